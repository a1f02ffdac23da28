"""CPU kernels in C, built on first use with the machine's C compiler and called through ctypes.

Only what PyTorch has no fused op for lives here: decode attention that reads paged bf16 keys and values once
(``csrc/paged_decode.c``); few-row products with int4 / int8 weights stored in tiles of 16 output rows, each weight
decoded once per call whatever the row count (``csrc/qlinear.c``); and the layers of a Llama-family decode step with
such weights in one call, the small ops between those kernels included (``csrc/decode_step.c``,
``models/fused_decode.py``). Everything has a torch path that is used when no compiler is found, when the build
fails, on other devices, and when ``LONGFIT_NATIVE=0``; tests compare the two.

The library is compiled with ``-O3 -march=native -fopenmp`` (without OpenMP, then without ``-march=native``, where
the compiler refuses them) into ``$LONGFIT_CACHE_DIR/kernels`` (default ``~/.cache/longfit/kernels``) under a name
that hashes the source, the flags, the compiler's version and the CPU's feature flags, so a cache shared between
machines never loads a build for another CPU. The build takes ~0.5 s once. With torch's Linux wheels (which ship
``libgomp.so.1``) the kernels' OpenMP symbols resolve to the libgomp torch has already loaded, so they share its
thread pool; the thread count is torch's (``torch.get_num_threads()``), passed on every call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_VAR = "LONGFIT_NATIVE"  # "0": never build or use the C kernels
_SOURCES = tuple(Path(__file__).with_name("csrc") / name
                 for name in ("paged_decode.c", "qlinear.c", "dense.c", "decode_step.c", "head.c"))
_HEADERS = tuple(Path(__file__).with_name("csrc") / name
                 for name in ("bf16.h", "fast_exp.h", "parallel.h"))  # in the cache key
# Reassociation lets the compiler vectorize the fp32 dot products and sums; NaN and infinity keep their meaning
# (no -ffinite-math-only).
_FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math"]
# Tried in order: a compiler without OpenMP (Apple's clang) still builds a one-thread kernel, one that rejects
# -march=native a portable one.
_VARIANTS = (["-march=native", "-fopenmp"], ["-march=native"], [])
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, extra: list[str]) -> Path:
    """Compile the source with ``extra`` flags into the cache (once per source, flags, compiler and CPU) and return
    the library."""
    flags = [*_FLAGS, *extra]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [path.read_text() for path in (*_SOURCES, *_HEADERS)]
    key = hashlib.sha256("\0".join([*sources, " ".join(flags), version, _cpu_flags()]).encode())
    from longfit.models.resolve import cache_dir

    directory = cache_dir() / "kernels"
    target = directory / f"paged_decode-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: processes that build at once (test workers) never load a partial file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, *map(str, _SOURCES), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@cache
def library() -> ctypes.CDLL | None:
    """The built kernels, or None (disabled, no compiler, or the build failed: logged once)."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found: decode attention uses the torch path")
        return None
    lib, error = None, None
    for extra in _VARIANTS:
        try:
            lib = ctypes.CDLL(str(_build(compiler, extra)))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            error = exc
    if lib is None:
        log.warning("C kernels unavailable, decode attention uses the torch path: %s", error)
        return None
    fn = lib.longfit_paged_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [_PTR, ctypes.c_int, _PTR, ctypes.c_int, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _I64,
                   ctypes.c_float, _I64, _I64, ctypes.c_int, _PTR, _PTR]
    _INT = ctypes.c_int
    lib.longfit_q4_linear.restype = lib.longfit_q8_linear.restype = lib.longfit_bf16_linear.restype = _INT
    lib.longfit_q4_linear.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _INT, _I64, _I64, _INT, _PTR, _INT]
    lib.longfit_q8_linear.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _INT, _PTR, _INT]
    lib.longfit_bf16_linear.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _INT, _PTR, _INT]
    lib.longfit_q4_dequantize.restype = _INT
    lib.longfit_q4_dequantize.argtypes = [_PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _INT, _PTR, _INT]
    lib.longfit_fused_decode.restype = lib.longfit_fused_layout.restype = _INT
    lib.longfit_fused_decode.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _I64, _I64, _I64,
                                         _I64, _PTR, ctypes.c_float, ctypes.c_float, _INT, _PTR, _PTR]
    lib.longfit_head_leaders.restype = _I64
    lib.longfit_head_leaders.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, ctypes.c_float, ctypes.c_float]
    lib.longfit_argmax_rows.restype = None
    lib.longfit_argmax_rows.argtypes = [_PTR, _I64, _I64, _PTR]
    lib.longfit_key_splits.restype = _I64
    lib.longfit_key_splits.argtypes = [_I64, _I64, _INT]
    lib.longfit_decode_greedy.restype = _I64
    lib.longfit_decode_greedy.argtypes = [
        _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT, _I64, _I64, _I64, _I64,
        ctypes.c_float, ctypes.c_float, _INT, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, ctypes.c_float, ctypes.c_float,
        _PTR, _I64, _PTR, ctypes.c_double, _PTR]
    return lib


