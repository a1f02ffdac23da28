"""Key-norm eviction: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import ScoringPolicy
from longfit.compression.spec import knorm_kept, make_stage


@dataclass(frozen=True, slots=True)
class KnormPolicy(ScoringPolicy):
    """Score ``-||k||_2`` per KV head; low key norm correlates with high attention.

    Paper: "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (kvpress ``KnormPress``).
    Norms are accumulated in float32 so bf16 keys do not tie. ``skip_layers`` leaves the first layers whole
    (KVCache-Factory ``L2NormCluster`` skips 2); the default 0 matches kvpress.
    """

    name: ClassVar[str] = "knorm"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)
    skip_layers: int = 0

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, skip_layers=self.skip_layers, every=self.every)

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return knorm_kept(layer_idx, num_tokens, self.keep, self.budget, self.skip_layers)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.float32)  # [Hkv, T]
