"""KV quantization: bit packing, per-group error bounds, outliers, policies' residual windows and byte counts."""

from __future__ import annotations

import math

import pytest
import torch

from longfit.compression.kv_quant import (
    Int8Policy,
    KIVIPolicy,
    KVQuantPolicy,
    _to_fp16,
    dequantize,
    pack_bits,
    quantize_int8_per_token,
    quantize_keys_per_channel,
    quantize_values_per_token,
    unpack_bits,
)
from longfit.compression.spec import make_stage
from longfit.compression.storage import quantized_bytes


def _codes(shape: tuple[int, ...], bits: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _reference_pack(codes: list[int], bits: int) -> list[int]:
    """Slow packing: concatenate each value's bits, least significant first, into bytes."""
    stream = [(value >> b) & 1 for value in codes for b in range(bits)]
    return [sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_matches_reference_and_round_trips(bits: int) -> None:
    codes = _codes((3, 5, 16), bits)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 16 * bits // 8)
    for row, packed_row in zip(codes.reshape(-1, 16).tolist(), packed.reshape(15, -1).tolist()):
        assert packed_row == _reference_pack(row, bits)
    assert torch.equal(unpack_bits(packed, bits, 16), codes)


def test_pack_rejects_a_ragged_bit_count() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(_codes((2, 5), 3), 3)


def test_fp16_rounding_is_directed() -> None:
    x = torch.randn(10_000) * torch.logspace(-6, 4, 10_000)
    assert bool((_to_fp16(x, up=True).float() >= x).all())
    assert bool((_to_fp16(x, up=False).float() <= x).all())
    assert float(_to_fp16(torch.tensor([1e9]), up=True)) == 65504.0  # saturates instead of inf


def _per_element_scale(q, shape: tuple[int, int, int]) -> torch.Tensor:
    """Each element's scale, broadcast back to ``[Hkv, T, D]``."""
    h, t, d = shape
    if q.layout == "channel":
        return q.scale.float().repeat_interleave(q.group_size, dim=1)
    if q.layout == "token":
        return q.scale.float().repeat_interleave(q.group_size, dim=2)
    return q.scale.float().expand(h, t, d)


def _inputs(dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 32, generator=g) * torch.rand(1, 1, 32, generator=g) * 4  # channels of varied range
    x[:, :, 3] += 20.0  # an outlier channel, as real keys have
    return x.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["channel", "token"])
def test_round_trip_error_within_half_a_step(bits: int, layout: str) -> None:
    x = _inputs()
    quantize = quantize_keys_per_channel if layout == "channel" else quantize_values_per_token
    q = quantize(x, bits, 16)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 64, 32 * bits // 8)
    assert q.scale.dtype == torch.float16 and q.zero is not None and q.zero.dtype == torch.float16
    assert q.scale.shape == ((2, 4, 32) if layout == "channel" else (2, 64, 2))
    error = (dequantize(q) - x.float()).abs()
    bound = _per_element_scale(q, x.shape) / 2
    assert bool((error <= bound * (1 + 1e-5) + 1e-6).all())
    assert q.nbytes() == 2 * 64 * 32 * bits // 8 + 2 * q.scale.numel() * 2


def test_reference_codes_per_group() -> None:
    """Slow reference: min-max codes computed group by group with Python floats."""
    x = _inputs(torch.float32)[:, :32, :8]
    q = quantize_keys_per_channel(x, 2, 16)
    codes = unpack_bits(q.codes, 2, 8)
    for h in range(2):
        for group in range(2):
            for c in range(8):
                column = x[h, group * 16:(group + 1) * 16, c].tolist()
                zero, scale = float(q.zero[h, group, c]), float(q.scale[h, group, c])
                assert zero <= min(column) and zero + 3 * scale >= max(column) * (1 - 1e-6) - 1e-6
                expected = [min(3, max(0, round((v - zero) / scale))) for v in column]
                assert codes[h, group * 16:(group + 1) * 16, c].tolist() == expected


def test_more_bits_smaller_error() -> None:
    x = _inputs()
    errors = [float((dequantize(quantize_values_per_token(x, b, 32)) - x.float()).abs().mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 20


def test_constant_group_is_exact() -> None:
    x = torch.full((1, 32, 8), 0.375)
    assert torch.equal(dequantize(quantize_keys_per_channel(x, 2, 32)), x)


def test_int8_symmetric_per_token() -> None:
    x = _inputs()
    q = quantize_int8_per_token(x)
    assert q.codes.shape == (2, 64, 32) and q.scale.shape == (2, 64, 1) and q.zero is None
    assert int(q.codes.view(torch.int8).abs().max()) <= 127
    error = (dequantize(q) - x.float()).abs()
    assert bool((error <= q.scale.float() / 2 * (1 + 1e-5) + 1e-6).all())
    assert q.nbytes() == 2 * 64 * 32 + 2 * 64 * 2


@pytest.mark.parametrize("layout", ["channel", "token"])
def test_outliers_are_exact_and_tighten_the_rest(layout: str) -> None:
    x = torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(3))
    x[0, 5, 2], x[1, 17, 9] = 40.0, -35.0  # two spikes
    quantize = quantize_keys_per_channel if layout == "channel" else quantize_values_per_token
    group = 16
    plain, sparse = quantize(x, 2, group), quantize(x, 2, group, outlier_fraction=0.05)
    assert sparse.outlier_index is not None and sparse.outlier_value is not None
    restored = dequantize(sparse)
    assert float(restored[0, 5, 2]) == 40.0 and float(restored[1, 17, 9]) == -35.0
    spike = torch.zeros_like(x, dtype=torch.bool)
    spike[0, 5, 2] = spike[1, 17, 9] = True
    plain_error = (dequantize(plain) - x).abs()[~spike].mean()
    sparse_error = (restored - x).abs()[~spike].mean()
    assert sparse_error < plain_error
    block = group * 16 if layout == "channel" else group
    count = int(0.05 * block + 0.5)
    assert sparse.outlier_index.shape[-1] == count
    assert sparse.nbytes() == plain.nbytes() + sparse.outlier_index.numel() * (2 + 4)


def test_outlier_offsets_above_32767_survive_int16() -> None:
    x = torch.randn(1, 128, 256, generator=torch.Generator().manual_seed(4))
    x[0, 127, 255] = 100.0  # flat offset 32767 + ... = 127 * 256 + 255 = 32767; and one past it
    x[0, 127, 254] = -100.0
    x2 = torch.cat([x, x], dim=1)
    x2[0, 255, 200] = 90.0  # second group, offset 127 * 256 + 200 = 32712
    restored = dequantize(quantize_keys_per_channel(x2, 4, 128, outlier_fraction=0.001))
    assert float(restored[0, 127, 255]) == 100.0 and float(restored[0, 255, 200]) == 90.0
    y = torch.randn(1, 256, 256, generator=torch.Generator().manual_seed(5))
    y[0, 200, 100] = 77.0  # offset 200 * 256 + 100 = 51300 > 32767
    assert float(dequantize(quantize_keys_per_channel(y, 4, 256, outlier_fraction=0.0001))[0, 200, 100]) == 77.0


@pytest.mark.parametrize("num_tokens", [1, 31, 32, 100, 128, 129, 300])
def test_kivi_residual_windows_and_bytes(num_tokens: int) -> None:
    keys, values = _inputs(seed=1).repeat(1, 5, 1)[:, :num_tokens], _inputs(seed=2).repeat(1, 5, 1)[:, :num_tokens]
    policy = KIVIPolicy(bits=2, group=32, residual=64)
    stored = policy.quantize(keys, values)
    quantized_keys = num_tokens - num_tokens % 64
    assert stored.key_residual.shape[1] == num_tokens - quantized_keys < 64
    assert stored.value_residual.shape[1] == num_tokens - quantized_keys  # values share the keys' boundary
    assert (stored.keys is None) == (quantized_keys == 0)
    assert stored.nbytes() == quantized_bytes(make_stage("kivi", bits=2, group=32, residual=64), 2, num_tokens, 32, 2)
    restored_keys, restored_values = policy.dequantize(stored)
    assert restored_keys.dtype == torch.bfloat16 and restored_keys.shape == keys.shape
    # the full-precision windows come back bit for bit
    assert torch.equal(restored_keys[:, quantized_keys:], keys[:, quantized_keys:])
    assert torch.equal(restored_values[:, quantized_keys:], values[:, quantized_keys:])


@pytest.mark.parametrize("policy", [KIVIPolicy(bits=16), Int8Policy(bits=16), KVQuantPolicy(bits=16)])
def test_sixteen_bits_is_the_identity(policy) -> None:
    keys, values = _inputs(seed=1), _inputs(seed=2)
    restored_keys, restored_values = policy.dequantize(policy.quantize(keys, values))
    assert torch.equal(restored_keys, keys) and torch.equal(restored_values, values)
    assert restored_keys.dtype == keys.dtype


@pytest.mark.parametrize("policy, spec", [
    (Int8Policy(), make_stage("int8")),
    (KVQuantPolicy(bits=3, group=16, outliers=0.02), make_stage("kvquant", bits=3, group=16, outliers=0.02)),
    (KVQuantPolicy(bits=2, group=32, outliers=0.0), make_stage("kvquant", bits=2, group=32, outliers=0.0)),
    (KIVIPolicy(bits=4, group=16, residual=32), make_stage("kivi", bits=4, group=16, residual=32)),
    (KIVIPolicy(bits=2, key_bits=4, group=16, residual=32), make_stage("kivi", bits=2, key_bits=4, group=16,
                                                                        residual=32)),
])
def test_policy_bytes_equal_the_spec_formula(policy, spec) -> None:
    for num_tokens in (5, 40, 64):
        keys, values = _inputs(seed=1)[:, :num_tokens], _inputs(seed=2)[:, :num_tokens]
        stored = policy.quantize(keys, values)
        assert stored.nbytes() == quantized_bytes(spec, 2, num_tokens, 32, 2)
        restored_keys, restored_values = policy.dequantize(stored)
        assert restored_keys.shape == keys.shape and restored_values.shape == values.shape


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angle = positions.float()[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def test_kvquant_pre_rope_keys_then_rope() -> None:
    """Quantize pre-RoPE keys, dequantize, rotate: close to rotating the originals (rotation preserves norms)."""
    pre = _inputs(torch.float32, seed=6)
    positions = torch.arange(pre.shape[1])
    policy = KVQuantPolicy(bits=4, group=32, outliers=0.01)
    restored, _ = policy.dequantize(policy.quantize(pre, pre))
    error = (_rope(restored, positions) - _rope(pre, positions)).norm(dim=-1)
    assert torch.allclose(error, (restored - pre).norm(dim=-1), atol=1e-4)
    assert float(error.max()) < 0.1 * float(pre.norm(dim=-1).min())


def test_kivi_attention_close_to_bf16() -> None:
    g = torch.Generator().manual_seed(7)
    keys, values = torch.randn(2, 256, 64, generator=g), torch.randn(2, 256, 64, generator=g)
    query = torch.randn(2, 1, 64, generator=g)

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(query @ k.float().transpose(1, 2) / math.sqrt(64), dim=-1)
        return probs @ v.float()

    exact = attend(keys, values)
    relative = {}
    for bits in (2, 4, 16):  # uniform noise of a step s has rms s / sqrt(12): ~0.09 of sigma at 4 bits, ~0.45 at 2
        policy = KIVIPolicy(bits=bits, group=32, residual=32)
        k, v = policy.dequantize(policy.quantize(keys, values), torch.float32)
        relative[bits] = float((attend(k, v) - exact).norm() / exact.norm())
    assert relative[16] == 0.0 and relative[4] < 0.15 and relative[2] < 0.7 and relative[4] < relative[2] / 3
