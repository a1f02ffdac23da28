"""Compiled decode steps (``RuntimeConfig.compile``, ``runtime.decode_graph``) against the eager step they replace."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from longfit import SamplingParams
from longfit.models import fused_decode
from longfit.runtime import decode_graph
from tests.conftest import make_tiny_llm

PROMPTS = [list(range(3, 40)), list(range(50, 55)), list(range(7, 80, 2))]
# Inductor compiles C++: without a compiler the engine runs eager (tested below), and these tests cannot compare.
needs_cxx = pytest.mark.skipif(not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")),
                               reason="torch.compile needs a C++ compiler")


def _greedy(llm, prompts, max_tokens=24, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, **kwargs)]


@needs_cxx
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_compiled_steps_equal_eager(model):
    """Batches of 1 to 3 rows, pages crossed, sliding windows and two RoPE tables (Gemma): the same tokens."""
    eager = make_tiny_llm(model)
    compiled = make_tiny_llm(model, compile=True)
    graph = compiled.engine.runner.graph
    compiled_at_start = graph.compile_seconds  # the engine compiled with its warm-up request
    assert compiled_at_start > 0
    assert _greedy(compiled, PROMPTS[1]) == _greedy(eager, PROMPTS[1])
    assert _greedy(compiled, PROMPTS) == _greedy(eager, PROMPTS)
    assert graph.failed is None
    assert graph.compiled_steps > 0
    assert graph.compile_seconds == compiled_at_start  # batch 1 and 3, 1 to 10 pages: compiled at start-up
    # Rows of 700+ tokens, 3 x 88 pages: past one torch attention chunk, so only the C kernel's op keeps such steps
    # in the graph (without it they run eager); the same tokens either way, and no recompilation.
    deep = [[3 + (7 * i + row) % 250 for i in range(700 + 5 * row)] for row in range(3)]
    before = graph.compiled_steps
    assert _greedy(compiled, deep, max_tokens=8) == _greedy(eager, deep, max_tokens=8)
    assert (graph.compiled_steps - before >= 3) == graph.native_attention
    assert graph.compile_seconds == compiled_at_start
    compiled.engine.kv_manager.pool.check_invariants()
    assert compiled.engine.kv_manager.pool.num_used_blocks == 0


@needs_cxx
def test_compiled_step_int4_hidden_close(monkeypatch):
    """bf16 activations and packed int4 layers (the ``auto`` form of a Q4 GGUF): one decode step's hidden states
    and KV writes through the graph equal the eager step's to bf16 rounding."""
    monkeypatch.setenv(fused_decode.ENV_VAR, "0")  # else the fused C step takes these steps and nothing compiles
    llm = make_tiny_llm(dtype="bfloat16", weights="int4", compile=True)
    runner = llm.engine.runner
    captured = {}
    forward = runner.model.forward
    graph = runner.graph
    call = type(graph).__call__

    def compiled_call(self, input_ids, positions, meta):
        saved = copy.copy(meta)
        saved.rope_cache = {}
        saved.decode_masks = {}
        pool = meta.kv_pool.clone()
        out = call(self, input_ids, positions, meta)
        captured.setdefault("compiled", out.float().clone())
        written = meta.kv_pool.clone()
        meta.kv_pool.copy_(pool)  # the eager step writes the same keys again
        captured.setdefault("eager", forward(input_ids, positions, saved).float())
        captured.setdefault("writes", (meta.kv_pool.float(), written.float()))
        return out

    monkeypatch.setattr(type(graph), "__call__", compiled_call)
    _greedy(llm, PROMPTS[:2], max_tokens=3)
    assert graph.failed is None and graph.compiled_steps > 0
    torch.testing.assert_close(*captured["writes"], rtol=2e-2, atol=2e-2)  # the keys and values written
    torch.testing.assert_close(captured["compiled"], captured["eager"], rtol=2e-2, atol=2e-2)


def test_quantized_steps_run_eager():
    """Steps that read quantized streams never enter the graph, plain ones of the same requests do; the outputs are
    the eager ones."""
    spec = "kivi:bits=4,group=8,residual=16"
    eager = make_tiny_llm()
    compiled = make_tiny_llm(compile=True)
    graph = compiled.engine.runner.graph
    seen = []
    eligible = graph.eligible

    def spy(meta):
        result = eligible(meta)
        seen.append((result, any(meta.decode_quant or ())))
        return result

    graph.eligible = spy
    assert _greedy(compiled, PROMPTS, kv_compression=spec) == _greedy(eager, PROMPTS, kv_compression=spec)
    assert (False, True) in seen and (True, True) not in seen


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler that raises (no C++ compiler, an op it cannot lower) leaves every step eager, with the reason."""

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(decode_graph.torch, "compile", broken_compile)
    eager = make_tiny_llm()
    compiled = make_tiny_llm(compile=True)
    assert _greedy(compiled, PROMPTS) == _greedy(eager, PROMPTS)
    graph = compiled.engine.runner.graph
    assert "no C++ compiler" in graph.failed
    assert graph.compiled_steps == 0
    assert not graph.eligible(None)  # failed: nothing is looked at any more


def test_prepacked_layers_are_refused(monkeypatch):
    """oneDNN-prepacked bf16 layers are not compiled: the graph says why and the engine runs eager."""
    from longfit.quant import matmul

    monkeypatch.setenv(matmul.PREPACK_ENV_VAR, "force")  # plain bf16 layers (the C kernel's) would compile
    llm = make_tiny_llm(dtype="bfloat16", weights="bf16", compile=True)
    graph = llm.engine.runner.graph
    if not any(getattr(m, "packed", None) is not None for m in llm.engine.runner.model.modules()):
        pytest.skip("this CPU does not prepack bf16 layers")
    assert "prepacked" in graph.failed
    assert len(_greedy(llm, PROMPTS[:1], max_tokens=4)[0]) == 4
