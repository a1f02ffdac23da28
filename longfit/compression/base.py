"""Policy interfaces and shared scoring math for one layer of one request.

A ``CompressionPolicy`` turns a layer's prefill KV (``keys, values: [Hkv, T, D]``, post-RoPE, model dtype) and the
post-RoPE queries of the last ``window_size`` prompt tokens (``[Hq, W, D]``, ``Hq = Hkv * groups``, query head ``h``
belongs to KV head ``h // groups``) into a ``KeepPlan``. Scoring methods write only ``score()`` (kvpress shape);
non-evicting methods (quantize, lowrank, merge, select) derive from ``StoragePolicy`` and keep every token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from longfit.compression.spec import window_kept


@dataclass(frozen=True, slots=True)
class KeepPlan:
    """Token positions one layer keeps per KV head.

    Attributes:
        kept_indices: ``[Hkv, num_kept]`` int64, strictly ascending per row. Every KV head keeps the same number
            of tokens (the engine stores one token count per layer) but may keep different positions.
        num_tokens: tokens in the layer before compression.
    """

    kept_indices: Tensor
    num_tokens: int

    def __post_init__(self) -> None:
        if self.kept_indices.dim() != 2 or self.kept_indices.dtype != torch.int64:
            raise ValueError(f"KeepPlan.kept_indices must be a [Hkv, num_kept] int64 tensor, got "
                             f"{tuple(self.kept_indices.shape)} {self.kept_indices.dtype}")
        if self.kept_indices.shape[1] > self.num_tokens:
            raise ValueError(f"KeepPlan keeps {self.kept_indices.shape[1]} of only {self.num_tokens} tokens")

    @staticmethod
    def keep_all(num_heads: int, num_tokens: int) -> KeepPlan:
        """The identity plan: every head keeps ``0..num_tokens-1``."""
        return KeepPlan(torch.arange(num_tokens, dtype=torch.int64).repeat(num_heads, 1), num_tokens)

    @staticmethod
    def from_scores(scores: Tensor, num_kept: int) -> KeepPlan:
        """Keep the ``num_kept`` highest scores per row of ``scores: [Hkv, T]``, sorted by position.

        NOTE: a stable descending sort breaks ties toward the earlier position, so comparisons with reference
        implementations are exact (``topk`` leaves tie order unspecified).
        """
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        return KeepPlan(order[:, :num_kept].sort(dim=-1).values, scores.shape[1])

    @property
    def num_kept(self) -> int:
        return self.kept_indices.shape[1]

    @property
    def num_heads(self) -> int:
        return self.kept_indices.shape[0]

    @property
    def is_keep_all(self) -> bool:
        """True when nothing is evicted (indices are then ``0..T-1`` in every row)."""
        return self.num_kept == self.num_tokens

    def gather(self, tensor: Tensor) -> Tensor:
        """Kept rows of ``tensor: [Hkv, T, D]`` → ``[Hkv, num_kept, D]`` (same dtype)."""
        index = self.kept_indices.unsqueeze(-1).expand(-1, -1, tensor.shape[-1])
        return tensor.gather(1, index)

    def validate(self) -> None:
        """Full check (tests, debugging): indices in range, strictly ascending per head."""
        k = self.kept_indices
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= self.num_tokens):
            raise ValueError(f"KeepPlan indices must lie in [0, {self.num_tokens})")
        if k.shape[1] > 1 and not bool((k.diff(dim=-1) > 0).all()):
            raise ValueError("KeepPlan indices must be unique and ascending per head")


class CompressionPolicy(ABC):
    """One compression method, a frozen dataclass whose fields are its spec parameters.

    ``kind`` is one of "evict" | "select" | "merge" | "lowrank" | "quantize"; ``window_size`` is how many
    last-prompt-token queries ``plan`` wants (0: none). ``when`` is "prefill" (compress once at the end of prefill)
    or "decode" (acts at every decode step: page selection). ``pre_rope_keys`` says the storage functions take the
    keys before RoPE (KVQuant, ShadowKV), so the engine must keep them and rotate after reconstruction.
    """

    __slots__ = ()
    name: ClassVar[str]
    kind: ClassVar[str]
    when: ClassVar[str] = "prefill"
    pre_rope_keys: ClassVar[bool] = False

    @property
    def window_size(self) -> int:
        return 0

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        """Tokens this layer keeps after prefill (same as ``spec.kept_tokens_per_layer``)."""
        del layer_idx, num_layers
        return num_tokens

    @abstractmethod
    def plan(self, layer_idx: int, num_layers: int, keys: Tensor, values: Tensor,
             queries: Tensor | None) -> KeepPlan:
        """Which tokens layer ``layer_idx`` keeps.

        Args:
            keys, values: ``[Hkv, T, D]``, post-RoPE, model dtype.
            queries: ``[Hq, W, D]`` post-RoPE queries of the last ``W >= window_size`` prompt tokens (only the last
                ``window_size`` are used), or None when ``window_size == 0``.
        """


class ScoringPolicy(CompressionPolicy):
    """A policy that only scores tokens; the plan keeps the ``num_kept`` best per KV head."""

    __slots__ = ()

    @abstractmethod
    def score(self, layer_idx: int, keys: Tensor, values: Tensor, queries: Tensor | None) -> Tensor:
        """``[Hkv, T]`` float32, higher = keep; ``queries`` are exactly the last ``window_size`` ones."""

    def plan(self, layer_idx: int, num_layers: int, keys: Tensor, values: Tensor,
             queries: Tensor | None) -> KeepPlan:
        check_layer_inputs(keys, values, queries, self.window_size)
        num_heads, num_tokens = keys.shape[0], keys.shape[1]
        num_kept = self.num_kept(layer_idx, num_layers, num_tokens)
        if num_kept >= num_tokens:
            return KeepPlan.keep_all(num_heads, num_tokens)  # keep=1 is a no-op, bit for bit
        window = self.window_size
        recent = queries[:, queries.shape[1] - window:] if window and queries is not None else None
        scores = self.score(layer_idx, keys, values, recent)
        return KeepPlan.from_scores(scores.float(), num_kept)


class WindowScoringPolicy(ScoringPolicy):
    """A scoring policy whose last ``window`` prompt queries score and are always kept (SnapKV, ChunkKV): it keeps
    ``keep`` / ``budget`` tokens per layer, none evicted when the prompt is not longer than the window."""

    __slots__ = ()
    window: int
    keep: float | None
    budget: int | None

    @property
    def window_size(self) -> int:
        return self.window

    def num_kept(self, layer_idx: int, num_layers: int, num_tokens: int) -> int:
        return window_kept(num_tokens, self.keep, self.budget, self.window)


class StoragePolicy(CompressionPolicy):
    """Base of the non-evicting kinds (quantize, lowrank, merge, select): ``plan`` keeps every token."""

    __slots__ = ()

    def plan(self, layer_idx: int, num_layers: int, keys: Tensor, values: Tensor,
             queries: Tensor | None) -> KeepPlan:
        return KeepPlan.keep_all(keys.shape[0], keys.shape[1])


def check_layer_inputs(keys: Tensor, values: Tensor, queries: Tensor | None, window: int) -> None:
    """ValueError unless keys/values are ``[Hkv, T, D]`` alike and queries fit (``[Hkv*g, >=min(window,T), D]``)."""
    if keys.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"keys and values must be [Hkv, T, D] with equal Hkv and T, got {tuple(keys.shape)} "
                         f"and {tuple(values.shape)}")
    if window == 0:
        return
    need = min(window, keys.shape[1])
    if queries is None or queries.dim() != 3 or queries.shape[0] % keys.shape[0] or queries.shape[2] != keys.shape[2]:
        got = None if queries is None else tuple(queries.shape)
        raise ValueError(f"queries must be [Hkv*groups, W, D] matching keys {tuple(keys.shape)}, got {got}")
    if queries.shape[1] < need:
        raise ValueError(f"queries must hold the last {need} prompt tokens, got {queries.shape[1]}")


def attention_logits(keys: Tensor, queries: Tensor, scale: float | None) -> Tensor:
    """``q·kᵀ`` scaled, causal inside the window: ``[Hq, W, T]`` float32; query ``i`` sits at ``T - W + i``.

    NOTE: divides by ``sqrt(D)`` (not multiply by its inverse) when ``scale`` is None, exactly as kvpress
    ``SnapKVPress.compute_window_attention``, so scores match it to the last bit on float32 inputs.
    """
    num_kv_heads, num_tokens, head_dim = keys.shape
    num_heads, window, _ = queries.shape
    groups = num_heads // num_kv_heads
    q = queries.float().reshape(num_kv_heads, groups * window, head_dim)  # [Hkv, g*W, D]
    logits = torch.bmm(q, keys.float().transpose(1, 2)).reshape(num_heads, window, num_tokens)  # [Hq, W, T]
    logits = logits.div_(math.sqrt(head_dim)) if scale is None else logits.mul_(scale)  # in place: T-long rows
    # Only the last W keys can lie in a window query's future: mask that W x W corner.
    future = torch.ones(window, window, dtype=torch.bool).triu_(diagonal=1)  # [W, W]
    logits[:, :, num_tokens - window:].masked_fill_(future, float("-inf"))
    return logits


def window_attention(keys: Tensor, queries: Tensor, scale: float | None = None) -> Tensor:
    """Softmax attention of the window queries over all keys: ``[Hq, W, T]`` float32 (causal in the window)."""
    return torch.softmax(attention_logits(keys, queries, scale), dim=-1)


def accumulated_attention(keys: Tensor, queries: Tensor, scale: float | None = None, chunk: int = 64) -> Tensor:
    """Attention each key receives, summed over the window queries: ``[Hq, T]`` float32.

    Computed ``chunk`` queries at a time so memory stays ``Hq * chunk * T`` floats.
    """
    num_tokens, window = keys.shape[1], queries.shape[1]
    total = torch.zeros(queries.shape[0], num_tokens, dtype=torch.float32)
    for start in range(0, window, chunk):  # per chunk of queries, not per token
        stop = min(window, start + chunk)
        # queries [start, stop) sit at positions T - W + start ..; attend over keys up to T - (W - stop)
        visible = num_tokens - (window - stop)
        probs = window_attention(keys[:, :visible], queries[:, start:stop], scale)  # [Hq, c, visible]
        total[:, :visible] += probs.sum(dim=1)
    return total


def group_mean(x: Tensor, num_kv_heads: int) -> Tensor:
    """Mean over the query heads of each KV head: ``[Hq, ...]`` → ``[Hkv, ...]`` (kvpress GQA reduction)."""
    return x.reshape(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:]).mean(dim=1)


def pool_scores(scores: Tensor, kernel: int, pool: str) -> Tensor:
    """1-D pooling along the key axis of ``[H, L]`` (stride 1, padding ``kernel // 2``, zero-padded average)."""
    if kernel == 1:
        return scores
    batch = scores.unsqueeze(0)  # [1, H, L]
    if pool == "max":
        return F.max_pool1d(batch, kernel_size=kernel, padding=kernel // 2, stride=1).squeeze(0)
    return F.avg_pool1d(batch, kernel_size=kernel, padding=kernel // 2, stride=1).squeeze(0)


def append_protected(scores: Tensor, num_protected: int) -> Tensor:
    """Append ``num_protected`` scores above every score in ``scores: [H, L]``, increasing with position.

    The protected tokens (the observation window) always win, and when fewer than them fit, the most recent do.
    """
    top = scores.max() if scores.numel() else torch.tensor(0.0)
    extra = top.float() + 1.0 + torch.arange(num_protected, dtype=torch.float32)  # [num_protected]
    return torch.cat([scores.float(), extra.expand(scores.shape[0], num_protected)], dim=1)
