"""Compactor: applies eviction policies to a request's paged KV at the end of its prefill.

For every full-attention layer: read the layer's keys and values from its pages, let each evicting stage
of the spec pick the positions to keep per KV head (``KeepPlan``), write the survivors to the first slots
of the same pages, and report how many tokens each layer kept. ``KVCacheManager.apply_compaction`` then
returns the whole pages left over to the pool. Positions stay logical: kept keys carry their RoPE phase,
new tokens are appended after the survivors. Sliding-window layers already hold only their window and are
left as they are.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np
import torch

from longfit.compression.registry import build_policy
from longfit.compression.spec import parse_spec
from longfit.models.attention import gather_keys_values
from longfit.outputs import CompactionResult

# Kinds the engine applies today. The others (quantize, lowrank, merge, select) are validated by the spec
# parser but refused at admission until their paged storage lands.
SUPPORTED_KINDS = frozenset({"evict"})


@functools.lru_cache(maxsize=256)
def validate_engine_spec(text: str) -> str:
    """Parse a spec (ValueError naming the problem) and check the engine can apply every stage."""
    spec = parse_spec(text)
    unsupported = [policy for policy in build_policy(spec) if policy.kind not in SUPPORTED_KINDS]
    if unsupported:
        names = ", ".join(sorted({type(p).__name__ for p in unsupported}))
        raise ValueError(f"kv_compression {text!r}: {names} are not applied inside the engine yet; "
                         "eviction methods (streaming, h2o, snapkv, pyramidkv, tova, knorm, duo_attention) are")
    return spec.text


class Compactor:
    """Owns the policy objects per spec string and rewrites pages in place."""

    def __init__(self, kv_pool: torch.Tensor, block_size: int, layer_windows: tuple[int | None, ...],
                 attention_scale: float) -> None:
        self.kv_pool = kv_pool
        self.block_size = block_size
        self.layer_windows = layer_windows
        self.attention_scale = attention_scale
        self._policies: dict[str, list] = {}

    def policies(self, spec: str) -> list:
        if spec not in self._policies:
            # Attention-scored policies must use the model's own softmax scale (Gemma: query_pre_attn_scalar).
            self._policies[spec] = [replace(p, scale=self.attention_scale) if getattr(p, "scale", 0) is None else p
                                    for p in build_policy(spec)]
        return self._policies[spec]

    def window_size(self, spec: str) -> int:
        """Query window the spec's policies need (captured during the last prefill chunk)."""
        return max((p.window_size for p in self.policies(spec)), default=0)

    def compact(self, request_id: str, spec: str, tables: np.ndarray, num_tokens: int,
                queries: dict[int, torch.Tensor]) -> CompactionResult:
        """Compress a request whose ``num_tokens`` prompt tokens are all cached.

        Args:
            tables: [L, max_pages] the request's page tables (runner mirror).
            queries: layer → [Hq, W, D] post-RoPE queries of the prompt's last tokens.
        Returns:
            tokens kept per layer (physical), the manager frees the pages beyond them.
        """
        policies = self.policies(spec)
        num_layers = len(self.layer_windows)
        kept_counts = []
        bs = self.block_size
        for layer, window in enumerate(self.layer_windows):
            if window is not None:
                kept_counts.append(num_tokens)
                continue
            pages = torch.from_numpy(tables[layer, :-(-num_tokens // bs)]).to(self.kv_pool.device)
            keys, values = gather_keys_values(self.kv_pool, pages)  # [P*bs, Hkv, D]
            keys = keys[:num_tokens].transpose(0, 1)  # [Hkv, T, D]
            values = values[:num_tokens].transpose(0, 1)
            layer_queries = queries.get(layer)
            for policy in policies:
                plan = policy.plan(layer, num_layers, keys, values, layer_queries)
                if not plan.is_keep_all:
                    keys, values = plan.gather(keys), plan.gather(values)  # [Hkv, K, D]
            kept = keys.shape[1]
            kept_counts.append(kept)
            if kept == num_tokens:
                continue
            # Survivors go to the first `kept` slots; everything was read above, so nothing is overwritten early.
            slots = torch.arange(kept, device=pages.device)
            rows = pages[slots // bs] * (2 * bs) + slots % bs
            flat = self.kv_pool.view(-1, *self.kv_pool.shape[-2:])  # [num_blocks * 2 * bs, Hkv, D]
            flat.index_copy_(0, rows, keys.transpose(0, 1).contiguous())
            flat.index_copy_(0, rows + bs, values.transpose(0, 1).contiguous())
        return CompactionResult(request_id=request_id, num_kept_tokens=kept_counts)
