"""The planner's KV bytes for a request equal what the engine really holds for it (pages of every layer)."""

from __future__ import annotations

import pytest

from longfit import SamplingParams
from longfit.plan.planner import kv_footprint
from tests.conftest import make_tiny_llm


def _peak_request_bytes(llm, prompt, params, spec, stored=None) -> int:
    """Bytes the request holds after compression, at its largest: just before its pages are freed (whole pages;
    ``stored`` collects the exact stored bytes at the same moment)."""
    manager = llm.engine.kv_manager
    held = []
    original = manager.free

    def recording_free(request):
        held.append(manager.request_bytes(request.request_id))
        if stored is not None:
            stored.append(manager.stored_bytes(request.request_id))
        original(request)

    manager.free = recording_free
    try:
        llm.generate([prompt], params, kv_compression=spec)
    finally:
        manager.free = original
    return max(held)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("spec", ["none", "snapkv:keep=0.25", "streaming:sinks=4,window=40", "pyramidkv:keep=0.3"])
def test_planned_bytes_equal_engine_bytes(model, spec):
    llm = make_tiny_llm(model)
    prompt = list(range(3, 203))  # 200 tokens
    output_tokens = 30
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, seed=0)
    measured = _peak_request_bytes(llm, prompt, params, None if spec == "none" else spec)
    config = llm.engine.model_config
    planned = kv_footprint(config, spec, len(prompt), output_tokens, block_size=llm.engine.kv_spec.block_size,
                           dtype_bytes=llm.engine.kv_spec.dtype_bytes)
    assert measured == planned.paged_bytes


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("spec", ["kivi:bits=2,group=8,residual=16", "kivi:bits=4,group=8,residual=32", "int8",
                                  "think:channels=0.5", "snapkv:keep=0.25+kivi:bits=2,group=8,residual=16",
                                  "knorm:keep=0.5+int8", "kvquant:bits=4,group=8",
                                  "kvquant:bits=2,group=16,outliers=0.05", "shadowkv:rank=8",
                                  "minicache:start=0,retain=0.25,group=8",
                                  "streaming:sinks=4,window=100+minicache:start=0,retain=0.125,group=16"])
def test_planned_bytes_equal_engine_bytes_for_packed_pages(model, spec):
    """Quantized / channel-pruned / low-rank / merged records packed into pages (KVQuant: with its fixed count of
    outliers per record; MiniCache: across a layer pair; tiny-gemma3 has no two adjacent full layers, so nothing
    merges there): pages held and exact bytes both equal the plan."""
    llm = make_tiny_llm(model)
    prompt = list(range(3, 203))
    for output_tokens in (1, 30):  # the prompt as compressed; then with decode-time flushes of the tail
        stored: list[int] = []
        params = SamplingParams(max_tokens=output_tokens, ignore_eos=True, seed=0)
        measured = _peak_request_bytes(llm, prompt, params, spec, stored)
        planned = kv_footprint(llm.engine.model_config, spec, len(prompt), output_tokens,
                               block_size=llm.engine.kv_spec.block_size, dtype_bytes=llm.engine.kv_spec.dtype_bytes)
        # ThinK's channel index, ShadowKV's basis: held beside the pages, once per full-attention layer
        formats = llm.engine.runner.compactor.layer_formats(spec) or ()
        side = sum(fmt.side_bytes for fmt in formats if fmt is not None)
        assert (measured + side, stored[0]) == (planned.paged_bytes, planned.exact_bytes), output_tokens


@pytest.mark.real_model
def test_planned_bytes_equal_engine_bytes_smollm2():
    from longfit import LLM

    try:
        llm = LLM("smollm2-135m", max_num_seqs=2)
    except ValueError as error:
        pytest.skip(str(error))
    prompt = list(range(1000, 1300))
    for spec in ("none", "snapkv:keep=0.25", "kivi:bits=2", "kvquant:bits=4", "minicache"):
        measured = _peak_request_bytes(llm, prompt, SamplingParams(max_tokens=8, ignore_eos=True),
                                       None if spec == "none" else spec)
        planned = kv_footprint(llm.engine.model_config, spec, len(prompt), 8, block_size=llm.engine.kv_spec.block_size)
        assert measured == planned.paged_bytes
