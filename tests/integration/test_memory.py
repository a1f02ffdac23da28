"""KV memory comes from the budget and is reused: many requests do not grow resident memory."""

from __future__ import annotations

import os

from longfit import SamplingParams
from tests.conftest import make_tiny_llm


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_many_requests_reuse_the_budget():
    budget = 128 * 2**20  # large enough to be mapped lazily (pages committed on first touch)
    llm = make_tiny_llm(memory_bytes=budget, max_num_seqs=16)
    spec = llm.engine.kv_spec
    assert spec.total_bytes <= budget
    params = SamplingParams(max_tokens=48, ignore_eos=True, seed=0)
    prompts = [f"request {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(32)]
    llm.generate(prompts, params)
    after_first = _rss_bytes()
    for round_index in range(5):
        llm.generate([p + str(round_index) for p in prompts], params)
        assert llm.engine.kv_manager.pool.num_used_blocks == 0
    growth = _rss_bytes() - after_first
    # The same pages are reused; only allocator noise may move RSS.
    assert growth < 32 * 2**20, growth
    # A fresh, lazily mapped pool: what was touched is far below the whole budget.
    assert after_first < 2 * 2**30


def test_kv_usage_reports_bytes_in_use_and_free():
    llm = make_tiny_llm(memory_bytes=4 * 2**20)
    usage = llm.kv_usage()
    assert usage["used_bytes"] == 0 and usage["free_bytes"] == usage["num_blocks"] * usage["page_bytes"]
    stream = llm.generate_stream("x" * 40, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    in_flight = llm.kv_usage()
    # After the first token: the 40 prompt tokens are cached (the new token is fed next step): 5 pages x 2 layers.
    assert in_flight["used_blocks"] == 2 * (40 // 8)
    assert in_flight["used_bytes"] + in_flight["free_bytes"] == usage["free_bytes"]
    stream.close()
    assert llm.kv_usage()["used_bytes"] == 0
