"""Dense matmuls that stay fast on CPUs whose bf16 matmul is not.

torch 2.13's CPU bf16 GEMM is fast only where oneDNN has a bf16 kernel for the ISA (AVX-512 and up). On an
AVX2-only CPU it falls back to a slow path: measured on a 2-core AMD EPYC without AVX-512, a 2048³ bf16 matmul ran
at 0.32 GFLOP/s against 130 in fp32 (400×), ``[512, 576] @ [576, 1536]`` took 768 ms in bf16 against 8.4 ms in fp32,
while a one-row bf16 ``F.linear`` (a GEMV, 120 µs) stayed as fast as fp32 (134 µs). So on such a CPU a bf16 weight
that multiplies ``FP32_MIN_ROWS`` rows or more is converted to fp32 for the product and the result cast back to the
activations' dtype. Fewer rows stay in bf16: the conversion costs 0.7-3.6 ns per weight (1536×576: 0.7 ms; the
49152×576 LM head: 100 ms, out of cache), more than a few rows' slow bf16 product (LM head: 13 ms at 2 rows,
31 ms at 4, 55 ms at 8; 1536×576: 0.87 ms at 8 rows).

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
# bf16 counts as slow when the probe's product takes this many times its fp32 time: fast kernels run bf16 at
# 0.5-4x fp32 time (AVX-512 emulation to AMX); the AVX2 fallback measured 400x.
SLOW_RATIO = 8.0
FP32_MIN_ROWS = 16  # from this many rows on the fp32 conversion pays for itself (see above)


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
    ``FP32_MIN_ROWS`` rows, slow bf16 here)."""
    return weight.dtype == torch.bfloat16 and rows >= FP32_MIN_ROWS and slow_bf16(weight.device)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` — x ``[..., K]``, weight ``[N, K]`` → ``[..., N]`` in x's dtype — computed in
    weight's dtype, or in fp32 where ``uses_fp32`` says so."""
    if uses_fp32(weight, x.numel() // max(x.shape[-1], 1)):
        out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def reset_probe() -> None:
    """Forget the probe's answer (tests that set ``$LONGFIT_BF16_MATMUL``)."""
    bf16_matmul_fast.cache_clear()
