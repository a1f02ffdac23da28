"""`longfit bench serve`: a load generator for any OpenAI-compatible server (longfit, vLLM, llama.cpp ...).

It streams completions at a fixed concurrency or with Poisson arrivals (or both: a rate capped by a
concurrency), with prompt and output lengths drawn from fixed values or uniform ranges, optionally behind
shared prefixes, and reports TTFT, TPOT, ITL (p50/p90/p99), request and output-token throughput.
``--peer llama-server`` starts llama.cpp's ``llama-server`` (built by ``scripts/build_peers.sh``) with
``--parallel N -cb`` on a GGUF file; ``--peer llama.cpp`` starts ``python -m llama_cpp.server`` (llama-cpp-python,
which serves one request at a time); ``--peer-url`` uses a peer already running. The same workload runs against
both, in the same run, ``--rounds`` times with the order alternating, and the ratios of the medians are printed.

Lengths are in words of a fixed English vocabulary (most are one token in BPE vocabularies); the token
counts in the report come from the server's ``usage`` when it sends one, else from the number of chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his",
          "her", "an", "be", "this", "are", "which", "or", "had", "not", "it", "have", "one", "but", "were", "all",
          "they", "their", "been", "has", "more", "when", "who", "will", "no", "if", "out", "so", "said", "what",
          "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "time", "could",
          "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man",
          "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through", "back", "years",
          "where", "much", "your", "way", "well", "down", "should", "because", "each", "just", "those", "people",
          "how", "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work",
          "long", "get", "here", "between", "both", "life", "being", "under", "never", "day", "same", "another",
          "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since", "against", "go",
          "came", "right", "used", "take", "three")
PEERS = ("llama.cpp", "llama-server")
PEER_MISSING = ("--peer llama.cpp needs llama-cpp-python, which is not installed: `pip install llama-cpp-python` (it "
                "compiles llama.cpp, several minutes), or start a llama.cpp server yourself (e.g. llama-server -m "
                "MODEL.gguf --parallel 16) and pass --peer-url http://HOST:PORT/v1")


class PeerUnavailable(RuntimeError):
    """The peer server cannot be started here (package missing, bad GGUF path, it exited)."""


# ---------------------------------------------------------------- workload
@dataclass(frozen=True, slots=True)
class LengthDist:
    """A length: fixed (``"256"``) or uniform over ``[low, high]`` (``"128:512"``)."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str, field_name: str) -> LengthDist:
        parts = text.split(":")
        try:
            low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (-1, -1)
        except ValueError:
            low, high = -1, -1
        if low < 0 or high < low:
            raise ValueError(f"{field_name} must be N or LOW:HIGH with 0 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(slots=True)
class RequestSpec:
    prompt: str
    max_tokens: int


def build_workload(num_requests: int, prompt_len: LengthDist, output_len: LengthDist, shared_prefix_len: int = 0,
                   num_prefixes: int = 1, seed: int = 0) -> list[RequestSpec]:
    """Random-word prompts; request ``i`` starts with shared prefix ``i % num_prefixes`` when one is asked."""
    if num_requests <= 0:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if shared_prefix_len < 0 or num_prefixes <= 0:
        raise ValueError("shared_prefix_len must be >= 0 and num_prefixes >= 1")
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choices(_WORDS, k=shared_prefix_len)) for _ in range(num_prefixes)]
    specs = []
    for index in range(num_requests):
        body = " ".join(rng.choices(_WORDS, k=max(1, prompt_len.sample(rng))))
        prefix = prefixes[index % num_prefixes]
        specs.append(RequestSpec(f"{prefix} {body}" if prefix else body, max(1, output_len.sample(rng))))
    return specs


def for_round(specs: list[RequestSpec], index: int) -> list[RequestSpec]:
    """The workload of round ``index`` (0-based): every prompt starts with the round's own tag. Servers cache prompts
    they have seen (longfit's prefix cache; llama-server's slots and RAM prompt cache): with the same prompts in
    every round, rounds after the first would measure cache hits. Sharing within a round is kept (one tag)."""
    return [RequestSpec(f"Round {index + 1}. {spec.prompt}", spec.max_tokens) for spec in specs]


