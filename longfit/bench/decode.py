"""`longfit bench decode|prefill|context`: decode and prefill throughput, against peers, in one run.

- ``decode``: decode tokens/s at each ``--batch-sizes`` (short random prompts of ``--depth`` tokens), plus prefill
  tokens/s at ``--prompt-tokens`` (what this command always printed).
- ``prefill``: prefill tokens/s at each ``--lengths`` (default 512 and 4k).
- ``context``: batch-1 decode tokens/s at each ``--depths`` (default 0, 2k, 8k tokens already in the cache).

Every command also prints each engine's peak resident memory and, for decode figures, the roofline fraction: bytes
read per decode step (weights in their compute form + the KV cache at the step's mean depth, for every sequence) ×
steps/s ÷ the memory read bandwidth this command measures, the median of samples before each figure and at the end
(``BandwidthSampler``, ``bench.calibrate.measure_bandwidth``).

``--peer llama.cpp`` / ``--peer transformers`` run the same figures on the same GGUF in their own processes
(``bench/peers.py``). For each figure every engine runs once as a warm-up, then ``--repeats`` times, alternating
engines (the order reversed every other round) so machine noise hits all of them alike; the figure is the median
(``--statistic best``: the fastest run, an estimate of the uncontended speed on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from longfit.bench.peers import (KV_TYPES, PEER_NAMES, PeerProcess, PeerSpec, PeerUnavailable, peak_rss_bytes,
                                 peer_importable, prompt_ids, random_ids)
from longfit.config import parse_tokens
from longfit.sampling_params import SamplingParams

if TYPE_CHECKING:
    from longfit.llm import LLM

_DEFAULTS = {"decode_batches": "1,4,16", "lengths": "512,4k", "depths": "0,2k,8k"}


# ---------------------------------------------------------------- longfit, in this process
def step_until_decoding(engine: Any) -> None:
    """Step ``engine`` until every request is admitted and decoding (its prompt done, its first token sampled)."""
    while any(r.is_prefilling or r.status.name == "WAITING" for r in engine.scheduler.requests.values()):
        engine.step()


class LongfitBackend:
    """longfit's engine driven step by step (the same calls as a PeerProcess)."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.kv_read: dict[str, float] = {}  # decode figure label → mean KV bytes the requests held while timed

    def info(self) -> dict[str, Any]:
        from longfit.quant.linear import Linear

        model = self.engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        inside = {id(b) for m in linears for b in m.buffers()}
        # Norm weights and other 1-D tensors are read every step too; the embedding table is not (one row a token).
        small = sum(t.numel() * t.element_size() for t in (*model.buffers(), *model.parameters())
                    if t.dim() == 1 and id(t) not in inside)
        forms: dict[str, int] = {}
        for m in linears:
            # packed layers say which kernels ran: longfit's C tiles or torch's packed kernels
            form = f"{m.form} ({m.layout})" if hasattr(m, "layout") else m.form
            forms[form] = forms.get(form, 0) + m.read_nbytes()
        spec = self.engine.kv_spec
        dense = f"dense {self.engine.config.runtime.dtype}"
        names = [dense if f == "dense" else f for f in sorted(forms, key=forms.get, reverse=True)]
        return {"name": "longfit", "weights": " + ".join(names),
                "weight_bytes": sum(forms.values()) + small, "kv_element_bytes": float(spec.dtype_bytes),
                "kv_read_bytes": dict(self.kv_read), "threads": _torch_threads(), "file": self.engine.model_path}

    def prefill(self, length: int, seed: int) -> float:
        self.engine.kv_manager.reset_prefix_cache()  # a cold cache: every run computes the whole prompt
        prompt = random_ids(seed, length, self.engine.model_config.vocab_size)
        started = time.perf_counter()
        self.llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        return length / (time.perf_counter() - started)

    def decode(self, batch: int, depth: int, tokens: int, seed: int) -> float:
        engine = self.engine
        if batch > engine.config.scheduler.max_num_seqs:
            raise ValueError(f"batch {batch} exceeds --max-num-seqs {engine.config.scheduler.max_num_seqs}")
        params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
        # Same prompts every run of a shape: the prefix cache keeps them, so only the decode is recomputed.
        for prompt in prompt_ids(seed, batch, depth, engine.model_config.vocab_size):
            engine.add_request(None, prompt, params)
        step_until_decoding(engine)  # then time pure decode steps
        produced = engine.stats["generation_tokens"]
        pool, held = engine.kv_manager.pool, []
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            held.append(pool.num_used_blocks)  # the pages this step reads (a compressed cache holds fewer)
            engine.step()
        elapsed = time.perf_counter() - started
        label = Figure("decode", batch=batch, depth=depth).label
        self.kv_read[label] = sum(held) / max(len(held), 1) * engine.kv_spec.page_bytes
        return (engine.stats["generation_tokens"] - produced) / elapsed

    def peak_rss(self) -> int:
        return peak_rss_bytes()

    def close(self) -> None:
        pass


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- the plan and the run
@dataclass(frozen=True, slots=True)
class Figure:
    """One measured quantity: ``kind`` "prefill" (``length``) or "decode" (``batch`` × ``depth``, ``tokens``)."""

    kind: str
    length: int = 0
    batch: int = 1
    depth: int = 0
    tokens: int = 0

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.length} tokens"
        return f"decode batch {self.batch}, depth {self.depth}"

    def context_needed(self) -> int:
        """KV tokens all sequences of this figure hold at once (what a peer's context must fit)."""
        if self.kind == "prefill":
            return self.length
        return self.batch * (max(self.depth, 1) + self.tokens + 2)


