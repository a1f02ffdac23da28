"""The one-call decode step (models/fused_decode.py, runtime/csrc/decode_step.c) against the eager layers."""

from __future__ import annotations

import pytest
import torch

from longfit import SamplingParams
from longfit.models import fused_decode
from longfit.runtime import native
from tests.conftest import make_tiny_llm, run_together

pytestmark = pytest.mark.skipif(native.library() is None, reason="the C kernels are not built on this machine")

KIVI = "kivi:bits=2,group=8,residual=16"
PROMPTS = ["the first prompt, a little longer than the others " * 2, "second", "a third one"]


# Largest difference allowed between the two paths' outputs (and written keys and values), relative to the largest
# value: bf16 rounding. The C norms sum their squares in another order than torch's reduction, so a value near a bf16
# rounding boundary may land one bf16 step away, and later layers carry that on: on the tiny models the two paths
# were bit-identical in every step measured; on SmolLM2, 16 of 24 steps identical, the others within 6e-3.
TOLERANCE = 2e-2


def assert_near(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    largest = want.float().abs().max()
    assert float((got.float() - want.float()).abs().max()) <= TOLERANCE * float(largest)


class Checked:
    """Wraps a model's plan: every fused step also runs the eager layers from the same state (the pool restored in
    between) and must produce the same output and write the same pages, to bf16 rounding (``TOLERANCE``)."""

    def __init__(self, model) -> None:
        self.model, self.plan = model, model.fused_decode()
        assert self.plan is not None
        self.batches: list[int] = []

    def applies(self, meta, num_tokens: int) -> bool:
        return self.plan.applies(meta, num_tokens)

    def __call__(self, h, positions, meta):
        pool = meta.kv_pool.clone()
        ref = h.clone()
        for layer in self.model.layers:
            ref = layer(ref, positions, meta)
        ref = self.model.norm(ref)
        ref_pool = meta.kv_pool.clone()
        meta.kv_pool.copy_(pool)
        out = self.plan(h, positions, meta)
        assert out.dtype == torch.bfloat16
        assert_near(out, ref)
        assert_near(meta.kv_pool, ref_pool)
        self.batches.append(h.shape[0])
        return out


@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("kv_dtype", ["auto", "float32"])
def test_fused_step_equals_the_eager_layers(weights: str, kv_dtype: str) -> None:
    # one step a call: multi-step greedy loops of int8 models run in one C call, past the check
    llm = make_tiny_llm(dtype="bfloat16", weights=weights, kv_dtype=kv_dtype, decode_steps=1)
    model = llm.engine.runner.model
    checked = Checked(model)
    model._fused = checked
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    fused = run_together(llm, PROMPTS, params, [None] * 3)
    assert max(checked.batches) == 3 and min(checked.batches) >= 1
    model._fused = None  # eager layers only
    assert run_together(llm, PROMPTS, params, [None] * 3) == fused


def test_fused_step_masks_a_sliding_window() -> None:
    """A layer's window goes to the attention kernel: keys older than it are not read (as in the eager layers)."""
    llm = make_tiny_llm(dtype="bfloat16", weights="int4")
    model = llm.engine.runner.model
    for layer in model.layers:
        layer.attn.window = 12
    checked = Checked(model)
    model._fused = checked
    outputs = run_together(llm, PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), [None] * 2)
    assert checked.batches and all(len(o) == 8 for o in outputs)
    assert list(checked.plan.table[:, 2]) == [12] * len(model.layers)


@pytest.mark.parametrize("options", [dict(dtype="bfloat16", weights="bf16"), dict(dtype="float32", weights="int4"),
                                     dict(model="tiny-gemma3", dtype="bfloat16", weights="int4")],
                         ids=["dense-weights", "fp32-model", "gemma3"])
def test_models_the_fused_step_cannot_take(options: dict) -> None:
    llm = make_tiny_llm(**options)
    assert llm.engine.runner.model.fused_decode() is None
    assert len(llm.generate("hello", SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) == 3


def test_environment_variable_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fused_decode.ENV_VAR, "0")
    assert make_tiny_llm(dtype="bfloat16", weights="int4").engine.runner.model.fused_decode() is None


def test_steps_it_cannot_take_run_the_eager_layers() -> None:
    """A quantized KV stream (KIVI) or a prefill chunk in the step: the eager layers, the same tokens as without
    the fused step at all."""
    llm = make_tiny_llm(dtype="bfloat16", weights="int4")
    model = llm.engine.runner.model
    checked = Checked(model)
    model._fused = checked
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [PROMPTS[0] * 3, PROMPTS[1]]
    kivi = run_together(llm, prompts, params, [KIVI, KIVI])
    assert not checked.batches  # every decode row had a quantized stream from its first decode step on
    model._fused = None
    assert run_together(llm, prompts, params, [KIVI, KIVI]) == kivi


def test_compile_is_not_used_where_the_fused_step_takes_the_model() -> None:
    """``compile=True`` builds no graph for a model the fused step takes (it is faster, and compiling takes minutes):
    the engine starts at once and decodes through the fused step."""
    llm = make_tiny_llm(dtype="bfloat16", weights="int4", compile=True)
    assert llm.engine.runner.graph is None and llm.engine.runner.model.fused_decode() is not None
    assert len(llm.generate("hello", SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) == 3
