"""Multi-step decoding (runtime/decode_loop.py, SchedulerConfig.decode_steps) against one step at a time."""

from __future__ import annotations

import types

import pytest

from longfit import SamplingParams
from longfit.runtime import decode_loop
from tests.conftest import make_tiny_llm

PROMPTS = ["the first prompt, a little longer than the others " * 2, "second", "a third one"]
# fp32 runs the eager layers; bf16 with int4 weights the fused C step where the kernels are built
FORMS = [dict(), dict(dtype="bfloat16", weights="int4")]


def _counting(monkeypatch) -> list[int]:
    """The num_steps of every loop the runner ran."""
    calls: list[int] = []
    original = decode_loop.run

    def run(runner, items, num_steps, result):
        calls.append(num_steps)
        return original(runner, items, num_steps, result)

    monkeypatch.setattr(decode_loop, "run", run)
    return calls


def _outputs(llm, prompts, params) -> list[tuple]:
    outs = llm.generate(prompts, params)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    llm.engine.kv_manager.pool.check_invariants()
    return [(c.token_ids, c.finish_reason, c.stop_reason,
             [sorted((t, round(p.logprob, 5)) for t, p in e.items()) for e in c.logprobs or []])
            for c in (o.outputs[0] for o in outs)]


@pytest.mark.parametrize("form", FORMS, ids=["fp32-eager", "bf16-int4"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=37, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=29, ignore_eos=True, logprobs=2),
], ids=["greedy", "seeded-logprobs"])
def test_several_steps_a_call_equal_one_step_a_call(monkeypatch, form, params) -> None:
    calls = _counting(monkeypatch)
    one = _outputs(make_tiny_llm(decode_steps=1, **form), PROMPTS, params)
    assert not calls
    for steps in (4, 7):
        assert _outputs(make_tiny_llm(decode_steps=steps, **form), PROMPTS, params) == one
    assert calls and max(calls) == 7 and all(1 < c <= 7 for c in calls)


@pytest.mark.parametrize("min_tokens", [0, 9])
def test_a_stop_token_ends_the_loop_where_one_step_would(min_tokens) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    tokens = make_tiny_llm(decode_steps=1).generate(PROMPTS[0], greedy)[0].outputs[0].token_ids
    # a token that comes before min_tokens (ignored there) and again after it, or the 6th one
    stop = next((t for i, t in enumerate(tokens[:min_tokens]) if t in tokens[min_tokens + 1:]), tokens[5])
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop], min_tokens=min_tokens)
    one = _outputs(make_tiny_llm(decode_steps=1), PROMPTS, params)
    assert one[0][1:3] == ("stop", stop)
    assert _outputs(make_tiny_llm(decode_steps=6), PROMPTS, params) == one


def test_blocks_generated_in_a_loop_serve_later_prompts_from_the_prefix_cache() -> None:
    """The tokens a loop produced are hashed into the prefix cache when the scheduler counts them: a prompt that
    repeats them hits those pages and continues as it would with nothing cached."""
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    llm = make_tiny_llm(decode_steps=4)
    first = llm.engine.tokenize(PROMPTS[0])
    generated = llm.generate([first], greedy)[0].outputs[0].token_ids
    follow = first + generated[:30]
    (out,) = llm.generate([follow], greedy)
    assert out.metrics.num_cached_prompt_tokens >= (len(first) + 24) // 8 * 8
    fresh = make_tiny_llm(decode_steps=1).generate([follow], greedy)[0].outputs[0].token_ids
    assert out.outputs[0].token_ids == fresh


def test_rows_the_loop_cannot_take_run_one_step(monkeypatch) -> None:
    """A compiled decode graph (stubbed: one that never runs) keeps the runner to one step a call; the pages the
    scheduler reserved serve the next steps, and nothing leaks."""
    calls = _counting(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    one = _outputs(make_tiny_llm(decode_steps=1), PROMPTS, params)
    llm = make_tiny_llm(decode_steps=5)
    llm.engine.runner.graph = types.SimpleNamespace(failed=None, eligible=lambda meta: False)
    assert _outputs(llm, PROMPTS, params) == one and not calls
