"""ShadowKV-style low-rank keys: a rank-r SVD of the layer's pre-RoPE keys; values stay exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy
from longfit.compression.spec import make_stage
from longfit.compression.storage import shadowkv_factorizes


@dataclass(frozen=True, slots=True)
class LowRankKeys:
    """Pre-RoPE keys of one layer as ``left @ right``.

    Attributes:
        left: ``[T, r]`` model dtype: each token's coefficients ``keys @ rightᵀ`` (``U[:, :r] · S[:r]``).
        right: ``[r, Hkv * D]`` model dtype: the basis, orthonormal rows (``Vᵀ[:r]``, zero rows past the keys'
            own rank).
        num_kv_heads: Hkv; ``head_dim``: D.
    """

    left: Tensor
    right: Tensor
    num_kv_heads: int
    head_dim: int

    def nbytes(self) -> int:
        return self.left.numel() * self.left.element_size() + self.right.numel() * self.right.element_size()

    def reconstruct(self, rows: Tensor | None = None) -> Tensor:
        """Pre-RoPE keys ``[Hkv, T, D]`` (or only token ``rows``), in float32 math, returned in the stored dtype.

        The caller applies RoPE at the tokens' true positions.
        """
        left = self.left if rows is None else self.left[rows]
        flat = left.float() @ self.right.float()  # [T, Hkv*D]
        keys = flat.reshape(flat.shape[0], self.num_kv_heads, self.head_dim).transpose(0, 1)
        return keys.to(self.left.dtype).contiguous()


def key_basis(flat_keys: Tensor, rank: int) -> Tensor:
    """The top-``rank`` right singular vectors of ``flat_keys: [T, Hkv * D]`` (pre-RoPE) → float32 ``[rank, Hkv*D]``,
    orthonormal rows; zero rows past ``min(T, Hkv * D)`` so the layout is fixed. Projecting onto them is the best
    rank-``rank`` approximation (Eckart–Young). The engine's compactor stores this basis beside the pages."""
    _, _, vh = torch.linalg.svd(flat_keys.float(), full_matrices=False)  # vh: [min(T, Hkv*D), Hkv*D]
    basis = flat_keys.new_zeros(rank, flat_keys.shape[1], dtype=torch.float32)
    basis[:min(rank, vh.shape[0])] = vh[:rank]
    return basis


def factorize_keys(pre_rope_keys: Tensor, rank: int) -> LowRankKeys | None:
    """Rank-``rank`` factorization of ``pre_rope_keys: [Hkv, T, D]`` flattened to ``[T, Hkv * D]`` (ShadowKV layout).

    Returns None when ``rank >= Hkv * D`` (no bytes saved per token: store them dense). The factors are rounded to
    the keys' dtype, as the engine stores them.
    """
    num_heads, num_tokens, head_dim = pre_rope_keys.shape
    if not shadowkv_factorizes(num_heads * head_dim, rank):
        return None
    flat = pre_rope_keys.float().transpose(0, 1).reshape(num_tokens, num_heads * head_dim)  # [T, Hkv*D]
    dtype = pre_rope_keys.dtype
    basis = key_basis(flat, rank).to(dtype)
    left = (flat @ basis.float().T).to(dtype)  # [T, r] the projection onto the stored basis
    return LowRankKeys(left.contiguous(), basis.contiguous(), num_heads, head_dim)


def reconstruct_keys(factors: LowRankKeys) -> Tensor:
    """``[Hkv, T, D]`` pre-RoPE keys from their factors."""
    return factors.reconstruct()


@dataclass(frozen=True, slots=True)
class ShadowKVPolicy(StoragePolicy):
    """Store each layer's pre-RoPE keys as a rank-``rank`` factorization; values exact.

    Paper: "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference" (bytedance/ShadowKV
    ``models/kv_cache.py``: SVD of ``[n, Hkv*d]`` pre-RoPE keys, rank 160). Keys must be factorized before RoPE
    (post-RoPE keys are not low-rank across positions); the engine re-applies RoPE after ``reconstruct``.
    Deliberate differences: only the low-rank key storage is implemented; ShadowKV's chunk landmarks, outlier
    chunks and sparse decode-time key selection are not, nor its value offloading, so decode reconstructs every
    stored key. The basis is the prompt's; in the engine, tokens generated later are projected onto it (ShadowKV
    keeps them exact in its local window). Factors are stored when ``rank < Hkv * D``.
    """

    name: ClassVar[str] = "shadowkv"
    kind: ClassVar[str] = "lowrank"
    pre_rope_keys: ClassVar[bool] = True
    rank: int = 160

    def __post_init__(self) -> None:
        make_stage(self.name, rank=self.rank)

    def factorize(self, pre_rope_keys: Tensor) -> LowRankKeys | None:
        return factorize_keys(pre_rope_keys, self.rank)
