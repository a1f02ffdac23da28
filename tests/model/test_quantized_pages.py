"""Compressed KV pages inside the engine (KIVI, int8, ThinK, KVQuant, ShadowKV): the decode logits equal a slow
reference that stores the same tokens the same way at the same moments, pages and bytes equal the plan, nothing
leaks, mixed batches equal solo runs."""

from __future__ import annotations

import pytest
import torch

from longfit import SamplingParams
from longfit.compression.kv_quant import KVQuantPolicy
from longfit.compression.spec import parse_spec
from longfit.compression.storage import kv_bytes
from longfit.compression.think import ThinKPolicy
from longfit.runtime.quant_pages import PageQuantFormat
from tests.conftest import check_preemption_keeps_outputs, make_tiny_llm, run_together
from tests.model.reference import apply_rope, reference_logits

PROMPT = "the quick brown fox jumps over the lazy dog; " * 6  # 270 byte tokens
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
QUANT_SPECS = ["kivi:bits=2,group=8,residual=16", "kivi:bits=4,group=16,residual=32",
               "kivi:bits=2,key_bits=4,group=8,residual=16", "int8", "think:channels=0.5",
               "kvquant:bits=4,group=8", "kvquant:bits=2,group=16,outliers=0.05", "kvquant:bits=4,group=8,outliers=0",
               "shadowkv:rank=8"]


def _kv_view(spec: str, num_prompt: int, model, boundary: int | None = None, chunk: int = 0):
    """Reference of the engine's schedule: the prompt attends exactly; the query at position t >= num_prompt reads
    the first ``t - t % flush`` tokens (``flush`` = residual, group for kvquant, 1 for int8) from their quantized
    records. With a compression ``boundary``, prompt queries from it on are computed in chunks of ``chunk`` tokens
    and read what was flushed before their chunk started. KVQuant goes through the tensor-level
    ``KVQuantPolicy``: keys rotated back to position 0 by an independent RoPE, quantized, dequantized, rotated to
    their positions again. ShadowKV: the basis is the SVD (``torch.linalg.svd`` here) of the prompt's pre-RoPE keys;
    every stored key, prompt or generated, is its projection onto that basis, rotated again."""
    model_config = model.config
    stage = parse_spec(spec).stage("quantize", "lowrank")
    fmt = PageQuantFormat.from_stage(stage, model_config.num_kv_heads, model_config.head_dim, "float32")

    def view(layer, queries, keys, values):
        if model_config.layer_window(layer) is not None:
            return None
        n = keys.shape[0]
        whole = n - n % fmt.record_tokens
        stored_k, stored_v = keys.float().clone(), values.float().clone()
        if fmt.method == "think":  # channels from the prompt's last `window` queries, pruned channels read as 0
            window = queries[num_prompt - stage.get("window"):num_prompt].transpose(0, 1)
            pruned = ThinKPolicy(channels=stage.get("channels")).prune(keys[:num_prompt].transpose(0, 1), window)
            kept = torch.zeros(keys.shape[1:], dtype=torch.bool).scatter_(1, pruned.channels, True)  # [Hkv, D]
            stored_k = stored_k * kept
        elif fmt.method == "kvquant":  # the reference policy on pre-RoPE keys, then RoPE again (independent code)
            inv_freq = model.layers[layer].attn.rope.inv_freq
            positions = torch.arange(n)
            policy = KVQuantPolicy(bits=stage.get("bits"), group=stage.get("group"), outliers=stage.get("outliers"))
            pre_rope = apply_rope(keys.float(), -positions, inv_freq).transpose(0, 1)  # [Hkv, T, D]
            restored_k, restored_v = policy.dequantize(policy.quantize(pre_rope, values.float().transpose(0, 1)))
            stored_k = apply_rope(restored_k.transpose(0, 1), positions, inv_freq)
            stored_v = restored_v.transpose(0, 1)
        elif fmt.method == "shadowkv":
            inv_freq = model.layers[layer].attn.rope.inv_freq
            positions = torch.arange(n)
            pre_rope = apply_rope(keys.float(), -positions, inv_freq).reshape(n, -1)  # [T, Hkv*D]
            basis = torch.linalg.svd(pre_rope[:boundary or num_prompt], full_matrices=False)[2][:stage.get("rank")]
            projected = (pre_rope @ basis.T @ basis).reshape(keys.shape)
            stored_k = apply_rope(projected, positions, inv_freq)
        else:
            stored_k[:whole], stored_v[:whole] = fmt.decode(fmt.encode(keys[:whole], values[:whole]))
        t = torch.arange(n)
        first = num_prompt if boundary is None else boundary
        in_chunk = (t >= first) & (t < num_prompt)
        start = torch.where(in_chunk, first + (t - first) // max(chunk, 1) * chunk, t)  # the step's first position
        quantized = torch.where(t >= first, start - start % fmt.flush_tokens, 0)  # tokens quantized before query t
        use = torch.arange(n)[None, :] < quantized[:, None]
        return stored_k, stored_v, use

    return view


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("spec", QUANT_SPECS)
def test_decode_logits_match_the_quantizing_reference(model, spec):
    llm = make_tiny_llm(model, max_num_batched_tokens=100)
    out = llm.generate(PROMPT, GREEDY, kv_compression=spec)[0]
    prompt, generated = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    decoder = llm.engine.runner.model
    logits = reference_logits(decoder, prompt + generated, _kv_view(spec, len(prompt), decoder))
    exact = reference_logits(decoder, prompt + generated)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)
    targets = torch.tensor(generated)
    ref = logits[positions].log_softmax(-1)[torch.arange(len(generated)), targets]
    unquantized = exact[positions].log_softmax(-1)[torch.arange(len(generated)), targets]
    engine = _engine_logprobs(out)
    # (kvquant: the engine un-rotates with its own RoPE tables, the reference with its own: fp32 ulps that can move
    # a float16 scale by one step, ~3e-4 in the log-probabilities, well inside the tolerance)
    assert torch.allclose(engine, ref, atol=2e-3), (engine - ref).abs().max()
    # the reference really compresses (not exact)
    if spec.startswith(("kivi:bits=2", "think", "kvquant:bits=2", "shadowkv")):
        assert (unquantized - ref).abs().max() > 10 * (engine - ref).abs().max()


