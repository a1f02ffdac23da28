"""Structured output (``SamplingParams.structured_output``, llguidance masks) and ``logit_bias`` on the tiny
byte-level model.

Checked against a slow reference: greedy decoding that, at every step, runs the exact forward over the whole text
and takes the best byte of those a Python matcher allows (the choices' next bytes). Also: every kind of constraint
yields text of its language, under sampling too; constrained and free requests share batches without changing the
free ones; preemption (recompute) keeps constrained outputs identical; bad constraints are clear ValueErrors.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from longfit import SamplingParams
from longfit.sampling_params import StructuredOutput
from tests.conftest import make_tiny_llm
from tests.model.reference import reference_logits

pytest.importorskip("llguidance")

EOS = 2  # the byte tokenizer's end of text


@pytest.fixture(scope="module")
def llm():
    return make_tiny_llm(max_num_seqs=8)


def greedy(structured: StructuredOutput | None, max_tokens: int = 48, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_output=structured, **kwargs)


def reference_choice_decode(llm, prompt: str, choices: tuple[str, ...], max_tokens: int) -> list[int]:
    """Greedy over the allowed bytes only, with logits from the slow exact forward of prompt + output so far."""
    model = llm.engine.runner.model
    prompt_ids = llm.engine.tokenize(prompt)
    out: list[int] = []
    encoded = [c.encode() for c in choices]
    for _ in range(max_tokens):
        text = bytes(out)
        allowed = {c[len(text)] for c in encoded if c.startswith(text) and len(c) > len(text)}
        if text in encoded:
            allowed.add(EOS)
        with torch.inference_mode():
            logits = reference_logits(model, prompt_ids + out)[-1]
        mask = torch.full_like(logits, float("-inf"))
        mask[sorted(allowed)] = 0
        token = int((logits + mask).argmax())
        out.append(token)
        if token == EOS:
            break
    return out


@pytest.mark.parametrize("prompt", ["The cache holds", "x"])
def test_greedy_choice_equals_the_masked_reference(llm, prompt):
    # Choices that share prefixes, so the mask changes at every byte and more than one branch stays open.
    choices = ("cache", "cached", "caching", "cat", "dog")
    out = llm.generate(prompt, greedy(StructuredOutput(choice=choices)))[0].outputs[0]
    expected = reference_choice_decode(llm, prompt, choices, 48)
    assert out.token_ids == expected
    assert out.text in choices and out.finish_reason == "stop"


SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["page", "block"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["kind", "ok", "n"], "additionalProperties": False}


@pytest.mark.parametrize("structured,check", [
    (StructuredOutput(regex=r"[0-9]{3}-[0-9]{4}"), lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
    (StructuredOutput(json_schema=SCHEMA),
     lambda t: set(json.loads(t)) == {"kind", "ok", "n"} and json.loads(t)["kind"] in ("page", "block")
     and 0 <= json.loads(t)["n"] <= 99),
    (StructuredOutput(json_schema=json.dumps(SCHEMA)), lambda t: set(json.loads(t)) == {"kind", "ok", "n"}),
    (StructuredOutput(grammar='start: "(" item ("," item)* ")"\nitem: "a" | "b"'),
     lambda t: re.fullmatch(r"\([ab](,[ab])*\)", t)),
], ids=["regex", "json_schema", "json_schema_text", "lark"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_kind_stays_in_its_language(llm, structured, check, temperature):
    params = SamplingParams(temperature=temperature, max_tokens=64, seed=7, n=4 if temperature else 1,
                            structured_output=structured)
    for completion in llm.generate("Answer:", params)[0].outputs:
        if completion.finish_reason == "stop":
            assert check(completion.text), completion.text
        else:  # cut by max_tokens: still a prefix of the language (a random model may keep a list going)
            assert completion.finish_reason == "length" and structured.grammar is not None


def test_json_object_parses(llm):
    out = llm.generate("{", greedy(StructuredOutput(json_object=True), max_tokens=200))[0].outputs[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_constrained_and_free_requests_share_a_batch(llm):
    free = greedy(None, max_tokens=20, ignore_eos=True)
    alone = llm.generate(["free one", "free two"], free)
    constrained = greedy(StructuredOutput(choice=("yes", "no")))
    ids = [llm.engine.add_request(None, p, pr) for p, pr in
           (("free one", free), ("yes or no?", constrained), ("free two", free))]
    done = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    assert done[ids[0]].token_ids == alone[0].outputs[0].token_ids
    assert done[ids[2]].token_ids == alone[1].outputs[0].token_ids
    assert done[ids[1]].text in ("yes", "no")


def test_preemption_keeps_constrained_outputs():
    """Four constrained requests in a pool too small for all: some are recomputed from scratch, and their matchers
    follow the output generated before the preemption, so each still equals its solo run."""
    prompt = "a long prompt that fills pages quickly before the answer: " * 2
    engine = make_tiny_llm().engine
    peak = engine.model_config.num_layers * -(-(len(prompt) + 60) // 8) * engine.kv_spec.page_bytes
    small = make_tiny_llm(memory_bytes=int(peak * 1.2), max_num_batched_tokens=40)
    params = greedy(StructuredOutput(regex=r"[a-z ]{60}"), max_tokens=60)
    prompts = [prompt, prompt[10:], prompt[20:], prompt[30:]]
    alone = [small.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    outs = small.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert small.engine.scheduler.num_preemptions > 0
    assert all(re.fullmatch(r"[a-z ]{60}", o.outputs[0].text) for o in outs)
    assert small.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize("fields,message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ("b",)}, "exactly one of"),
    ({"json_schema": "[1, 2]"}, "must be a JSON object"),
    ({"json_schema": "{nope"}, "not valid JSON"),
    ({"choice": ()}, "non-empty list"),
    ({"regex": ""}, "non-empty string"),
    ({"json_object": "yes"}, "true or false"),
])
def test_bad_constraints_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutput(**fields)


def test_constraints_that_do_not_compile_are_refused_at_admission(llm):
    for structured in (StructuredOutput(regex="[a-"), StructuredOutput(grammar="start: nope_rule")):
        with pytest.raises(ValueError, match=f"structured_output.{structured.kind}"):
            llm.engine.add_request(None, "x", greedy(structured))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_output=StructuredOutput(regex="a+"))



def test_logit_bias_bans_and_forces_tokens(llm):
    free = llm.generate("The cache", greedy(None, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    banned = llm.generate("The cache", greedy(None, max_tokens=12, ignore_eos=True,
                                              logit_bias={t: -100 for t in set(free)}))[0].outputs[0].token_ids
    assert not set(banned) & set(free)
    forced = llm.generate("The cache", greedy(None, max_tokens=6, ignore_eos=True, logit_bias={ord("Q"): 100.0}))
    assert forced[0].outputs[0].text == "QQQQQQ"
    # Sampling too: a token pushed up by 100 is drawn every time, whatever the temperature.
    sampled = llm.generate("x", SamplingParams(temperature=1.5, max_tokens=8, seed=3, n=3,
                                              logit_bias={ord("z"): 100.0}))
    assert all(c.text == "z" * 8 for c in sampled[0].outputs)
    # A bias and a grammar together: the bias picks within the grammar.
    both = llm.generate("x", greedy(StructuredOutput(choice=("ab", "cd")), logit_bias={ord("c"): 50.0}))
    assert both[0].outputs[0].text == "cd"


@pytest.mark.parametrize("bias,message", [
    ({"5": 1.0}, "token ids"), ({-1: 1.0}, "token ids"), ({True: 1.0}, "token ids"), ({5: 101}, r"\[-100, 100\]"),
    ({5: float("nan")}, "finite"), ([5], "map token ids"),
])
def test_bad_logit_bias_names_the_field(bias, message):
    with pytest.raises(ValueError, match=message) as error:
        SamplingParams(logit_bias=bias)
    assert str(error.value).startswith("logit_bias")


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(ValueError, match=r"logit_bias token id 300 is outside the vocabulary \[0, 256\)"):
        llm.engine.add_request(None, "x", greedy(None, logit_bias={300: 1.0}))


def test_choices_with_regex_metacharacters_are_literal(llm):
    choices = ("a-b", "c#d", "e f", "x.y", "(1)", "q?[z]{2}", "ü€", "back\\slash", "tab\there", "$^|*+")
    params = SamplingParams(temperature=1.5, max_tokens=20, seed=5, n=16, structured_output=StructuredOutput(
        choice=choices))
    texts = {c.text for c in llm.generate("pick", params)[0].outputs}
    assert texts <= set(choices) and len(texts) >= 3


def test_ignore_eos_after_the_grammar_ends_keeps_emitting_eos(llm):
    """With ignore_eos the request outlives its grammar: once complete, only end-of-text is allowed (no error, no
    text outside the grammar), until max_tokens."""
    out = llm.generate("x", greedy(StructuredOutput(choice=("ab",)), max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert out.token_ids[:2] == [ord("a"), ord("b")] and out.token_ids[2:] == [EOS] * 4
    assert out.finish_reason == "length"
