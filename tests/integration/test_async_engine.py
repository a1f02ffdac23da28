"""AsyncLLMEngine on tiny-llama: streaming, abort on cancellation, one engine thread, step errors, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from longfit import SamplingParams
from longfit.config import EngineConfig
from longfit.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestError
from longfit.engine.scheduler import QueueFullError
from tests.conftest import make_tiny_llm

OPTIONS = {"dtype": "float32", "block_size": 8, "max_num_batched_tokens": 64, "max_num_seqs": 8}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True)


def make_engine(**kwargs) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_config(EngineConfig.from_kwargs("tiny-llama", **{**OPTIONS, **kwargs}))


@pytest.fixture(scope="module")
def engine():
    async_engine = make_engine()
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    return make_tiny_llm()


async def _last(engine: AsyncLLMEngine, prompt, params, request_id):
    outputs = [output async for output in engine.generate(prompt, params, request_id)]
    return outputs


async def _idle(engine: AsyncLLMEngine, timeout: float = 5.0) -> tuple[int, int]:
    """Wait until the engine holds no request; return (blocks in use, requests known to the scheduler)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await engine.call(lambda e: (e.kv_manager.pool.num_used_blocks, len(e.scheduler.requests),
                                             e.has_unfinished_requests()))
        if not state[2] or time.monotonic() > deadline:
            return state[0], state[1]
        await asyncio.sleep(0.02)


def test_generate_streams_cumulative_outputs_equal_to_llm(engine, reference):
    prompts = ["hello", "a longer prompt that spans pages", "xyz"]

    async def run():
        return await asyncio.gather(*(_last(engine, p, GREEDY, f"gen-{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(run())
    for prompt, outputs in zip(prompts, streams):
        final = outputs[-1]
        assert final.finished and not any(o.finished for o in outputs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 12
        (expected,) = reference.generate(prompt, GREEDY)
        assert final.outputs[0].token_ids == expected.outputs[0].token_ids
        assert final.outputs[0].text == expected.outputs[0].text


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    async def run():
        used_idle = (await _idle(engine))[0]
        started = asyncio.Event()

        async def consume(request_id: str):
            async for output in engine.generate("cancel me " * 5, LONG, request_id):
                if len(output.outputs[0].token_ids) >= 3:
                    started.set()

        tasks = [asyncio.create_task(consume(f"cancel-{i}")) for i in range(3)]
        await asyncio.wait_for(started.wait(), 10)
        assert engine.stats["kv_blocks_used"] > used_idle or (await engine.call(
            lambda e: e.kv_manager.pool.num_used_blocks)) > used_idle
        begin = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        used, known = await _idle(engine)
        return used_idle, used, known, time.monotonic() - begin

    used_idle, used, known, elapsed = asyncio.run(run())
    assert (used, known) == (used_idle, 0)
    assert elapsed < 2.0  # aborted, not run to 1500 tokens


def test_cancel_during_admission_leaves_nothing_behind(engine):
    async def run():
        blocker = asyncio.create_task(engine.call(lambda e: time.sleep(0.3)))  # the loop thread is busy
        await asyncio.sleep(0.05)
        adding = asyncio.create_task(engine.add_request("admission", "abc", LONG))
        await asyncio.sleep(0.05)
        adding.cancel()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await adding
        return await _idle(engine)

    assert asyncio.run(run()) == (0, 0)


def test_every_engine_call_runs_on_one_thread():
    async_engine = make_engine()
    seen: set[int] = set()
    inner = async_engine.engine
    for name in ("add_request", "step", "abort_request", "has_unfinished_requests"):
        original = getattr(inner, name)

        def wrapped(*args, _original=original, **kwargs):
            seen.add(threading.get_ident())
            return _original(*args, **kwargs)

        setattr(inner, name, wrapped)

    async def run():
        await asyncio.gather(*(_last(async_engine, f"p{i}", GREEDY, f"t-{i}") for i in range(4)))
        stream = await async_engine.add_request("t-abort", "abort me", LONG)
        await stream.__anext__()
        stream.close()
        await _idle(async_engine)

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert seen == {async_engine._thread.ident}


def test_step_error_fails_affected_requests_and_keeps_serving(reference):
    async_engine = make_engine()
    runner = async_engine.engine.runner
    original = runner.execute
    poison = list(b"POISON")

    def execute(scheduled):
        if any(item.prompt_token_ids == poison for item in scheduled.scheduled):
            raise RuntimeError("injected runner failure")
        return original(scheduled)

    runner.execute = execute

    async def run():
        with pytest.raises(RequestError, match="injected runner failure"):
            await _last(async_engine, poison, SamplingParams(temperature=0, max_tokens=5, n=2), "bad")
        healthy = await _last(async_engine, "healthy", GREEDY, "good")
        return healthy[-1], await _idle(async_engine)

    try:
        healthy, idle = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert healthy.outputs[0].token_ids == reference.generate("healthy", GREEDY)[0].outputs[0].token_ids
    assert idle == (0, 0)
    assert async_engine.num_step_errors == 1


def test_error_outside_the_runner_fails_running_requests_only_once():
    async_engine = make_engine()
    scheduler = async_engine.engine.scheduler
    original = scheduler.update_from_output
    calls = {"n": 0}

    def update(scheduled, result):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected bookkeeping failure")
        return original(scheduled, result)

    scheduler.update_from_output = update

    async def run():
        with pytest.raises(RequestError):
            await _last(async_engine, "first", GREEDY, "victim")
        after = await _last(async_engine, "second", GREEDY, "survivor")
        return after[-1], await _idle(async_engine)

    try:
        after, idle = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert after.finished and len(after.outputs[0].token_ids) == 12
    assert idle == (0, 0)


def test_admission_errors_reach_the_caller():
    async_engine = make_engine(max_num_seqs=1, max_queue=0)

    async def run():
        with pytest.raises(ValueError, match="kv_compression"):
            await async_engine.add_request("kvc", "abc", GREEDY, kv_compression="no-such-method")
        with pytest.raises(ValueError, match="context"):
            await async_engine.add_request("long", [65] * 5000, GREEDY)
        with pytest.raises(QueueFullError):
            await async_engine.add_request("full", "abc", GREEDY)
        return await _idle(async_engine)

    try:
        assert asyncio.run(run()) == (0, 0)
    finally:
        async_engine.shutdown()


def test_shutdown_fails_pending_streams_and_refuses_new_work():
    async_engine = make_engine()

    async def run():
        stream = await async_engine.add_request("pending", "shutdown", LONG)
        await stream.__anext__()
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", "abc", GREEDY)

    asyncio.run(run())
    assert not async_engine.is_running and not async_engine._thread.is_alive()
    assert async_engine.engine.kv_manager.pool.num_used_blocks == 0
