"""StreamingLLM eviction: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import ScoringPolicy
from longfit.compression.spec import make_stage, streaming_kept


@dataclass(frozen=True, slots=True)
class StreamingLLMPolicy(ScoringPolicy):
    """Keep the first ``sinks`` tokens and the most recent ones.

    Paper: "Efficient Streaming Language Models with Attention Sinks" (mit-han-lab/streaming-llm
    ``StartRecentKVCache``). Budget: ``sinks + window`` tokens, or ``keep``/``budget`` tokens of which all but the
    sinks are the most recent (kvpress ``StreamingLLMPress`` split). Query-free.

    Deliberate differences: applied once at the end of prefill, or with ``every=N`` every N decode tokens (the
    reference evicts every step: ``every=1``); kept keys keep
    their original RoPE positions (kvpress default; the reference re-rotates cache-relative positions).
    """

    name: ClassVar[str] = "streaming_llm"
    kind: ClassVar[str] = "evict"
    sinks: int = 4
    window: int | None = None
    keep: float | None = None
    budget: int | None = None
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)

    def __post_init__(self) -> None:
        make_stage(self.name, sinks=self.sinks, window=self.window, keep=self.keep, budget=self.budget,
                   every=self.every)

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return streaming_kept(num_tokens, self.sinks, self.window, self.keep, self.budget)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        """1 for sinks and the ``num_kept - sinks`` most recent tokens, 0 elsewhere: ``[Hkv, T]``."""
        num_heads, num_tokens = keys.shape[0], keys.shape[1]
        num_recent = max(0, self.num_kept(layer_idx, 0, num_tokens) - self.sinks)
        scores = torch.zeros(num_heads, num_tokens, dtype=torch.float32)
        scores[:, : self.sinks] = 1.0
        scores[:, num_tokens - num_recent:] = 1.0
        return scores
