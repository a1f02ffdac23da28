"""Quest decode-time page selection: per-page key bounds pick the pages a decode step reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from longfit.compression.base import StoragePolicy
from longfit.compression.spec import make_stage

MIN_PAGES = 3  # Quest keeps at least 3 pages (``max(3, budget // chunk)``)


def page_bounds(keys: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Per-page, per-channel key minimum and maximum of ``keys: [Hkv, T, D]``: two ``[Hkv, P, D]`` tensors.

    ``P = ceil(T / page_size)``; the last page may be partial (its bounds cover only its real tokens).
    """
    num_heads, num_tokens, _ = keys.shape
    num_pages = -(-num_tokens // page_size)
    pad = num_pages * page_size - num_tokens
    x = keys.float()
    low = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("inf")).reshape(num_heads, num_pages, page_size, -1)
    high = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("-inf")).reshape(num_heads, num_pages, page_size, -1)
    return low.amin(dim=2).to(keys.dtype), high.amax(dim=2).to(keys.dtype)


def page_upper_bounds(query: Tensor, page_min: Tensor, page_max: Tensor) -> Tensor:
    """Quest's bound ``Σ_i max(q_i · min_i, q_i · max_i)`` ≥ every ``q · k`` in the page: ``[Hq, P]`` float32.

    Computed as ``q⁺ · max + q⁻ · min`` (two matmuls) for ``query: [Hq, D]``, bounds ``[Hkv, P, D]``.
    """
    num_kv_heads = page_min.shape[0]
    q = query.float().reshape(num_kv_heads, -1, query.shape[-1])  # [Hkv, g, D]
    bound = torch.bmm(q.clamp(min=0), page_max.float().transpose(1, 2))  # [Hkv, g, P]
    bound += torch.bmm(q.clamp(max=0), page_min.float().transpose(1, 2))
    return bound.reshape(query.shape[0], -1)


def select_pages(query: Tensor, page_min: Tensor, page_max: Tensor, num_pages_kept: int, *,
                 group_reduce: str = "max", keep_last: bool = True) -> Tensor:
    """Pages each KV head reads this decode step: ``[Hkv, min(num_pages_kept, P)]`` int64, ascending.

    Args:
        query: ``[Hq, D]`` post-RoPE query of the decoded token (GQA: query head ``h`` uses KV head ``h // g``).
        page_min, page_max: ``[Hkv, P, D]`` per-page key bounds (``page_bounds``).
        num_pages_kept: pages to read per KV head.
        group_reduce: how a KV head combines its query heads' bounds: "max" (still an upper bound for every head
            of the group; ShadowKV's choice) or "mean".
        keep_last: always read the last page, which holds the newest tokens.
    """
    num_kv_heads, num_pages, _ = page_min.shape
    k = min(num_pages_kept, num_pages)
    if k == num_pages:
        return torch.arange(num_pages).repeat(num_kv_heads, 1)
    bound = page_upper_bounds(query, page_min, page_max).reshape(num_kv_heads, -1, num_pages)  # [Hkv, g, P]
    score = bound.amax(dim=1) if group_reduce == "max" else bound.mean(dim=1)  # [Hkv, P]
    if keep_last:
        score[:, -1] = float("inf")
    order = torch.argsort(score, dim=-1, descending=True, stable=True)  # NOTE: stable: ties to the lower page
    return order[:, :k].sort(dim=-1).values


def pages_to_tokens(pages: Tensor, page_size: int, num_tokens: int) -> Tensor:
    """Token mask ``[Hkv, T]`` bool of the selected ``pages: [Hkv, k]``."""
    mask = torch.zeros(pages.shape[0], -(-num_tokens // page_size), dtype=torch.bool)
    mask.scatter_(1, pages, True)
    return mask.repeat_interleave(page_size, dim=1)[:, :num_tokens]


@dataclass(frozen=True, slots=True)
class QuestPolicy(StoragePolicy):
    """Keep every token; at each decode step read only the top pages by Quest's key-bound score.

    Paper: "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (mit-han-lab/Quest
    ``evaluation/quest_attention.py``: 16-token pages, ``max(3, budget // page)`` pages, the first 2 layers dense).
    Deliberate differences: pages are selected per KV head (the bound is maxed over the GQA group) instead of per
    query head after ``repeat_kv``, so one gather serves the whole group; the newest page is always read. Saves
    bytes read, not memory: the page bounds add ``2 * D`` values per page and head.
    """

    name: ClassVar[str] = "quest"
    kind: ClassVar[str] = "select"
    when: ClassVar[str] = "decode"
    budget: int = 1024
    page: int = 16
    dense_layers: int = 2

    def __post_init__(self) -> None:
        make_stage(self.name, budget=self.budget, page=self.page, dense_layers=self.dense_layers)

    def num_pages_kept(self, num_pages: int) -> int:
        """``min(P, max(3, budget // page))``."""
        return min(num_pages, max(MIN_PAGES, self.budget // self.page))

    def is_dense(self, layer_idx: int, num_pages: int) -> bool:
        """Layers below ``dense_layers``, and any layer whose budget covers every page, read everything."""
        return layer_idx < self.dense_layers or self.num_pages_kept(num_pages) >= num_pages

    def select(self, query: Tensor, page_min: Tensor, page_max: Tensor, num_pages: int) -> Tensor:
        """``models.attention.SelectionPolicy`` shape: ``[Hkv, k]`` page indices for one decode query."""
        return select_pages(query, page_min[:, :num_pages], page_max[:, :num_pages], self.num_pages_kept(num_pages))