def arrival_offsets(num_requests: int, request_rate: float, rng: random.Random) -> list[float]:
    """Send times (s after start) of a Poisson process of ``request_rate`` req/s; all zero when infinite."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be > 0 (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    offsets, now = [], 0.0
    for _ in range(num_requests):
        offsets.append(now)
        now += rng.expovariate(request_rate)
    return offsets


# ---------------------------------------------------------------- measurement
@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it. Times in seconds; ``chunk_times`` are offsets from the send time."""

    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


@dataclass(slots=True)
class Summary:
    """Aggregate of one run: throughput and latency percentiles (milliseconds)."""

    label: str
    num_ok: int
    num_failed: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    output_tokens: int
    latency_ms: dict[str, dict[str, float]]  # metric -> {"mean", "p50", "p90", "p99"}

    def row(self) -> str:
        stats = self.latency_ms
        fmt = lambda m: "/".join(f"{stats[m][k]:.0f}" for k in ("p50", "p90", "p99"))
        return (f"{self.label:<16} {self.num_ok:>5} {self.num_failed:>6} {self.duration_s:>8.1f} "
                f"{self.request_throughput:>7.2f} {self.output_throughput:>9.1f} {fmt('ttft'):>17} "
                f"{fmt('tpot'):>14} {fmt('itl'):>14} {fmt('e2e'):>17}")


HEADER = (f"{'target':<16} {'ok':>5} {'failed':>6} {'time_s':>8} {'req/s':>7} {'out_tok/s':>9} "
          f"{'TTFT ms p50/90/99':>17} {'TPOT p50/90/99':>14} {'ITL p50/90/99':>14} {'E2E ms p50/90/99':>17}")


def summarize(label: str, records: list[RequestRecord], duration_s: float) -> Summary:
    ok = [r for r in records if r.ok]
    duration = max(duration_s, 1e-9)
    samples = {"ttft": [r.ttft for r in ok if r.ttft is not None],
               "tpot": [t for r in ok if (t := r.tpot) is not None],
               "itl": [gap for r in ok for gap in r.itls],
               "e2e": [r.latency for r in ok]}
    latency = {name: {"mean": 1000 * sum(v) / len(v) if v else math.nan,
                      **{f"p{q}": 1000 * percentile(v, q) for q in (50, 90, 99)}} for name, v in samples.items()}
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return Summary(label, len(ok), len(records) - len(ok), duration_s, len(ok) / duration, output_tokens / duration,
                   (prompt_tokens + output_tokens) / duration, prompt_tokens, output_tokens, latency)


