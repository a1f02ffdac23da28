"""ShadowKV: low-rank pre-RoPE keys (a rank-r SVD of the layer's keys, values exact) and decode-time chunk
selection by landmarks."""

from __future__ import annotations

import math
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


def chunk_landmarks(keys: Tensor, chunk: int, outliers: int) -> tuple[Tensor, Tensor]:
    """ShadowKV's landmarks and outlier chunks of ``keys: [T, Hkv, D]`` post-RoPE (T a multiple of ``chunk``).

    Returns ``landmarks`` float32 ``[T / chunk, Hkv, D]`` (each chunk's mean key) and ``outlier`` bool
    ``[T / chunk, Hkv]``: per KV head the ``outliers`` chunks whose least similar key has the lowest cosine
    similarity to the chunk's landmark (ties: the lower chunk), i.e. the chunks a landmark summarizes worst.
    """
    num_chunks = keys.shape[0] // chunk
    chunks = keys.float().reshape(num_chunks, chunk, *keys.shape[1:])  # [n, C, Hkv, D]
    landmarks = chunks.mean(1)
    outlier = torch.zeros(num_chunks, keys.shape[1], dtype=torch.bool, device=keys.device)
    count = min(outliers, num_chunks)
    if count:
        similarity = torch.cosine_similarity(chunks, landmarks.unsqueeze(1), dim=-1).amin(1)  # [n, Hkv]
        lowest = torch.argsort(similarity, dim=0, stable=True)[:count]  # [count, Hkv]
        outlier.scatter_(0, lowest, True)
    return landmarks, outlier


def select_chunks(q: Tensor, landmarks: Tensor, forced: Tensor, valid: Tensor, count: int) -> Tensor:
    """The chunks each KV head reads at one decode step (ShadowKV ``get_retrieval_position_ids``).

    ``q: [R, Hq, D]`` post-RoPE queries, ``landmarks: [R, n, Hkv, D]``, ``forced: [R, n, Hkv]`` (outlier and local
    chunks, always read), ``valid: [R, n]`` (chunks a row holds), ``count`` chunks per head → chunk indices
    ``[R, Hkv, min(count, n)]`` ascending. Score: the softmax over a row's chunks of ``q · landmark / sqrt(D)`` per
    query head, then the max over the query heads of each KV head (GQA); forced chunks come first, ties go to the
    lower chunk. A row holding fewer chunks than ``count`` gets all of them (then indices of invalid chunks).
    """
    rows, num_heads, dim = q.shape
    num_chunks, num_kv_heads = landmarks.shape[1], landmarks.shape[2]
    grouped = q.float().view(rows, num_kv_heads, num_heads // num_kv_heads, dim)
    logits = torch.einsum("rhgd,rchd->rhgc", grouped, landmarks.float()) / math.sqrt(dim)  # [R, Hkv, g, n]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    score = logits.softmax(-1).amax(2)  # [R, Hkv, n]
    score = score.masked_fill(forced.transpose(1, 2), 2.0).masked_fill(~valid[:, None, :], -1.0)
    order = torch.argsort(score, dim=-1, descending=True, stable=True)[..., :min(count, num_chunks)]
    return order.sort(dim=-1).values


@dataclass(frozen=True, slots=True)
class ShadowKVStore:
    """One layer as the engine stores it (``runtime.quant_pages``' ShadowKV records).

    Attributes:
        factors: the first ``T_s = T - T mod chunk`` tokens' pre-RoPE keys (left ``[T_s, r]``; the basis from all T).
        landmarks: ``[T_s / chunk, Hkv, D]`` chunk means of the post-RoPE keys; ``outlier``: ``[T_s / chunk, Hkv]``
            flags (1: outlier chunk), both in the model dtype; None without chunk selection (``budget=0``).
        tail_keys: ``[Hkv, T - T_s, D]`` the last tokens' keys, dense; ``values``: ``[Hkv, T, D]`` exact.
    """

    factors: LowRankKeys
    landmarks: Tensor | None
    outlier: Tensor | None
    tail_keys: Tensor
    values: Tensor

    def nbytes(self) -> int:
        extra = [t for t in (self.landmarks, self.outlier, self.tail_keys, self.values) if t is not None]
        return self.factors.nbytes() + sum(t.numel() * t.element_size() for t in extra)


def reconstruct_keys(factors: LowRankKeys) -> Tensor:
    """``[Hkv, T, D]`` pre-RoPE keys from their factors."""
    return factors.reconstruct()


@dataclass(frozen=True, slots=True)
class ShadowKVPolicy(StoragePolicy):
    """Store each layer's pre-RoPE keys as a rank-``rank`` factorization; values exact.

    Paper: "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference" (bytedance/ShadowKV
    ``models/kv_cache.py``: SVD of ``[n, Hkv*d]`` pre-RoPE keys, rank 160; ``sparse_budget=2048, chunk_size=8,
    outlier_chunk=48, local_chunk=4``). Keys must be factorized before RoPE (post-RoPE keys are not low-rank across
    positions); the engine re-applies RoPE after ``reconstruct``. Decode follows ShadowKV: each chunk of ``chunk``
    tokens has a landmark (its mean post-RoPE key, ``chunk_landmarks``); each step every KV head reads the chunks
    ``select_chunks`` picks (``ceil(budget / chunk)`` by landmark score, plus its ``outliers`` outlier chunks and
    the ``local`` most recent ones), rebuilds only their keys and attends over them and the dense tail.
    Deliberate differences: outlier and local chunks are always read, as in ShadowKV, but stored like the others
    (low-rank keys; ShadowKV keeps them exact); values stay in the pages (ShadowKV offloads them to the CPU); the
    basis is the prompt's, and tokens generated later are projected onto it and become selectable chunks (ShadowKV
    keeps them exact in its local window). Factors are stored when ``rank < Hkv * D``.
    """

    name: ClassVar[str] = "shadowkv"
    kind: ClassVar[str] = "lowrank"
    pre_rope_keys: ClassVar[bool] = True
    rank: int = 160
    budget: int = 2048
    chunk: int = 8
    outliers: int = 48
    local: int = 4

    def __post_init__(self) -> None:
        make_stage(self.name, rank=self.rank, budget=self.budget, chunk=self.chunk, outliers=self.outliers,
                   local=self.local)

    def factorize(self, pre_rope_keys: Tensor) -> LowRankKeys | None:
        return factorize_keys(pre_rope_keys, self.rank)

    def store(self, pre_rope_keys: Tensor, values: Tensor, rotated_keys: Tensor) -> ShadowKVStore | None:
        """``[Hkv, T, D]`` keys (pre- and post-RoPE) and values → the layer as the engine stores it, None when the
        keys stay dense (``rank >= Hkv * D``)."""
        factors = factorize_keys(pre_rope_keys, self.rank)
        if factors is None:
            return None
        stored = pre_rope_keys.shape[1] - pre_rope_keys.shape[1] % self.chunk
        factors = LowRankKeys(factors.left[:stored], factors.right, factors.num_kv_heads, factors.head_dim)
        landmarks = outlier = None
        if self.budget:
            marks, flags = chunk_landmarks(rotated_keys[:, :stored].transpose(0, 1), self.chunk, self.outliers)
            landmarks, outlier = marks.to(values.dtype), flags.to(values.dtype)
        return ShadowKVStore(factors, landmarks, outlier, pre_rope_keys[:, stored:], values)
