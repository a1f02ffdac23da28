"""The paged engine (prefill chunks, decode over pages, sliding windows) equals a contiguous naive forward."""

from __future__ import annotations

import random

import pytest
import torch

from longfit import SamplingParams
from tests.conftest import make_tiny_llm
from tests.model.reference import reference_logits

MODELS = ["tiny-llama", "tiny-gemma3"]


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(length)]


def _prompt_logprobs(llm, prompt: list[int]) -> torch.Tensor:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    return torch.tensor([entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])])


def _reference_prompt_logprobs(llm, prompt: list[int]) -> torch.Tensor:
    logits = reference_logits(llm.engine.runner.model, prompt)
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("chunk", [5, 16, 512])
@pytest.mark.parametrize("block_size", [8, 16])
def test_chunked_prefill_matches_reference(model, chunk, block_size):
    llm = make_tiny_llm(model, max_num_batched_tokens=chunk, block_size=block_size)
    prompt = _prompt(90, seed=1)  # longer than tiny-gemma3's 32-token window
    got = _prompt_logprobs(llm, prompt)
    want = _reference_prompt_logprobs(llm, prompt)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("native_kernel", ["1", "0"])  # decode attention: the C kernel where built; the torch ops
def test_greedy_decode_matches_reference(model, native_kernel, monkeypatch):
    monkeypatch.setenv("LONGFIT_NATIVE", native_kernel)
    llm = make_tiny_llm(model, block_size=8)
    prompt = _prompt(20, seed=2)
    out = llm.generate([prompt], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, logprobs=0))[0]
    tokens = out.outputs[0].token_ids
    assert len(tokens) == 60
    logits = reference_logits(llm.engine.runner.model, prompt + tokens)
    ref = logits[len(prompt) - 1:-1]  # rows predicting each generated token
    assert ref.argmax(-1).tolist() == tokens
    got = torch.tensor([entry[t].logprob for entry, t in zip(out.outputs[0].logprobs, tokens)])
    want = ref.log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("model", MODELS)
def test_batch_equals_alone(model):
    llm = make_tiny_llm(model, max_num_batched_tokens=48)
    prompts = [_prompt(n, seed=n) for n in (3, 17, 40, 75, 9)]
    params = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_bf16_close_to_fp32():
    prompt = _prompt(60, seed=3)
    fp32 = _prompt_logprobs(make_tiny_llm(dtype="float32"), prompt)
    bf16 = _prompt_logprobs(make_tiny_llm(dtype="bfloat16"), prompt)
    assert (fp32 - bf16).abs().mean() < 0.05
