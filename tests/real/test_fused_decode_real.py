"""On the real SmolLM2 with its file's packed weights: every fused decode step equals the eager layers to bf16 rounding,
and the greedy tokens are the same (tests/model/test_fused_decode.py checks the same on tiny random models)."""

from __future__ import annotations

import pytest

from longfit import LLM, SamplingParams
from longfit.runtime import native
from tests.model.test_fused_decode import Checked

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")]


def test_smollm2_fused_steps_equal_the_eager_layers() -> None:
    try:
        # a small pool: the check clones it every step; one step a call, so that every step goes through the check
        llm = LLM("smollm2-135m", weights="auto", max_num_seqs=2, memory_bytes=64 << 20, decode_steps=1)
    except ValueError as error:
        pytest.skip(str(error))
    model = llm.engine.runner.model
    checked = Checked(model)
    model._fused = checked
    prompts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number."]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert 2 in checked.batches
    model._fused = None
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == fused


def test_smollm2_several_steps_a_call_equal_one_step_a_call() -> None:
    """Multi-step decoding (the default decode_steps=4 and 7; greedy rows in one C call, sampled ones in the Python
    loop) gives SmolLM2's own tokens and text, EOS included."""
    try:
        llms = {steps: LLM("smollm2-135m", weights="auto", max_num_seqs=2, memory_bytes=64 << 20,
                           decode_steps=steps) for steps in (1, 4, 7)}
    except ValueError as error:
        pytest.skip(str(error))
    prompts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number."]
    for params in (SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=40, temperature=0.7, seed=11)):
        outs = {steps: [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                        for o in llm.generate(prompts, params)] for steps, llm in llms.items()}
        assert outs[4] == outs[1] and outs[7] == outs[1]
