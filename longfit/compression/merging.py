"""MiniCache: merge the KV of adjacent deep layers into one direction per token plus per-layer norms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy
from longfit.compression.spec import make_stage
from longfit.compression.storage import minicache_pair_bytes, minicache_pairs

_EPS = 1e-8


@dataclass(frozen=True, slots=True)
class MergedPair:
    """Two layers' KV stored as shared directions, per-layer norms and a few exact (retained) tokens.

    Attributes:
        key_direction, value_direction: ``[Hkv, T, D]`` model dtype, unit vectors (SLERP midpoint).
        key_norms, value_norms: ``[2, Hkv, T]`` model dtype: ``||k||`` of layer a and layer b.
        retained: ``[Hkv, R]`` int64 ascending: tokens kept exact in both layers.
        retained_keys, retained_values: ``[2, Hkv, R, D]`` model dtype, layer a then layer b.
    """

    key_direction: Tensor
    value_direction: Tensor
    key_norms: Tensor
    value_norms: Tensor
    retained: Tensor
    retained_keys: Tensor
    retained_values: Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key_direction, self.value_direction, self.key_norms,
                                                          self.value_norms, self.retained, self.retained_keys,
                                                          self.retained_values))


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


def merge_layers(keys_a: Tensor, values_a: Tensor, keys_b: Tensor, values_b: Tensor,
                 retain: float) -> MergedPair | None:
    """Merge two layers' ``[Hkv, T, D]`` K and V; None when the merged form would not be smaller.

    Per (KV head, token) the keys (and the values) of both layers share their SLERP-midpoint direction and keep
    their own norms. The ``floor(retain * T)`` tokens per head with the largest angle between the layers (the larger
    of the key and the value angle) are retained exactly.
    """
    num_heads, num_tokens, head_dim = keys_a.shape
    dtype_bytes = keys_a.element_size()
    if minicache_pair_bytes(num_heads, num_tokens, head_dim, retain, dtype_bytes) >= 4 * keys_a.numel() * dtype_bytes:
        return None
    key_dir, key_angle = slerp_direction(keys_a, keys_b)
    value_dir, value_angle = slerp_direction(values_a, values_b)
    num_retained = min(num_tokens, int(retain * num_tokens + 1e-9))
    distance = torch.maximum(key_angle, value_angle)  # [Hkv, T]
    order = torch.argsort(distance, dim=-1, descending=True, stable=True)
    retained = order[:, :num_retained].sort(dim=-1).values  # [Hkv, R]
    index = retained.unsqueeze(-1).expand(-1, -1, head_dim)
    dtype = keys_a.dtype
    norms = [torch.linalg.vector_norm(x.float(), dim=-1) for x in (keys_a, keys_b, values_a, values_b)]
    return MergedPair(
        key_direction=key_dir.to(dtype), value_direction=value_dir.to(dtype),
        key_norms=torch.stack(norms[:2]).to(dtype), value_norms=torch.stack(norms[2:]).to(dtype),
        retained=retained,
        retained_keys=torch.stack([keys_a.gather(1, index), keys_b.gather(1, index)]),
        retained_values=torch.stack([values_a.gather(1, index), values_b.gather(1, index)]))


def unmerge_layers(pair: MergedPair) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rebuild ``(keys_a, values_a, keys_b, values_b)``, each ``[Hkv, T, D]`` in the stored dtype."""
    dtype = pair.key_direction.dtype
    out = []
    for layer in (0, 1):
        for direction, norms, exact in ((pair.key_direction, pair.key_norms, pair.retained_keys),
                                        (pair.value_direction, pair.value_norms, pair.retained_values)):
            rebuilt = (direction.float() * norms[layer].float().unsqueeze(-1)).to(dtype)  # [Hkv, T, D]
            index = pair.retained.unsqueeze(-1).expand(-1, -1, rebuilt.shape[-1])
            out.append(rebuilt.scatter(1, index, exact[layer]))
    return out[0], out[1], out[2], out[3]


@dataclass(frozen=True, slots=True)
class MiniCachePolicy(StoragePolicy):
    """Merge layer pairs ``(l, l+1)`` from ``floor(start * L)`` on; keep ``retain`` of the tokens unmerged.

    Paper: "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models" (SLERP of adjacent
    layers' directions, magnitudes restored per layer, token retention). Deliberate differences: retention keeps a
    fixed fraction per head (largest angle) instead of an angle threshold, so the stored bytes are known in
    advance; norms are stored in the model dtype; pairs that would not shrink are left unmerged. Composes only
    with position-aligned eviction (streaming_llm), since token ``i`` of both layers must be the same position.
    """

    name: ClassVar[str] = "minicache"
    kind: ClassVar[str] = "merge"
    start: float = 0.5
    retain: float = 0.05

    def __post_init__(self) -> None:
        make_stage(self.name, start=self.start, retain=self.retain)

    def layer_pairs(self, num_layers: int, full_layers: list[bool] | None = None) -> list[tuple[int, int]]:
        """Merged ``(a, b)`` layer pairs; sliding-window layers (``full_layers[l]`` False) are skipped."""
        return minicache_pairs(num_layers, self.start, full_layers)

    def merge(self, keys_a: Tensor, values_a: Tensor, keys_b: Tensor, values_b: Tensor) -> MergedPair | None:
        return merge_layers(keys_a, values_a, keys_b, values_b, self.retain)