def _engine_logprobs(out) -> torch.Tensor:
    return torch.tensor([step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)])


@pytest.mark.parametrize("spec", ["kvquant:bits=4,group=8,outliers=0.05", "kivi:bits=2,group=8,residual=16"])
def test_prompt_chunks_after_the_boundary_read_the_stream(spec):
    """Compression at token 100 of 270, then prompt chunks of 40 that attend over the (pre-RoPE) stream and the
    tail, each flushing its tail: the slow reference follows the same schedule."""
    llm = make_tiny_llm(max_num_batched_tokens=40)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, kv_compression_boundary=100)
    out = llm.generate(PROMPT, params, kv_compression=spec)[0]
    prompt, generated = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    decoder = llm.engine.runner.model
    logits = reference_logits(decoder, prompt + generated, _kv_view(spec, len(prompt), decoder, 100, 40))
    ref = logits[len(prompt) - 1:-1].log_softmax(-1)[torch.arange(len(generated)), torch.tensor(generated)]
    assert torch.allclose(_engine_logprobs(out), ref, atol=2e-3), (_engine_logprobs(out) - ref).abs().max()
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize("spec", QUANT_SPECS + ["snapkv:keep=0.25+kivi:bits=2,group=8,residual=16"])
def test_bytes_and_pages_equal_the_plan(spec):
    llm = make_tiny_llm()
    engine = llm.engine
    stream = llm.generate_stream(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                 kv_compression=spec)
    outputs = [next(stream) for _ in range(12)]
    request_id = next(iter(engine.kv_manager.requests))
    num_tokens = len(outputs[-1].prompt_token_ids) + len(outputs[-1].outputs[0].token_ids) - 1  # last not cached
    stored = engine.kv_manager.stored_bytes(request_id)
    if "+" not in spec:  # eviction plans count generated tokens as kept: compare the prompt-only case below
        assert stored == kv_bytes(spec, engine.model_config, num_tokens, dtype_bytes=4)
    page_bytes = engine.kv_spec.page_bytes
    fmt = next(f for f in engine.runner.states[request_id].formats if f is not None)
    side = fmt.side_bytes
    state = engine.kv_manager.requests[request_id]
    for layer in range(engine.model_config.num_layers):  # stream pages + tail pages, nothing more
        tail = state.num_cached[layer] - state.quant_tokens[layer]
        assert state.quant_bytes[layer] == fmt.stream_bytes(state.quant_tokens[layer]) + side
        # side bytes (ThinK's channel index, ShadowKV's basis) are held beside the pages
        assert len(state.tables[layer]) == -(-fmt.stream_bytes(state.quant_tokens[layer]) // page_bytes) + -(-tail // 8)
    assert engine.kv_manager.pool.num_used_blocks == state.num_pages()
    list(stream)
    assert engine.kv_manager.pool.num_used_blocks == 0
    engine.kv_manager.pool.check_invariants()


@pytest.mark.parametrize("spec", ["kivi:bits=2,group=16,residual=16", "kvquant:bits=2,group=16",
                                  "kvquant:bits=4,group=16,outliers=0.02"])
def test_a_quantized_layer_takes_a_fraction_of_the_pages(spec):
    llm = make_tiny_llm(block_size=16)
    long_prompt = PROMPT * 4
    full = llm.generate_stream(long_prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    next(full)
    full_pages = llm.engine.kv_manager.pool.num_used_blocks
    list(full)
    stream = llm.generate_stream(long_prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                                 kv_compression=spec)
    next(stream)
    quant_pages = llm.engine.kv_manager.pool.num_used_blocks
    list(stream)
    # fp32 cache, head_dim 16, group 16: 2-bit codes + fp16 scales = 3 bytes per value pair vs 8 in fp32; kvquant
    # 4-bit with its per-token value scales and 2% outliers (5 per key group, none per value vector): 3.3 bytes
    assert quant_pages * 4 <= full_pages
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    llm.engine.kv_manager.pool.check_invariants()


def test_bits16_is_the_identity_and_mixed_batches_equal_solo_runs():
    llm = make_tiny_llm(max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:150], PROMPT[40:], PROMPT[:90], PROMPT[7:], PROMPT[:120], PROMPT[3:], PROMPT[:100]]
    # two kvquant rows of different lengths in one read: the shorter one's padding records hold stale bytes; two
    # shadowkv rows, each with its own basis
    specs = ["kivi:bits=2,group=8,residual=16", "int8", None, "kivi:bits=4,group=16,residual=32",
             "kvquant:bits=2,group=8,outliers=0.05", "kvquant:bits=2,group=8,outliers=0.05", "shadowkv:rank=8",
             "shadowkv:rank=8"]
    solo = [llm.generate(p, params, kv_compression=s)[0].outputs[0].token_ids for p, s in zip(prompts, specs)]
    full = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    for identity in ("kivi:bits=16", "kvquant:bits=16", "shadowkv:rank=32"):
        assert llm.generate(PROMPT, params, kv_compression=identity)[0].outputs[0].token_ids == full
    assert run_together(llm, prompts, params, specs) == solo
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


@pytest.mark.parametrize("spec", ["kivi:bits=2,group=8,residual=16", "kvquant:bits=2,group=8,outliers=0.05"])
def test_one_spec_batch_of_unequal_lengths_equals_solo_runs(spec):
    """Every decode row in one stream read (the read path without per-row buffers): the shorter rows' padding
    records hold stale bytes and must be zeroed and masked, so the batch equals each request run alone."""
    llm = make_tiny_llm(max_num_batched_tokens=512)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [PROMPT, PROMPT[:70], PROMPT[30:150]]
    solo = [llm.generate(p, params, kv_compression=spec)[0].outputs[0].token_ids for p in prompts]
    assert run_together(llm, prompts, params, [spec] * len(prompts)) == solo
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


def test_boundary_abort_and_preemption_leave_no_pages():
    llm = make_tiny_llm(max_num_batched_tokens=40)
    spec = "kivi:bits=2,group=8,residual=16"
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, kv_compression_boundary=100)
    out = llm.generate(PROMPT, params, kv_compression=spec)[0]  # prompt chunks after the boundary read the stream
    assert len(out.outputs[0].token_ids) == 20
    request_id = llm.engine.add_request(None, PROMPT, SamplingParams(max_tokens=50), kv_compression=spec)
    for _ in range(12):
        llm.engine.step()
    llm.engine.abort_request(request_id)
    llm.engine.step()
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    check_preemption_keeps_outputs(spec, PROMPT)


