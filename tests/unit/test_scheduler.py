"""Exact token accounting of the phase-free scheduler, with a fake runner that samples token 7."""

from __future__ import annotations

import pytest

from longfit.config import SchedulerConfig
from longfit.engine.request import Request, RequestStatus
from longfit.engine.scheduler import QueueFullError, Scheduler
from longfit.kv.manager import KVCacheManager
from longfit.kv.spec import KVCacheSpec
from longfit.outputs import ModelRunnerOutput
from longfit.sampling_params import SamplingParams


def make_scheduler(num_blocks=1000, block_size=16, num_layers=1, max_model_len=4096, prefix=False, **config):
    spec = KVCacheSpec(num_layers, 1, 8, block_size, "bfloat16", 2, num_blocks, (None,) * num_layers)
    return Scheduler(SchedulerConfig(**config), KVCacheManager(spec, prefix), max_model_len)


def make_requests(num_requests: int, num_tokens: int, max_tokens: int = 4, start: int = 0) -> list[Request]:
    return [Request(f"r{start + i}", [10 + i] * num_tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            for i in range(num_requests)]


def run_step(scheduler: Scheduler):
    out = scheduler.schedule()
    sampled = {item.request_id: [7] for item in out.scheduled if item.do_sample}
    scheduler.update_from_output(out, ModelRunnerOutput(sampled_token_ids=sampled))
    return out


def test_prompt_chunks_fill_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=1024)
    for request in make_requests(2, 800):
        scheduler.add_request(request)
    first = run_step(scheduler)
    assert [len(i.token_ids) for i in first.scheduled] == [800, 224]
    assert [i.do_sample for i in first.scheduled] == [True, False]
    second = run_step(scheduler)
    # Decode of r0 first (1 token), then the rest of r1's prompt.
    assert [(i.request_id, len(i.token_ids)) for i in second.scheduled] == [("r0", 1), ("r1", 576)]
    assert second.num_batched_tokens == 577


def test_decodes_are_never_stalled_by_a_long_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    (short,) = make_requests(1, 10, max_tokens=20)
    scheduler.add_request(short)
    run_step(scheduler)
    (long,) = make_requests(1, 1000, start=1)
    scheduler.add_request(long)
    for _ in range(5):
        out = run_step(scheduler)
        assert out.scheduled[0].request_id == "r0" and len(out.scheduled[0].token_ids) == 1
        assert len(out.scheduled[1].token_ids) == 63


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=1000)
    for request in make_requests(3, 5):
        scheduler.add_request(request)
    out = run_step(scheduler)
    assert [i.request_id for i in out.scheduled] == ["r0", "r1"]
    assert scheduler.num_waiting == 1


def test_requests_finish_at_max_tokens_and_free_pages():
    scheduler = make_scheduler()
    (request,) = make_requests(1, 5, max_tokens=3)
    scheduler.add_request(request)
    steps = 0
    while scheduler.has_unfinished_requests():
        run_step(scheduler)
        steps += 1
    assert steps == 3 and request.output_token_ids == [7, 7, 7]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.kv.pool.num_used_blocks == 0


def test_preemption_recomputes_most_recent_request():
    # 6 usable pages of 16 tokens: two requests of 40 prompt tokens take 3 pages each, then growth preempts.
    scheduler = make_scheduler(num_blocks=7, max_num_batched_tokens=200)
    requests = make_requests(2, 40, max_tokens=20)
    for request in requests:
        scheduler.add_request(request)
    run_step(scheduler)
    assert scheduler.kv.pool.num_free_blocks == 0
    for _ in range(9):  # the 9th decode step of r0 writes token 49 and needs a 4th page
        run_step(scheduler)
    assert requests[1].metrics.num_preemptions >= 1
    assert scheduler.num_preemptions >= 1
    while scheduler.has_unfinished_requests():
        run_step(scheduler)
    assert all(r.num_output_tokens == 20 for r in requests)
    assert scheduler.kv.pool.num_used_blocks == 0
    scheduler.kv.pool.check_invariants()


def test_abort_frees_pages_at_once():
    scheduler = make_scheduler()
    requests = make_requests(2, 50, max_tokens=100)
    for request in requests:
        scheduler.add_request(request)
    run_step(scheduler)
    used = scheduler.kv.pool.num_used_blocks
    scheduler.abort_requests(["r0"])
    assert scheduler.kv.pool.num_used_blocks == used // 2
    assert requests[0].status == RequestStatus.FINISHED_ABORTED
    out = scheduler.schedule()
    assert "r0" in out.finished_request_ids and [i.request_id for i in out.scheduled] == ["r1"]


def test_admission_errors_are_clear():
    scheduler = make_scheduler(num_blocks=5, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_requests(1, 100)[0])
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add_request(make_requests(1, 70, max_tokens=10)[0])  # 80 tokens > 4 pages of 16
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.validate_request(0, 5)


def test_queue_limit():
    scheduler = make_scheduler(max_queue=2)
    for request in make_requests(2, 5):
        scheduler.add_request(request)
    with pytest.raises(QueueFullError):
        scheduler.add_request(make_requests(1, 5, start=9)[0])


