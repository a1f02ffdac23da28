"""LLM.generate end to end on tiny random models: sampling options, streaming, n > 1, no page leaks."""

from __future__ import annotations

import pytest

from longfit import LLM, SamplingParams
from tests.conftest import make_tiny_llm

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def assert_no_leak(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_manager.pool.num_used_blocks == 0
    assert not engine.kv_manager.requests
    engine.kv_manager.pool.check_invariants()


def test_outputs_are_vllm_shaped(tiny_llm):
    (out,) = tiny_llm.generate("hello", GREEDY)
    assert out.prompt == "hello" and out.prompt_token_ids == list(b"hello") and out.finished
    (completion,) = out.outputs
    assert len(completion.token_ids) == 12 and completion.finish_reason == "length"
    assert completion.text == tiny_llm.get_tokenizer().decode(completion.token_ids)
    assert_no_leak(tiny_llm)


def test_seeded_sampling_is_reproducible(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    first = tiny_llm.generate(["abc", "xyz"], params)
    second = tiny_llm.generate(["xyz", "abc"], params)
    assert first[0].outputs[0].token_ids == second[1].outputs[0].token_ids
    other = tiny_llm.generate("abc", SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True))
    assert other[0].outputs[0].token_ids != first[0].outputs[0].token_ids


def test_top_k_one_is_greedy(tiny_llm):
    greedy = tiny_llm.generate("prompt", GREEDY)[0].outputs[0].token_ids
    topk = tiny_llm.generate("prompt", SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True, seed=1))
    assert topk[0].outputs[0].token_ids == greedy


def test_repetition_penalty_changes_output(tiny_llm):
    base = tiny_llm.generate("aaaa", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    penalized = tiny_llm.generate("aaaa", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                        repetition_penalty=5.0, frequency_penalty=2.0))[0]
    base_ids, pen_ids = base.outputs[0].token_ids, penalized.outputs[0].token_ids
    assert base_ids != pen_ids
    assert len(set(pen_ids)) >= len(set(base_ids))


def test_stop_strings_and_token_ids(tiny_llm):
    (free,) = tiny_llm.generate("stop test", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    ids = free.outputs[0].token_ids
    text = free.outputs[0].text
    stop_char = text[5]
    (stopped,) = tiny_llm.generate("stop test", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                               stop=[stop_char]))
    assert stopped.outputs[0].text == text[:text.index(stop_char)]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop_char
    (by_id,) = tiny_llm.generate("stop test", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                             stop_token_ids=[ids[3]]))
    assert by_id.outputs[0].token_ids == ids[:ids.index(ids[3]) + 1]
    assert by_id.outputs[0].finish_reason == "stop"
    assert_no_leak(tiny_llm)


def test_eos_stops_unless_ignored():
    llm = make_tiny_llm()
    (free,) = llm.generate("eos", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    first = free.outputs[0].token_ids[0]
    llm.engine.eos_token_ids = (first,)
    for request_eos in (True, False):
        (out,) = llm.generate("eos", SamplingParams(temperature=0, max_tokens=8, ignore_eos=not request_eos))
        assert len(out.outputs[0].token_ids) == (1 if request_eos else 8)
    (min_tok,) = llm.generate("eos", SamplingParams(temperature=0, max_tokens=8, min_tokens=3))
    assert len(min_tok.outputs[0].token_ids) >= 3


def test_logprobs_returned_per_token(tiny_llm):
    (out,) = tiny_llm.generate("lp", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3))
    completion = out.outputs[0]
    assert len(completion.logprobs) == 5
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and entry[token].rank == 1 and len(entry) == 3
    assert completion.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in
                                                              zip(completion.token_ids, completion.logprobs)))


