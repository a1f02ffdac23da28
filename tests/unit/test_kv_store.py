"""The KV pool allocation: a large pool is its own fresh mapping, zero whatever the process allocated and freed
before, and writable; small pools are zeroed tensors."""

from __future__ import annotations

import torch

from longfit.kv.spec import KVCacheSpec
from longfit.runtime.kv_store import allocate_kv_pool, fresh_pages


def test_large_pool_is_zero_and_writable():
    spec = KVCacheSpec(1, 3, 64, 32, "bfloat16", 2, 3000, (None,))  # 3000 pages of 24 KiB: a fresh mapping
    pool = allocate_kv_pool(spec)
    assert pool.shape == (3000, 2, 32, 3, 64) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
    assert not pool.any()
    pool[1234] = 1.5
    assert (pool[1234] == 1.5).all() and not pool[1233].any()


def test_small_pool_and_fresh_pages():
    small = allocate_kv_pool(KVCacheSpec(2, 1, 8, 4, "float32", 4, 16, (None, None)))
    assert small.shape == (16, 2, 4, 1, 8) and small.dtype == torch.float32 and not small.any()
    pages = fresh_pages((5, 7), torch.float32)
    assert pages.shape == (5, 7) and not pages.any()
    pages += 2
    assert (pages == 2).all()
