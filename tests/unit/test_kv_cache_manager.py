from __future__ import annotations

from longfit.engine.request import Request
from longfit.kv.manager import KVCacheManager
from longfit.kv.spec import KVCacheSpec
from longfit.outputs import CompactionResult
from longfit.sampling_params import SamplingParams


def make_manager(num_blocks=64, num_layers=2, block_size=4, windows=None, prefix=True) -> KVCacheManager:
    spec = KVCacheSpec(num_layers, 1, 8, block_size, "bfloat16", 2, num_blocks, tuple(windows or [None] * num_layers))
    return KVCacheManager(spec, enable_prefix_caching=prefix)


def make_request(rid: str, tokens: list[int], **kwargs) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8), **kwargs)


def test_allocation_grows_every_layer_in_pages():
    kv = make_manager()
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10)
    assert [len(t) for t in kv.requests["a"].tables] == [3, 3]  # ceil(10 / 4) per layer
    assert kv.pool.num_used_blocks == 6
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 2)  # 12 tokens still fit in 3 pages
    assert kv.pool.num_used_blocks == 6
    req.num_computed_tokens = 12
    assert kv.allocate_slots(req, 1)
    assert kv.pool.num_used_blocks == 8
    assert kv.request_bytes("a") == 8 * kv.spec.page_bytes
    kv.free(req)
    assert kv.pool.num_used_blocks == 0
    kv.pool.check_invariants()


def test_allocation_fails_cleanly_when_full():
    kv = make_manager(num_blocks=5)  # 4 pages = 2 per layer = 8 tokens
    req = make_request("a", list(range(9)))
    assert not kv.allocate_slots(req, 9)
    assert kv.pool.num_used_blocks == 0
    assert kv.allocate_slots(req, 8)
    assert kv.pool.num_free_blocks == 0


def test_prefix_hits_share_pages_and_count():
    kv = make_manager()
    first = make_request("a", list(range(13)))
    assert kv.get_computed_blocks(first) == 0
    assert kv.allocate_slots(first, 13)
    second = make_request("b", list(range(13)) + [99])
    hit = kv.get_computed_blocks(second)
    assert hit == 12  # three full pages of 4 tokens
    assert kv.requests["b"].tables[0][:3] == kv.requests["a"].tables[0][:3]
    assert kv.pool.ref_counts[kv.requests["a"].tables[0][0]] == 2
    kv.free(first)
    kv.free(second)
    kv.pool.check_invariants()
    assert kv.pool.num_used_blocks == 0
    third = make_request("c", list(range(13)))
    assert kv.get_computed_blocks(third) == 12  # still cached after both finished
    assert 0 < kv.prefix_hit_rate < 1


def test_at_least_one_prompt_token_is_computed():
    kv = make_manager()
    first = make_request("a", list(range(8)))
    kv.allocate_slots(first, 8)
    again = make_request("b", list(range(8)))
    assert kv.get_computed_blocks(again) == 4  # not 8: the last token must run to produce logits


def test_sliding_window_layer_releases_pages():
    kv = make_manager(windows=[None, 8], prefix=False)
    req = make_request("a", list(range(4)))
    kv.allocate_slots(req, 4)
    for _ in range(20):  # decode 20 tokens, one step at a time
        req.num_computed_tokens += 1 if req.num_computed_tokens >= 4 else 4
        req.all_token_ids.append(0)
        kv.allocate_slots(req, 1)
    state = kv.requests["a"]
    live_sliding = [p for p in state.tables[1] if p]
    assert len(state.tables[0]) == 6  # 24 tokens / 4 in the full layer
    assert len(live_sliding) <= 8 // 4 + 1
    kv.free(req)
    assert kv.pool.num_used_blocks == 0
    kv.pool.check_invariants()


def test_compaction_frees_whole_pages_per_layer():
    kv = make_manager(prefix=False)
    req = make_request("a", list(range(16)))
    kv.allocate_slots(req, 16)
    assert kv.pool.num_used_blocks == 8
    freed = kv.apply_compaction(req, CompactionResult("a", num_kept_tokens=[5, 2]))
    assert len(freed) == 2 + 3  # of 4 pages each, layer 0 keeps 2 and layer 1 keeps 1
    assert kv.requests["a"].num_cached == [5, 2]
    assert kv.pool.num_used_blocks == 3
    assert kv.allocate_slots(req, 4)  # 9 and 6 tokens → 3 and 2 pages
    assert [len(t) for t in kv.requests["a"].tables] == [3, 2]
    kv.free(req)
    kv.pool.check_invariants()