@dataclass(slots=True)
class EngineResult:
    name: str
    info: dict[str, Any]
    runs: dict[str, list[float]] = field(default_factory=dict)  # figure label → tokens/s of every measured run
    peak_rss_bytes: int = 0

    def value(self, figure: Figure, statistic: str = "median") -> float:
        """The figure's median (or fastest, ``statistic="best"``) run in tokens/s; NaN when it has none."""
        runs = self.runs.get(figure.label)
        if not runs:
            return math.nan
        return max(runs) if statistic == "best" else statistics.median(runs)


def parse_counts(text: str, flag: str) -> tuple[int, ...]:
    """``"0,2k,8k"`` → (0, 2048, 8192); zero is allowed (depth 0), negatives and junk are not."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            values.append(0 if part == "0" else parse_tokens(part, flag))
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated token counts such as 512,4k, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return tuple(values)


def build_plan(command: str, args: argparse.Namespace, max_context: int) -> list[Figure]:
    """The figures of ``command``; depths and lengths that would not fit ``max_context`` are cut to fit."""
    if args.repeats < 1 or args.decode_tokens < 1:
        raise ValueError("--repeats and --decode-tokens must be >= 1")
    room = max_context - args.decode_tokens - 2
    if command == "prefill":
        lengths = parse_counts(args.lengths, "--lengths")
        return [Figure("prefill", length=min(max(n, 1), max_context - 1)) for n in lengths]
    if command == "context":
        return [Figure("decode", batch=1, depth=min(d, room), tokens=args.decode_tokens)
                for d in parse_counts(args.depths, "--depths")]
    figures = [Figure("prefill", length=min(args.prompt_tokens, max_context - 1))] if args.prompt_tokens > 0 else []
    for batch in parse_counts(args.batch_sizes, "--batch-sizes"):
        if batch < 1:
            raise ValueError("--batch-sizes must be >= 1")
        figures.append(Figure("decode", batch=batch, depth=min(args.depth, room), tokens=args.decode_tokens))
    return figures


def measure(figures: list[Figure], engines: list[tuple[str, Any]], repeats: int, seed: int = 0,
            progress: bool = True,
            before_figure: Callable[[], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run every figure on every engine: one warm-up each, then ``repeats`` alternating rounds.

    A peer that fails (its process died, llama_decode refused) is dropped from ``engines`` with one line on stderr;
    the run goes on with the others. ``before_figure`` (if any) is called before each figure (a bandwidth sample).
    Returns engine name → figure label → the measured tokens/s of each run.
    """
    runs: dict[str, dict[str, list[float]]] = {name: {} for name, _ in engines}
    for index, figure in enumerate(figures):
        if before_figure is not None:
            before_figure()
        if progress:
            print(f"[{index + 1}/{len(figures)}] {figure.label} ...", file=sys.stderr, flush=True)
        for round_index in range(repeats + 1):
            order = engines if round_index % 2 == 0 else engines[::-1]
            for name, engine in list(order):
                try:
                    # Prefill prompts differ per run (a cold cache each time); decode prompts stay fixed per figure.
                    if figure.kind == "prefill":
                        rate = engine.prefill(figure.length, seed + round_index)
                    else:
                        rate = engine.decode(figure.batch, figure.depth, figure.tokens, seed)
                except PeerUnavailable as error:
                    print(f"longfit bench: peer dropped: {error}", file=sys.stderr)
                    engines[:] = [(n, e) for n, e in engines if n != name]
                    engine.close()
                    del runs[name]
                    continue
                if round_index:  # round 0 is the warm-up
                    runs[name].setdefault(figure.label, []).append(rate)
    return runs


