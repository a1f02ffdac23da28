"""DuoAttention head-aware eviction: retrieval heads keep everything, streaming heads keep sinks + window."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from longfit.compression.base import CompressionPolicy, KeepPlan, check_layer_inputs
from longfit.compression.head_scores import HeadScores, check_head_scores, read_head_scores, write_head_scores
from longfit.compression.spec import duo_kept, duo_streaming_mask, make_stage

__all__ = ["DuoAttentionPolicy", "HeadScores", "read_head_scores", "write_head_scores"]


@dataclass(frozen=True, slots=True)
class DuoAttentionPolicy(CompressionPolicy):
    """Split KV heads into retrieval heads (full KV) and streaming heads (``sinks`` + last ``window`` tokens).

    Paper: "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads"
    (mit-han-lab/duo-attention ``sparsify_attention_heads``: the ``sparsity`` fraction of heads with the lowest
    retrieval score stream). ``head_scores[l][h]`` come from a per-model JSON file (``head_scores.write_head_scores``
    documents the format; ``longfit profile-heads`` writes it).

    Deliberate differences: the engine stores one token count per layer, so a layer shrinks only when all its KV
    heads stream. ``granularity="layer"`` (default) therefore ranks whole layers by their best head and makes the
    lowest ``sparsity`` fraction of layers streaming, which frees pages in the paged store today;
    ``granularity="head"`` assigns heads as the paper does, and layers mixing both kinds stay whole until the store
    has a per-head ring (``streaming_mask`` tells which heads could shrink). The reference also uses streaming
    attention during prefill; here prefill attention is exact and eviction happens at its end.
    """

    name: ClassVar[str] = "duo_attention"
    kind: ClassVar[str] = "evict"
    head_scores: tuple[tuple[float, ...], ...] = ()
    sparsity: float = 0.5
    sinks: int = 64
    window: int = 256
    granularity: str = "layer"

    def __post_init__(self) -> None:
        make_stage(self.name, sparsity=self.sparsity, sinks=self.sinks, window=self.window,
                   granularity=self.granularity)
        # NOTE: frozen dataclass; normalizing the table to tuples (and validating it) happens once, here
        object.__setattr__(self, "head_scores", check_head_scores(self.head_scores, "DuoAttentionPolicy.head_scores"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **params: Any) -> DuoAttentionPolicy:
        """Policy from a head-score file written by ``write_head_scores``."""
        return cls(head_scores=read_head_scores(path).scores, **params)

    def streaming_mask(self) -> list[list[bool]]:
        """``[layers][kv_heads]``: True for streaming heads."""
        return duo_streaming_mask(self.head_scores, self.sparsity, self.granularity)

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        if num_layers != len(self.head_scores):
            raise ValueError(f"duo_attention head scores cover {len(self.head_scores)} layers, model has {num_layers}")
        return duo_kept(num_tokens, self.streaming_mask()[layer_idx], self.sinks, self.window)

    def plan(self, layer_idx: int, num_layers: int, keys: Tensor, values: Tensor,
             queries: Tensor | None) -> KeepPlan:
        check_layer_inputs(keys, values, queries, 0)
        num_heads, num_tokens = keys.shape[0], keys.shape[1]
        if num_heads != len(self.head_scores[0]):
            raise ValueError(f"duo_attention head scores have {len(self.head_scores[0])} KV heads, keys {num_heads}")
        if self.num_kept(layer_idx, num_layers, num_tokens) >= num_tokens:
            return KeepPlan.keep_all(num_heads, num_tokens)
        kept = torch.cat([torch.arange(self.sinks), torch.arange(num_tokens - self.window, num_tokens)])
        return KeepPlan(kept.repeat(num_heads, 1), num_tokens)
