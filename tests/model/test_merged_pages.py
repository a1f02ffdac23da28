"""MiniCache inside the engine: a merged layer pair stored as records across both layers' pages. The decode logits
equal a slow reference that merges the same groups at the same moments (an independent per-vector SLERP written
here), bytes and pages equal the plan, mixed batches equal solo runs, nothing leaks."""

from __future__ import annotations

import math

import pytest
import torch

from longfit import SamplingParams
from longfit.compression.spec import parse_spec
from longfit.compression.storage import kv_bytes
from longfit.plan.planner import kv_footprint
from tests.conftest import check_preemption_keeps_outputs, make_tiny_llm, run_together
from tests.model.reference import reference_logits

PROMPT = "the quick brown fox jumps over the lazy dog; " * 6  # 270 byte tokens
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
SPECS = ["minicache:start=0,retain=0.25,group=8", "minicache:start=0,retain=0,group=16",
         "minicache:start=0,retain=0.1,group=32"]


def _merge_group(ka: torch.Tensor, kb: torch.Tensor, va: torch.Tensor, vb: torch.Tensor, retained: int):
    """One KV head, one group: ``[G, D]`` each → the four rebuilt tensors, vector by vector."""
    out = [torch.empty_like(x) for x in (ka, kb, va, vb)]
    distance = []
    for i in range(ka.shape[0]):
        angles = []
        for pair, (x, y) in enumerate(((ka[i], kb[i]), (va[i], vb[i]))):
            ux, uy = x / x.norm(), y / y.norm()
            omega = math.acos(max(-1.0, min(1.0, float(ux @ uy))))
            mid = (ux + uy) * math.sin(omega / 2) / math.sin(omega)  # SLERP at t = 1/2
            mid = mid / mid.norm()
            out[2 * pair][i], out[2 * pair + 1][i] = mid * x.norm(), mid * y.norm()
            angles.append(omega)
        distance.append(max(angles))
    keep = sorted(range(ka.shape[0]), key=lambda i: (-distance[i], i))[:retained]  # largest angles, ties: lower
    for rebuilt, exact in zip(out, (ka, kb, va, vb)):
        rebuilt[keep] = exact[keep]
    return out


def _merged_view(spec: str, num_prompt: int):
    """KV view of the engine's schedule for a tiny model whose layers (0, 1) are merged: query t >= num_prompt reads
    the first ``t - t % G`` tokens merged (whole groups, merged from both layers' exact K and V), the rest exact.
    Layer 0's merged keys need layer 1's keys, which come later in the forward pass: ``state["previous"]`` holds
    the last pass's layer-1 K and V, and the caller iterates the passes to their fixed point (each pass fixes at
    least one more group, since a token's K and V depend only on what the earlier queries read)."""
    stage = parse_spec(spec).stage("merge")
    group = stage.get("group")
    retained = min(group, int(stage.get("retain") * group + 1e-9))
    state: dict = {"previous": None, "current": {}}

    def view(layer, queries, keys, values):
        state["current"][layer] = (keys.float(), values.float())
        if layer == 0:
            if state["previous"] is None:
                return None  # first pass: exact (fixes the prompt, which never reads merged tokens)
            other = state["previous"]
        else:
            other = state["current"][1]
        ka, va = state["current"][0] if layer == 1 else (keys.float(), values.float())
        kb, vb = other
        n = keys.shape[0]
        merged = n - n % group
        stored_k, stored_v = keys.float().clone(), values.float().clone()
        for head in range(keys.shape[1]):
            for start in range(0, merged, group):
                span = slice(start, start + group)
                rebuilt = _merge_group(ka[span, head], kb[span, head], va[span, head], vb[span, head], retained)
                stored_k[span, head], stored_v[span, head] = rebuilt[layer], rebuilt[2 + layer]
        t = torch.arange(n)
        reads = torch.where(t >= num_prompt, t - t % group, 0)
        return stored_k, stored_v, t[None, :] < reads[:, None]

    return view, state


def _reference_logprobs(decoder, prompt: list[int], generated: list[int], spec: str) -> torch.Tensor:
    view, state = _merged_view(spec, len(prompt))
    for _ in range(len(generated) + 2):
        logits = reference_logits(decoder, prompt + generated, view)
        layer1 = state["current"][1]
        if state["previous"] is not None and all(torch.equal(a, b) for a, b in zip(layer1, state["previous"])):
            break
        state["previous"], state["current"] = layer1, {}
    else:
        raise AssertionError("the reference did not reach its fixed point")
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)
    return logits[positions].log_softmax(-1)[torch.arange(len(generated)), torch.tensor(generated)]


def _engine_logprobs(out) -> torch.Tensor:
    return torch.tensor([step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)])


