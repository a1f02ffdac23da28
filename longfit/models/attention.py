"""Attention over the paged KV cache, for decode tokens and prefill chunks in one flat batch.

The KV pool is one tensor ``[num_blocks, 2, block_size, Hkv, D]``: a page holds the keys (index 0) and
values (index 1) of ``block_size`` tokens of one layer. Each layer of each request has its own page table,
so layers may keep different numbers of tokens after compression. A step's tokens are laid out decode
tokens first (one per decoding request), then each prefill chunk contiguously.

Every layer first writes the step's new keys and values into its pages, then attends: decode tokens
in one batched pass over their pages in fp32 (``paged_decode_attention``; on a layer where some row has a
quantized stream, one gather + SDPA), each prefill chunk with its own SDPA over the cached prefix plus itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from longfit.models.layers import RMSNorm, RotaryEmbedding
from longfit.models.paged_decode import decode_bias, paged_decode_attention
from longfit.models.quant_decode import kivi_decode_attention, shadowkv_decode_attention
from longfit.quant.linear import Linear
from longfit.runtime.quant_pages import PageQuantFormat


@dataclass(slots=True)
class StreamRead:
    """Quantized stream pages to read (``runtime.quant_pages``) for some rows of a batch, one format.

    Decode: ``rows`` [R] batch rows, ``pages`` [R, W] stream pages (padded with 0), ``records`` [R] records each,
    ``side`` [R, ...] the format's side tensor per row (ThinK: channels [Hkv, d']; ShadowKV: basis [r, Hkv * D]).
    Prefill chunk: ``rows`` and ``records`` None, ``pages`` [W], every one of ``max_records`` records valid, ``side``
    unbatched. MiniCache: ``partner`` reads the other layer of the pair for the same rows.
    """

    fmt: PageQuantFormat
    rows: torch.Tensor | None
    pages: torch.Tensor
    records: torch.Tensor | None
    max_records: int
    side: torch.Tensor | None = None
    partner: StreamRead | None = None


@dataclass(slots=True)
class PageSelect:
    """Quest at decode for some rows of a batch (one policy): each KV head reads its top pages by key bounds.

    ``tables`` [R, C] the rows' pages in order (0 past a row's ``num_pages``), ``seq_lens`` [R] keys including the
    new one, ``bounds`` [num_blocks, 2, Hkv, D] per-page key minimum / maximum (filled for full pages).
    """

    rows: torch.Tensor
    tables: torch.Tensor
    seq_lens: torch.Tensor
    pages_kept: int  # Quest's max(3, budget // page)
    bounds: torch.Tensor


def quest_select(q: torch.Tensor, bounds: torch.Tensor, tables: torch.Tensor, num_pages: torch.Tensor,
                 pages_kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched ``compression.quest.select_pages``: q [R, Hq, D], tables [R, C], num_pages [R] →
    (table indices [R, Hkv, k] ascending, valid [R, Hkv, k]); the newest page is always read, a KV head's bound
    is the max over its query heads (``q⁺ · max + q⁻ · min``), ties go to the lower page."""
    rows, num_heads, dim = q.shape
    lo, hi = bounds[tables].float().unbind(2)  # [R, C, Hkv, D]
    num_kv_heads = lo.shape[2]
    qg = q.float().view(rows, 1, num_kv_heads, num_heads // num_kv_heads, dim)  # [R, 1, Hkv, g, D]
    bound = (qg.clamp(min=0) * hi.unsqueeze(3) + qg.clamp(max=0) * lo.unsqueeze(3)).sum(-1)  # [R, C, Hkv, g]
    score = bound.amax(dim=3).transpose(1, 2)  # [R, Hkv, C]
    index = torch.arange(tables.shape[1], device=q.device)
    last = (num_pages - 1).view(rows, 1, 1)
    score = score.masked_fill(index > last, float("-inf")).masked_fill(index == last, float("inf"))
    k = min(pages_kept, tables.shape[1])
    order = torch.argsort(score, dim=-1, descending=True, stable=True)[..., :k].sort(dim=-1).values
    return order, order <= last


@dataclass(slots=True)
class ChunkMeta:
    """A run of consecutive prompt (or multi-token) positions of one request.

    ``block_table[l]`` lists layer ``l``'s pages covering its first ``num_cached[l] + (end - start)``
    physical tokens (padded with 0). ``capture_window`` > 0 asks each layer to keep the post-RoPE queries
    of the chunk's last ``capture_window`` tokens in ``AttentionMetadata.captured`` (for compression).
    """

    start: int
    end: int
    num_cached: list[int]
    block_table: torch.Tensor  # [L, P] int64
    capture_window: int = 0
    quant: list[StreamRead | None] | None = None  # per layer: its quantized stream (block_table then holds the tail)


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step attention inputs built by the runner.

    key_rows[l, i]: row of token i's key in ``kv_pool.view(-1, Hkv, D)`` for layer l (its value sits
    ``block_size`` rows later). Decode: ``decode_block_tables[l]`` [Bd, P] pages to read,
    ``decode_first_key[l]`` [Bd] physical index of the first key those pages hold, ``decode_seq_lens[l]``
    [Bd] physical keys including the new one. On a quantized layer those describe the full-precision tail, and
    ``decode_quant[l]`` lists the streams of quantized tokens that come before it.
    """

    kv_pool: torch.Tensor
    block_size: int
    key_rows: torch.Tensor  # [L, N] int64
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [L, Bd, P] int64
    decode_first_key: torch.Tensor | None = None  # [L, Bd] int64
    decode_seq_lens: torch.Tensor | None = None  # [L, Bd] int64
    decode_quant: list[list[StreamRead] | None] | None = None
    decode_select: list[list[PageSelect] | None] | None = None  # per layer: Quest rows (their tables above are 0)
    # paged_decode_attention masks of this step, shared by layers; None: each layer builds its own (compiled steps)
    decode_masks: dict[tuple, tuple] | None = field(default_factory=dict)
    chunks: list[ChunkMeta] = field(default_factory=list)
    captured: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (chunk, layer) → [Hq, W, D]
    decode_capture: torch.Tensor | None = None  # [R] decode rows whose queries each layer keeps ...
    decode_captured: list[torch.Tensor] = field(default_factory=list)  # ... here, in layer order: [R, Hq, D] each
    rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def is_plain_decode(self) -> bool:
        """Whether every token of the step is a decode row over full-precision pages: no prefill chunk, quantized
        stream, Quest selection or query capture (the steps a compiled graph or the fused C step may take)."""
        return (self.num_decode > 0 and not self.chunks and self.decode_capture is None
                and self.decode_select is None and not any(self.decode_quant or ()))

    def rope_rows(self, rope: RotaryEmbedding, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope.cos_sin(positions)`` ([N, 1, D] fp32 each), computed once per step and rope table."""
        return self.rope_cache.get(id(rope)) or self.rope_cache.setdefault(id(rope), rope.cos_sin(positions))


