"""Peer engines for `longfit bench decode|prefill|context`: llama.cpp (llama-cpp-python) and HF transformers.

Each peer runs in its own spawned process, so its thread pool, its allocator and its peak resident memory are its
own, and neither library is imported by longfit itself (transformers and llama-cpp-python are bench-only
dependencies). The parent drives a peer through :class:`PeerProcess` with the same calls it makes on longfit's
backend (``info``, ``prefill``, ``decode``, ``peak_rss``); only one engine computes at a time.

Measurement conventions, identical for every engine:
- prompts are random token ids (no tokenizer cost); generation is greedy and never stops early;
- ``prefill(length)``: an empty cache, one prompt of ``length`` tokens, logits of the last token only → tokens/s;
- ``decode(batch, depth, tokens)``: ``batch`` prompts of ``max(depth, 1)`` tokens are prefilled (untimed; the cache
  is kept between runs of the same shape and cut back to the prompt), the first token comes from the prefill, then
  ``tokens`` steps of one token per sequence are timed → aggregate generated tokens/s.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

PEER_NAMES = ("llama.cpp", "transformers")
KV_TYPES = {"f16": 2.0, "q8_0": 34 / 32}  # bytes per KV element as llama.cpp stores them
_PEER_MODULES = {"llama.cpp": "llama_cpp", "transformers": "transformers"}
# llama.cpp file types for the weight form longfit computes in (`--weights`); None keeps the file as it is.
_LLAMA_FTYPES = {"bf16": ("BF16", 32), "int8": ("Q8_0", 7), "int4": ("Q4_1", 3)}
_GGUF_FILE_TYPES = {32: "BF16", 7: "Q8_0", 3: "Q4_1", 2: "Q4_0"}


class PeerUnavailable(RuntimeError):
    """A peer cannot run here: package missing, no GGUF to load, or its process failed."""


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """What one peer process runs.

    Attributes:
        kind: "llama.cpp" or "transformers".
        gguf: the GGUF file longfit loads (the peer converts it when ``weights`` asks for another type).
        threads: compute threads (longfit's torch threads, so every engine gets the same cores).
        weights: longfit's ``--weights`` value; llama.cpp loads the matching type, transformers always bf16.
        kv_type: llama.cpp KV cache type, "f16" or "q8_0" (ignored by transformers, whose cache is bf16).
        n_ctx: context the llama.cpp cache must hold (all sequences of the largest batch together).
        n_seq_max: most sequences decoded together.
        cache_dir: where converted GGUF files are kept.
    """

    kind: str
    gguf: str
    threads: int
    weights: str = "auto"
    kv_type: str = "f16"
    n_ctx: int = 4096
    n_seq_max: int = 1
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.kind not in PEER_NAMES:
            raise ValueError(f"peer must be one of {PEER_NAMES}, got {self.kind!r}")
        if self.kv_type not in KV_TYPES:
            raise ValueError(f"peer KV type must be one of {tuple(KV_TYPES)}, got {self.kv_type!r}")
        if self.threads <= 0 or self.n_ctx <= 0 or self.n_seq_max <= 0:
            raise ValueError("peer threads, n_ctx and n_seq_max must be positive")

    @property
    def label(self) -> str:
        if self.kind == "llama.cpp":
            return "llama.cpp" if self.kv_type == "f16" else f"llama.cpp kv {self.kv_type}"
        return "transformers"


def peer_importable(kind: str) -> bool:
    return importlib.util.find_spec(_PEER_MODULES[kind]) is not None


# ---------------------------------------------------------------- parent side
class PeerProcess:
    """A peer engine in its own process; ``call(op, *args)`` runs one operation there and returns its result.

    The child is ``python -m longfit.bench.peers`` (not multiprocessing's spawn, which would re-import the parent's
    ``__main__``, the CLI, and with it torch: a llama.cpp peer would then carry torch's memory in its peak RSS).
    Messages travel over a socket pair, so nothing the libraries print can corrupt them.
    """

    def __init__(self, spec: PeerSpec, load_timeout: float = 900.0, call_timeout: float = 3600.0) -> None:
        if not peer_importable(spec.kind):
            package = "llama-cpp-python (scripts/build_peers.sh)" if spec.kind == "llama.cpp" else "transformers gguf"
            raise PeerUnavailable(f"{spec.label}: not installed (pip install {package})")
        if not spec.gguf or not os.path.isfile(spec.gguf):
            raise PeerUnavailable(f"{spec.label}: needs a GGUF file (the model is {spec.gguf or 'not a GGUF'!r})")
        self.spec = spec
        self.call_timeout = call_timeout
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "longfit.bench.peers", str(theirs.fileno()), json.dumps(asdict(spec))],
                pass_fds=(theirs.fileno(),), stdout=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())
        self.info_data: dict[str, Any] = self._receive(load_timeout)

    def _receive(self, timeout: float) -> Any:
        try:
            if not self._conn.poll(timeout):
                self.close()
                raise PeerUnavailable(f"{self.spec.label}: no answer within {timeout:.0f} s")
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise PeerUnavailable(f"{self.spec.label}: its process exited "
                                  f"(status {self._process.poll()})") from None
        if status != "ok":
            self.close()
            raise PeerUnavailable(f"{self.spec.label}: {value}")
        return value

    def info(self) -> dict[str, Any]:
        return self.info_data

    def call(self, op: str, *args: Any) -> Any:
        try:
            self._conn.send((op, args))
        except (BrokenPipeError, OSError):
            raise PeerUnavailable(f"{self.spec.label}: its process exited") from None
        return self._receive(self.call_timeout)

    def prefill(self, length: int, seed: int) -> float:
        return self.call("prefill", length, seed)

    def decode(self, batch: int, depth: int, tokens: int, seed: int) -> float:
        return self.call("decode", batch, depth, tokens, seed)

    def peak_rss(self) -> int:
        return self.call("peak_rss")

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._conn.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._conn.close()


# ---------------------------------------------------------------- child side
def _worker_main(conn: Any, spec: PeerSpec) -> None:
    """Load the peer, answer ``(op, args)`` messages with ``("ok", value)`` or ``("error", "one line")``."""
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        backend: Any = (LlamaCppBackend if spec.kind == "llama.cpp" else TransformersBackend)(spec)
        conn.send(("ok", backend.info()))
    except Exception as error:  # noqa: BLE001 - reported to the parent as one line
        conn.send(("error", f"{type(error).__name__}: {error}"[:500]))
        return
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            return
        try:
            conn.send(("ok", getattr(backend, op)(*args)))
        except Exception as error:  # noqa: BLE001
            conn.send(("error", f"{op} failed: {type(error).__name__}: {error}"[:500]))


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM`` of /proc/self/status.

    NOTE: not ``ru_maxrss``, which Linux carries over fork and exec: a peer process would report the larger
    peak of the bench process that started it.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other systems: KiB on Linux, close enough


def gguf_weight_bytes(path: str) -> int:
    """Bytes of the tensors a decode step reads: every tensor, except the token embedding when a separate output
    matrix exists (then only one embedding row per token is read)."""
    from longfit.models.model_config import read_gguf

    tensors = read_gguf(path).tensors
    skip = {"token_embd.weight"} if "output.weight" in tensors else set()
    return sum(info.num_bytes for name, info in tensors.items() if name not in skip)


def random_ids(seed: int, count: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab - 1) for _ in range(count)]


def prompt_ids(seed: int, batch: int, depth: int, vocab: int) -> list[list[int]]:
    """The ``batch`` prompts of a decode shape (``max(depth, 1)`` tokens each); every engine draws the same ones."""
    return [random_ids(seed * 1_000_003 + 7919 * index + depth, max(depth, 1), vocab) for index in range(batch)]


class LlamaCppBackend:
    """llama.cpp through llama-cpp-python's C API: flash attention on, one unified KV pool for all sequences."""

    def __init__(self, spec: PeerSpec) -> None:
        import ctypes

        import llama_cpp as lc
        import numpy as np

        self.spec, self.lc, self.np, self.ctypes = spec, lc, np, ctypes
        lc.llama_backend_init()
        self._log_sink = lc.llama_log_callback(lambda level, text, data: None)  # keep a reference: C holds it
        lc.llama_log_set(self._log_sink, ctypes.c_void_p(0))
        self.path = self._matching_file(spec)
        model_params = lc.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(self.path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        params = lc.llama_context_default_params()
        params.n_ctx = spec.n_ctx
        params.n_batch = min(2048, spec.n_ctx)
        params.n_ubatch = min(512, spec.n_ctx)
        params.n_seq_max = spec.n_seq_max
        params.n_threads = params.n_threads_batch = spec.threads
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        kv = lc.GGML_TYPE_F16 if spec.kv_type == "f16" else lc.GGML_TYPE_Q8_0
        params.type_k = params.type_v = kv
        params.kv_unified = True  # one pool: any sequence may use the whole n_ctx, as llama-server -cb does
        params.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {spec.n_ctx} tokens")
        self.n_batch = params.n_batch
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(max(self.n_batch, spec.n_seq_max), 0, spec.n_seq_max)
        self._shape: tuple[int, int, int] | None = None
        self._first: list[int] = []

    def _matching_file(self, spec: PeerSpec) -> str:
        """The GGUF itself, or a copy converted to the type longfit computes in (cached next to the others)."""
        from longfit.models.model_config import read_gguf

        target = _LLAMA_FTYPES.get(spec.weights)
        if target is None:
            return spec.gguf
        file_type = read_gguf(spec.gguf).metadata.get("general.file_type")
        if _GGUF_FILE_TYPES.get(int(file_type) if file_type is not None else -1) == target[0]:
            return spec.gguf
        directory = spec.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "longfit", "peers")
        os.makedirs(directory, exist_ok=True)
        stem = os.path.splitext(os.path.basename(spec.gguf))[0]
        out = os.path.join(directory, f"{stem}.as-{target[0]}.gguf")
        if not os.path.isfile(out):
            params = self.lc.llama_model_quantize_default_params()
            params.nthread = spec.threads
            params.ftype = target[1]
            params.allow_requantize = True
            partial = f"{out}.{os.getpid()}.partial"
            if self.lc.llama_model_quantize(spec.gguf.encode(), partial.encode(), self.ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama_model_quantize to {target[0]} failed")
            os.replace(partial, out)
        return out

    def info(self) -> dict[str, Any]:
        file_type = _GGUF_FILE_TYPES.get(self.lc.llama_model_ftype(self.model)
                                         if hasattr(self.lc, "llama_model_ftype") else -1)
        return {"name": self.spec.label, "weights": f"GGUF {file_type or os.path.basename(self.path)}",
                "weight_bytes": gguf_weight_bytes(self.path), "kv_element_bytes": KV_TYPES[self.spec.kv_type],
                "threads": self.spec.threads, "file": self.path}

    def _clear(self) -> None:
        self.lc.llama_memory_clear(self.memory, True)
        self._shape = None

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over ``(token, position, sequence, wants_logits)`` entries."""
        batch = self.batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        status = self.lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (context {self.spec.n_ctx} too small?)")

    def _argmax(self, count: int) -> list[int]:
        logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(count, self.vocab))
        return logits.argmax(axis=1).tolist()

    def _prefill_sequence(self, ids: list[int], seq: int) -> int:
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last = start + len(chunk) == len(ids)
            self._run([(t, start + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)])
        return self._argmax(1)[0]

    def prefill(self, length: int, seed: int) -> float:
        self._clear()
        ids = random_ids(seed, length, self.vocab)
        started = time.perf_counter()
        self._prefill_sequence(ids, 0)
        elapsed = time.perf_counter() - started
        self._clear()
        return length / elapsed

    def decode(self, batch: int, depth: int, tokens: int, seed: int) -> float:
        prompt_len = max(depth, 1)
        if self._shape != (batch, depth, seed):
            self._clear()
            self._first = [self._prefill_sequence(ids, s) for s, ids in enumerate(prompt_ids(seed, batch, depth,
                                                                                              self.vocab))]
            self._shape = (batch, depth, seed)
        else:  # same prompts as the last run: drop its generated tokens, keep the prompts' cache
            for s in range(batch):
                self.lc.llama_memory_seq_rm(self.memory, s, prompt_len, -1)
        current = list(self._first)
        started = time.perf_counter()
        for step in range(tokens):
            self._run([(current[s], prompt_len + step, s, True) for s in range(batch)])
            current = self._argmax(batch)
        return batch * tokens / (time.perf_counter() - started)

    def peak_rss(self) -> int:
        return peak_rss_bytes()


class _Stamps:
    """A generate() streamer that only records when each put arrives (the prompt first, then each new token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TransformersBackend:
    """HF transformers ``generate()`` on the GGUF (dequantized to bf16 by transformers' gguf_file loader)."""

    def __init__(self, spec: PeerSpec) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(spec.threads)
        self.torch, self.spec = torch, spec
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(spec.gguf)),
                                                          gguf_file=os.path.basename(spec.gguf),
                                                          dtype=torch.bfloat16).eval()
        self.vocab = self.model.config.vocab_size
        self._shape: tuple[int, int, int] | None = None
        self._ids: Any = None
        self._cache: Any = None

    def info(self) -> dict[str, Any]:
        params = {id(p): p for p in self.model.parameters()}.values()
        total = sum(p.numel() * p.element_size() for p in params)
        embed = self.model.get_input_embeddings().weight
        if not self.model.config.tie_word_embeddings:  # only one row per token is read
            total -= embed.numel() * embed.element_size()
        return {"name": "transformers", "weights": "bf16 (dequantized GGUF)", "weight_bytes": total,
                "kv_element_bytes": 2.0, "threads": self.spec.threads, "file": self.spec.gguf}

    def prefill(self, length: int, seed: int) -> float:
        torch = self.torch
        ids = torch.tensor([random_ids(seed, length, self.vocab)])
        with torch.inference_mode():
            started = time.perf_counter()
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            elapsed = time.perf_counter() - started
        return length / elapsed

    def decode(self, batch: int, depth: int, tokens: int, seed: int) -> float:
        from transformers import DynamicCache

        torch = self.torch
        with torch.inference_mode():
            if self._shape != (batch, depth, seed):
                self._ids = torch.tensor(prompt_ids(seed, batch, depth, self.vocab))
                self._cache = None
                if self._ids.shape[1] > 1:  # prefill all but the last prompt token once; generate() does the rest
                    self._cache = DynamicCache()
                    self.model(input_ids=self._ids[:, :-1], past_key_values=self._cache, use_cache=True,
                               logits_to_keep=1)
                self._shape = (batch, depth, seed)
            if self._cache is not None:
                self._cache.crop(self._ids.shape[1] - 1)
            stamps = _Stamps()
            self.model.generate(input_ids=self._ids, attention_mask=torch.ones_like(self._ids),
                                past_key_values=self._cache, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1,
                                do_sample=False, streamer=stamps, pad_token_id=0)
        # stamps: [prompt, first token (from the prefill), then one per decode step]
        return batch * tokens / (stamps.times[-1] - stamps.times[1])

    def peak_rss(self) -> int:
        return peak_rss_bytes()


if __name__ == "__main__":  # the peer process PeerProcess starts: argv = [socket fd, PeerSpec as JSON]
    _worker_main(Connection(int(sys.argv[1])), PeerSpec(**json.loads(sys.argv[2])))
