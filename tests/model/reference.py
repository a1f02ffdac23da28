"""A slow, obviously-correct forward pass over a whole sequence: contiguous tensors, explicit masks,
naive softmax. It reuses the model's projection and norm modules (checked against transformers
elsewhere) and re-derives everything the paged path does: RoPE, GQA, windows, the cache itself."""

from __future__ import annotations

from collections.abc import Callable

import torch

from longfit.models.base import DecoderModel

# (layer, queries [T, Hq, D], keys [T, Hkv, D], values [T, Hkv, D]) → (stored keys, stored values, use [T, T] bool,
# visible [Hkv, T, T] bool or None) or None: query t reads key j from the stored (e.g. quantized then dequantized)
# tensors where use[t, j], else the exact ones, and only where visible[h, t, j] (page selection). Post-RoPE.
KVView = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor],
                  "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None"]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    angles = positions[:, None].double() * inv_freq[None, :]  # [T, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos[:, None] + rotated.float() * sin[:, None]).to(x.dtype)


@torch.inference_mode()
def reference_logits(model: DecoderModel, token_ids: list[int], kv_view: KVView | None = None) -> torch.Tensor:
    """[T, V] fp32 logits for every position of ``token_ids``; ``kv_view`` substitutes stored keys/values."""
    cfg = model.config
    ids = torch.tensor(token_ids)
    positions = torch.arange(len(token_ids))
    x = model.embed[ids]
    if cfg.embedding_multiplier != 1.0:
        x = x * torch.tensor(cfg.embedding_multiplier, dtype=x.dtype)
    x = x.float()  # fp32 residual stream, as the engine keeps it
    T = len(token_ids)
    for index, layer in enumerate(model.layers):
        attn = layer.attn
        h = layer.input_norm(x)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q, k, v = attn.qkv(h).split([q_size, kv_size, kv_size], dim=-1)
        q, k, v = q.view(T, cfg.num_heads, -1), k.view(T, cfg.num_kv_heads, -1), v.view(T, cfg.num_kv_heads, -1)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, positions, attn.rope.inv_freq), apply_rope(k, positions, attn.rope.inv_freq)
        group = cfg.num_heads // cfg.num_kv_heads
        view = kv_view(index, q, k, v) if kv_view is not None else None
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [T, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * cfg.attention_scale
        if view is not None:
            ks, vs = (t.float().repeat_interleave(group, dim=1) for t in view[:2])
            use, visible = view[2], view[3] if len(view) > 3 else None
            scores = torch.where(use, torch.einsum("qhd,khd->hqk", q.float(), ks) * cfg.attention_scale, scores)
        qpos, kpos = positions[:, None], positions[None, :]
        mask = kpos <= qpos
        window = cfg.layer_window(index)
        if window is not None:
            mask &= kpos > qpos - window
        if view is not None and visible is not None:
            mask = mask & visible.repeat_interleave(group, dim=0)  # [Hq, T, T]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        if view is None:
            out = torch.einsum("hqk,khd->qhd", probs, v.float())
        else:
            out = (torch.einsum("hqk,khd->qhd", probs * ~use, v.float())
                   + torch.einsum("hqk,khd->qhd", probs * use, vs))
        out = out.to(x.dtype).reshape(T, q_size)
        o = attn.o_proj(out)
        if cfg.architecture == "gemma3":
            x = x + layer.post_attention_norm(o)
            x = x + layer.post_feedforward_norm(layer.mlp(layer.pre_feedforward_norm(x)))
        else:
            x = x + o
            x = x + layer.mlp(layer.post_attention_norm(x))
    return model.compute_logits(model.norm(x))
