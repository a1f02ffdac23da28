"""Decode attention over full-precision pages (``paged_decode_attention``) equals plain fp64 loops over rows and
heads: GQA, rows of different lengths padded with the null page, sliding windows, pages in random pool order,
one chunk and many (padded) chunks, bf16 and fp32 pools."""

from __future__ import annotations

import pytest
import torch

from longfit.models.paged_decode import paged_decode_attention

BS, HKV, HQ, DIM = 8, 2, 6, 16


def _reference(q, pool, pages, first_key, seq_lens, scale, window):
    """[B, Hq, D] fp64: each row reads its pages in order, keeps keys first_key + j < seq_len (and within the
    window), and each query head attends with its KV head, one softmax per row and head."""
    group = q.shape[1] // pool.shape[3]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row in range(q.shape[0]):
        keys, values, positions = [], [], []
        for index, page in enumerate(pages[row].tolist()):
            for slot in range(BS):
                position = int(first_key[row]) + index * BS + slot
                if position >= int(seq_lens[row]) or (window is not None and position <= seq_lens[row] - 1 - window):
                    continue
                keys.append(pool[page, 0, slot].double())  # [Hkv, D]
                values.append(pool[page, 1, slot].double())
                positions.append(position)
        keys, values = torch.stack(keys), torch.stack(values)  # [n, Hkv, D]
        for head in range(q.shape[1]):
            scores = keys[:, head // group] @ q[row, head].double() * scale  # [n]
            out[row, head] = scores.softmax(0) @ values[:, head // group]
    return out


def _case(lens, window, dtype, seed):
    """A pool holding each row's pages in random order, everything else (null page, unwritten slots) finite
    noise; returns (q, pool, pages [B, P], first_key, seq_lens)."""
    gen = torch.Generator().manual_seed(seed)
    first_key = [0 if window is None else max(n - window, 0) // BS * BS for n in lens]
    counts = [-(-(n - f) // BS) for n, f in zip(lens, first_key)]
    num_blocks = sum(counts) + 3
    pool = (torch.randn(num_blocks, 2, BS, HKV, DIM, generator=gen) * 2).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    pages = torch.zeros(len(lens), max(counts), dtype=torch.int64)
    for row, count in enumerate(counts):
        pages[row, :count] = torch.tensor([order.pop() for _ in range(count)])
    q = (torch.randn(len(lens), HQ, DIM, generator=gen) * 2).to(dtype)
    return q, pool, pages, torch.tensor(first_key), torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lens, window", [
    ([61], None),  # batch 1, last page partly filled
    ([100, 7, 64, 33], None),  # different lengths: short rows padded with the null page
    ([100, 7, 64, 33], 20),  # sliding window: the first page read starts before the window
    ([9, 150], 64),
])
@pytest.mark.parametrize("chunk_tokens", [2048, 16, 24])  # one chunk; 2 pages per row-chunk; padded chunks
def test_matches_plain_loops(dtype, lens, window, chunk_tokens):
    q, pool, pages, first_key, seq_lens = _case(lens, window, dtype, seed=len(lens) + (window or 0))
    scale = DIM ** -0.5
    got = paged_decode_attention(q, pool, pages, first_key, seq_lens, scale, window, chunk_tokens=chunk_tokens)
    want = _reference(q, pool, pages, first_key, seq_lens, scale, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    error = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert error <= 1e-5, error


def test_long_rows_stay_fp32_accurate():
    """Thousands of keys over many chunks: still fp32-accurate (bf16 scores or probabilities would give ~1e-3)."""
    q, pool, pages, first_key, seq_lens = _case([3000, 1500], None, torch.bfloat16, seed=7)
    got = paged_decode_attention(q, pool, pages, first_key, seq_lens, DIM ** -0.5, None, chunk_tokens=512)
    want = _reference(q, pool, pages, first_key, seq_lens, DIM ** -0.5, None)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_layers_share_a_mask_per_tensor_pair():
    q, pool, pages, first_key, seq_lens = _case([100, 7, 64, 33], 20, torch.bfloat16, seed=3)
    masks: dict = {}
    alone = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20)
    first = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20, masks=masks)
    again = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20, masks=masks)
    assert len(masks) == 1 and torch.equal(first, alone) and torch.equal(again, alone)
    paged_decode_attention(q, pool, pages, first_key, seq_lens.clone(), 0.25, 20, masks=masks)  # another layer's lengths
    assert len(masks) == 2