def test_n_completions_share_the_prompt(tiny_llm):
    (out,) = tiny_llm.generate("many", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert_no_leak(tiny_llm)


def test_streaming_yields_growing_text_and_abort_frees(tiny_llm):
    chunks = list(tiny_llm.generate_stream("stream", GREEDY))
    # One chunk per engine step: a multi-step decode (decode_steps, 4 by default) brings up to 4 tokens at once
    counts = [len(c.outputs[0].token_ids) for c in chunks]
    assert chunks[-1].finished and counts == [1, 5, 9, 12]
    assert all(b.outputs[0].text.startswith(a.outputs[0].text) for a, b in zip(chunks, chunks[1:]))
    assert chunks[-1].outputs[0].token_ids == tiny_llm.generate("stream", GREEDY)[0].outputs[0].token_ids
    stream = tiny_llm.generate_stream("stream", SamplingParams(max_tokens=100, ignore_eos=True))
    next(stream)
    assert tiny_llm.engine.kv_manager.pool.num_used_blocks > 0
    stream.close()
    assert_no_leak(tiny_llm)


def test_chat_applies_template(tiny_llm):
    (out,) = tiny_llm.chat([{"role": "user", "content": "hi"}], GREEDY)
    assert out.prompt_token_ids == list(b"<user>hi\n<assistant>")


def test_exception_mid_request_returns_every_page(monkeypatch):
    llm = make_tiny_llm()
    calls = {"n": 0}
    original = llm.engine.runner.execute

    def failing(scheduler_output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(scheduler_output)

    monkeypatch.setattr(llm.engine.runner, "execute", failing)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["one", "two"], SamplingParams(max_tokens=20, ignore_eos=True))
    assert_no_leak(llm)
    monkeypatch.setattr(llm.engine.runner, "execute", original)
    assert llm.generate("after", GREEDY)[0].outputs[0].finish_reason == "length"


def test_preemption_under_a_tiny_budget_keeps_greedy_outputs():
    prompts = [f"request number {i} " * 3 for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = [o.outputs[0].token_ids for o in make_tiny_llm().generate(prompts, params)]
    page = 2 * 8 * 2 * 16 * 4  # K and V, 8 tokens, 2 KV heads, head dim 16, fp32
    tight = make_tiny_llm(memory_bytes=page * 2 * 24)  # 2 layers: room for ~96 tokens per layer in all
    outs = tight.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == roomy
    assert tight.engine.scheduler.num_preemptions > 0
    assert_no_leak(tight)


def test_prefix_cache_hits_keep_outputs_identical():
    shared = "a shared system prompt that is long enough to fill pages " * 2
    prompts = [shared + f"question {i}" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    cold = [o.outputs[0].token_ids for o in make_tiny_llm(enable_prefix_caching=False).generate(prompts, params)]
    llm = make_tiny_llm()
    llm.generate(prompts[:1], params)
    warm = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert warm == cold and llm.kv_usage()["prefix_hit_rate"] > 0.5


@pytest.mark.parametrize("prompt,match", [("", "empty"), ("x" * 2048, "max_model_len"), ([999], r"\[0, 256\)")])
def test_bad_prompts_raise_clear_errors(tiny_llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        tiny_llm.generate(prompt, GREEDY)
    assert_no_leak(tiny_llm)


def test_unknown_model_and_options():
    with pytest.raises(ValueError, match="smollm2-135m"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="block_size"):
        LLM("tiny-llama", block_size=7)
    with pytest.raises(ValueError, match="dtype"):
        LLM("tiny-llama", dtype="float16")
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM("tiny-llama", no_such_option=1)


def test_max_tokens_zero_returns_prompt_logprobs_only(tiny_llm):
    (out,) = tiny_llm.generate("echo me", SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == len("echo me") and out.prompt_logprobs[0] is None
    assert_no_leak(tiny_llm)


def test_failed_step_with_n_siblings_frees_all(monkeypatch):
    llm = make_tiny_llm(max_num_seqs=1)
    engine = llm.engine
    original = engine.runner.execute
    state = {"fail": True}

    def failing_once(scheduler_output):
        if state.pop("fail", False):
            raise RuntimeError("injected")
        return original(scheduler_output)

    monkeypatch.setattr(engine.runner, "execute", failing_once)
    engine.add_request("r", "hello", SamplingParams(n=2, max_tokens=4, temperature=0))
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.step() == [] and not engine.has_unfinished_requests()
    assert_no_leak(llm)


def test_outputs_carry_request_metrics(tiny_llm):
    (out,) = tiny_llm.generate("metrics", GREEDY)
    assert out.metrics is not None and out.metrics.first_token_time is not None
    assert out.metrics.kv_bytes > 0


def test_second_chat_turn_reuses_the_first_turn_from_the_prefix_cache():
    llm = make_tiny_llm()
    history = [{"role": "user", "content": "a first question that is long enough to fill pages"}]
    first = llm.chat(history, GREEDY)[0]
    history += [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "and next?"}]
    second = llm.chat(history, GREEDY)[0]
    assert second.metrics.num_cached_prompt_tokens >= len(first.prompt_token_ids) // 8 * 8 - 8


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_prepacked_bf16_layers_generate_the_same_tokens(model, monkeypatch):
    """bf16 models with every dense layer prepacked for oneDNN (``LONGFIT_PREPACK=force``, on any CPU) decode exactly
    what plain weights decode, batched and alone, prefill chunks included."""
    from longfit.quant import matmul
    from longfit.quant.linear import DenseLinear

    if not matmul.prepack_available():
        pytest.skip("this torch has no oneDNN prepacked linear")
    prompts = ["the quick brown fox", "a" * 150, "hello"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outputs = {}
    for mode in ("0", "force"):
        monkeypatch.setenv(matmul.PREPACK_ENV_VAR, mode)
        llm = make_tiny_llm(model, dtype="bfloat16")
        layers = {name: m for name, m in llm.engine.runner.model.named_modules() if isinstance(m, DenseLinear)}
        assert layers and all((m.packed is not None) == (mode == "force") for m in layers.values())
        # The head keeps its plain weight too: the embedding table and the rows its leaders are rescored from.
        assert all((m.weight is None) == (mode == "force" and name != "lm_head") for name, m in layers.items())
        outputs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert_no_leak(llm)
    assert outputs["force"] == outputs["0"]
