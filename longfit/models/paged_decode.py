"""Decode attention over full-precision pages: one query per request, GQA, fp32 scores and softmax.

The pool is ``[num_blocks, 2, block_size, Hkv, D]`` (keys at index 0, values at 1), in bf16 or fp32. A decode step
reads every page of every request once per layer, so at depth the cost is the pool read plus the fp32 work on it.

On CPU, ``paged_decode_attention`` runs the C kernel of ``runtime/csrc/paged_decode.c`` (``runtime.native``) when
the machine's compiler built it: one pass over each row's pages that reads every KV byte once, in bf16, with a
running softmax (3.5-6.8x faster per layer than the torch ops below from depth 16 to 8k, on SmolLM2's shapes at 1
thread: ``scripts/bench_paged_decode.py``). The torch ops below are its fallback (no compiler,
``LONGFIT_NATIVE=0``, other devices) and its reference in the tests.

The former path (gather all pages, one 6-D permuting copy to fp32 ``[B, Hkv, S, D]``, SDPA with a mask) spent
most of its time in that copy (TensorIterator is slow on 64-element runs across 6 dims, and its 12 MiB fp32 output
at 8k leaves the cache) and in SDPA's masked path. The torch ops, per layer on SmolLM2 shapes (9 query / 3 KV heads,
D 64, pages of 32), 1 thread: 1.0x at 2k, 1.25x at 4k, 1.55x at 8k for one row; 1.8x for 4 rows of 2k-4k, 4x for
16 rows of 1k-2k. It

- reads the pages in chunks of about ``chunk_tokens`` (row, token) pairs, so a chunk's fp32 keys or values stay
  in cache between their conversion and their matmul;
- groups the query heads per KV head (``[B*Hkv, g, D]``) so each key and value is read once, no expanded K/V;
- converts keys and values separately into a heads-first ``[B, Hkv, n, D]`` buffer: MKL's batched matmul with
  3 query rows costs about the bytes of its other operand and runs ~20% (in cache) to 2x (out of it) slower on
  per-head strided views of the token-major page layout;
- masks by adding a 0 / -inf bias (``masked_fill_`` with a broadcast mask cost 4-10x more) and takes the softmax
  over all chunks at once (two passes: all scores, then ``p @ V``), so no per-chunk log-sum-exp merge.

Everything stays fp32 from the scores on, so the result matches an fp32 reference to rounding (max error 3e-6 of
the largest output against fp64 at 8k, as the former path; bf16 matmuls would round scores and probabilities:
~0.4%). At 2k one row is at the floor of these ops (gather ~0.13 ms from DRAM, 2 conversions ~0.13 ms, 2 matmuls
~0.2 ms): the MKL matmuls with 3 rows (~15 GB/s) and the bf16→fp32 copies bound it, not Python.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longfit.runtime import native as kernels

# A chunk's fp32 keys are chunk_tokens * Hkv * D * 4 bytes: 1.5 MiB for SmolLM2 (1 MiB L2 + shared L3 on the
# machine measured). Per layer, 1 thread: one row at 8k the same from 1024 to 4096 tokens, 1.8x slower in one
# 8192 chunk; 4 rows at 4k 2048 (512 a row) 20% faster than 8192; 16 rows at 2k 2048 (128 a row) 1.7x faster
# than 16384. One chunk is best at 2k for one row (fewest ops, whole-page gathers).
DECODE_CHUNK_TOKENS = 2048


def decode_bias(first_key: torch.Tensor, seq_lens: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """Additive mask: first_key, seq_lens [B] int64 → fp32 [B, num_keys], 0 for key ``first_key + j`` if it is
    before ``seq_lens`` (and within the last ``window`` positions), else -inf."""
    # key position minus seq_len: valid keys are in [-window, 0)
    offset = torch.arange(num_keys, device=first_key.device) + (first_key - seq_lens).unsqueeze(1)  # [B, S]
    invalid = offset >= 0
    if window is not None:
        invalid |= offset < -window
    return torch.where(invalid, float("-inf"), 0.0)


def shared_bias(masks: dict | None, first_key: torch.Tensor, seq_lens: torch.Tensor, num_keys: int,
                window: int | None) -> torch.Tensor:
    """``decode_bias``, built once per (first_key, seq_lens) tensor pair in ``masks`` (a dict that lives one step,
    holding those tensors alive, so their ids stay theirs): the runner gives the layers with equal values the same
    tensors, and the ~5 small ops of a mask cost ~15 µs a layer, ~0.4 ms of a 30-layer step."""
    if masks is None:
        return decode_bias(first_key, seq_lens, num_keys, window)
    key = (id(first_key), id(seq_lens), num_keys, window)
    if key not in masks:
        masks[key] = (decode_bias(first_key, seq_lens, num_keys, window), first_key, seq_lens)
    return masks[key][0]


def paged_decode_attention(q: torch.Tensor, kv_pool: torch.Tensor, pages: torch.Tensor, first_key: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: int | None = None,
                           chunk_tokens: int = DECODE_CHUNK_TOKENS, masks: dict | None = None,
                           native: bool | None = None) -> torch.Tensor:
    """One decode query per row against its pages.

    On CPU this runs the C kernel ``runtime.native.paged_decode`` where it is built (see above), as an op of the
    graph while a compiled step is traced (``runtime.native.IN_GRAPH``); elsewhere, with ``native=False`` or with
    ``LONGFIT_NATIVE=0``, the torch ops below. ``native=True`` requires the kernel (tests).

    q: [B, Hq, D] (any float dtype); kv_pool: [num_blocks, 2, bs, Hkv, D] bf16 or fp32; pages: [B, P] int64
    pool pages in order (rows with fewer pages padded with the null page 0); first_key: [B] int64 position of
    the first key those pages hold; seq_lens: [B] int64 keys including the new one. Key ``first_key + j`` is
    read where it is ``< seq_lens`` and, with a ``window``, ``> seq_lens - 1 - window``; every row needs at
    least one such key. Returns [B, Hq, D] fp32. Masked slots must hold finite values (the pool starts zero,
    the runner zeroes pages that held packed codes): their values are multiplied by zero probabilities, and
    unlike SDPA's boolean mask the bias is added to their scores, so a NaN key would poison its row.
    ``masks``: see ``shared_bias``.
    """
    if torch.compiler.is_compiling():
        if (kernels.IN_GRAPH and native is not False and kv_pool.device.type == "cpu"
                and kv_pool.dtype in (torch.bfloat16, torch.float32)):
            return kernels.paged_decode_op(q, kv_pool, pages, first_key, seq_lens, scale, window or 0)
    elif native is not False and kernels.paged_decode_supported(q, kv_pool):
        return kernels.paged_decode(q, kv_pool, pages, first_key, seq_lens, scale, window)
    if native:
        raise RuntimeError("the C decode-attention kernel is not available for this call")
    batch, num_pages = pages.shape
    num_blocks, _, bs, hkv, dim = kv_pool.shape
    num_heads = q.shape[1]
    group = num_heads // hkv
    # Chunks only help caches; on an accelerator one chunk (fewest launches).
    per_chunk = max(1, chunk_tokens // (batch * bs)) if kv_pool.device.type == "cpu" else num_pages
    num_chunks = -(-num_pages // per_chunk)
    queries = q.float().reshape(batch * hkv, group, dim)  # query heads grouped by their KV head
    if num_chunks == 1:
        bias = shared_bias(masks, first_key, seq_lens, num_pages * bs, window)
        return _attend(queries, kv_pool, pages, bias, scale).view(batch, num_heads, dim)
    # Equal chunks (padded with the null page, masked), so the scores of all chunks are one tensor for one softmax.
    per_chunk = -(-num_pages // num_chunks)
    if num_chunks * per_chunk != num_pages:
        pages = F.pad(pages, (0, num_chunks * per_chunk - num_pages))
    chunk = per_chunk * bs
    halves = kv_pool.view(num_blocks, 2, bs * hkv * dim)  # a page's keys, then its values, each contiguous
    chunk_pages = pages.view(batch, num_chunks, per_chunk).transpose(0, 1)  # [n, B, per_chunk]
    buf = torch.empty(batch, hkv, per_chunk, bs, dim, dtype=torch.float32, device=q.device)  # keys, then values
    heads = buf.view(batch * hkv, chunk, dim)

    def load(c: int, half: int) -> None:
        rows = halves[:, half].index_select(0, chunk_pages[c].reshape(-1))  # [B * per_chunk, bs * Hkv * D]
        buf.copy_(rows.view(batch, per_chunk, bs, hkv, dim).permute(0, 3, 1, 2, 4))

    scores = torch.empty(num_chunks, batch, num_heads, chunk, dtype=torch.float32, device=q.device)
    for c in range(num_chunks):
        load(c, 0)
        out_c = scores[c].view(batch * hkv, group, chunk)
        torch.baddbmm(out_c, queries, heads.transpose(1, 2), beta=0, alpha=scale, out=out_c)
    bias = shared_bias(masks, first_key, seq_lens, num_chunks * chunk, window)  # [B, n * C]
    scores += bias.view(batch, 1, num_chunks, chunk).permute(2, 0, 1, 3)
    # Softmax over all chunks at once: exp(s - max) here, the division by its sum after p @ V.
    scores.sub_(scores.amax(dim=(0, 3), keepdim=True)).exp_()
    total = scores.sum(dim=(0, 3))  # [B, Hq]
    out = torch.zeros(batch * hkv, group, dim, dtype=torch.float32, device=q.device)
    for c in range(num_chunks):
        load(c, 1)
        out.baddbmm_(scores[c].view(batch * hkv, group, chunk), heads)
    return out.view(batch, num_heads, dim).div_(total.unsqueeze(-1))


def _attend(queries: torch.Tensor, kv_pool: torch.Tensor, pages: torch.Tensor, bias: torch.Tensor,
            scale: float) -> torch.Tensor:
    """``paged_decode_attention`` in one chunk (fewest ops: at depth 0 the fixed cost per layer matters):
    queries [B*Hkv, g, D] fp32, bias [B, P * bs] fp32 → [B*Hkv, g, D] fp32. Whole pages in one gather (24 KiB
    rows read ~1.5x faster from DRAM than their 12 KiB halves)."""
    batch, num_pages = pages.shape
    num_blocks, _, bs, hkv, dim = kv_pool.shape
    num_keys = num_pages * bs
    blocks = kv_pool.view(num_blocks, -1).index_select(0, pages.reshape(-1))
    blocks = blocks.view(batch, num_pages, 2, bs, hkv, dim)
    buf = torch.empty(batch, hkv, num_pages, bs, dim, dtype=torch.float32, device=queries.device)
    heads = buf.view(batch * hkv, num_keys, dim)
    buf.copy_(blocks[:, :, 0].permute(0, 3, 1, 2, 4))
    scores = torch.baddbmm(heads.new_empty(()), queries, heads.transpose(1, 2), beta=0, alpha=scale)
    scores.view(batch, -1, num_keys).add_(bias.unsqueeze(1))
    probs = scores.softmax(-1)
    buf.copy_(blocks[:, :, 1].permute(0, 3, 1, 2, 4))
    return torch.bmm(probs, heads)
