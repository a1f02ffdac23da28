"""SnapKV eviction: the observation window's attention, pooled, picks the tokens each KV head keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longfit.compression.base import (WindowScoringPolicy, append_protected, group_mean, pool_scores,
                                      window_attention)
from longfit.compression.spec import make_stage


def snapkv_scores(keys: Tensor, queries: Tensor, kernel: int, pool: str, scale: float | None) -> Tensor:
    """SnapKV scores ``[Hkv, T]`` float32 for ``keys: [Hkv, T, D]`` and the window ``queries: [Hq, W, D]``.

    softmax(Q_win Kᵀ) in float32, causal inside the window → mean over the W window queries → pooling over the key
    axis → mean over the GQA group; the W window tokens get scores above all others (always kept).
    """
    num_heads, num_tokens, window = keys.shape[0], keys.shape[1], queries.shape[1]
    attn = window_attention(keys, queries, scale)  # [Hq, W, T]
    past = attn.mean(dim=1)[:, : num_tokens - window]  # [Hq, T-W]
    pooled = pool_scores(past, kernel, pool)  # [Hq, T-W]
    return append_protected(group_mean(pooled, num_heads), window)  # [Hkv, T]


@dataclass(frozen=True, slots=True)
class SnapKVPolicy(WindowScoringPolicy):
    """Keep the observation window plus the past tokens its queries attend to most, per KV head.

    Paper: "SnapKV: LLM Knows What You are Looking for Before Generation". Follows kvpress ``SnapKVPress``
    (``kvpress/presses/snapkv_press.py``): mean over the window queries, ``avg`` pooling with ``kernel=5``, mean over
    the GQA group, ``window=64``; the window counts toward the kept tokens. ``pool="max"`` gives KVCache-Factory's
    variant. Prompts not longer than the window are left whole (kvpress issue #134). ``scale`` is the attention
    scale (None: ``head_dim ** -0.5``). Deliberate difference: when ``num_kept < window``, the most recent
    ``num_kept`` window tokens are kept (kvpress breaks that tie arbitrarily).
    """

    name: ClassVar[str] = "snapkv"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    window: int = 64
    kernel: int = 5
    pool: str = "avg"
    scale: float | None = None
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, window=self.window, kernel=self.kernel,
                   pool=self.pool, every=self.every)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        assert queries is not None
        return snapkv_scores(keys, queries, self.kernel, self.pool, self.scale)
