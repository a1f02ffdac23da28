"""ThinK: prune the least important key channels, per KV head, using the observation window's queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy, check_layer_inputs
from longfit.compression.spec import INDEX_BYTES, make_stage
from longfit.compression.storage import think_channels_kept


@dataclass(frozen=True, slots=True)
class PrunedKeys:
    """Keys with only some channels stored.

    Attributes:
        keys: ``[Hkv, T, d']`` model dtype, the kept channels in ascending channel order.
        channels: ``[Hkv, d']`` int64, ascending: which of the ``head_dim`` channels each KV head kept.
        head_dim: the full head dimension ``D``.
    """

    keys: Tensor
    channels: Tensor
    head_dim: int

    def nbytes(self) -> int:
        """Stored bytes: the pruned keys plus the channel index (int64; none when every channel is kept)."""
        index = self.channels.numel() * INDEX_BYTES if self.keys.shape[-1] < self.head_dim else 0
        return self.keys.numel() * self.keys.element_size() + index

    def restore(self) -> Tensor:
        """``[Hkv, T, D]`` keys with the pruned channels zero (reference form; kvpress ``ThinKPress`` output)."""
        num_heads, num_tokens, _ = self.keys.shape
        full = self.keys.new_zeros(num_heads, num_tokens, self.head_dim)
        return full.scatter(2, self.channels.unsqueeze(1).expand(-1, num_tokens, -1), self.keys)

    def project_queries(self, queries: Tensor) -> Tensor:
        """Keep the same channels of ``queries: [Hq, L, D]`` → ``[Hq, L, d']``, so ``q' · k'`` equals ``q · k``
        with the pruned channels zeroed (query head ``h`` uses KV head ``h // groups``)."""
        groups = queries.shape[0] // self.channels.shape[0]
        index = self.channels.repeat_interleave(groups, dim=0)  # [Hq, d']
        return queries.gather(2, index.unsqueeze(1).expand(-1, queries.shape[1], -1))


def think_channel_scores(keys: Tensor, queries: Tensor) -> Tensor:
    """Channel importance ``[Hkv, D]`` float32: ``mean_w(q²)`` (mean over the GQA group) times ``mean_t(k²)``.

    Same ranking as the paper's ``||Q[:, j] K[:, j]ᵀ||_F`` per channel; the form of kvpress ``ThinKPress``.
    """
    num_heads, _, head_dim = keys.shape
    q_norm = queries.float().pow(2).mean(dim=1)  # [Hq, D]
    q_norm = q_norm.reshape(num_heads, -1, head_dim).mean(dim=1)  # [Hkv, D]
    return q_norm * keys.float().pow(2).mean(dim=1)  # [Hkv, D]


@dataclass(frozen=True, slots=True)
class ThinKPolicy(StoragePolicy):
    """Store only a ``channels`` fraction of each KV head's key channels; values untouched.

    Paper: "ThinK: Thinner Key Cache by Query-Driven Pruning" (SalesforceAIResearch/ThinK). Scores as kvpress
    ``ThinKPress`` (``window=32`` last queries); the ``floor(D * (1 - channels))`` lowest-scoring channels are
    pruned. Deliberate difference: kvpress zeroes the pruned channels (no memory saved); longfit stores
    ``[Hkv, T, d']`` plus the channel index and projects decode queries onto the kept channels. Channels are
    chosen on post-RoPE keys and applied to post-RoPE queries, so RoPE pairs need no special care. Decode-time
    keys are pruned with the channels chosen at prefill.
    """

    name: ClassVar[str] = "think"
    kind: ClassVar[str] = "lowrank"
    channels: float = 0.5
    window: int = 32

    def __post_init__(self) -> None:
        make_stage(self.name, channels=self.channels, window=self.window)

    @property
    def window_size(self) -> int:
        return self.window

    def prune(self, keys: Tensor, queries: Tensor | None) -> PrunedKeys:
        """Prune ``keys: [Hkv, T, D]`` using the last ``window`` of ``queries: [Hq, W, D]``."""
        num_heads, num_tokens, head_dim = keys.shape
        kept = think_channels_kept(head_dim, self.channels)
        if kept == head_dim:  # channels=1: identity, the keys object itself
            return PrunedKeys(keys, torch.arange(head_dim).repeat(num_heads, 1), head_dim)
        check_layer_inputs(keys, keys, queries, self.window)
        assert queries is not None
        scores = think_channel_scores(keys, queries[:, max(0, queries.shape[1] - self.window):])
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        channels = order[:, :kept].sort(dim=-1).values  # [Hkv, d']
        pruned = keys.gather(2, channels.unsqueeze(1).expand(-1, num_tokens, -1))
        return PrunedKeys(pruned, channels, head_dim)
