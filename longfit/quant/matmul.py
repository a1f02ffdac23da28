"""Dense matmuls that stay fast on CPUs whose bf16 matmul is not.

torch 2.13's CPU bf16 GEMM is fast only where oneDNN has a bf16 kernel for the ISA (AVX-512 and up). On an
AVX2-only CPU it falls back to a slow path: measured on a 2-core AMD EPYC without AVX-512, a 2048³ bf16 matmul ran
at 0.32 GFLOP/s against 130 in fp32 (400×), ``[512, 576] @ [576, 1536]`` took 768 ms in bf16 against 8.4 ms in fp32,
while a one-row bf16 ``F.linear`` (a GEMV, 120 µs) stayed as fast as fp32 (134 µs). So on such a CPU a bf16 weight
that multiplies ``FP32_MIN_ROWS`` rows or more is converted to fp32 for the product and the result cast back to the
activations' dtype. Fewer rows stay in bf16: a one-row product (LM head: 7.3 ms) costs less than the conversion.

The conversion is done a block of weight rows at a time (``CONVERT_BLOCK_BYTES`` of fp32), each block multiplied
while it is still in cache (a one-off timing: ~3.6 ns per weight for a whole out-of-cache weight, 0.23 ns for a
cache-sized block). Measured on that EPYC with ``scripts/matmul_blocks.py``, 1 thread, weights out of cache, ms for
1 / 4 / 8 / 16 rows (a rerun gave the same crossovers):

| weight | slow bf16 product | fp32 by blocks | (int8 kernel) |
|---|---|---|---|
| 49152×576 (LM head) | 9.3 / 31.1 / 56.4 / 117 | 15.3 / 21.9 / 24.4 / 29.2 | 11.4 / 11.3 / 23.9 / 44.3 |
| 3072×576 | 0.63 / 2.28 / 3.92 / 7.95 | 1.54 / 2.40 / 2.82 / 3.21 | |
| 576×1536 | 0.39 / 1.01 / 1.72 / 3.32 | 1.03 / 1.66 / 1.50 / 1.80 | |

(converting the head whole cost 142 ms at 16 rows). A weight larger than the last-level cache crosses over at ~4
rows (the slow product streams it from DRAM for every few rows), a cache-resident one at ~8.

``bf16_matmul_fast()`` decides once per process by timing a small product in both dtypes; the environment variable
``LONGFIT_BF16_MATMUL=fast|slow`` overrides the probe. CUDA tensors never take the fp32 path.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

ENV_VAR = "LONGFIT_BF16_MATMUL"
PREPACK_ENV_VAR = "LONGFIT_PREPACK"  # "0": dense bf16 layers keep plain weights (F.linear reorders them every call)
# bf16 counts as slow when the probe's product takes this many times its fp32 time: fast kernels run bf16 at
# 0.5-4x fp32 time (AVX-512 emulation to AMX); the AVX2 fallback measured 400x.
SLOW_RATIO = 8.0
FP32_MIN_ROWS = 8  # from this many rows on the fp32 conversion pays for itself (see above) ...
FP32_MIN_ROWS_LARGE = 4  # ... and from this many for a weight of LARGE_WEIGHT_BYTES or more
LARGE_WEIGHT_BYTES = 16 << 20  # larger than a CPU's last-level cache (the bf16 LM heads of small models: 56 MB)
CONVERT_BLOCK_BYTES = 2 << 20  # fp32 bytes of weight converted at once: one block stays in L2/L3 for its product


def _probe_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    a = torch.randn(64, 256).to(dtype)
    b = torch.randn(256, 256).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_matmul_fast() -> bool:
    """Whether a many-row bf16 CPU matmul is about as fast as fp32 here (probed once; ``$LONGFIT_BF16_MATMUL``
    = ``fast`` or ``slow`` overrides). Raises ValueError for any other value of the variable."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced not in ("", "fast", "slow"):
        raise ValueError(f"{ENV_VAR} must be 'fast' or 'slow' (or unset: probe), got {forced!r}")
    if forced:
        return forced == "fast"
    bf16, fp32 = _probe_seconds(torch.bfloat16), _probe_seconds(torch.float32)
    if bf16 > SLOW_RATIO * fp32:
        logger.info("bf16 matmul is %.0fx slower than fp32 on this CPU: bf16 weights multiply many rows in fp32",
                    bf16 / fp32)
        return False
    return True


def slow_bf16(device: torch.device) -> bool:
    """Whether many-row bf16 products on ``device`` should run in fp32 instead (a CPU without a fast bf16 GEMM)."""
    return device.type == "cpu" and not bf16_matmul_fast()