class BandwidthSampler:
    """Read-bandwidth samples taken by the command itself: before each figure and once at the end. The roofline's
    denominator is their median, so that one sample in a fast or slow moment of a shared machine does not set it
    (single samples of this machine's 1-thread read spread over 19.5-27.4 GB/s within 30 s).

    A sample's buffer would count in this process's peak RSS, which the table reports: the peak before each sample
    is kept and the kernel's high-water mark reset after it (``/proc/self/clear_refs``, Linux). Where that reset is
    refused, only the final sample (after the peaks are read) is taken, as before.
    """

    def __init__(self, num_bytes: int, repeats: int = 3) -> None:
        self.num_bytes, self.repeats = num_bytes, repeats
        self.samples: list[float] = []
        self._peak = peak_rss_bytes()  # the load's peak counts: the reset below (a probe) would drop it
        self._can_reset = _reset_peak_rss()

    def _sample(self) -> None:
        import torch

        from longfit.bench.calibrate import measure_bandwidth

        with torch.inference_mode():
            self.samples.append(measure_bandwidth(self.num_bytes, self.repeats)["read_bytes_per_s"])

    def between(self) -> None:
        """A sample between figures (skipped where the peak RSS cannot be reset after it)."""
        if self._can_reset:
            self._peak = max(self._peak, peak_rss_bytes())
            self._sample()
            self._can_reset = _reset_peak_rss()

    def final(self) -> float:
        """The last sample (after every engine's peak RSS was read); returns the median of all."""
        self._sample()
        return statistics.median(self.samples)

    def peak_rss(self, current: int) -> int:
        """This process's peak RSS over the runs: ``current`` (VmHWM since the last reset) or an earlier peak."""
        return max(self._peak, current)


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def step_bytes(info: dict[str, Any], figure: Figure, kv_bytes_per_token_element: float,
               layer_windows: tuple[int | None, ...]) -> float:
    """Bytes one decode step reads: the weights once, plus each sequence's KV at the run's mean depth.

    ``kv_bytes_per_token_element`` is ``2 (K and V) · num_kv_heads · head_dim`` per layer; the engine's element
    size (``info["kv_element_bytes"]``) multiplies it. Sliding-window layers read at most their window. Where the
    engine measured the KV its requests held during the figure's run (``info["kv_read_bytes"]``: longfit, whose
    compressed caches hold and read fewer bytes than the full cache), that replaces the estimate.
    """
    measured = info.get("kv_read_bytes", {}).get(figure.label)
    if measured is not None:
        return info["weight_bytes"] + measured
    mean_depth = max(figure.depth, 1) + (figure.tokens + 1) / 2
    kv_tokens = sum(mean_depth if w is None else min(mean_depth, w) for w in layer_windows)
    return info["weight_bytes"] + figure.batch * kv_tokens * kv_bytes_per_token_element * info["kv_element_bytes"]