# ---------------------------------------------------------------- the client
async def send_one(client: Any, model: str, spec: RequestSpec, endpoint: str = "completions",
                   ignore_eos: bool = True, temperature: float = 0.0) -> RequestRecord:
    """Stream one request over SSE; record when each content chunk arrived."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:  # vLLM's and longfit's extension; servers without it stop at EOS (counted from usage)
        body["ignore_eos"] = True
    path = "chat/completions" if endpoint == "chat" else "completions"
    record = RequestRecord(ok=False)
    started = time.perf_counter()
    num_chunks = 0
    usage = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"])[:200]
                    return record
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if text:
                        now = time.perf_counter() - started
                        record.chunk_times.append(now)
                        num_chunks += 1
                        if record.ttft is None:
                            record.ttft = now
    except Exception as error:  # noqa: BLE001 - a failed request is a data point, not a crash of the run
        record.error = f"{type(error).__name__}: {error}"[:200]
        return record
    record.latency = time.perf_counter() - started
    record.prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else 0
    record.output_tokens = int(usage.get("completion_tokens", num_chunks)) if usage else num_chunks
    record.ok = record.ttft is not None
    if not record.ok:
        record.error = "no content was streamed"
    return record


async def run_load(client: Any, model: str, specs: list[RequestSpec], concurrency: int, request_rate: float,
                   seed: int = 0, endpoint: str = "completions", ignore_eos: bool = True, temperature: float = 0.0,
                   progress: Any = None) -> tuple[list[RequestRecord], float]:
    """Send every spec (Poisson arrivals at ``request_rate``, at most ``concurrency`` in flight).

    Returns the records in spec order and the wall time from the first send to the last answer.
    """
    if concurrency <= 0:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    offsets = arrival_offsets(len(specs), request_rate, random.Random(seed + 1))
    gate = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one(spec: RequestSpec, offset: float) -> RequestRecord:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with gate:
            record = await send_one(client, model, spec, endpoint, ignore_eos, temperature)
        if progress is not None:
            progress.update(1)
        return record

    records = await asyncio.gather(*(one(spec, offset) for spec, offset in zip(specs, offsets)))
    return list(records), time.perf_counter() - start


async def _bench_target(label: str, base_url: str, model: str | None, api_key: str | None, warm: list[RequestSpec],
                        specs: list[RequestSpec], args: argparse.Namespace) -> Summary:
    import httpx
    from tqdm import tqdm

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        if model is None:
            listing = (await client.get("models")).json()
            model = listing["data"][0]["id"]
        if warm:
            await run_load(client, model, warm, args.concurrency, math.inf, args.seed, args.endpoint, args.ignore_eos,
                           args.temperature)
        with tqdm(total=len(specs), desc=label, unit="req", disable=args.no_progress, file=sys.stderr) as bar:
            records, duration = await run_load(client, model, specs, args.concurrency, args.request_rate, args.seed,
                                               args.endpoint, args.ignore_eos, args.temperature, bar)
    errors = [r.error for r in records if not r.ok]
    if errors:
        print(f"{label}: {len(errors)} failed requests; first error: {errors[0]}", file=sys.stderr)
    return summarize(label, records, duration)


# ---------------------------------------------------------------- the llama.cpp peer
def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def start_llama_cpp_peer(gguf: str | None, port: int, context: int, threads: int | None, extra: list[str],
                         startup_timeout: float = 300.0) -> subprocess.Popen[bytes]:
    """Start ``python -m llama_cpp.server`` on ``gguf`` and wait until it answers ``/v1/models``.

    Raises:
        PeerUnavailable: llama-cpp-python is not installed, the GGUF is missing, or the server exited.
    """
    if not llama_cpp_available():
        raise PeerUnavailable(PEER_MISSING)
    if not gguf or not os.path.isfile(gguf):
        raise PeerUnavailable(f"--peer-model must be the GGUF file both servers load, got {gguf!r}")
    # NOTE: llama_cpp.server runs one request at a time behind a lock, and by default a new request interrupts
    # the one streaming (interrupt_requests): under concurrent load that would cut streams short.
    command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(context), "--interrupt_requests", "False"]
    command += (["--n_threads", str(threads)] if threads else []) + extra
    return _wait_until_serving(command, port, "llama_cpp.server", startup_timeout)


def default_llama_server() -> str:
    """``$LONGFIT_PEERS_DIR/bin/llama-server`` (scripts/build_peers.sh puts it there), else the one on PATH."""
    import shutil

    directory = os.environ.get("LONGFIT_PEERS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "longfit",
                                                                    "peers")
    built = os.path.join(directory, "bin", "llama-server")
    return built if os.path.isfile(built) else (shutil.which("llama-server") or built)


def start_llama_server(binary: str, gguf: str | None, port: int, parallel: int, context: int, threads: int | None,
                       extra: list[str], startup_timeout: float = 300.0) -> subprocess.Popen[bytes]:
    """Start ``llama-server --parallel N -cb`` (continuous batching over N slots) and wait for ``/v1/models``.

    ``context`` is per slot: the server gets ``-c parallel * context`` (llama-server splits ``-c`` over its slots).

    Raises:
        PeerUnavailable: the binary or the GGUF is missing, or the server exited.
    """
    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        raise PeerUnavailable(f"llama-server not found at {binary}: build it with scripts/build_peers.sh or pass "
                              f"--peer-binary")
    if not gguf or not os.path.isfile(gguf):
        raise PeerUnavailable(f"--peer-model must be the GGUF file both servers load, got {gguf!r}")
    command = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel), "-cb",
               "-c", str(parallel * context)] + (["-t", str(threads), "-tb", str(threads)] if threads else []) + extra
    return _wait_until_serving(command, port, "llama-server", startup_timeout)


def _wait_until_serving(command: list[str], port: int, name: str, startup_timeout: float) -> subprocess.Popen[bytes]:
    """Start ``command`` and wait until it answers ``/v1/models``.

    Its output goes to a log file, not a pipe: a server logging every request would block once a pipe nobody reads
    is full. The log's tail is quoted when the server exits early.
    """
    import tempfile

    import httpx

    log = tempfile.NamedTemporaryFile(prefix=f"longfit-peer-{name}-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log.name, errors="replace") as handle:
                tail = handle.read()[-500:]
            raise PeerUnavailable(f"{name} exited with status {process.returncode} (log {log.name}): {tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                process.log_path = log.name  # type: ignore[attr-defined]  # stop_process removes it
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(process)
    raise PeerUnavailable(f"{name} did not answer within {startup_timeout:.0f} s (log {log.name})")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log_path = getattr(process, "log_path", None)
    if log_path:
        with contextlib.suppress(OSError):
            os.unlink(log_path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- CLI
def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL")
    target.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    target.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key ($OPENAI_API_KEY)")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions", help="API to load")
    load = parser.add_argument_group("workload")
    load.add_argument("--num-requests", type=int, default=64, help="requests to send")
    load.add_argument("--concurrency", type=int, default=16, help="most requests in flight (users)")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Poisson arrival rate in req/s (default inf: as fast as --concurrency allows)")
    load.add_argument("--prompt-len", default="256", help="prompt words: N or LOW:HIGH (uniform)")
    load.add_argument("--output-len", default="128", help="max_tokens: N or LOW:HIGH (uniform)")
    load.add_argument("--shared-prefix-len", type=int, default=0, help="words of a prefix shared by requests")
    load.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes (request i uses i %% K)")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="ask the server to generate exactly max_tokens (vLLM/longfit extension)")
    load.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before the run")
    load.add_argument("--seed", type=int, default=0, help="workload seed")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    load.add_argument("--json", default=None, help="also write the summaries to this JSON file")
    peer = parser.add_argument_group("peer")
    target.add_argument("--target-label", default="target", help="name of --base-url in the table (e.g. longfit)")
    load.add_argument("--rounds", type=int, default=1,
                      help="run the workload this many times per server, alternating servers; medians are compared")
    peer.add_argument("--peer", choices=PEERS, default=None,
                      help="run the same workload against this server too: llama-server (llama.cpp, --parallel "
                           "slots, continuous batching) or llama.cpp (llama-cpp-python's one-at-a-time server)")
    peer.add_argument("--peer-model", default=None, help="GGUF file the peer loads (the one longfit serves)")
    peer.add_argument("--peer-url", default=None, help="use an already running peer at this base URL instead")
    peer.add_argument("--peer-context", type=int, default=4096,
                      help="peer context per sequence (llama-server gets -c parallel x this)")
    peer.add_argument("--peer-parallel", type=int, default=None, help="llama-server slots (default: --concurrency)")
    peer.add_argument("--peer-binary", default=None, help="llama-server binary (default: scripts/build_peers.sh's)")
    peer.add_argument("--peer-threads", type=int, default=None, help="peer threads (default: its own)")
    peer.add_argument("--peer-args", default="", help="extra peer server flags, one string")


def median_summary(label: str, runs: list[Summary]) -> Summary:
    """Element-wise median of several rounds' summaries (counts are summed)."""
    med = lambda values: statistics.median(values) if values else math.nan
    latency = {metric: {key: med([r.latency_ms[metric][key] for r in runs]) for key in runs[0].latency_ms[metric]}
               for metric in runs[0].latency_ms}
    return Summary(label, sum(r.num_ok for r in runs), sum(r.num_failed for r in runs),
                   med([r.duration_s for r in runs]), med([r.request_throughput for r in runs]),
                   med([r.output_throughput for r in runs]), med([r.total_token_throughput for r in runs]),
                   sum(r.prompt_tokens for r in runs), sum(r.output_tokens for r in runs), latency)


