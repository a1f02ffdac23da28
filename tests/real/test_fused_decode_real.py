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
        # a small pool: the check clones it every step
        llm = LLM("smollm2-135m", weights="auto", max_num_seqs=2, memory_bytes=64 << 20)
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
