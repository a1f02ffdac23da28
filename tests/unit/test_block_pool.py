from __future__ import annotations

import pytest

from longfit.kv.block_pool import BlockPool


def test_allocate_free_roundtrip():
    pool = BlockPool(10)
    assert pool.num_free_blocks == 9
    pages = pool.allocate(4)
    assert len(set(pages)) == 4 and 0 not in pages
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 4
    pool.free(pages)
    assert pool.num_free_blocks == 9
    pool.check_invariants()


def test_over_allocation_and_double_free_raise():
    pool = BlockPool(3)
    pages = pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(pages)
    with pytest.raises(RuntimeError):
        pool.free(pages)


def test_cached_pages_are_evicted_lru_only_when_needed():
    pool = BlockPool(5)  # 4 usable pages
    a, b = pool.allocate(2)
    pool.set_hash(a, "ha")
    pool.set_hash(b, "hb")
    pool.free([a])
    pool.free([b])
    assert pool.num_free_blocks == 4 and pool.lookup("ha") == a  # freed but still cached
    fresh = pool.allocate(2)  # served from the plain free list first
    assert set(fresh).isdisjoint({a, b}) and pool.lookup("ha") == a
    evicted = pool.allocate(1)  # now the least recently freed cached page goes
    assert evicted == [a] and pool.lookup("ha") is None and pool.lookup("hb") == b
    assert pool.num_evictions == 1
    pool.check_invariants()


def test_touch_revives_cached_page_and_counts_refs():
    pool = BlockPool(4)
    (page,) = pool.allocate(1)
    pool.set_hash(page, "h")
    pool.touch([page])
    assert pool.ref_counts[page] == 2
    pool.free([page])
    pool.free([page])
    assert pool.lookup("h") == page and pool.num_free_blocks == 3
    pool.touch([page])
    assert pool.ref_counts[page] == 1 and pool.num_free_blocks == 2
    pool.check_invariants()
