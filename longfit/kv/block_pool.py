"""BlockPool: the mechanism under the paged KV cache — a free list of pages, reference counts, block hashes.

A page ("block") is a fixed number of bytes in the runtime's KV store and holds the keys and values of
``block_size`` tokens of ONE layer (so layers can keep different numbers of tokens after compression).
Page 0 is the null page: it pads block tables and is never allocated or ref-counted. Allocation and
freeing are O(1) per page; freed pages that still carry a prefix hash stay cached (LRU order) until the
pool needs them. No torch here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class BlockPool:
    """Pages ``1 .. num_blocks - 1`` with reference counts.

    Free pages live in ``_free`` (never hashed) and ``_cached`` (an LRU of free pages that still hold a
    reusable prefix, keyed by page id). ``allocate`` takes from ``_free`` first and evicts the least
    recently freed cached page only when ``_free`` is empty.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"BlockPool needs at least 2 blocks (page 0 is the null page), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # NOTE: popping from the end hands out low page ids first (reversed order), which keeps a short run's
        # memory in the first pages of the store (touched pages = resident pages).
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # free but hashed pages, LRU first
        self.block_hash: dict[int, Hashable] = {}  # page id → prefix hash
        self.hash_to_block: dict[Hashable, int] = {}
        self.num_evictions = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        """Pages an allocation can get now (free plus evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.num_free_blocks

    # ------------------------------------------------------------------ allocation
    def allocate(self, count: int) -> list[int]:
        """Take ``count`` pages with ref count 1. Raises RuntimeError if fewer are free (callers check first)."""
        if count > self.num_free_blocks:
            raise RuntimeError(f"BlockPool: asked for {count} pages, {self.num_free_blocks} free")
        take = min(count, len(self._free))
        pages = self._free[len(self._free) - take:]
        del self._free[len(self._free) - take:]
        for _ in range(count - take):
            page, _ = self._cached.popitem(last=False)
            self._drop_hash(page)
            self.num_evictions += 1
            pages.append(page)
        for page in pages:
            self.ref_counts[page] = 1
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference from each page; pages reaching zero become free (cached if hashed).

        Pages are released in reverse so that a request's tail pages are evicted before its head pages,
        which keeps longer shared prefixes alive.
        """
        for page in reversed(pages):
            if page == 0:
                continue
            count = self.ref_counts[page] - 1
            if count < 0:
                raise RuntimeError(f"BlockPool: page {page} freed twice")
            self.ref_counts[page] = count
            if count == 0:
                if page in self.block_hash:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def touch(self, pages: list[int]) -> None:
        """Take a reference on pages found through the prefix cache (they may be free-but-cached)."""
        for page in pages:
            if self.ref_counts[page] == 0:
                self._cached.pop(page, None)
            self.ref_counts[page] += 1

    # ------------------------------------------------------------------ prefix hashes
    def set_hash(self, page: int, block_hash: Hashable) -> None:
        """Mark a full, immutable page as holding the prefix ``block_hash`` (first writer wins)."""
        if block_hash in self.hash_to_block or page in self.block_hash:
            return
        self.block_hash[page] = block_hash
        self.hash_to_block[block_hash] = page

    def lookup(self, block_hash: Hashable) -> int | None:
        return self.hash_to_block.get(block_hash)

    def _drop_hash(self, page: int) -> None:
        block_hash = self.block_hash.pop(page, None)
        if block_hash is not None:
            self.hash_to_block.pop(block_hash, None)

    def reset_prefix_cache(self) -> None:
        """Forget every hash; cached free pages become plain free pages."""
        for page in self._cached:
            self._free.append(page)
        self._cached.clear()
        self.block_hash.clear()
        self.hash_to_block.clear()

    def check_invariants(self) -> None:
        """Slow consistency check for tests: every page is exactly one of null, used, free, cached."""
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate page in free list"
        assert not (free & set(self._cached)), "page both free and cached"
        for page in range(1, self.num_blocks):
            in_free = page in free or page in self._cached
            assert in_free == (self.ref_counts[page] == 0), f"page {page}: ref {self.ref_counts[page]}, free {in_free}"
        assert self.ref_counts[0] == 0
