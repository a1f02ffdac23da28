"""KV-cache quantization: KIVI (2/4-bit), int8 per token, KVQuant-style pre-RoPE keys with sparse outliers.

Codes are packed tightly along the channel axis (``[Hkv, T, D * bits / 8]`` uint8, so every token's codes are
self-contained for paged storage); scales and zero points are float16 (as the KIVI reference), rounded outward
(zero down, scale up) so the round-trip error stays within ``scale / 2`` per element. The byte counts equal
``storage.quantized_bytes``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy
from longfit.compression.spec import make_stage
from longfit.compression.storage import kivi_split, kvquant_split, outlier_count, value_group

_FP16_MAX = 65504.0
_MIN_SCALE = 2.0**-24  # smallest float16 subnormal: a constant group still gets a positive scale


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: uint8 [..., N]`` (each ``< 2**bits``) into ``uint8 [..., N * bits / 8]``.

    Little-endian: value ``j`` occupies bits ``[j*bits, (j+1)*bits)`` of the packed bit string. ``N * bits`` must
    be a multiple of 8. bits 1/2/4/8 shift whole values into bytes; other widths (3) go through bit planes.
    """
    num_values = codes.shape[-1]
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8) or (num_values * bits) % 8:
        raise ValueError(f"pack_bits: bits must be in 1..8 with N*bits a multiple of 8, got {bits=}, N={num_values}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    lead = codes.shape[:-1]
    if 8 % bits == 0:
        per_byte = 8 // bits
        grouped = codes.reshape(*lead, num_values // per_byte, per_byte)
        packed = grouped[..., 0].clone()
        for j in range(1, per_byte):  # at most 8 shifts per call, not per token
            packed |= grouped[..., j] << (j * bits)
        return packed
    planes = (codes.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1  # [..., N, bits]
    planes = planes.reshape(*lead, num_values * bits // 8, 8)
    return (planes << torch.arange(8, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, num_values: int) -> Tensor:
    """Inverse of ``pack_bits``: ``uint8 [..., N * bits / 8]`` → ``uint8 [..., N]``."""
    if bits == 8:
        return packed
    lead = packed.shape[:-1]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # [8/bits]
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*lead, num_values)
    planes = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [..., N*bits/8, 8]
    planes = planes.reshape(*lead, num_values, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8)).sum(dim=-1, dtype=torch.uint8)


def _to_fp16(x: Tensor, up: bool) -> Tensor:
    """float32 → float16 rounded toward +inf (``up``) or -inf, saturating at ±65504."""
    x = x.clamp(-_FP16_MAX, _FP16_MAX)
    h = x.half()
    wrong = h.float() < x if up else h.float() > x
    target = torch.full_like(h, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(h, target), h)


@dataclass(frozen=True, slots=True)
class QuantizedTensor:
    """Packed codes of one ``[Hkv, T, D]`` tensor.

    Attributes:
        codes: ``uint8 [Hkv, T, D * bits / 8]`` (int8 layout: the int8 codes' bytes).
        scale, zero: float16. layout "channel": ``[Hkv, T / G, D]`` (per channel, per group of G tokens);
            "token": ``[Hkv, T, D / G]`` (per token, per group of G channels); "symmetric": scale ``[Hkv, T, 1]``,
            zero None.
        outlier_index: ``int16 [Hkv, num_blocks, K]`` offsets inside each block's flattened values (read as
            unsigned 16-bit), or None; a block is ``G x D`` values (channel layout) or ``G`` (token layout).
        outlier_value: ``[Hkv, num_blocks, K]`` exact values in ``dtype``.
        dtype: dtype of the quantized input.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    layout: str
    group_size: int
    head_dim: int
    dtype: torch.dtype
    outlier_index: Tensor | None = None
    outlier_value: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[1]

    def nbytes(self) -> int:
        parts = (self.codes, self.scale, self.zero, self.outlier_index, self.outlier_value)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _group_view(x: Tensor, layout: str, group: int) -> Tensor:
    """``[Hkv, T, D]`` → groups along the reduced axis: channel ``[Hkv, T/G, G, D]``, token ``[Hkv, T, D/G, G]``."""
    num_heads, num_tokens, head_dim = x.shape
    if layout == "channel":
        return x.reshape(num_heads, num_tokens // group, group, head_dim)
    return x.reshape(num_heads, num_tokens, head_dim // group, group)


def _block_size(layout: str, group: int, head_dim: int) -> int:
    """Values sharing one scale row: a channel group holds ``G x D`` (G tokens), a token group ``G`` channels."""
    return group * head_dim if layout == "channel" else group


def _outlier_mask(groups: Tensor, layout: str, count: int, block: int) -> tuple[Tensor, Tensor]:
    """The ``count`` most outlying values per block: (bool mask like ``groups``, index ``[Hkv, N, count]``).

    Outlyingness is ``|x - mean| / std`` along the quantization axis (per channel over the group's tokens for
    keys, over the group's channels for values): the values that stretch their min-max range the most.
    """
    axis = 2 if layout == "channel" else 3
    mean = groups.mean(dim=axis, keepdim=True)
    std = groups.std(dim=axis, keepdim=True, correction=0)
    z = ((groups - mean).abs() / (std + 1e-12)).reshape(groups.shape[0], -1, block)  # [Hkv, N, block]
    index = torch.topk(z, count, dim=-1).indices  # [Hkv, N, count]
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, index, True).reshape(groups.shape)
    return mask, index


def _quantize_minmax(x: Tensor, bits: int, layout: str, group: int, outlier_fraction: float) -> QuantizedTensor:
    """Asymmetric min-max quantization of ``x: [Hkv, T, D]`` per group (see ``QuantizedTensor`` layouts)."""
    num_heads, num_tokens, head_dim = x.shape
    if (head_dim * bits) % 8:
        raise ValueError(f"quantization needs head_dim * bits divisible by 8, got head_dim={head_dim}, bits={bits}")
    axis_len = num_tokens if layout == "channel" else head_dim
    if group <= 0 or axis_len % group:
        raise ValueError(f"{'tokens' if layout == 'channel' else 'head_dim'}={axis_len} must be a multiple of "
                         f"group_size={group}")
    groups = _group_view(x.float(), layout, group)
    axis = 2 if layout == "channel" else 3
    block = _block_size(layout, group, head_dim)
    count = outlier_count(outlier_fraction, block)
    outlier_index = outlier_value = None
    low, high = groups, groups
    if count:
        if block > 65536:
            raise ValueError(f"outlier groups must hold at most 65536 values (16-bit offsets), got {block}")
        mask, index = _outlier_mask(groups, layout, count, block)
        low, high = groups.masked_fill(mask, float("inf")), groups.masked_fill(mask, float("-inf"))
        flat = _group_view(x, layout, group).reshape(num_heads, -1, block)
        outlier_value = flat.gather(-1, index)  # exact, in the input dtype
        outlier_index = index.to(torch.int32).to(torch.int16)  # NOTE: wraps above 32767; read back & 0xFFFF
    mn, mx = low.amin(dim=axis, keepdim=True), high.amax(dim=axis, keepdim=True)
    empty = mn > mx  # every value of the group is an outlier
    mn, mx = mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)
    levels = (1 << bits) - 1
    zero = _to_fp16(mn, up=False)
    scale = _to_fp16(((mx - zero.float()) / levels).clamp_min(_MIN_SCALE), up=True)
    codes = ((groups - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    codes = pack_bits(codes.reshape(num_heads, num_tokens, head_dim), bits)
    return QuantizedTensor(codes, scale.squeeze(axis), zero.squeeze(axis), bits, layout, group, head_dim, x.dtype,
                           outlier_index, outlier_value)


def quantize_keys_per_channel(keys: Tensor, bits: int, group_size: int,
                              outlier_fraction: float = 0.0) -> QuantizedTensor:
    """KIVI keys: each channel of each group of ``group_size`` tokens gets its own scale and zero point.

    ``keys: [Hkv, T, D]`` with ``T % group_size == 0``; ``outlier_fraction`` > 0 keeps that fraction of each
    ``[G, D]`` group exact (KVQuant dense-and-sparse).
    """
    return _quantize_minmax(keys, bits, "channel", group_size, outlier_fraction)


def quantize_values_per_token(values: Tensor, bits: int, group_size: int,
                              outlier_fraction: float = 0.0) -> QuantizedTensor:
    """KIVI values: each token's channels quantized in groups of ``group_size`` (``D % group_size == 0``)."""
    return _quantize_minmax(values, bits, "token", group_size, outlier_fraction)


def quantize_int8_per_token(x: Tensor) -> QuantizedTensor:
    """Symmetric int8 per token and KV head: ``scale = max|x| / 127`` (float16, rounded up), codes in [-127, 127]."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)  # [Hkv, T, 1]
    scale = _to_fp16((amax / 127.0).clamp_min(_MIN_SCALE), up=True)
    codes = (x.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
    return QuantizedTensor(codes.view(torch.uint8), scale, None, 8, "symmetric", x.shape[-1], x.shape[-1], x.dtype)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[Hkv, T, D]`` in ``dtype`` (math in float32); outliers are restored exactly."""
    if q.layout == "symmetric":
        return (q.codes.view(torch.int8).float() * q.scale.float()).to(dtype)
    num_heads, num_tokens = q.codes.shape[:2]
    codes = unpack_bits(q.codes, q.bits, q.head_dim).reshape(num_heads, num_tokens, q.head_dim)
    axis = 2 if q.layout == "channel" else 3
    groups = _group_view(codes, q.layout, q.group_size).float()
    assert q.zero is not None
    x = groups * q.scale.float().unsqueeze(axis) + q.zero.float().unsqueeze(axis)
    if q.outlier_index is not None and q.outlier_value is not None:
        flat = x.reshape(num_heads, -1, _block_size(q.layout, q.group_size, q.head_dim))
        index = q.outlier_index.to(torch.int64) & 0xFFFF
        x = flat.scatter(-1, index, q.outlier_value.float())
    return x.reshape(num_heads, num_tokens, q.head_dim).to(dtype)


dequantize_keys_per_channel = dequantize
dequantize_values_per_token = dequantize
dequantize_int8 = dequantize


@dataclass(frozen=True, slots=True)
class QuantizedKV:
    """One layer's stored K and V: quantized oldest tokens, then full-precision residual (newest) tokens.

    Attributes:
        keys, values: quantized parts (tokens ``[0, Tq)``) or None when nothing is quantized.
        key_residual, value_residual: ``[Hkv, T - Tq, D]`` in the model dtype.
    """

    keys: QuantizedTensor | None
    values: QuantizedTensor | None
    key_residual: Tensor
    value_residual: Tensor
    num_tokens: int

    def nbytes(self) -> int:
        total = sum(q.nbytes() for q in (self.keys, self.values) if q is not None)
        return total + sum(t.numel() * t.element_size() for t in (self.key_residual, self.value_residual))


def _join(q: QuantizedTensor | None, residual: Tensor, dtype: torch.dtype) -> Tensor:
    if q is None:
        return residual if residual.dtype == dtype else residual.to(dtype)
    return torch.cat([dequantize(q, dtype), residual.to(dtype)], dim=1)


class QuantizationPolicy(StoragePolicy):
    """Quantized storage of K and V; ``bits=16`` stores the model dtype unchanged (identity)."""

    __slots__ = ()
    kind: ClassVar[str] = "quantize"

    @abstractmethod
    def quantize(self, keys: Tensor, values: Tensor) -> QuantizedKV:
        """Store ``keys, values: [Hkv, T, D]`` (model dtype)."""

    def dequantize(self, stored: QuantizedKV, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(keys, values)``, each ``[Hkv, T, D]`` in ``dtype`` (default: the stored model dtype)."""
        dtype = dtype or stored.key_residual.dtype
        return _join(stored.keys, stored.key_residual, dtype), _join(stored.values, stored.value_residual, dtype)


@dataclass(frozen=True, slots=True)
class KIVIPolicy(QuantizationPolicy):
    """KIVI: asymmetric min-max, keys per channel over ``group`` tokens, values per token over ``group`` channels.

    Paper: "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (jy-yuan/KIVI ``models/llama_kivi.py``).
    Keys and values quantize the first ``n - n % residual`` tokens (whole groups); the rest stays full precision
    (``spec.kivi_split``). Defaults G=32, R=128 (LongBench setting). Deliberate differences: values share the
    keys' boundary (the reference keeps a sliding window of exactly ``residual`` full-precision values); codes
    packed per token along channels into uint8 (the reference packs int32 along tokens for keys), float16 scales
    rounded outward; value groups are ``min(group, head_dim)`` channels.
    """

    name: ClassVar[str] = "kivi"
    bits: int = 2
    key_bits: int | None = None  # None: bits (KIVI's k_bits / v_bits are separate settings in its reference)
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        make_stage(self.name, bits=self.bits, key_bits=self.key_bits, group=self.group, residual=self.residual)

    def quantize(self, keys: Tensor, values: Tensor) -> QuantizedKV:
        num_tokens, head_dim = keys.shape[1], keys.shape[2]
        if self.bits == 16:
            return QuantizedKV(None, None, keys, values, num_tokens)
        qk, qv = kivi_split(num_tokens, self.group, self.residual)
        kq = quantize_keys_per_channel(keys[:, :qk], self.key_bits or self.bits, self.group) if qk else None
        vq = quantize_values_per_token(values[:, :qv], self.bits, value_group(self.group, head_dim)) if qv else None
        return QuantizedKV(kq, vq, keys[:, qk:].contiguous(), values[:, qv:].contiguous(), num_tokens)


@dataclass(frozen=True, slots=True)
class Int8Policy(QuantizationPolicy):
    """Symmetric int8 per token and KV head for K and V, one float16 scale each.

    Reference: methods.md §1.5 (llama.cpp ``q8_0`` uses 32-value blocks; SGLang INT8 KV is per token and head).
    The key scale can be folded into the score: ``q · k = scale · (q · codes)``.
    """

    name: ClassVar[str] = "int8"
    bits: int = 8

    def __post_init__(self) -> None:
        make_stage(self.name, bits=self.bits)

    def quantize(self, keys: Tensor, values: Tensor) -> QuantizedKV:
        if self.bits == 16:
            return QuantizedKV(None, None, keys, values, keys.shape[1])
        empty = keys[:, :0]
        return QuantizedKV(quantize_int8_per_token(keys), quantize_int8_per_token(values), empty, values[:, :0],
                           keys.shape[1])


@dataclass(frozen=True, slots=True)
class KVQuantPolicy(QuantizationPolicy):
    """KVQuant-style: pre-RoPE keys per channel (groups of ``group`` tokens), values per token, sparse outliers.

    Paper: "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization"
    (SqueezeAILab/KVQuant). ``quantize`` expects **pre-RoPE** keys; the engine applies RoPE after dequantizing.
    ``outliers`` (default 1%) of each key group (``group × D`` values) and of each token's value vector are kept
    exact as (16-bit offset, value) pairs and excluded from the min-max range, a fixed count per group
    (``spec.kvquant_outliers``). The first ``n - n % group`` tokens are quantized (keys and values); the keys and
    values of the last ``n % group`` tokens stay full precision (``spec.kvquant_split``). Deliberate differences:
    uniform codes instead of the non-uniform Fisher-weighted datatypes (those need gradient calibration); outliers
    picked online per group by ``|x - mean| / std`` instead of offline per-channel thresholds (keys) and the top/
    bottom 0.5% per vector (values); values wait for their group's keys instead of being quantized as they arrive;
    no fp16 first-token (attention-sink) option.
    """

    name: ClassVar[str] = "kvquant"
    pre_rope_keys: ClassVar[bool] = True
    bits: int = 4
    group: int = 32
    outliers: float = 0.01

    def __post_init__(self) -> None:
        make_stage(self.name, bits=self.bits, group=self.group, outliers=self.outliers)

    def quantize(self, keys: Tensor, values: Tensor) -> QuantizedKV:
        """``keys`` are the layer's pre-RoPE keys ``[Hkv, T, D]``; ``values`` as usual."""
        num_tokens, head_dim = keys.shape[1], keys.shape[2]
        if self.bits == 16:
            return QuantizedKV(None, None, keys, values, num_tokens)
        qk = kvquant_split(num_tokens, self.group, head_dim)
        kq = quantize_keys_per_channel(keys[:, :qk], self.bits, self.group, self.outliers) if qk else None
        vq = quantize_values_per_token(values[:, :qk], self.bits, head_dim, self.outliers) if qk else None
        return QuantizedKV(kq, vq, keys[:, qk:].contiguous(), values[:, qk:].contiguous(), num_tokens)
