"""Decode attention over full-precision pages (``paged_decode_attention``) equals plain fp64 loops over rows and
heads: GQA, rows of different lengths padded with the null page, sliding windows, pages in random pool order,
one chunk and many (padded) chunks, bf16 and fp32 pools; both the torch ops and the C kernel
(``runtime.native``), which must also agree with each other at the shapes of the real models."""

from __future__ import annotations

import pytest
import torch

from longfit.models.paged_decode import paged_decode_attention
from longfit.runtime import native as kernels

# The C kernel where this machine builds it; the torch ops always.
PATHS = [False, pytest.param(True, marks=pytest.mark.skipif(kernels.library() is None, reason="no C compiler"))]

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


def _case(lens, window, dtype, seed, shape=(HKV, HQ // HKV, DIM, BS)):
    """A pool holding each row's pages in random order, everything else (null page, unwritten slots) finite
    noise; shape: (Hkv, query heads per KV head, D, block size). Returns (q, pool, pages [B, P], first_key,
    seq_lens)."""
    hkv, group, dim, bs = shape
    gen = torch.Generator().manual_seed(seed)
    first_key = [0 if window is None else max(n - window, 0) // bs * bs for n in lens]
    counts = [-(-(n - f) // bs) for n, f in zip(lens, first_key)]
    num_blocks = sum(counts) + 3
    pool = (torch.randn(num_blocks, 2, bs, hkv, dim, generator=gen) * 2).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    pages = torch.zeros(len(lens), max(counts), dtype=torch.int64)
    for row, count in enumerate(counts):
        pages[row, :count] = torch.tensor([order.pop() for _ in range(count)])
    q = (torch.randn(len(lens), hkv * group, dim, generator=gen) * 2).to(dtype)
    return q, pool, pages, torch.tensor(first_key), torch.tensor(lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lens, window", [
    ([61], None),  # batch 1, last page partly filled
    ([100, 7, 64, 33], None),  # different lengths: short rows padded with the null page
    ([100, 7, 64, 33], 20),  # sliding window: the first page read starts before the window
    ([9, 150], 64),
])
@pytest.mark.parametrize("chunk_tokens, native", [(2048, False), (16, False), (24, False), (2048, PATHS[1])])
def test_matches_plain_loops(dtype, lens, window, chunk_tokens, native):
    """Torch ops: one chunk, 2 pages per row-chunk, padded chunks; then the C kernel."""
    q, pool, pages, first_key, seq_lens = _case(lens, window, dtype, seed=len(lens) + (window or 0))
    scale = DIM ** -0.5
    got = paged_decode_attention(q, pool, pages, first_key, seq_lens, scale, window, chunk_tokens=chunk_tokens,
                                 native=native)
    want = _reference(q, pool, pages, first_key, seq_lens, scale, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    error = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert error <= 1e-5, error


@pytest.mark.parametrize("native", PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_long_rows_stay_fp32_accurate(native, threads, monkeypatch):
    """Thousands of keys over many chunks (torch) or key splits merged at the end (C kernel, 2 threads): still
    fp32-accurate (bf16 scores or probabilities would give ~1e-3)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    q, pool, pages, first_key, seq_lens = _case([3000, 1500], None, torch.bfloat16, seed=7)
    got = paged_decode_attention(q, pool, pages, first_key, seq_lens, DIM ** -0.5, None, chunk_tokens=512,
                                 native=native)
    want = _reference(q, pool, pages, first_key, seq_lens, DIM ** -0.5, None)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_layers_share_a_mask_per_tensor_pair():
    q, pool, pages, first_key, seq_lens = _case([100, 7, 64, 33], 20, torch.bfloat16, seed=3)
    masks: dict = {}
    alone = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20, native=False)
    first = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20, masks=masks, native=False)
    again = paged_decode_attention(q, pool, pages, first_key, seq_lens, 0.25, 20, masks=masks, native=False)
    assert len(masks) == 1 and torch.equal(first, alone) and torch.equal(again, alone)
    # another layer's lengths
    paged_decode_attention(q, pool, pages, first_key, seq_lens.clone(), 0.25, 20, masks=masks, native=False)
    assert len(masks) == 2


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler")
@pytest.mark.parametrize("shape", [(3, 3, 64, 32), (1, 4, 256, 32), (2, 7, 128, 16), (2, 2, 96, 16)],
                         ids=["smollm2", "gemma3", "g7-d128", "d96"])  # Hkv, g, D, bs; g > 4 and D % 64 != 0 too
@pytest.mark.parametrize("window", [None, 512])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_torch_ops_at_model_shapes(shape, window, threads, monkeypatch):
    """SmolLM2's and Gemma-3's head shapes, 7 query heads per KV head (the kernel's register blocks hold 4) and a
    head dim that is not a multiple of 64; 16 rows of 1-1500 keys (some starting past the window), 1 and 2 threads
    (key splits): the C kernel equals the torch ops to fp32 rounding."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    dim = shape[2]
    lens = [1] + torch.randint(1, 1500, (15,), generator=torch.Generator().manual_seed(11)).tolist()
    q, pool, pages, first, lens = _case(lens, window, torch.bfloat16, seed=11, shape=shape)
    got = paged_decode_attention(q, pool, pages, first, lens, dim ** -0.5, window, native=True)
    want = paged_decode_attention(q, pool, pages, first, lens, dim ** -0.5, window, native=False)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