def test_prefix_hit_skips_cached_tokens():
    scheduler = make_scheduler(prefix=True, max_num_batched_tokens=1000)
    first, second = make_requests(2, 40)
    second.prompt_token_ids = list(first.prompt_token_ids)
    second.all_token_ids = list(first.prompt_token_ids)
    scheduler.add_request(first)
    run_step(scheduler)
    scheduler.add_request(second)
    out = run_step(scheduler)
    assert [(i.request_id, i.num_computed_tokens, len(i.token_ids)) for i in out.scheduled] == [
        ("r0", 40, 1), ("r1", 32, 8)]


# ---------------------------------------------------------------- multi-step decoding (SchedulerConfig.decode_steps)
def _multi(scheduler: Scheduler, tokens: dict[str, list[int]] | None = None):
    """One step whose runner returns ``tokens[id]`` (default: as many 7s as the step allows) per decode."""
    out = scheduler.schedule()
    sampled = {item.request_id: (tokens or {}).get(item.request_id, [7] * out.num_steps)
               for item in out.scheduled if item.do_sample}
    result = ModelRunnerOutput(sampled_token_ids=sampled)
    scheduler.update_from_output(out, result)
    return out, result


def test_multi_step_reserves_pages_then_counts_the_tokens():
    scheduler = make_scheduler(block_size=4, decode_steps=4, prefix=True)
    (request,) = make_requests(1, 6, max_tokens=10)
    scheduler.add_request(request)
    out, _ = _multi(scheduler)
    assert out.num_steps == 1  # a prefill step
    state = scheduler.kv.requests["r0"]
    out, _ = _multi(scheduler)
    assert out.num_steps == 4 and len(out.scheduled[0].token_ids) == 1
    # the step's own token (the 7th) counted; pages for 3 more reserved, not counted, their blocks not hashed yet
    assert len(state.tables[0]) == 3 and out.scheduled[0].new_block_ids == [[state.tables[0][2]]]
    assert request.num_computed_tokens == 10 and request.num_output_tokens == 5 and state.num_cached == [10]
    assert state.block_hashes == [hash((None, (10,) * 4)), hash((state.block_hashes[0], (10, 10, 7, 7)))]
    out, _ = _multi(scheduler)
    assert out.num_steps == 4 and request.num_output_tokens == 9
    out, _ = _multi(scheduler)
    assert out.num_steps == 1  # one token left before max_tokens
    assert request.status == RequestStatus.FINISHED_LENGTH and request.num_output_tokens == 10
    assert scheduler.kv.pool.num_used_blocks == 0


def test_multi_step_drops_the_tokens_after_a_stop():
    scheduler = make_scheduler(block_size=4, decode_steps=4)
    request = Request("r0", [10] * 6, SamplingParams(max_tokens=20, stop_token_ids=[3]))
    scheduler.add_request(request)
    _multi(scheduler)
    out, result = _multi(scheduler, {"r0": [5, 3, 9, 9]})
    assert out.num_steps == 4 and result.sampled_token_ids["r0"] == [5, 3]
    assert request.output_token_ids == [7, 5, 3] and request.status == RequestStatus.FINISHED_STOPPED
    assert scheduler.kv.pool.num_used_blocks == 0


@pytest.mark.parametrize("params", [dict(stop=["x"]), dict(repetition_penalty=1.2), dict(logit_bias={1: 2.0})])
def test_multi_step_needs_plain_decodes_and_no_request_that_could_start(params):
    scheduler = make_scheduler(decode_steps=4)
    scheduler.add_request(Request("r0", [10] * 6, SamplingParams(max_tokens=20, **params)))
    for _ in range(2):
        out, _ = _multi(scheduler)
        assert out.num_steps == 1  # the prefill, then a decode whose output is needed between tokens
    # A request waiting for pages while seats are free could be admitted any step: one step at a time.
    spec = KVCacheSpec(1, 1, 8, 4, "bfloat16", 2, 16, (None,))  # 15 pages of 4 tokens
    short = Scheduler(SchedulerConfig(decode_steps=4), KVCacheManager(spec, False), 4096)
    short.add_request(Request("r0", [10] * 6, SamplingParams(max_tokens=20)))
    _multi(short)
    short.add_request(Request("r1", [11] * 56, SamplingParams(max_tokens=4)))  # 14 pages: not while r0 holds 2
    out, _ = _multi(short)
    assert short.num_waiting == 1 and out.num_steps == 1


def test_multi_step_goes_on_while_the_queue_waits_for_a_seat():
    """Without a free seat a waiting request is admitted only once a running one finishes, and a loop ends at the
    step where one does: it gets its seat on the same step as with one step a call."""
    full = make_scheduler(block_size=4, decode_steps=4, max_num_seqs=1)
    full.add_request(Request("r0", [10] * 6, SamplingParams(max_tokens=6, ignore_eos=True)))
    _multi(full)
    full.add_request(Request("r1", [11] * 6, SamplingParams(max_tokens=20)))  # waits: no seat
    out, _ = _multi(full)
    assert full.num_waiting == 1 and out.num_steps == 4  # r0 has 5 tokens to go
    out, _ = _multi(full)
    assert out.num_steps == 1 and full.requests.get("r0") is None  # its last token; it finishes
    out, _ = _multi(full)
    assert [item.request_id for item in out.scheduled] == ["r1"] and full.num_waiting == 0


def test_decode_steps_is_validated():
    for bad in (0, 65, 2.5, True):
        with pytest.raises(ValueError, match="decode_steps"):
            SchedulerConfig(decode_steps=bad)
