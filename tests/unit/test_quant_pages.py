"""KVQuant and ShadowKV records of the paged store: fixed size, equal to the planner's bytes, and decoded to what the
tensor-level policies give (KVQuant exactly, outliers included), whatever the batch dims or stale padding bytes."""

from __future__ import annotations

import pytest
import torch

from longfit.compression.kv_quant import KVQuantPolicy, pack_bits
from longfit.compression.spec import make_stage
from longfit.compression.storage import quantized_bytes
from longfit.runtime.quant_pages import (
    PageQuantFormat,
    _unpack_codes,
    from_code_order,
    grouped_code_order,
    to_code_order,
    unpack_codes_grouped,
)

NUM_KV_HEADS, HEAD_DIM, GROUP = 3, 16, 8


def _layer(dtype: torch.dtype, num_tokens: int = 4 * GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=g) * torch.linspace(0.1, 4, HEAD_DIM)
    keys[5, 1, 3] = 40.0  # a key outlier
    values = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=g)
    values[9, 0, 7] = -25.0  # a value outlier
    return keys.to(dtype), values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits, outliers", [(2, 0.0), (2, 0.1), (3, 0.05), (4, 0.01), (4, 0.1), (8, 0.2)])
def test_records_decode_to_the_policy_dequantization(bits: int, outliers: float, dtype: torch.dtype) -> None:
    stage = make_stage("kvquant", bits=bits, group=GROUP, outliers=outliers)
    cache_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    fmt = PageQuantFormat.from_stage(stage, NUM_KV_HEADS, HEAD_DIM, cache_dtype)
    keys, values = _layer(dtype)
    records = fmt.encode(keys, values)  # [4, record_bytes] uint8
    assert records.shape == (4, fmt.record_bytes) and records.dtype == torch.uint8
    assert records.numel() == quantized_bytes(stage, NUM_KV_HEADS, keys.shape[0], HEAD_DIM, dtype.itemsize)
    policy = KVQuantPolicy(bits=bits, group=GROUP, outliers=outliers)
    ref_k, ref_v = policy.dequantize(policy.quantize(keys.transpose(0, 1), values.transpose(0, 1)), torch.float32)
    got_k, got_v = fmt.decode(records)  # [T, Hkv, D] float32
    assert torch.equal(got_k, ref_k.transpose(0, 1)) and torch.equal(got_v, ref_v.transpose(0, 1))
    if outliers:  # the planted outliers come back exactly
        assert got_k[5, 1, 3] == keys[5, 1, 3].float() and got_v[9, 0, 7] == values[9, 0, 7].float()
    # batched read ([R, n, record_bytes]) with a stale padding record (any bytes): valid rows unchanged, no error
    garbage = torch.full((1, fmt.record_bytes), 0xFF, dtype=torch.uint8)
    batch = torch.stack([records, torch.cat([records[:3], garbage])])
    batch_k, batch_v = fmt.decode(batch)  # [2, T, Hkv, D]
    assert torch.equal(batch_k[0], got_k) and torch.equal(batch_v[1, :3 * GROUP], got_v[:3 * GROUP])


