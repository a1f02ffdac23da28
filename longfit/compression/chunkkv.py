"""ChunkKV eviction: whole chunks of consecutive tokens, ranked by the observation window's attention, are kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import WindowScoringPolicy, append_protected, window_attention
from longfit.compression.spec import make_stage


def chunk_ranks(token_scores: Tensor, chunk: int) -> Tensor:
    """Rank of each chunk of ``token_scores: [L]`` float32 by its mean score (0 = best): ``[ceil(L / chunk)]`` int64.

    Chunks are ``chunk`` consecutive tokens from the first one; the last may be shorter (its mean is over the tokens
    it has). Ties go to the earlier chunk.
    """
    num_tokens, device = token_scores.shape[0], token_scores.device
    num_chunks = -(-num_tokens // chunk)
    padded = torch.zeros(num_chunks * chunk, dtype=torch.float32, device=device)
    padded[:num_tokens] = token_scores
    sizes = torch.full((num_chunks,), float(chunk), device=device)
    sizes[-1] = num_tokens - (num_chunks - 1) * chunk
    means = padded.view(num_chunks, chunk).sum(dim=1) / sizes  # [C]
    order = torch.argsort(means, descending=True, stable=True)
    ranks = torch.empty(num_chunks, dtype=torch.int64, device=device)
    ranks[order] = torch.arange(num_chunks, device=device)
    return ranks


def chunkkv_scores(keys: Tensor, queries: Tensor, chunk: int, scale: float | None) -> Tensor:
    """ChunkKV scores ``[Hkv, T]`` float32 for ``keys: [Hkv, T, D]`` and the window ``queries: [Hq, W, D]``.

    softmax(Q_win Kᵀ) in float32 (causal inside the window) summed over the W window queries and all query heads →
    one score per past token, shared by every KV head → chunks of ``chunk`` past tokens ranked by their mean. A
    token's score is ``C - rank(its chunk)`` plus its own score scaled into ``[0, 0.5]``: every token of a better
    chunk outranks every token of a worse one, so the kept set is whole chunks, and only the chunk at the budget's
    edge is cut, keeping its highest-scoring tokens. The W window tokens get scores above all others.
    """
    num_heads, num_tokens, window = keys.shape[0], keys.shape[1], queries.shape[1]
    attn = window_attention(keys, queries, scale)  # [Hq, W, T]
    past = attn[:, :, : num_tokens - window].sum(dim=(0, 1))  # [T-W]
    if past.numel() == 0:
        return append_protected(past.expand(num_heads, 0), window)
    ranks = chunk_ranks(past, chunk)  # [C]
    num_chunks = ranks.shape[0]
    per_token = (num_chunks - ranks).repeat_interleave(chunk)[: past.shape[0]].float()  # [T-W]
    within = past * (0.5 / past.max().clamp_min(torch.finfo(torch.float32).tiny))  # [T-W] in [0, 0.5]
    return append_protected((per_token + within).expand(num_heads, -1), window)  # [Hkv, T]


@dataclass(frozen=True, slots=True)
class ChunkKVPolicy(WindowScoringPolicy):
    """Keep the observation window plus the chunks of ``chunk`` consecutive past tokens its queries attend to most.

    Paper: "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference" (Liu et al.,
    2025). Token-level methods keep the most attended tokens one by one and can keep part of a phrase or a number
    but not the rest; ChunkKV scores and keeps chunks, the same chunks for every KV head of a layer. Scoring is the
    paper's: the window queries' attention, summed over the window and the heads, per chunk (mean, so a shorter last
    chunk is not penalized). ``chunk=20`` is kvpress's default (``ChunkKVPress.chunk_length``); the paper uses 10
    with Llama tokenizers, which group digits by three. On SmolLM2, whose tokenizer splits every digit, 20 kept 73%
    of the full cache's RULER score at keep 0.25 against 46-51% for 10 (docs/FIDELITY.md). kvpress wraps a scorer
    press and keeps ``int(C * keep)`` chunks; longfit keeps exactly the spec's token count (the same as SnapKV's, so
    the KV bytes are the planner's), whole chunks and at most one partial one, and always keeps the window (the
    paper concatenates the window to the selected chunks). Not done: the paper's layer-wise index reuse (a
    prefill-speed option). ``scale`` is the attention scale (None: ``head_dim ** -0.5``).
    """

    name: ClassVar[str] = "chunkkv"
    kind: ClassVar[str] = "evict"
    keep: float | None = None
    budget: int | None = None
    window: int = 64
    chunk: int = 20
    scale: float | None = None
    every: int = 0  # decode-time re-compression, applied by the engine (runtime.compactor)

    def __post_init__(self) -> None:
        make_stage(self.name, keep=self.keep, budget=self.budget, window=self.window, chunk=self.chunk,
                   every=self.every)

    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        assert queries is not None
        return chunkkv_scores(keys, queries, self.chunk, self.scale)
