"""Decode attention straight from packed records: KIVI (scores from the key codes, outputs from the value codes)
and ShadowKV (only the chunks each KV head selects are rebuilt).

KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al. 2024) stores keys per channel
(one fp16 scale and zero per channel per group of G tokens) and values per token (one scale and zero per token per
group of ``vg`` channels). Both are affine in the codes, so attention never needs the dequantized tensors:

    q · k_t   = Σ_d (q_d s_{g,d}) c_{t,d} + Σ_d q_d z_{g,d}               (key group g holds token t)
    Σ_t p_t v_t = Σ_t (p_t s_{t,j}) c_{t,d} + Σ_t p_t z_{t,j}             (value channel group j holds d)

so the scale folds into the (small) query per group and into the (small) probabilities per token, and the codes
meet them in batched matmuls. The general path (``attention.read_streams``: dequantize the whole stream to fp32,
concatenate it with the full-precision tail, one masked SDPA) writes and re-reads every K/V element several times
more; this one unpacks the codes once, heads first, and multiplies them. The KIVI paper's own CUDA kernels fuse
the unpacking into the matmul as well; eager PyTorch cannot. What it can do is unpack with one shift and mask per
code plane on 4-byte words (``quant_pages.unpack_codes_grouped``), which leaves the channels permuted inside each
value group: the query is permuted to match, and the values' output permuted back, both ``[.., D]``. All value
groups go through one matmul (the codes read once). Even so the fp32 codes are twice the bytes of a bf16 full
cache, so on a CPU this path approaches, not beats, full-cache decode speed (docs/COMPRESSION.md).

The result equals dequantize + softmax attention up to fp32 rounding (``tests/model/test_quant_decode.py``
compares it with that slow path, padding records of garbage bytes included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longfit.compression.shadowkv import select_chunks
from longfit.models.layers import RotaryEmbedding
from longfit.runtime.quant_pages import PageQuantFormat, from_code_order, to_code_order


def kivi_decode_attention(q: Tensor, records: Tensor, fmt: PageQuantFormat, stream_valid: Tensor,
                          tail_keys: Tensor, tail_values: Tensor, tail_valid: Tensor, scale: float) -> Tensor:
    """One decode query per row over its KIVI stream, then its full-precision tail.

    Args:
        q: [B, Hq, D] queries (any float dtype; computed in fp32).
        records: uint8 [B, n, record_bytes], each row's stream records (``fmt.read``); rows with fewer records hold
            padding (any bytes), masked by ``stream_valid``.
        fmt: the stream's format (method "kivi").
        stream_valid: bool [B, n * G], the stream tokens each row attends to.
        tail_keys, tail_values: fp32 [B, Hkv, S, D], the tail pages (``attention.gather_heads_first``).
        tail_valid: bool [B, S].
        scale: softmax scale.

    Returns:
        fp32 [B, Hq, D].
    """
    batch, num_heads, dim = q.shape
    hkv = fmt.num_kv_heads
    group = num_heads // hkv
    k_scale, k_zero, k_codes, v_scale, v_zero, v_codes = fmt.kivi_operands(records)
    # Padding records may hold NaN scales: zero them so masked tokens contribute exactly 0 (0 · NaN is NaN).
    record_ok = stream_valid.view(batch, -1, fmt.record_tokens)[..., 0]  # [B, n]
    k_scale = k_scale.masked_fill(~record_ok[..., None, None], 0.0)  # [B, n, Hkv, D]
    k_zero = k_zero.masked_fill(~record_ok[..., None, None], 0.0)
    token_ok = ~stream_valid[:, None, None, :]  # [B, 1, 1, T]
    v_scale, v_zero = v_scale.masked_fill(token_ok, 0.0), v_zero.masked_fill(token_ok, 0.0)  # [B, Hkv, D/vg, T]

    # The codes come with the channels permuted inside each value group (grouped_code_order): permute the query
    # and the key scales to match for the scores, and the stream's output back (all tiny next to the codes).
    vg = fmt.value_group
    qg = q.float().view(batch, 1, hkv, group, dim)  # [B, 1, Hkv, g, D]
    # [B, n, Hkv, g, D]: the query with each key group's channel scales folded in, in the key codes' order
    qs = to_code_order(qg, fmt.kbits, vg) * to_code_order(k_scale, fmt.kbits, vg).unsqueeze(3)
    bias = (qg * k_zero.unsqueeze(3)).sum(-1, keepdim=True)  # [B, n, Hkv, g, 1]
    stream_scores = torch.matmul(qs, k_codes.transpose(-1, -2)).add_(bias)  # [B, n, Hkv, g, G]
    num_stream = stream_scores.shape[1] * fmt.record_tokens
    stream_scores = stream_scores.permute(0, 2, 3, 1, 4).reshape(batch, hkv, group, num_stream)
    tail_scores = torch.matmul(qg.squeeze(1), tail_keys.transpose(-1, -2))  # [B, Hkv, g, S]
    scores = torch.cat([stream_scores, tail_scores], dim=-1).mul_(scale)
    valid = torch.cat([stream_valid, tail_valid], dim=1)  # [B, T + S]
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, Hkv, g, T + S]
    p_stream, p_tail = probs[..., :num_stream], probs[..., num_stream:]

    width, num_groups = fmt.value_group, dim // fmt.value_group
    # One pass over the value codes for all channel groups: row (j, i) of the weights is p_t s_{t,j} for query head
    # i, multiplied with every channel, and only group j's channels of its result are kept (num_groups x the
    # products of a matmul per group, but the codes are read once and contiguously).
    weights = p_stream.unsqueeze(2) * v_scale.unsqueeze(3)  # [B, Hkv, D/vg, g, T]
    full = torch.matmul(weights.reshape(batch, hkv, num_groups * group, -1), v_codes)  # [B, Hkv, D/vg * g, D]
    blocks = full.view(batch, hkv, num_groups, group, num_groups, width).diagonal(dim1=2, dim2=4)  # [.., g, vg, D/vg]
    stream = blocks.permute(0, 1, 2, 4, 3).reshape(batch, hkv, group, dim)  # permuted channels
    out = torch.matmul(p_tail, tail_values)  # [B, Hkv, g, D]
    out += from_code_order(stream, fmt.bits, vg)
    zeros = torch.matmul(p_stream, v_zero.transpose(-1, -2))  # [B, Hkv, g, D/vg]: Σ_t p_t z_{t,j}
    out += zeros.repeat_interleave(width, dim=-1)
    return out.view(batch, num_heads, dim)


def shadowkv_decode_attention(q: Tensor, records: Tensor, fmt: PageQuantFormat, num_records: Tensor, basis: Tensor,
                              rope: RotaryEmbedding, tail_keys: Tensor, tail_values: Tensor, tail_valid: Tensor,
                              scale: float) -> Tensor:
    """One decode query per row over the ShadowKV chunks its KV heads select, then its full-precision tail.

    ``q: [R, Hq, D]`` post-RoPE; ``records: uint8 [R, n, record_bytes]`` (chunks of ``C`` tokens with landmarks),
    ``num_records: [R]`` chunks each row holds (the rest is padding), ``basis: [R, r, Hkv * D]``; tail
    ``[R, Hkv, S, D]`` float32 with ``tail_valid: [R, S]`` → float32 ``[R, Hq, D]``.

    Paper: ShadowKV (bytedance/ShadowKV ``models/kv_cache.py``): each KV head reads ``fmt.select_chunks`` chunks
    (``compression.shadowkv.select_chunks``: its outlier chunks, the ``local_chunks`` most recent, then the best by
    landmark score), rebuilds only their keys from the coefficients (pre-RoPE, then rotated to their positions) and
    attends over them and the tail. Reading every chunk gives the same attention as the dense path.
    """
    rows, num_heads, dim = q.shape
    chunk, num_kv_heads, num_chunks = fmt.record_tokens, fmt.num_kv_heads, records.shape[1]
    landmarks, outlier = fmt.shadowkv_landmarks(records)  # [R, n, Hkv, D] float32, [R, n, Hkv] bool
    index = torch.arange(num_chunks, device=q.device)
    valid = index < num_records.unsqueeze(1)  # [R, n]
    local = index >= (num_records - fmt.local_chunks).unsqueeze(1)
    chosen = select_chunks(q, landmarks, outlier | local.unsqueeze(-1), valid, fmt.select_chunks)  # [R, Hkv, k]
    k = chosen.shape[-1]
    # Only the chosen records are copied and parsed (whole rows: one index_select), each KV head's own chunks.
    flat = (chosen + torch.arange(rows, device=q.device).view(-1, 1, 1) * num_chunks).reshape(-1)
    picked = records.reshape(rows * num_chunks, -1).index_select(0, flat).view(rows * num_kv_heads, k, -1)
    _, _, coefficients, values = fmt.shadowkv_fields(picked, landmarks=False)  # [R*Hkv, k, C, r], [.., C, Hkv, D]
    per_head = basis.view(rows, fmt.rank, num_kv_heads, dim).permute(0, 2, 1, 3)  # [R, Hkv, r, D]
    keys = torch.matmul(coefficients.view(rows, num_kv_heads, k * chunk, fmt.rank).float(), per_head.float())
    positions = (chosen.unsqueeze(-1) * chunk + torch.arange(chunk, device=q.device)).reshape(-1)
    cos, sin = rope.cos_sin(positions)  # [R*Hkv*k*C, 1, D]
    keys = RotaryEmbedding.apply(keys.reshape(-1, 1, dim), cos, sin).reshape(rows, num_kv_heads, k * chunk, dim)
    own = values.view(rows, num_kv_heads, k, chunk, num_kv_heads, dim).diagonal(dim1=1, dim2=4)  # [R, k, C, D, Hkv]
    picked_values = own.permute(0, 4, 1, 2, 3).reshape(rows, num_kv_heads, k * chunk, dim).float()
    chunk_ok = valid.gather(1, chosen.flatten(1)).view(rows, num_kv_heads, k).repeat_interleave(chunk, dim=2)
    mask = torch.cat([chunk_ok, tail_valid.unsqueeze(1).expand(-1, num_kv_heads, -1)], dim=2)  # [R, Hkv, S']
    out = F.scaled_dot_product_attention(
        q.float().unsqueeze(2),  # [R, Hq, 1, D]
        torch.cat([keys, tail_keys], dim=2), torch.cat([picked_values, tail_values], dim=2),  # [R, Hkv, S', D]
        attn_mask=mask.repeat_interleave(num_heads // num_kv_heads, dim=1).unsqueeze(2), scale=scale,
        enable_gqa=True)
    return out.squeeze(2)
