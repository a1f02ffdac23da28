"""Decode attention straight from KIVI records: scores from the key codes, outputs from the value codes.

KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", Liu et al. 2024) stores keys per channel
(one fp16 scale and zero per channel per group of G tokens) and values per token (one scale and zero per token per
group of ``vg`` channels). Both are affine in the codes, so attention never needs the dequantized tensors:

    q · k_t   = Σ_d (q_d s_{g,d}) c_{t,d} + Σ_d q_d z_{g,d}               (key group g holds token t)
    Σ_t p_t v_t = Σ_t (p_t s_{t,j}) c_{t,d} + Σ_t p_t z_{t,j}             (value channel group j holds d)

so the scale folds into the (small) query per group and into the (small) probabilities per token, and the codes
meet them in batched matmuls. The general path (``attention.read_streams``: dequantize the whole stream to fp32,
concatenate it with the full-precision tail, one masked SDPA) writes and re-reads every K/V element several times
more; this one unpacks the codes once, heads first, and multiplies them. The KIVI paper's own CUDA kernels fuse
the unpacking into the matmul as well; eager PyTorch cannot, so the unpack stays the largest cost.

The result equals dequantize + softmax attention up to fp32 rounding (``tests/model/test_quant_decode.py``
compares it with that slow path, padding records of garbage bytes included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longfit.runtime.quant_pages import PageQuantFormat


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
    token_ok = ~stream_valid[:, None, :, None]  # [B, 1, T, 1]
    v_scale, v_zero = v_scale.masked_fill(token_ok, 0.0), v_zero.masked_fill(token_ok, 0.0)  # [B, Hkv, T, D/vg]

    qg = q.float().view(batch, 1, hkv, group, dim)  # [B, 1, Hkv, g, D]
    qs = qg * k_scale.unsqueeze(3)  # [B, n, Hkv, g, D]: the query with each key group's channel scales folded in
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

    out = torch.matmul(p_tail, tail_values)  # [B, Hkv, g, D]
    width = fmt.value_group
    zeros = torch.matmul(p_stream, v_zero)  # [B, Hkv, g, D/vg]: Σ_t p_t z_{t,j}
    out += zeros.repeat_interleave(width, dim=-1)
    for j in range(dim // width):  # D / vg channel groups (2 for D = 64, vg = 32)
        weights = p_stream * v_scale[..., j].unsqueeze(2)  # [B, Hkv, g, T]: p_t s_{t,j}
        out[..., j * width:(j + 1) * width] += torch.matmul(weights, v_codes[..., j * width:(j + 1) * width])
    return out.view(batch, num_heads, dim)
