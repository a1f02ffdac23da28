"""H2O eviction: heavy hitters by accumulated attention, plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longfit.compression.base import ScoringPolicy, accumulated_attention, append_protected, group_mean
from longfit.compression.spec import make_stage, window_kept


@dataclass(frozen=True, slots=True)
class H2OPolicy(ScoringPolicy):
    """Keep ``recent_ratio`` of the budget as the most recent tokens and fill the rest with heavy hitters.

    Paper: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    (FMInference/H2O ``H2OKVCache_LayerWise``: per-head cumulative attention, ``topk`` over all but the recent
    tokens, plus the recent ones; the paper's 0.1 heavy + 0.1 recent split is ``recent_ratio=0.5``).

    Deliberate differences: (1) the cumulative score sums the attention of only the last ``observe`` prompt
    queries (default 256), computed explicitly in float32 chunks; summing all ``n`` queries costs ``O(n²)`` per
    layer (about 2 TFLOP over SmolLM2's 30 layers at 8k) and needs attention weights that fused prefill never
    materializes. When ``observe`` is at most the recent window, every heavy-hitter candidate is seen by all
    observed queries, so the truncation adds no bias toward early keys. (2) The reference scores per attention
    head (MHA); with GQA the scores are averaged over the query heads of a KV head (kvpress convention).
    (3) Eviction runs once at the end of prefill, or with ``every=N`` every N decode tokens (the engine's
    ``Compactor.recompact``, scored by the latest ``observe`` queries), not at every step.
    """

    name: ClassVar[str] = "h2o"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    recent_ratio: float = 0.5
    observe: int = 256
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)
    scale: float | None = None

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, recent_ratio=self.recent_ratio,
                   observe=self.observe, every=self.every)

    @property
    def window_size(self) -> int:
        return self.observe

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return window_kept(num_tokens, self.keep, self.budget, self.observe)

    def num_recent(self, num_tokens: int) -> int:
        """Most recent tokens always kept: ``floor(num_kept * recent_ratio)``."""
        return int(self.num_kept(0, 1, num_tokens) * self.recent_ratio + 1e-9)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        assert queries is not None
        num_heads, num_tokens = keys.shape[0], keys.shape[1]
        recent = self.num_recent(num_tokens)
        accumulated = group_mean(accumulated_attention(keys, queries, self.scale), num_heads)  # [Hkv, T]
        return append_protected(accumulated[:, : num_tokens - recent], recent)