@pytest.mark.parametrize("spec", SPECS)
def test_decode_logits_match_the_merging_reference(spec):
    llm = make_tiny_llm(max_num_batched_tokens=100)
    out = llm.generate(PROMPT, GREEDY, kv_compression=spec)[0]
    prompt, generated = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    decoder = llm.engine.runner.model
    ref = _reference_logprobs(decoder, prompt, generated, spec)
    exact = reference_logits(decoder, prompt + generated)[len(prompt) - 1:-1].log_softmax(-1)
    exact = exact[torch.arange(len(generated)), torch.tensor(generated)]
    engine = _engine_logprobs(out)
    assert torch.allclose(engine, ref, atol=2e-3), (engine - ref).abs().max()
    assert (exact - ref).abs().max() > 10 * (engine - ref).abs().max()  # the reference really merges
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize("spec", SPECS + ["streaming:sinks=4,window=100+minicache:start=0,retain=0.125,group=8"])
def test_bytes_and_pages_equal_the_plan(spec):
    llm = make_tiny_llm()
    engine = llm.engine
    stream = llm.generate_stream(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                 kv_compression=spec)
    outputs = [next(stream) for _ in range(12)]
    request_id = next(iter(engine.kv_manager.requests))
    num_prompt = len(outputs[-1].prompt_token_ids)
    num_output = len(outputs[-1].outputs[0].token_ids)  # the planner holds all but the last one, as the engine
    planned = kv_footprint(engine.model_config, spec, num_prompt, num_output, block_size=8, dtype_bytes=4)
    if "+" not in spec:
        assert planned.exact_bytes == kv_bytes(spec, engine.model_config, num_prompt + num_output - 1, dtype_bytes=4)
    assert engine.kv_manager.stored_bytes(request_id) == planned.exact_bytes
    assert engine.kv_manager.pool.num_used_blocks * engine.kv_spec.page_bytes == planned.paged_bytes
    state = engine.runner.states[request_id]
    assert list(state.quant_tokens) == [state.quant_tokens[0]] * 2 and state.quant_tokens[0] > 0
    list(stream)
    assert engine.kv_manager.pool.num_used_blocks == 0
    engine.kv_manager.pool.check_invariants()


def test_a_merged_pair_takes_fewer_pages():
    llm = make_tiny_llm(block_size=16)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    used = []
    for spec in (None, "minicache:start=0,retain=0.0625,group=16"):
        stream = llm.generate_stream(PROMPT * 4, params, kv_compression=spec)
        next(stream)
        used.append(llm.engine.kv_manager.pool.num_used_blocks)
        list(stream)
    # fp32, 2 heads of 16: per group of 16 tokens both layers take 8 KiB dense; merged: directions 4 KiB (layer 0)
    # + norms 512 B + 1 retained token per head (4 B offsets, 512 B exact) on layer 1: 5.0 / 8 of the bytes
    assert used[1] <= used[0] * 0.65
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


def test_identity_mixed_batches_boundary_abort_and_preemption():
    llm = make_tiny_llm(max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    for identity in ("minicache:retain=1", "minicache:start=0.5", "minicache:start=0,group=8,retain=0.5"):
        assert llm.generate(PROMPT, params, kv_compression=identity)[0].outputs[0].token_ids == full
    # unequal lengths in one read (padding records hold stale bytes), two merging specs, kivi and a full cache
    prompts = [PROMPT, PROMPT[:70], PROMPT[30:150], PROMPT[:120], PROMPT[5:]]
    specs = [SPECS[0], SPECS[0], SPECS[1], None, "kivi:bits=2,group=8,residual=16"]
    solo = [llm.generate(p, params, kv_compression=s)[0].outputs[0].token_ids for p, s in zip(prompts, specs)]
    assert run_together(llm, prompts, params, specs) == solo
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    # compression at token 100, then prompt chunks of 40 that read the merged stream and merge their own groups
    chunked = make_tiny_llm(max_num_batched_tokens=40)
    at_boundary = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, kv_compression_boundary=100)
    out = chunked.generate(PROMPT, at_boundary, kv_compression=SPECS[0])[0]
    assert len(out.outputs[0].token_ids) == 12 and chunked.engine.kv_manager.pool.num_used_blocks == 0
    request_id = chunked.engine.add_request(None, PROMPT, SamplingParams(max_tokens=50), kv_compression=SPECS[0])
    for _ in range(12):
        chunked.engine.step()
    chunked.engine.abort_request(request_id)
    chunked.engine.step()
    assert chunked.engine.kv_manager.pool.num_used_blocks == 0
    check_preemption_keeps_outputs(SPECS[0], PROMPT)


def test_engine_refuses_what_it_cannot_merge():
    llm = make_tiny_llm()
    for spec, message in [("minicache:group=12", "minicache:group must be a multiple of the KV block size 8"),
                          ("streaming:window=64,every=16+minicache", "every"),
                          ("snapkv:keep=0.5+minicache", "composes only with streaming_llm"),
                          ("minicache:group=0", r"minicache:group must be an integer in \[1, 32768\]")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPT, SamplingParams(max_tokens=2), kv_compression=spec)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