# ---------------------------------------------------------------- report
def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def render(command: str, results: list[EngineResult], figures: list[Figure], bandwidth: float,
           kv_elements: float, layer_windows: tuple[int | None, ...], header: list[str],
           statistic: str = "median", bandwidth_samples: Sequence[float] = ()) -> list[str]:
    """The side-by-side table: each peer's column is followed by the ratio longfit / peer."""
    peers = results[1:]
    columns = ["longfit"] + [c for p in peers for c in (p.name, "ratio")]
    width = max(24, *(len(f.label) + 8 for f in figures))
    lines = list(header)
    lines.append(f"{'figure':<{width}}" + "".join(f"{c:>16}" for c in columns))

    def row(label: str, values: list[float], fmt: str, ratios: bool = True) -> None:
        cells = [_cell(values[0], fmt)]
        for value in values[1:]:
            ratio = values[0] / value if ratios and value and not math.isnan(value) else math.nan
            cells += [_cell(value, fmt), _cell(ratio, ".2f") + ("x" if not math.isnan(ratio) else "")]
        lines.append(f"{label:<{width}}" + "".join(f"{c:>16}" for c in cells))

    for figure in figures:
        rates = [r.value(figure, statistic) for r in results]
        row(f"{figure.label}, tok/s", rates, ".1f")
        if figure.kind == "decode":
            fractions = [step_bytes(r.info, figure, kv_elements, layer_windows) * rate / figure.batch / bandwidth
                         for r, rate in zip(results, rates)]
            row("  % of roofline", [100 * f for f in fractions], ".1f", ratios=False)
    row("peak RSS MiB", [r.peak_rss_bytes / 2**20 for r in results], ".0f")
    row("weights read/step MiB", [r.info["weight_bytes"] / 2**20 for r in results], ".1f")
    lines.append("weights: " + "; ".join(f"{r.name} {r.info['weights']}" for r in results))
    roofline = ("; % of roofline = bytes read per step (weights + KV at the mean depth) x steps/s / bandwidth"
                if any(f.kind == "decode" for f in figures) else "")
    measured = "measured by this command"
    if len(bandwidth_samples) > 1:
        measured = (f"median of {len(bandwidth_samples)} samples taken by this command before each figure and at the "
                    f"end, {min(bandwidth_samples) / 1e9:.1f}-{max(bandwidth_samples) / 1e9:.1f} GB/s")
    lines.append(f"memory read bandwidth {bandwidth / 1e9:.2f} GB/s ({measured}){roofline}")
    if not peers:
        lines.append("(no peer: add --peer llama.cpp and/or --peer transformers for ratios)")
    return lines


