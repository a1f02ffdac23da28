"""Multi-step decoding (runtime/decode_loop.py, SchedulerConfig.decode_steps) against one step at a time."""

from __future__ import annotations

import types

import pytest

from longfit import SamplingParams
from longfit.config import ModelConfig
from longfit.models.loader import synthetic_config
from longfit.runtime import decode_loop, native
from tests.conftest import make_tiny_llm

PROMPTS = ["the first prompt, a little longer than the others " * 2, "second", "a third one"]
# fp32 runs the eager layers; bf16 with int4 weights the fused C step (its head is int4: the loop stays in Python);
# int8 weights put greedy loops wholly in C (FusedDecode.greedy), without and with a tied head's leader rescoring
FORMS = {"fp32-eager": dict(), "bf16-int4": dict(dtype="bfloat16", weights="int4"),
         "bf16-int8": dict(dtype="bfloat16", weights="int8"),
         "bf16-int8-tied": dict(dtype="bfloat16", weights="int8", tied=True)}


def _llm(form: dict, **kwargs):
    form = dict(form, **kwargs)
    if not form.pop("tied", False):
        return make_tiny_llm(**form)
    with synthetic_config("tiny-llama", ModelConfig.tiny("llama", tie_word_embeddings=True)) as name:
        llm = make_tiny_llm(name, **form)
    assert llm.engine.runner.model.exact_rows is not None  # the head's leaders are rescored
    return llm


def _counting(monkeypatch) -> tuple[list[int], list[int]]:
    """The num_steps of every loop the runner ran, and of those run wholly in C."""
    calls: list[int] = []
    in_c: list[int] = []
    run, greedy = decode_loop.run, decode_loop._run_greedy

    def counted(runner, items, num_steps, result):
        calls.append(num_steps)
        return run(runner, items, num_steps, result)

    def counted_c(runner, items, head, tokens, tables, widths, *args):
        in_c.append(len(widths))
        return greedy(runner, items, head, tokens, tables, widths, *args)

    monkeypatch.setattr(decode_loop, "run", counted)
    monkeypatch.setattr(decode_loop, "_run_greedy", counted_c)
    return calls, in_c


def _outputs(llm, prompts, params) -> list[tuple]:
    outs = llm.generate(prompts, params)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    llm.engine.kv_manager.pool.check_invariants()
    return [(c.token_ids, c.finish_reason, c.stop_reason,
             [sorted((t, round(p.logprob, 5)) for t, p in e.items()) for e in c.logprobs or []])
            for c in (o.outputs[0] for o in outs)]


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=37, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=29, ignore_eos=True, logprobs=2),
], ids=["greedy", "seeded-logprobs"])
def test_several_steps_a_call_equal_one_step_a_call(monkeypatch, form, params) -> None:
    calls, in_c = _counting(monkeypatch)
    one = _outputs(_llm(form, decode_steps=1), PROMPTS, params)
    assert not calls
    for steps in (4, 7):
        assert _outputs(_llm(form, decode_steps=steps), PROMPTS, params) == one
    assert calls and max(calls) == 7 and all(1 < c <= 7 for c in calls)
    c_loops = native.library() is not None and form.get("weights") == "int8" and params.temperature == 0
    assert len(in_c) == (len(calls) if c_loops else 0)


@pytest.mark.parametrize("form", [FORMS["fp32-eager"], FORMS["bf16-int8-tied"]], ids=["python", "c"])
@pytest.mark.parametrize("min_tokens", [0, 9])
def test_a_stop_token_ends_the_loop_where_one_step_would(form, min_tokens) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    tokens = _llm(form, decode_steps=1).generate(PROMPTS[0], greedy)[0].outputs[0].token_ids
    # a token that comes before min_tokens (ignored there) and again after it, or the 6th one
    stop = next((t for i, t in enumerate(tokens[:min_tokens]) if t in tokens[min_tokens + 1:]), tokens[5])
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop], min_tokens=min_tokens)
    one = _outputs(_llm(form, decode_steps=1), PROMPTS, params)
    assert one[0][1:3] == ("stop", stop)
    assert _outputs(_llm(form, decode_steps=6), PROMPTS, params) == one


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
    calls, _ = _counting(monkeypatch)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    one = _outputs(make_tiny_llm(decode_steps=1), PROMPTS, params)
    llm = make_tiny_llm(decode_steps=5)
    llm.engine.runner.graph = types.SimpleNamespace(failed=None, eligible=lambda meta: False)
    assert _outputs(llm, PROMPTS, params) == one and not calls


@pytest.mark.parametrize("form", [FORMS["fp32-eager"], FORMS["bf16-int8"]], ids=["python", "c"])
def test_a_loop_stops_after_its_time_bound(monkeypatch, form) -> None:
    """With no time to spare (MAX_BURST_S = 0) every loop stops after its first step: one token per engine step,
    the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    one = _outputs(_llm(form, decode_steps=1), PROMPTS[:1], params)
    monkeypatch.setattr(decode_loop, "MAX_BURST_S", 0.0)
    calls, _ = _counting(monkeypatch)
    llm = _llm(form, decode_steps=4)
    chunks = list(llm.generate_stream(PROMPTS[0], params))
    assert calls and [len(c.outputs[0].token_ids) for c in chunks] == list(range(1, 16))
    assert chunks[-1].outputs[0].token_ids == one[0][0]
