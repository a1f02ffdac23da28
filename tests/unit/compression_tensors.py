"""Random layer tensors shared by the compression reference tests."""

from __future__ import annotations

import torch


def layer_tensors(num_kv_heads: int, groups: int, num_tokens: int, head_dim: int, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys, values: [Hkv, T, D]; queries: [Hkv * groups, T, D] (scaled up so attention is peaked)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_kv_heads, num_tokens, head_dim, generator=g)
    values = torch.randn(num_kv_heads, num_tokens, head_dim, generator=g)
    queries = torch.randn(num_kv_heads * groups, num_tokens, head_dim, generator=g) * 1.5
    return keys.to(dtype), values.to(dtype), queries.to(dtype)