def _start_peer(args: argparse.Namespace) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The peer's base URL, and its process when this run started it."""
    if args.peer_url is not None:
        return args.peer_url, None
    port = _free_port()
    if args.peer == "llama-server":
        process = start_llama_server(args.peer_binary or default_llama_server(), args.peer_model, port,
                                     args.peer_parallel or args.concurrency, args.peer_context, args.peer_threads,
                                     args.peer_args.split())
    else:
        process = start_llama_cpp_peer(args.peer_model, port, args.peer_context, args.peer_threads,
                                       args.peer_args.split())
    return f"http://127.0.0.1:{port}/v1", process


def run_bench_serve(args: argparse.Namespace) -> int:
    """Run the workload against --base-url (and the peer), ``--rounds`` times alternating; print one table."""
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    specs = build_workload(args.num_requests + args.warmup, LengthDist.parse(args.prompt_len, "--prompt-len"),
                           LengthDist.parse(args.output_len, "--output-len"), args.shared_prefix_len,
                           args.num_prefixes, args.seed)
    warm, measured = specs[:args.warmup], specs[args.warmup:]
    if args.peer == "llama.cpp" and args.peer_url is None and not llama_cpp_available():
        # NOTE: checked before the target run, so nobody waits a whole benchmark to learn this.
        print(f"longfit bench serve: {PEER_MISSING}", file=sys.stderr)
        return 2
    label = args.target_label
    targets = [(label, args.base_url, args.model, args.api_key)]
    rounds: dict[str, list[Summary]] = {label: []}
    process = None
    try:
        if args.peer is not None:
            peer_url, process = _start_peer(args)
            targets.append((args.peer, peer_url, None, None))
            rounds[args.peer] = []
        for index in range(args.rounds):
            round_warm, round_measured = for_round(warm, index), for_round(measured, index)
            for name, url, model, key in (targets if index % 2 == 0 else targets[::-1]):
                summary = asyncio.run(_bench_target(name, url, model, key, round_warm, round_measured, args))
                summary.label = f"{name} #{index + 1}" if args.rounds > 1 else name
                rounds[name].append(summary)
    except PeerUnavailable as error:
        print(f"longfit bench serve: {error}", file=sys.stderr)
        print("\n".join([HEADER] + [s.row() for runs in rounds.values() for s in runs]))
        return 2
    finally:
        if process is not None:
            stop_process(process)
    summaries = [runs[0] if args.rounds == 1 else median_summary(f"{name} med", runs) for name, runs in rounds.items()]
    print(f"workload: {args.num_requests} requests, concurrency {args.concurrency}, rate {args.request_rate} req/s, "
          f"prompt {args.prompt_len} words, output {args.output_len} tokens, shared prefix {args.shared_prefix_len} "
          f"words x {args.num_prefixes}; {args.rounds} round(s), servers alternated")
    rows = [s.row() for runs in rounds.values() for s in runs] if args.rounds > 1 else []
    print("\n".join([HEADER] + rows + [s.row() for s in summaries]))
    if len(summaries) == 2:
        ours, theirs = summaries
        ratio = lambda a, b: a / b if b else math.nan
        print(f"ratio {label}/{args.peer}: output tok/s x{ratio(ours.output_throughput, theirs.output_throughput):.2f}"
              f", TPOT p50 x{ratio(ours.latency_ms['tpot']['p50'], theirs.latency_ms['tpot']['p50']):.2f}, "
              f"TTFT p50 x{ratio(ours.latency_ms['ttft']['p50'], theirs.latency_ms['ttft']['p50']):.2f}"
              + (" (medians of the rounds)" if args.rounds > 1 else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"summaries": [asdict(s) for s in summaries],
                       "rounds": {name: [asdict(s) for s in runs] for name, runs in rounds.items()}}, handle, indent=2)
    return 0 if all(s.num_failed == 0 for s in summaries) else 1