# ---------------------------------------------------------------- command
def add_micro_bench_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Flags of ``bench decode|prefill|context`` (engine flags are added by the CLI)."""
    group = parser.add_argument_group("measurement")
    if command == "decode":
        group.add_argument("--batch-sizes", default=_DEFAULTS["decode_batches"], help="comma-separated batch sizes")
        group.add_argument("--prompt-tokens", type=int, default=512, help="prefill figure length (0: none)")
        group.add_argument("--depth", type=int, default=16, help="prompt tokens of each decoding sequence")
    elif command == "prefill":
        group.add_argument("--lengths", default=_DEFAULTS["lengths"], help="prompt lengths, e.g. 512,4k")
    else:
        group.add_argument("--depths", default=_DEFAULTS["depths"],
                           help="tokens in the cache before decoding, e.g. 0,2k,8k (cut to the context)")
    group.add_argument("--decode-tokens", type=int, default=64, help="timed decode steps per run")
    group.add_argument("--repeats", type=int, default=3, help="measured runs per figure and engine")
    group.add_argument("--statistic", choices=("median", "best"), default="median",
                       help="figure of the runs: median, or best (fastest; for a machine shared with other work)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    group.add_argument("--bandwidth-mib", type=int, default=512, help="buffer of the bandwidth measurement")
    group.add_argument("--json", default=None, help="also write every run to this JSON file")
    group.add_argument("--no-progress", action="store_true", help="no per-figure progress lines on stderr")
    peer = parser.add_argument_group("peers")
    peer.add_argument("--peer", action="append", choices=PEER_NAMES, default=[],
                      help="also measure this engine on the same GGUF (repeatable)")
    peer.add_argument("--peer-kv", default="f16", help=f"llama.cpp KV types, comma-separated: {','.join(KV_TYPES)}")
    peer.add_argument("--peer-threads", type=int, default=None, help="peer threads (default: longfit's)")


def _start_peers(args: argparse.Namespace, llm: LLM, figures: list[Figure], threads: int) -> list[PeerProcess]:
    kv_types = [k.strip() for k in args.peer_kv.split(",") if k.strip()]
    specs = []
    n_ctx = max(f.context_needed() for f in figures) + 64
    n_seq = max(f.batch for f in figures)
    for kind in dict.fromkeys(args.peer):
        for kv in (kv_types if kind == "llama.cpp" else ["f16"]):
            specs.append(PeerSpec(kind, llm.engine.model_path if str(llm.engine.model_path).endswith(".gguf") else "",
                                  args.peer_threads or threads, llm.engine.config.runtime.weights, kv,
                                  n_ctx=-(-n_ctx // 256) * 256, n_seq_max=n_seq))
    peers = []
    for spec in specs:
        if not peer_importable(spec.kind):
            print(f"longfit bench: peer {spec.label} skipped: not installed", file=sys.stderr)
            continue
        try:
            peers.append(PeerProcess(spec))
        except PeerUnavailable as error:
            print(f"longfit bench: peer skipped: {error}", file=sys.stderr)
    return peers


def run_micro_bench(args: argparse.Namespace, llm: LLM, command: str) -> int:
    """Measure, print the table (and JSON); returns the exit status."""
    if args.bandwidth_mib < 1:
        raise ValueError("--bandwidth-mib must be >= 1")
    config = llm.engine.model_config
    figures = build_plan(command, args, llm.engine.max_model_len)
    threads = _torch_threads()
    ours = LongfitBackend(llm)
    peers = _start_peers(args, llm, figures, threads) if args.peer else []
    engines: list[tuple[str, Any]] = [("longfit", ours)] + [(p.spec.label, p) for p in peers]
    sampler = BandwidthSampler(args.bandwidth_mib << 20)
    try:
        runs = measure(figures, engines, args.repeats, args.seed, progress=not args.no_progress,
                       before_figure=sampler.between)
        results = [EngineResult(name, engine.info(), runs[name],
                                sampler.peak_rss(engine.peak_rss()) if engine is ours else engine.peak_rss())
                   for name, engine in engines]
    except PeerUnavailable as error:  # a peer died after its measurements: one line, as any CLI error
        raise ValueError(str(error)) from None
    finally:
        for _, engine in engines:
            engine.close()
    bandwidth = sampler.final()  # after the peaks were read: its buffer would count in longfit's
    kv_elements = 2 * config.num_kv_heads * config.head_dim
    windows = tuple(config.layer_window(i) for i in range(config.num_layers))
    engine_config = llm.engine.config
    header = [f"longfit bench {command}: model {engine_config.model} ({os.path.basename(str(llm.engine.model_path))}), "
              f"--weights {engine_config.runtime.weights}, {threads} threads, {args.statistic} of {args.repeats} "
              f"runs after a warm-up, engines alternated, {args.decode_tokens} decode steps per run",
              f"load: {os.getloadavg()[0]:.2f} (1-min load average at the end; the machine may be shared)"]
    print("\n".join(render(command, results, figures, bandwidth, kv_elements, windows, header, args.statistic,
                           sampler.samples)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": command, "bandwidth_bytes_per_s": bandwidth,
                       "bandwidth_samples_bytes_per_s": sampler.samples,
                       "figures": [asdict(f) | {"label": f.label} for f in figures],
                       "engines": [asdict(r) for r in results]}, handle, indent=2)
    return 0