def test_engine_refuses_what_it_cannot_store():
    llm = make_tiny_llm()
    with pytest.raises(ValueError, match="multiple of the KV block size"):
        llm.generate(PROMPT, SamplingParams(max_tokens=2), kv_compression="kivi:group=4,residual=4")
    for spec, message in [("kvquant:group=12", "kvquant:group must be a multiple of the KV block size 8"),
                          ("snapkv:keep=0.25+kvquant:bits=4,group=8", r"kvquant does not combine with an eviction "
                                                                      r"stage \(snapkv\)"),
                          ("streaming:window=64+shadowkv:rank=8", r"shadowkv does not combine with an eviction"),
                          ("kvquant:group=8192", r"kvquant:group\*head_dim must be <= 65536"),
                          ("kvquant:bits=5", "kvquant:bits must be one of 2, 3, 4, 8, 16"),
                          ("kvquant:bits=8,group=8,outliers=0.45", "lower kvquant:outliers or kvquant:bits"),
                          ("kivi:bits=2,group=1,residual=8", "raise kivi:group"),
                          ("shadowkv:rank=31,chunk=1", "raise shadowkv:chunk or set shadowkv:budget=0"),
                          ("shadowkv:chunk=0", r"shadowkv:chunk must be an integer in \[1, 4096\]"),
                          ("shadowkv:budget=-1", "shadowkv:budget must be an integer >= 0"),
                          ("kvquant:outliers=0.5", r"kvquant:outliers must be a number in \[0, 0.5\)")]:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPT, SamplingParams(max_tokens=2), kv_compression=spec)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