def test_record_size_for_smollm2_shape() -> None:
    """30 layers x 3 KV heads x 64, bf16, group 32, 1% outliers: 20 per key group and head, 1 per value vector."""
    fmt = PageQuantFormat.from_stage(make_stage("kvquant", bits=4), 3, 64, "bfloat16")
    assert fmt.outlier_counts == (20, 1)
    # scales 768 + 384, codes 3072 + 3072, outliers 3*20*4 + 32*3*1*4
    assert fmt.record_bytes == 768 + 384 + 2 * 3072 + 240 + 384 == 7920
    assert 30 * fmt.record_bytes / 32 == 7425.0  # bytes per token, against 23,040 in bf16 (3.1x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shadowkv_records_hold_the_projection_onto_the_prompt_basis(dtype: torch.dtype) -> None:
    """Records of 8-token chunks: a landmark and outlier flags, then r coefficients + exact values per token; the
    decoded keys are the policy's rank-r reconstruction, bytes equal the planner's (basis beside the pages), batched
    rows with their own bases decode independently."""
    from longfit.compression.shadowkv import factorize_keys, key_basis
    from longfit.compression.storage import kv_bytes, stored_layout
    from longfit.config import ModelConfig

    rank, width, chunk = 5, NUM_KV_HEADS * HEAD_DIM, 8
    stage = make_stage("shadowkv", rank=rank, outliers=2)
    cache_dtype = "bfloat16" if dtype == torch.bfloat16 else "float32"
    fmt = PageQuantFormat.from_stage(stage, NUM_KV_HEADS, HEAD_DIM, cache_dtype)
    assert fmt.pre_rope and fmt.has_side and fmt.record_tokens == fmt.flush_tokens == chunk
    assert fmt.record_bytes == (width + NUM_KV_HEADS + chunk * (rank + width)) * dtype.itemsize
    plain = PageQuantFormat.from_stage(make_stage("shadowkv", rank=rank, budget=0), NUM_KV_HEADS, HEAD_DIM,
                                       cache_dtype)
    assert plain.select_chunks == 0 and plain.record_bytes == chunk * (rank + width) * dtype.itemsize
    assert fmt.select_chunks == 2048 // 8 + 2 + 4  # budget / chunk + outliers + local
    assert PageQuantFormat.from_stage(make_stage("shadowkv", rank=width), NUM_KV_HEADS, HEAD_DIM) is None
    keys, values = _layer(dtype, 40)
    rotated = torch.randn(40, NUM_KV_HEADS, HEAD_DIM).to(dtype)  # stands for the post-RoPE keys
    basis = key_basis(keys.reshape(40, -1), rank).to(dtype)  # [r, Hkv*D]
    records = fmt.encode(keys, values, basis, rotated, prompt=True)
    assert records.shape == (5, fmt.record_bytes)
    got_k, got_v = fmt.decode(records, basis)
    assert torch.equal(got_v, values.float())
    ref = factorize_keys(keys.transpose(0, 1), rank)  # the tensor-level policy: [Hkv, T, D]
    assert torch.allclose(got_k, ref.reconstruct().transpose(0, 1).float(), atol=3e-2 if dtype == torch.bfloat16
                          else 1e-5)
    error = (got_k - keys.float()).norm() / keys.float().norm()
    assert 0.01 < error < 0.9  # really rank 5 of 48, better than nothing
    # landmarks: each chunk's mean post-RoPE key; outliers: per head the 2 chunks whose least similar key is least
    # similar to the landmark (a loop over heads and chunks)
    landmarks, outlier, _, _ = fmt.shadowkv_fields(records)
    chunks = rotated.float().view(5, chunk, NUM_KV_HEADS, HEAD_DIM)
    assert torch.allclose(landmarks, chunks.mean(1).to(dtype).float())
    for head in range(NUM_KV_HEADS):
        worst = [min(torch.nn.functional.cosine_similarity(chunks[c, t, head], chunks[c, :, head].mean(0), dim=0)
                     for t in range(chunk)) for c in range(5)]
        assert outlier[:, head].tolist() == [c in sorted(range(5), key=lambda c: worst[c])[:2] for c in range(5)]
    assert not fmt.shadowkv_fields(fmt.encode(keys, values, basis, rotated))[1].any()  # generated: no outliers
    layout = stored_layout(stage, NUM_KV_HEADS, 43, HEAD_DIM, dtype.itemsize)
    assert layout == (40, fmt.stream_bytes(40), fmt.side_bytes)  # 3 tokens stay dense
    config = ModelConfig.tiny(num_layers=1, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, num_heads=NUM_KV_HEADS)
    dense_tail = 2 * 3 * width * dtype.itemsize
    assert kv_bytes("shadowkv:rank=5", config, 43, dtype.itemsize) == fmt.stream_bytes(40) + fmt.side_bytes + dense_tail
    other = key_basis(torch.randn(40, width), rank).to(dtype)
    batch_k, _ = fmt.decode(torch.stack([records, fmt.encode(keys, values, other, rotated)]),
                            torch.stack([basis, other]))
    assert torch.equal(batch_k[0], got_k)
    assert torch.allclose(batch_k[1], fmt.decode(fmt.encode(keys, values, other, rotated), other)[0])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("span", [2, 8, 16, 32])
def test_grouped_unpack_is_a_permutation_of_the_natural_unpack(bits: int, span: int) -> None:
    """The fast unpack (one shift and mask per code plane) returns the natural unpack's channels in the order
    ``grouped_code_order`` states, each value group kept contiguous; the inverse order restores them."""
    head_dim = 64
    codes = torch.randint(0, 1 << bits, (2, 5, 3, head_dim), generator=torch.Generator().manual_seed(bits + span))
    packed = pack_bits(codes.to(torch.uint8), bits)
    natural = _unpack_codes(packed, bits, head_dim)
    assert torch.equal(natural, codes.float())
    order, inverse = grouped_code_order(bits, head_dim, span)
    assert sorted(order) == list(range(head_dim))
    for j in range(head_dim // span):  # channels never leave their value group
        assert {d // span for d in order[j * span:(j + 1) * span]} == {j}
    grouped = unpack_codes_grouped(packed.transpose(1, 2), bits, head_dim, span)  # a non-contiguous input too
    assert torch.equal(grouped, natural.transpose(1, 2)[..., list(order)])
    assert torch.equal(grouped[..., list(inverse)], natural.transpose(1, 2))
    # the strided views the decode path uses are the same permutations
    assert torch.equal(to_code_order(natural, bits, span), natural[..., list(order)])
    assert torch.equal(from_code_order(to_code_order(natural, bits, span), bits, span), natural)
    if span % (8 // bits) or bits == 8:
        assert order == tuple(range(head_dim))
