"""Round-to-nearest (RTN) weight quantization: int8 per output channel, int4 per group of input channels.

Method: plain RTN as gpt-fast's ``quantize.py`` (WeightOnlyInt8 / WeightOnlyInt4) describes it, with no
calibration data ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" uses it as
its baseline). These functions are the slow, obvious reference that the packed kernels in ``quant/linear.py`` are
tested against, and also what ``build_linear`` uses to quantize float weights at load time.

Conventions, chosen to match the fused CPU kernels exactly:
- int8: symmetric, ``w ≈ code · scale`` with ``code ∈ [-127, 127]`` and ``scale[n] = max|w[n, :]| / 127``.
- int4: asymmetric min/max per group of ``group_size`` input channels, in the kernel's form
  ``w ≈ (code - 8) · scale + zero`` with ``code ∈ 0..15``. NOTE: ``zero`` is the value at code 8 (``min + 8·scale``),
  not the group minimum; that is the shift ``torch._weight_int4pack_mm_for_cpu`` applies (tinygemm convention).
- ``param_dtype``: the dtype the kernel reads scales (and zeros) in. The kernels take them in the activation dtype,
  bf16 on the fast path, so the parameters are rounded to bf16 *before* the codes are chosen: the reference
  dequantization is then exactly the weight the kernel multiplies by, and the error bound stays half a step.
  Scales are rounded up (never down) so that the extreme values still fit in the code range.
- int4 for the C kernels' tile layout (``quantize_int4_min``): llama.cpp's Q4_1 form ``w ≈ code · d + m`` with fp16
  ``d`` and ``m`` (the layout's parameters), ``m`` the group minimum rounded down; returned in the (scale, zero)
  form above so that ``dequantize_int4`` reads both.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT4_GROUP_SIZES = (32, 64, 128, 256)  # the sizes torch's CPU int4 kernel accepts
INT8_MAX = 127
INT4_MAX = 15
_TINY_SCALE = 1e-12  # an all-equal row or group gets this scale instead of 0 (no division by zero)
_PARAM_DTYPES = (torch.float32, torch.bfloat16)


def _check_matrix(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out, in] matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")


def _check_param_dtype(param_dtype: torch.dtype) -> None:
    if param_dtype not in _PARAM_DTYPES:
        raise ValueError(f"param_dtype must be torch.float32 or torch.bfloat16, got {param_dtype}")


def round_up_to_dtype(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest ``dtype`` values ≥ ``values`` (fp32 in, fp32 out, same shape), for non-negative scales."""
    rounded = values.to(dtype)
    too_small = rounded.float() < values
    bumped = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(too_small, bumped, rounded).float()


