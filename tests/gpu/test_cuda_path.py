"""The CUDA path equals the CPU path (skipped without CUDA; no GPU in CI)."""

from __future__ import annotations

import pytest

from longfit import SamplingParams
from tests.conftest import make_tiny_llm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_cuda_greedy_equals_cpu(model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["a" * 50, "some other prompt " * 4]
    cpu = [o.outputs[0].token_ids for o in make_tiny_llm(model).generate(prompts, params)]
    gpu_llm = make_tiny_llm(model, device="cuda")
    gpu = [o.outputs[0].token_ids for o in gpu_llm.generate(prompts, params)]
    assert gpu == cpu
    assert gpu_llm.generate(prompts[0], params, kv_compression="snapkv:keep=0.5")[0].outputs[0].finish_reason == "length"
    for spec in ("kivi:bits=2,group=8,residual=16", "kvquant:bits=4,group=8,outliers=0.05"):  # packed pages on CUDA
        assert gpu_llm.generate(prompts[1], params, kv_compression=spec)[0].outputs[0].finish_reason == "length"
    assert gpu_llm.engine.kv_manager.pool.num_used_blocks == 0
