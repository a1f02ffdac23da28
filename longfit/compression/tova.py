"""TOVA eviction: keep the tokens the last prompt token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longfit.compression.base import ScoringPolicy, append_protected, window_attention
from longfit.compression.spec import make_stage, window_kept


@dataclass(frozen=True, slots=True)
class TOVAPolicy(ScoringPolicy):
    """Score = attention of the last prompt token, averaged over all query heads, shared by every KV head.

    Paper: "Transformers are Multi-State RNNs". Prefill form as kvpress ``TOVAPress``: the last token is always
    kept. Deliberate difference: the reference evicts one token per decode step to keep a fixed-size cache; longfit
    applies it once at the end of prefill, or with ``every=N`` every N decode tokens (``every=1``: the reference's
    schedule). ``scale`` is the attention scale (None: ``head_dim ** -0.5``).
    """

    name: ClassVar[str] = "tova"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)
    scale: float | None = None

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, every=self.every)

    @property
    def window_size(self) -> int:
        return 1

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return window_kept(num_tokens, self.keep, self.budget, 1)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        assert queries is not None
        num_heads, num_tokens = keys.shape[0], keys.shape[1]
        attn = window_attention(keys, queries, self.scale)  # [Hq, 1, T]
        past = attn[:, 0, : num_tokens - 1].mean(dim=0)  # [T-1], mean over all query heads
        return append_protected(past.expand(num_heads, num_tokens - 1), 1)  # [Hkv, T]