def uses_fp32(weight: Tensor, rows: int) -> bool:
    """Whether a product of ``rows`` rows with this weight runs in fp32 (a bf16 CPU weight, at least
    ``FP32_MIN_ROWS`` rows, or ``FP32_MIN_ROWS_LARGE`` for a large weight, slow bf16 here)."""
    if weight.dtype != torch.bfloat16 or rows < FP32_MIN_ROWS_LARGE:
        return False
    large = weight.numel() * weight.element_size() >= LARGE_WEIGHT_BYTES
    return (large or rows >= FP32_MIN_ROWS) and slow_bf16(weight.device)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` — x ``[..., K]``, weight ``[N, K]`` → ``[..., N]`` in x's dtype — computed in
    weight's dtype, or in fp32 where ``uses_fp32`` says so."""
    if uses_fp32(weight, x.numel() // max(x.shape[-1], 1)):
        out = fp32_linear(x.reshape(-1, x.shape[-1]), weight, bias)  # [M, N] fp32
        return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def fp32_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` in fp32 — x ``[M, K]`` (any float dtype), weight ``[N, K]`` → ``[M, N]`` fp32 —
    with a non-fp32 weight converted one block of ``CONVERT_BLOCK_BYTES`` at a time (see the module docstring)."""
    xf = x.float()
    num_out, num_in = weight.shape
    block = max(16, CONVERT_BLOCK_BYTES // (4 * num_in))
    if weight.dtype == torch.float32 or block >= num_out:
        return F.linear(xf, weight.float(), None if bias is None else bias.float())
    out = torch.empty(xf.shape[0], num_out, dtype=torch.float32, device=x.device)  # [M, N]
    buffer = torch.empty(block, num_in, dtype=torch.float32, device=x.device)  # [block, K], reused
    # NOTE: a loop over blocks of weight rows (the LM head: 54), not over tokens: each block is converted into the
    # cache-resident buffer and multiplied before the next evicts it.
    for start in range(0, num_out, block):
        rows = buffer[: min(block, num_out - start)]
        rows.copy_(weight[start : start + rows.shape[0]])
        torch.mm(xf, rows.T, out=out[:, start : start + rows.shape[0]])
    if bias is not None:
        out += bias.float()
    return out


@functools.cache
def prepack_available() -> bool:
    """Whether this torch and CPU have oneDNN's prepacked bf16 linear (``mkldnn._reorder_linear_weight`` and
    ``mkldnn._linear_pointwise``, the ops inductor's CPU freezing uses; oneDNN refuses bf16 below AVX-512)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        return bool(ops._reorder_linear_weight and ops._linear_pointwise and ops._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def should_prepack(weight: Tensor) -> bool:
    """Whether a dense layer's ``weight`` is worth prepacking (``prepack``): a bf16 CPU weight where the bf16 GEMM
    is fast, oneDNN's ops present, and ``$LONGFIT_PREPACK`` not ``0`` (``force``: also where the bf16 GEMM is slow,
    for tests). ``DenseLinear.prepack`` also keeps the plain weight where the few-row C kernel takes it.

    ``F.linear`` on a plain bf16 weight reorders it into oneDNN's blocked layout on every call, a read and a write
    of the whole weight before the product. Measured on the project's 2-core EPYC (AVX-512 bf16), 1 thread, weights
    from DRAM (``scripts/matmul_blocks.py``): a 3072×576 weight 0.65 → 0.45 ms at 1 row, 0.86 → 0.67 at 16, the
    49152×576 LM head 7.2 → 4.2 and 10.7 → 6.3; identical results; SmolLM2 bf16 decode 1.4-1.5× faster at batch 1
    to 16 (docs/PERFORMANCE.md).
    """
    mode = os.environ.get(PREPACK_ENV_VAR, "").strip().lower()
    if mode not in ("", "0", "1", "force"):
        raise ValueError(f"{PREPACK_ENV_VAR} must be 0, 1 or force (or unset: 1), got {mode!r}")
    if mode == "0" or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
        return False
    return (mode == "force" or bf16_matmul_fast()) and prepack_available()


def prepack_forced() -> bool:
    """``LONGFIT_PREPACK=force``: prepack every bf16 CPU layer, also where the bf16 GEMM is slow and where the few-row
    C kernel would keep the plain weight (``DenseLinear.prepack``; tests of the prepacked path)."""
    return os.environ.get(PREPACK_ENV_VAR, "").strip().lower() == "force"


def prepack(weight: Tensor) -> Tensor:
    """bf16 ``weight [N, K]`` reordered once into oneDNN's blocked layout (an opaque mkldnn tensor of the same
    shape, about the same bytes) for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, bias)`` over ``packed = prepack(w)`` — x ``[..., K]`` → ``[..., N]`` in x's dtype, computed
    in bf16 (other activation dtypes are cast to bf16 and back, as ``linear`` does for a bf16 weight). Equals
    ``F.linear`` on the plain weight bit for bit (same oneDNN kernel, without the per-call reorder)."""
    if x.dtype == torch.bfloat16:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, bias, "none", [], "")
    return out.to(x.dtype)


def reset_probe() -> None:
    """Forget the probe's answer (tests that set ``$LONGFIT_BF16_MATMUL``)."""
    bf16_matmul_fast.cache_clear()