def quantize_int8(weight: Tensor, param_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 RTN.

    Args:
        weight: [N, K] float (any float dtype; computed in fp32).
        param_dtype: dtype of the returned scales (bf16 for the packed kernel with bf16 activations).

    Returns:
        codes: [N, K] int8 in [-127, 127]; scales: [N] ``param_dtype``; ``w ≈ codes · scales[:, None]``.
    """
    _check_matrix(weight)
    _check_param_dtype(param_dtype)
    w = weight.float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(_TINY_SCALE)  # [N]
    scales = round_up_to_dtype(scales, param_dtype)  # exact in param_dtype, ≥ max|w| / 127
    codes = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # [N, K]
    return codes, scales.to(param_dtype)


def dequantize_int8(codes: Tensor, scales: Tensor) -> Tensor:
    """Inverse of :func:`quantize_int8`: codes [N, K] int8, scales [N] → fp32 [N, K]."""
    return codes.float() * scales.float()[:, None]


def quantize_int4(
    weight: Tensor, group_size: int, param_dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max int4 RTN per group of ``group_size`` consecutive input channels.

    Args:
        weight: [N, K] float, ``K % group_size == 0``.
        group_size: input channels per (scale, zero) pair.
        param_dtype: dtype of the returned scales and zeros.

    Returns:
        codes: [N, K] uint8 in 0..15 (one code per byte, unpacked);
        scales, zeros: [N, K / group_size] ``param_dtype``; ``w ≈ (codes - 8) · scale + zero`` per group.

    Raises:
        ValueError: group_size not positive or not dividing K.
    """
    _check_matrix(weight)
    _check_param_dtype(param_dtype)
    n_out, n_in = weight.shape
    if group_size <= 0 or n_in % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features={n_in}, got {group_size}")
    groups = weight.float().reshape(n_out, n_in // group_size, group_size)  # [N, K/G, G]
    w_min = groups.amin(dim=-1)  # [N, K/G]
    w_max = groups.amax(dim=-1)
    scales = round_up_to_dtype(((w_max - w_min) / INT4_MAX).clamp_min(_TINY_SCALE), param_dtype)
    # NOTE: zero is the value at code 8 (kernel convention); rounding it to param_dtype shifts the grid by at most
    # half an ulp of zero, and the clamp below absorbs that shift at the ends of the range.
    zeros = (w_min + 8 * scales).to(param_dtype).float()
    codes = torch.round((groups - zeros[..., None]) / scales[..., None]) + 8  # [N, K/G, G]
    codes = codes.clamp(0, INT4_MAX).to(torch.uint8).reshape(n_out, n_in)
    return codes, scales.to(param_dtype), zeros.to(param_dtype)


def dequantize_int4(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Inverse of :func:`quantize_int4`: codes [N, K] in 0..15, scales/zeros [N, K/G] → fp32 [N, K]."""
    n_out, n_in = codes.shape
    groups = codes.float().reshape(n_out, n_in // group_size, group_size)  # [N, K/G, G]
    weight = (groups - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return weight.reshape(n_out, n_in)


def round_down_to_dtype(values: Tensor, dtype: torch.dtype) -> Tensor:
    """The largest ``dtype`` values ≤ ``values`` (fp32 in, fp32 out, same shape)."""
    rounded = values.to(dtype)
    too_big = rounded.float() > values
    bumped = torch.nextafter(rounded, torch.full_like(rounded, float("-inf")))
    return torch.where(too_big, bumped, rounded).float()


def quantize_int4_min(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min/max int4 RTN per group in llama.cpp's Q4_1 form, ``w ≈ code · d + m`` with fp16 ``d`` and
    ``m`` (the tile kernels' parameters, ``quant/tiles.py``): ``m`` is the group minimum rounded down to fp16, ``d``
    the step from it to the maximum rounded up, and the codes are chosen against the rounded values, so the error
    stays within half a step.

    Args:
        weight: [N, K] float, ``K % group_size == 0``.
        group_size: input channels per (d, m) pair.

    Returns:
        codes [N, K] uint8 in 0..15; scales [N, K/G] fp32 (= d); zeros [N, K/G] fp32 (= m + 8·d, exact), i.e.
        the (scale, zero) form of :func:`quantize_int4` that ``dequantize_int4`` reads.

    Raises:
        ValueError: group_size not positive or not dividing K; a group whose min or step does not fit fp16.
    """
    _check_matrix(weight)
    n_out, n_in = weight.shape
    if group_size <= 0 or n_in % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features={n_in}, got {group_size}")
    groups = weight.float().reshape(n_out, n_in // group_size, group_size)  # [N, K/G, G]
    m = round_down_to_dtype(groups.amin(dim=-1), torch.float16)  # [N, K/G]
    d = round_up_to_dtype(((groups.amax(dim=-1) - m) / INT4_MAX).clamp_min(2.0**-24), torch.float16)
    if not (torch.isfinite(m).all() and torch.isfinite(d).all()):
        raise ValueError("weight has groups whose range does not fit fp16 (|w| > 65504)")
    codes = torch.round((groups - m[..., None]) / d[..., None]).clamp(0, INT4_MAX).to(torch.uint8)
    return codes.reshape(n_out, n_in), d, m + 8 * d
