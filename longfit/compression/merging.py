"""MiniCache: merge the KV of adjacent deep layers into one direction per token plus per-layer norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy
from longfit.compression.spec import make_stage
from longfit.compression.storage import minicache_merges, minicache_pairs, minicache_retained

_EPS = 1e-8


@dataclass(frozen=True, slots=True)
class MergedPair:
    """Two layers' KV of ``T`` tokens: the first ``M = T - T % G`` merged in groups of ``G`` tokens (shared directions,
    per-layer norms, a few exact tokens per group and head), the last ``T - M`` kept exact in both layers.

    Attributes:
        key_direction, value_direction: ``[Hkv, M, D]`` model dtype, unit vectors (SLERP midpoint).
        key_norms, value_norms: ``[2, Hkv, M]`` model dtype: ``||k||`` of layer a and layer b.
        retained: ``[Hkv, M / G, R]`` int16 ascending offsets inside each group: tokens kept exact in both layers.
        retained_keys, retained_values: ``[2, Hkv, M / G, R, D]`` model dtype, layer a then layer b.
        tail_keys, tail_values: ``[2, Hkv, T - M, D]`` model dtype, the tokens after the last whole group.
    """

    key_direction: Tensor
    value_direction: Tensor
    key_norms: Tensor
    value_norms: Tensor
    retained: Tensor
    retained_keys: Tensor
    retained_values: Tensor
    tail_keys: Tensor
    tail_values: Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_direction, self.value_direction, self.key_norms,
                                                          self.value_norms, self.retained, self.retained_keys,
                                                          self.retained_values, self.tail_keys, self.tail_values))


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """(unit vectors, norms) of ``x: [..., D]`` in float32."""
    norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    return x.float() / norm.clamp_min(_EPS), norm.squeeze(-1)


def slerp_direction(a: Tensor, b: Tensor, t: float = 0.5) -> tuple[Tensor, Tensor]:
    """Spherical interpolation of the directions of ``a`` and ``b`` (``[..., D]``): (unit direction, angle).

    Falls back to normalized linear interpolation where the angle is tiny (``sin Ω`` ≈ 0).
    """
    ua, _ = _unit(a)
    ub, _ = _unit(b)
    cos = (ua * ub).sum(-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)  # [...]
    sin = torch.sin(omega)
    safe = sin > 1e-4
    wa = torch.where(safe, torch.sin((1 - t) * omega) / sin.clamp_min(1e-4), torch.full_like(sin, 1 - t))
    wb = torch.where(safe, torch.sin(t * omega) / sin.clamp_min(1e-4), torch.full_like(sin, t))
    direction, _ = _unit(wa.unsqueeze(-1) * ua + wb.unsqueeze(-1) * ub)
    return direction, omega


def merge_layers(keys_a: Tensor, values_a: Tensor, keys_b: Tensor, values_b: Tensor, retain: float,
                 group: int) -> MergedPair | None:
    """Merge two layers' ``[Hkv, T, D]`` K and V; None when the merged form would not be smaller.

    Per (KV head, token) of each whole group of ``group`` tokens, the keys (and the values) of both layers share their
    SLERP-midpoint direction and keep their own norms. In each group the ``floor(retain * group)`` tokens per head with
    the largest angle between the layers (the larger of the key and the value angle) are retained exactly. The tokens
    after the last whole group stay exact.
    """
    num_heads, num_tokens, head_dim = keys_a.shape
    if not minicache_merges(num_heads, head_dim, group, retain, keys_a.element_size()):
        return None
    merged, groups = num_tokens - num_tokens % group, num_tokens // group
    key_dir, key_angle = slerp_direction(keys_a[:, :merged], keys_b[:, :merged])
    value_dir, value_angle = slerp_direction(values_a[:, :merged], values_b[:, :merged])
    distance = torch.maximum(key_angle, value_angle).view(num_heads, groups, group)  # [Hkv, M/G, G]
    order = torch.argsort(distance, dim=-1, descending=True, stable=True)
    retained = order[..., :minicache_retained(group, retain)].sort(dim=-1).values  # [Hkv, M/G, R]
    index = retained.unsqueeze(-1).expand(-1, -1, -1, head_dim)

    def exact(a: Tensor, b: Tensor) -> Tensor:  # [2, Hkv, M/G, R, D]
        return torch.stack([x[:, :merged].reshape(num_heads, groups, group, head_dim).gather(2, index)
                            for x in (a, b)])

    dtype = keys_a.dtype
    norms = [torch.linalg.vector_norm(x[:, :merged].float(), dim=-1) for x in (keys_a, keys_b, values_a, values_b)]
    return MergedPair(
        key_direction=key_dir.to(dtype), value_direction=value_dir.to(dtype),
        key_norms=torch.stack(norms[:2]).to(dtype), value_norms=torch.stack(norms[2:]).to(dtype),
        retained=retained.to(torch.int16), retained_keys=exact(keys_a, keys_b),
        retained_values=exact(values_a, values_b),
        tail_keys=torch.stack([keys_a[:, merged:], keys_b[:, merged:]]),
        tail_values=torch.stack([values_a[:, merged:], values_b[:, merged:]]))


def unmerge_layers(pair: MergedPair) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rebuild ``(keys_a, values_a, keys_b, values_b)``, each ``[Hkv, T, D]`` in the stored dtype."""
    dtype = pair.key_direction.dtype
    heads, groups, _ = pair.retained.shape
    out = []
    for layer in (0, 1):
        for direction, norms, exact, tail in ((pair.key_direction, pair.key_norms, pair.retained_keys, pair.tail_keys),
                                              (pair.value_direction, pair.value_norms, pair.retained_values,
                                               pair.tail_values)):
            rebuilt = (direction.float() * norms[layer].float().unsqueeze(-1)).to(dtype)  # [Hkv, M, D]
            dim = rebuilt.shape[-1]
            by_group = rebuilt.view(heads, groups, -1, dim)  # [Hkv, M/G, G, D]
            index = pair.retained.long().unsqueeze(-1).expand(-1, -1, -1, dim)
            by_group = by_group.scatter(2, index, exact[layer])
            out.append(torch.cat([by_group.reshape(heads, -1, dim), tail[layer]], dim=1))
    return out[0], out[1], out[2], out[3]