PAGED_DECODE_MAX_DIM, PAGED_DECODE_MAX_HEADS = 512, 64  # paged_decode.c's MAX_D, MAX_HQ


def paged_decode_supported(q: torch.Tensor, kv_pool: torch.Tensor) -> bool:
    """Whether ``paged_decode`` can take this call: CPU, a contiguous bf16/fp32 pool, head dim and query heads within
    ``PAGED_DECODE_MAX_DIM`` / ``PAGED_DECODE_MAX_HEADS``, the kernels built."""
    dim = kv_pool.shape[4]
    return (enabled() and kv_pool.device.type == "cpu" and q.device.type == "cpu"
            and kv_pool.dtype in (torch.bfloat16, torch.float32) and kv_pool.is_contiguous()
            and dim <= PAGED_DECODE_MAX_DIM and q.shape[1] <= PAGED_DECODE_MAX_HEADS and library() is not None)


def key_splits(batch: int, num_pages: int, threads: int) -> int:
    """Key splits per row: enough work items to keep ``threads`` busy (4 per thread), each split at least 4 pages;
    1 on one thread (a split only adds a merge). The rule is ``longfit_key_splits`` (decode_step.c), which the
    greedy loop also applies. Call only where ``library()`` is not None."""
    return library().longfit_key_splits(batch, num_pages, threads)


