"""PyramidKV eviction: SnapKV scores with per-layer budgets that shrink with depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from longfit.compression.base import ScoringPolicy
from longfit.compression.snapkv import snapkv_scores
from longfit.compression.spec import make_stage, pyramid_kept


@dataclass(frozen=True, slots=True)
class PyramidKVPolicy(ScoringPolicy):
    """SnapKV scoring; layer ``l`` keeps a budget falling linearly from the first to the last layer.

    Paper: "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling". ``keep`` uses the
    kvpress ``PyramidKVPress.get_layer_budget`` schedule (mean over layers = ``n * keep``), ``budget`` the
    KVCache-Factory ``PyramidKVCluster`` one (``spec.pyramid_kept``). Scores as ``SnapKVPolicy`` (kvpress defaults
    window 64, kernel 5, avg pooling, beta 20). Layers keep different token counts: the paged store must allow a
    token count per layer.
    """

    name: ClassVar[str] = "pyramidkv"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    window: int = 64
    kernel: int = 5
    pool: str = "avg"
    beta: int = 20
    scale: float | None = None

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, window=self.window, kernel=self.kernel,
                   pool=self.pool, beta=self.beta)

    @property
    def window_size(self) -> int:
        return self.window

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return pyramid_kept(layer_idx, num_layers, num_tokens, self.keep, self.budget, self.window, self.beta)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        assert queries is not None
        return snapkv_scores(keys, queries, self.kernel, self.pool, self.scale)