@dataclass(frozen=True, slots=True)
class MiniCachePolicy(StoragePolicy):
    """Merge layer pairs ``(l, l+1)`` from ``floor(start * L)`` on, in groups of ``group`` tokens; keep ``retain`` of
    each group's tokens per head unmerged.

    Paper: "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models" (SLERP of adjacent
    layers' directions, magnitudes restored per layer, token retention; prompt and generated tokens alike).
    Deliberate differences: retention keeps a fixed fraction per head and group of tokens (largest angle) instead of
    an angle threshold over the sequence, so the stored bytes are known in advance and generated tokens are merged a
    group at a time as they arrive (the last ``T % group`` tokens stay exact, like KIVI's residual); norms are
    stored in the model dtype; a spec whose groups would not shrink leaves the pairs unmerged. Keys are merged after
    RoPE: both layers' key ``i`` carry the same rotation, which preserves their angle and rotates their midpoint,
    so merging before or after RoPE gives the same keys. Composes only with position-aligned eviction
    (streaming_llm), since token ``i`` of both layers must be the same position.
    """

    name: ClassVar[str] = "minicache"
    kind: ClassVar[str] = "merge"
    start: float = 0.5
    retain: float = 0.05
    group: int = 64

    def __post_init__(self) -> None:
        make_stage(self.name, start=self.start, retain=self.retain, group=self.group)

    def layer_pairs(self, num_layers: int, full_layers: list[bool] | None = None) -> list[tuple[int, int]]:
        """Merged ``(a, b)`` layer pairs; sliding-window layers (``full_layers[l]`` False) are skipped."""
        return minicache_pairs(num_layers, self.start, full_layers)

    def merge(self, keys_a: Tensor, values_a: Tensor, keys_b: Tensor, values_b: Tensor) -> MergedPair | None:
        return merge_layers(keys_a, values_a, keys_b, values_b, self.retain, self.group)