def paged_decode(q: torch.Tensor, kv_pool: torch.Tensor, pages: torch.Tensor, first_key: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """The C kernel behind ``models.paged_decode.paged_decode_attention`` (same arguments, same result to fp32
    rounding): q [B, Hq, D], kv_pool [num_blocks, 2, bs, Hkv, D] bf16/fp32 contiguous, pages [B, P], first_key
    and seq_lens [B] → [B, Hq, D] fp32. Call only where ``paged_decode_supported``."""
    batch, num_pages = pages.shape
    _, _, block_size, num_kv_heads, dim = kv_pool.shape
    group = q.shape[1] // num_kv_heads
    threads = torch.get_num_threads()
    splits = key_splits(batch, num_pages, threads)
    # bf16 queries go in as they are (the bf16 path multiplies them exactly); anything else as fp32
    q = q.contiguous() if q.dtype == torch.bfloat16 else q.to(torch.float32).contiguous()
    pages, first_key, seq_lens = (t.to(torch.int64).contiguous() for t in (pages, first_key, seq_lens))
    out = torch.empty(batch, q.shape[1], dim, dtype=torch.float32)
    scratch = torch.empty(batch * splits * q.shape[1] * (dim + 2), dtype=torch.float32)
    status = library().longfit_paged_decode(
        q.data_ptr(), int(q.dtype == torch.bfloat16), kv_pool.data_ptr(), int(kv_pool.dtype == torch.bfloat16),
        pages.data_ptr(), first_key.data_ptr(), seq_lens.data_ptr(), batch, num_pages, block_size, num_kv_heads, dim,
        group, float(scale), int(window or 0), splits, threads, scratch.data_ptr(), out.data_ptr())
    if status != 0:
        raise RuntimeError(f"paged decode kernel refused its shapes (status {status})")
    return out


# In a compiled decode step (runtime/decode_graph.py) the kernel is one opaque op of the graph; ``DecodeGraph``
# turns this on when the library is built, before it traces.
IN_GRAPH = False


# The kernels as torch ops (``torch.ops.longfit.*``), so a compiled graph can call them: defined on a library
# fragment with a CPU kernel and a fake (shape) function. Measured, one call: ~6 us of dispatch over the direct call,
# against ~10-17 us through ``torch.library.custom_op`` (its Python layers run on every call). Eager code calls the
# functions directly: the dispatch costs more than the ctypes call itself.
_OPS = torch.library.Library("longfit", "FRAGMENT")


def _define_op(name: str, schema: str, kernel, fake) -> None:
    _OPS.define(f"{name}{schema}")
    _OPS.impl(name, kernel, "CPU")
    torch.library.register_fake(f"longfit::{name}", fake, lib=_OPS)


_define_op("paged_decode", "(Tensor q, Tensor kv_pool, Tensor pages, Tensor first_key, Tensor seq_lens, float scale, "
           "int window) -> Tensor",
           lambda q, kv_pool, pages, first_key, seq_lens, scale, window: paged_decode(
               q, kv_pool, pages, first_key, seq_lens, scale, window or None),  # window 0: none
           lambda q, kv_pool, pages, first_key, seq_lens, scale, window: q.new_empty(q.shape, dtype=torch.float32))

def q4_linear(x: torch.Tensor, tiles: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group_size: int,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bf16 contiguous (CPU) @ int4 weight → [M, N] ``out_dtype`` (bf16 or fp32), with
    ``w[n, k] = code · d + m`` per group (``quant/tiles.py`` builds ``tiles`` [N/16, K/8, 64] uint8 and ``d``,
    ``m`` [N/16, K/G, 16] fp16 or fp32). Call only where ``library()`` is not None. Per group, the products are
    within ``max|x| / 64516 · Σ|w|`` of exact ones (``csrc/qlinear.c``)."""
    num_rows, in_features = x.shape
    out = torch.empty(num_rows, tiles.shape[0] * 16, dtype=out_dtype)
    status = library().longfit_q4_linear(
        x.data_ptr(), num_rows, in_features, tiles.data_ptr(), d.data_ptr(), m.data_ptr(),
        int(d.dtype == torch.float16), out.shape[1], group_size, torch.get_num_threads(), out.data_ptr(),
        int(out_dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"int4 kernel refused its shapes (status {status})")
    return out


def q4_dequantize(tiles: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group_size: int,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The int4 weight of ``q4_linear``'s tiles as ``[N, K]`` ``dtype`` (bf16 or fp32), ``w = code · d + m`` rounded
    as ``Int4Linear.dequantized_t``'s torch expression. Call only where ``library()`` is not None."""
    out = torch.empty(tiles.shape[0] * 16, tiles.shape[1] * 8, dtype=dtype)
    status = library().longfit_q4_dequantize(
        tiles.data_ptr(), d.data_ptr(), m.data_ptr(), int(d.dtype == torch.float16), out.shape[0], out.shape[1],
        group_size, torch.get_num_threads(), out.data_ptr(), int(dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"int4 dequantize refused its shapes (status {status})")
    return out


def q8_linear(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bf16 contiguous (CPU) @ int8 weight → [M, N] ``out_dtype``, ``w[n, k] = code · scales[n]``
    (``tiles`` [N/16, K/4, 64] uint8 of code + 128, ``scales`` [N] bf16). Call only where ``library()`` is not None.
    The products are within ``max|x| / 64516 · Σ|w|`` of exact ones (``csrc/qlinear.c``)."""
    num_rows, in_features = x.shape
    out = torch.empty(num_rows, scales.shape[0], dtype=out_dtype)
    status = library().longfit_q8_linear(
        x.data_ptr(), num_rows, in_features, tiles.data_ptr(), scales.data_ptr(), out.shape[1],
        torch.get_num_threads(), out.data_ptr(), int(out_dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"int8 kernel refused its shapes (status {status})")
    return out


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [M, K] bf16 contiguous (CPU) @ weight [N, K] bf16 contiguous (row-major, K % 32 == 0) → [M, N] ``out_dtype``
    (bf16 or fp32): exact bf16 products, fp32 sums (``csrc/dense.c``). Call only where ``library()`` is not
    None."""
    num_rows, in_features = x.shape
    out = torch.empty(num_rows, weight.shape[0], dtype=out_dtype)
    status = library().longfit_bf16_linear(x.data_ptr(), num_rows, in_features, weight.data_ptr(), weight.shape[0],
                                           torch.get_num_threads(), out.data_ptr(), int(out_dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"bf16 kernel refused its shapes (status {status})")
    return out


def head_leaders(logits: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, row_error: torch.Tensor | None,
                 rel: float, abs_: float) -> int:
    """``DecoderModel.compute_logits``' leader rescoring in C (``csrc/head.c``, the same rule): logits [M, V] fp32
    contiguous, rescored in place; hidden [M, d] bf16 and rows [V, d] bf16 contiguous; row_error [V] fp32 or None.
    Returns how many logits were recomputed. Call only where ``library()`` is not None."""
    count = library().longfit_head_leaders(
        logits.data_ptr(), logits.shape[0], logits.shape[1], hidden.data_ptr(), hidden.shape[1], rows.data_ptr(),
        None if row_error is None else row_error.data_ptr(), rel, abs_)
    if count < 0:
        raise RuntimeError("head leader kernel refused its shapes")
    return count


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, V] fp32 contiguous (CPU) → [M] int64: each row's first maximal index, a NaN counting as maximal (what
    ``x.max(dim=-1).indices`` gives). Call only where ``library()`` is not None."""
    out = torch.empty(x.shape[0], dtype=torch.int64)
    library().longfit_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


_define_op("q4_linear", "(Tensor x, Tensor tiles, Tensor d, Tensor m, int group_size) -> Tensor",
           lambda x, tiles, d, m, group_size: q4_linear(x, tiles, d, m, group_size),
           lambda x, tiles, d, m, group_size: x.new_empty((x.shape[0], tiles.shape[0] * 16), dtype=torch.bfloat16))
_define_op("q8_linear", "(Tensor x, Tensor tiles, Tensor scales) -> Tensor",
           lambda x, tiles, scales: q8_linear(x, tiles, scales),
           lambda x, tiles, scales: x.new_empty((x.shape[0], scales.shape[0]), dtype=torch.bfloat16))
_define_op("bf16_linear", "(Tensor x, Tensor weight) -> Tensor",
           lambda x, weight: bf16_linear(x, weight),
           lambda x, weight: x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.bfloat16))
paged_decode_op = torch.ops.longfit.paged_decode
q4_linear_op = torch.ops.longfit.q4_linear
q8_linear_op = torch.ops.longfit.q8_linear
bf16_linear_op = torch.ops.longfit.bf16_linear