def write_kv(pool: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> None:
    """Store a step's keys and values: k, v [N, Hkv, D] at ``rows`` [N] of ``pool`` viewed as [-1, Hkv, D] (each
    value ``block_size`` rows after its key), converted to the pool's dtype."""
    if torch.compiler.is_compiling():
        # Indexed on the pool itself, not a view: inductor then writes in place (through a view, the traced graph
        # copied the whole pool every layer).
        page, slot = rows // (2 * block_size), rows % (2 * block_size)
        pool.index_put_((page, torch.zeros_like(page), slot), k.to(pool.dtype))
        pool.index_put_((page, torch.ones_like(page), slot), v.to(pool.dtype))
        return
    flat = pool.view(-1, k.shape[1], k.shape[2])  # [num_blocks * 2 * bs, Hkv, D]
    flat.index_copy_(0, rows, k.to(pool.dtype))
    flat.index_copy_(0, rows + block_size, v.to(pool.dtype))


def gather_keys_values(kv_pool: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Read pages in order. pages: [..., P] int64 → keys, values: [..., P * block_size, Hkv, D]."""
    blocks = kv_pool[pages]  # [..., P, 2, bs, Hkv, D]
    lead = blocks.shape[:-5]
    _, _, bs, hkv, dim = blocks.shape[-5:]
    keys = blocks.select(-4, 0).reshape(*lead, -1, hkv, dim)
    values = blocks.select(-4, 1).reshape(*lead, -1, hkv, dim)
    return keys, values


def gather_heads_first(kv_pool: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode read: pages [B, P] → keys, values float32 [B, Hkv, P * block_size, D], contiguous.

    One row gather of whole pages, then one copy that converts to float32 and puts heads first: SDPA on CPU is
    several times slower on the strided [B, S, Hkv, D] view than on this layout (measured 2x per layer at 8k).
    """
    batch, num_pages = pages.shape
    _, _, bs, hkv, dim = kv_pool.shape
    blocks = kv_pool.view(kv_pool.shape[0], -1).index_select(0, pages.reshape(-1))
    blocks = blocks.view(batch, num_pages, 2, bs, hkv, dim)
    kv = torch.empty(2, batch, hkv, num_pages, bs, dim, dtype=torch.float32, device=kv_pool.device)
    kv.copy_(blocks.permute(2, 0, 4, 1, 3, 5))
    kv = kv.view(2, batch, hkv, num_pages * bs, dim)
    return kv[0], kv[1]


def pool_bytes(kv_pool: torch.Tensor) -> torch.Tensor:
    """The pool as ``uint8 [num_blocks, page_bytes]`` (quantized pages are byte streams)."""
    return kv_pool.view(torch.uint8).view(kv_pool.shape[0], -1)


def decode_stream(read: StreamRead, kv_pool: torch.Tensor, rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize a read's records → keys, values float32 ``[..., n, Hkv, D]`` (decode: ``[R, n, Hkv, D]``; prefill
    chunk: ``[n, Hkv, D]``). Pre-RoPE keys (KVQuant, ShadowKV) are rotated to their positions: stream token ``i`` is at
    position ``i`` (no eviction before a pre-RoPE stage)."""
    fmt, pool = read.fmt, pool_bytes(kv_pool)
    partner = None
    if read.partner is not None:
        partner = read.partner.fmt.read(pool, read.partner.pages, read.max_records)
    keys, values = fmt.decode(fmt.read(pool, read.pages, read.max_records), read.side, partner)
    if fmt.pre_rope:
        keys = rope.rotate(keys, torch.arange(keys.shape[-3], device=keys.device))
    return keys, values


def whole_batch_read(reads: list[StreamRead], batch: int) -> StreamRead | None:
    """The one read when ``reads`` is a single read of all ``batch`` decode rows in order, else None."""
    if len(reads) != 1 or reads[0].rows is None or reads[0].rows.numel() != batch:
        return None
    rows = reads[0].rows
    return reads[0] if torch.equal(rows, torch.arange(batch, device=rows.device)) else None


def stream_valid(read: StreamRead) -> torch.Tensor:
    """bool [R, max_records * G]: the stream tokens each decode row of ``read`` holds (the rest is padding)."""
    tokens = read.max_records * read.fmt.record_tokens
    assert read.records is not None
    return torch.arange(tokens, device=read.pages.device) < read.records.unsqueeze(1) * read.fmt.record_tokens


def read_streams(reads: list[StreamRead], kv_pool: torch.Tensor, batch: int,
                 rope: RotaryEmbedding) -> tuple[torch.Tensor, ...]:
    """Dequantize decode rows' streams → keys, values float32 [batch, S, Hkv, D] (keys post-RoPE) and valid
    [batch, S] (rows without a stream, and padding, are zero and invalid: padded records may hold any bytes)."""
    read = whole_batch_read(reads, batch)
    if read is not None:
        # Every row in one read, in order (batch 1, or one spec for all): its fresh tensors are the result, padding
        # zeroed in place (no zero-filled buffers, no scatter: ~11% of a KIVI decode step at 4k tokens).
        keys, values = decode_stream(read, kv_pool, rope)  # [B, n, Hkv, D]
        valid = stream_valid(read)
        if not bool(valid.all()):
            invalid = ~valid[..., None, None]
            keys.masked_fill_(invalid, 0.0)
            values.masked_fill_(invalid, 0.0)
        return keys, values, valid
    num_tokens = max(r.max_records * r.fmt.record_tokens for r in reads)
    hkv, dim = kv_pool.shape[-2:]
    keys = kv_pool.new_zeros(batch, num_tokens, hkv, dim, dtype=torch.float32)
    values = torch.zeros_like(keys)
    valid = torch.zeros(batch, num_tokens, dtype=torch.bool, device=kv_pool.device)
    for read in reads:
        k, v = decode_stream(read, kv_pool, rope)  # [R, n, Hkv, D]
        ok = torch.arange(k.shape[1], device=k.device) < read.records.unsqueeze(1) * read.fmt.record_tokens
        keys[read.rows, :k.shape[1]] = torch.where(ok[..., None, None], k, 0.0)
        values[read.rows, :k.shape[1]] = torch.where(ok[..., None, None], v, 0.0)
        valid[read.rows, :k.shape[1]] = ok
    return keys, values, valid


# KIVI decode rows that share one stream read attend from the codes (models.quant_decode); False: dequantize the
# stream and run one SDPA, the general path (tests compare the two).
FUSED_KIVI_DECODE = True


class Attention(nn.Module):
    """Multi-head attention with GQA, optional QK-norm, RoPE and a sliding window, over the paged cache."""

    def __init__(self, layer_idx: int, qkv: Linear, o_proj: Linear, num_heads: int, num_kv_heads: int,
                 head_dim: int, scale: float, rope: RotaryEmbedding, window: int | None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.qkv = qkv
        self.o_proj = o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.rope = rope
        self.window = window
        self.q_norm, self.k_norm = q_norm, k_norm

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # Heads first, then the split: views of the contiguous output (viewing the strided q, k, v slices made a
        # compiled step guard on the batch size).
        q, k, v = self.qkv(x).view(num_tokens, -1, self.head_dim).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)  # [N, Hq, D], [N, Hkv, D], [N, Hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = meta.rope_rows(self.rope, positions)
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)

        # Write first: a prefix shared with another request in this very step is read after it is written.
        pool = meta.kv_pool
        rows = meta.key_rows[self.layer_idx]
        write_kv(pool, rows, k, v, meta.block_size)

        if meta.decode_capture is not None:
            meta.decode_captured.append(q.index_select(0, meta.decode_capture))
        if not meta.chunks:  # decode rows only: their output is the result (no slice copy)
            return self.o_proj(self._decode(q, meta).reshape(num_tokens, q_size))
        out = torch.empty_like(q)  # [N, Hq, D]
        if meta.num_decode:
            out[:meta.num_decode] = self._decode(q[:meta.num_decode], meta)
        for chunk_index, chunk in enumerate(meta.chunks):
            qc = q[chunk.start:chunk.end]
            out[chunk.start:chunk.end] = self._prefill(qc, k[chunk.start:chunk.end], v[chunk.start:chunk.end],
                                                        chunk, meta)
            if chunk.capture_window:
                meta.captured[(chunk_index, self.layer_idx)] = qc[-chunk.capture_window:].transpose(0, 1)
        return self.o_proj(out.view(num_tokens, q_size))

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [Bd, Hq, D] → [Bd, Hq, D]; one query per request against its pages."""
        layer = self.layer_idx
        streams = meta.decode_quant[layer] if meta.decode_quant is not None else None
        if streams:
            out = self._decode_streams(q, streams, meta)
        else:
            out = paged_decode_attention(q, meta.kv_pool, meta.decode_block_tables[layer],
                                         meta.decode_first_key[layer], meta.decode_seq_lens[layer], self.scale,
                                         self.window, masks=meta.decode_masks).to(q.dtype)
        selects = meta.decode_select[layer] if meta.decode_select is not None else None
        for select in selects or ():
            out[select.rows] = self._decode_selected(q[select.rows], select, meta)
        return out

    def _decode_streams(self, q: torch.Tensor, streams: list[StreamRead], meta: AttentionMetadata) -> torch.Tensor:
        """A layer where some rows have quantized streams: q [Bd, Hq, D] → [Bd, Hq, D] over each row's stream, then
        its full-precision tail pages. ShadowKV rows with more chunks than they read rebuild only their selected
        chunks (``shadowkv_decode_attention``); KIVI rows sharing one read attend from the codes
        (``kivi_decode_attention``); otherwise each row's stream is dequantized (fp32, empty for rows without one)
        for one masked SDPA."""
        layer = self.layer_idx
        pages = meta.decode_block_tables[layer]  # [Bd, P]
        keys, values = gather_heads_first(meta.kv_pool, pages)  # [Bd, Hkv, S, D] float32
        # The same visibility rule (length, sliding window) as the plain pages' path, as a boolean mask [Bd, S].
        valid = decode_bias(meta.decode_first_key[layer], meta.decode_seq_lens[layer], keys.shape[2], self.window) == 0
        selected = [r for r in streams if r.fmt.select_chunks and r.max_records > r.fmt.select_chunks]
        if not selected:
            return self._attend_streams(q, streams, keys, values, valid, meta)
        dense = [r for r in streams if not any(r is s for s in selected)]
        if dense or sum(r.rows.numel() for r in selected) < q.shape[0]:  # rows left for the general path
            out = self._attend_streams(q, dense, keys, values, valid, meta)
        else:
            out = torch.empty_like(q)
        pool = pool_bytes(meta.kv_pool)
        for read in selected:
            rows = read.rows
            out[rows] = shadowkv_decode_attention(
                q[rows], read.fmt.read(pool, read.pages, read.max_records), read.fmt, read.records, read.side,
                self.rope, keys[rows], values[rows], valid[rows], self.scale).to(q.dtype)
        return out

    def _attend_streams(self, q: torch.Tensor, streams: list[StreamRead], keys: torch.Tensor, values: torch.Tensor,
                        valid: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [Bd, Hq, D] over the rows' dequantized ``streams`` (possibly none) and their tails ``keys, values``
        [Bd, Hkv, S, D] float32 (``valid`` [Bd, S]) → [Bd, Hq, D]."""
        if not streams:
            out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values,
                                                 attn_mask=valid[:, None, None, :], scale=self.scale, enable_gqa=True)
            return out.squeeze(2).to(q.dtype)
        read = whole_batch_read(streams, q.shape[0])
        if FUSED_KIVI_DECODE and read is not None and read.fmt.method == "kivi":
            records = read.fmt.read(pool_bytes(meta.kv_pool), read.pages, read.max_records)
            return kivi_decode_attention(q, records, read.fmt, stream_valid(read), keys, values, valid,
                                         self.scale).to(q.dtype)
        stream_keys, stream_values, stream_ok = read_streams(streams, meta.kv_pool, q.shape[0], self.rope)
        keys = torch.cat([stream_keys.transpose(1, 2), keys], dim=2)  # quantized tokens come before the tail
        values = torch.cat([stream_values.transpose(1, 2), values], dim=2)
        valid = torch.cat([stream_ok, valid], dim=1)
        out = F.scaled_dot_product_attention(
            q.float().unsqueeze(2),  # [Bd, Hq, 1, D]
            keys, values,  # [Bd, Hkv, S, D]
            attn_mask=valid[:, None, None, :], scale=self.scale, enable_gqa=True)
        return out.squeeze(2).to(q.dtype)

    def _decode_selected(self, q: torch.Tensor, select: PageSelect, meta: AttentionMetadata) -> torch.Tensor:
        """Quest rows: q [R, Hq, D] → [R, Hq, D], each KV head attending over its own selected pages."""
        bs = meta.block_size
        num_pages = -(-select.seq_lens // bs)  # [R]
        index, page_valid = quest_select(q, select.bounds, select.tables, num_pages, select.pages_kept)  # [R, Hkv, k]
        pages = select.tables.gather(1, index.flatten(1)).view_as(index)  # [R, Hkv, k]
        heads = torch.arange(self.num_kv_heads, device=q.device).view(1, -1, 1)
        blocks = meta.kv_pool[pages, :, :, heads]  # [R, Hkv, k, 2, bs, D]: only each head's own slices
        rows, hkv, k = index.shape
        keys = blocks[:, :, :, 0].reshape(rows, hkv, k * bs, -1).float()
        values = blocks[:, :, :, 1].reshape(rows, hkv, k * bs, -1).float()
        key_pos = (index.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).flatten(2)  # [R, Hkv, k*bs]
        valid = page_valid.repeat_interleave(bs, dim=2) & (key_pos < select.seq_lens.view(-1, 1, 1))
        group = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.float().unsqueeze(2), keys, values,  # [R, Hq, 1, D], [R, Hkv, S, D]
            attn_mask=valid.repeat_interleave(group, dim=1).unsqueeze(2), scale=self.scale, enable_gqa=True)
        return out.squeeze(2).to(q.dtype)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: ChunkMeta,
                 meta: AttentionMetadata) -> torch.Tensor:
        """q: [n, Hq, D], k/v: [n, Hkv, D] (this chunk) → [n, Hq, D], causal over cached prefix + chunk."""
        num_new = q.shape[0]
        cached = chunk.num_cached[self.layer_idx]
        first_key = 0
        stream = chunk.quant[self.layer_idx] if chunk.quant is not None else None
        if cached == 0:
            keys, values = k, v
        elif stream is not None:  # quantized stream, then the tail pages (this chunk included)
            stream_keys, stream_values = decode_stream(stream, meta.kv_pool, self.rope)  # [Sq, Hkv, D]
            num_tail = cached + num_new - stream_keys.shape[0]
            first_tail = stream.pages.shape[0]
            tail = chunk.block_table[self.layer_idx, first_tail:first_tail + -(-num_tail // meta.block_size)]
            tail_keys, tail_values = gather_keys_values(meta.kv_pool, tail)
            keys = torch.cat([stream_keys.to(q.dtype), tail_keys[:num_tail].to(q.dtype)])
            values = torch.cat([stream_values.to(q.dtype), tail_values[:num_tail].to(q.dtype)])
        else:
            total = cached + num_new
            if self.window is not None:
                first_key = max(0, cached - self.window + 1) // meta.block_size * meta.block_size
            first_page, last_page = first_key // meta.block_size, -(-total // meta.block_size)
            keys, values = gather_keys_values(meta.kv_pool, chunk.block_table[self.layer_idx, first_page:last_page])
            keys, values = keys[:total - first_key].to(q.dtype), values[:total - first_key].to(q.dtype)
        # fp32 attention: on CPU SDPA costs the same in fp32 and bf16 (2k causal, 9/3 heads: 42 ms both), and bf16
        # attention probabilities alone cost ~1% of bf16 top-1 agreement with the fp32 reference on SmolLM2.
        qt = q.float().transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D] fp32
        kt, vt = keys.float().transpose(0, 1).unsqueeze(0), values.float().transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
        if cached == 0 and self.window is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            query_pos = torch.arange(cached, cached + num_new, device=q.device).unsqueeze(1)  # [n, 1]
            key_pos = torch.arange(first_key, first_key + keys.shape[0], device=q.device).unsqueeze(0)  # [1, S]
            mask = key_pos <= query_pos
            if self.window is not None:
                mask &= key_pos > query_pos - self.window
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1).to(q.dtype)
