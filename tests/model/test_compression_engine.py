"""Eviction policies inside the engine: pages really freed (as the spec's plan predicts), survivors written
exactly where the policy said, no leaks, keep=1 is the identity."""

from __future__ import annotations

import pytest
import torch

from longfit import SamplingParams
from longfit.compression.registry import build_policy
from longfit.compression.spec import kept_tokens_per_layer
from tests.conftest import make_tiny_llm

PROMPT = "the quick brown fox jumps over the lazy dog; " * 6  # 270 byte tokens
EVICTION_SPECS = ["snapkv:keep=0.25", "streaming:sinks=4,window=64", "knorm:keep=0.5", "tova:keep=0.3",
                  "h2o:keep=0.25,observe=32", "pyramidkv:keep=0.3", "chunkkv:keep=0.3,chunk=7"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _pages_at_first_decode(llm, spec):
    """Pages held right after the first decode step (the prompt compressed, one generated token cached)."""
    stream = llm.generate_stream(PROMPT, GREEDY, kv_compression=spec)
    next(stream)
    next(stream)
    used = llm.engine.kv_manager.pool.num_used_blocks
    return used, list(stream)[-1]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("spec", EVICTION_SPECS)
def test_pages_freed_equal_the_plan(model, spec):
    llm = make_tiny_llm(model, max_num_batched_tokens=100)  # the prompt spans three chunks
    config = llm.engine.model_config
    used, out = _pages_at_first_decode(llm, spec)
    num_tokens = len(out.prompt_token_ids)  # tiny-gemma3 adds a BOS token
    kept = kept_tokens_per_layer(spec, config.num_layers, num_tokens)
    bs = llm.engine.kv_spec.block_size
    expected = 0
    for layer in range(config.num_layers):
        window = config.layer_window(layer)
        if window is None:  # the survivors plus the first generated token
            expected += -(-(kept[layer] + 1) // bs)
        else:  # sliding layers are not compressed: they hold the pages the query at `num_tokens` can see
            expected += len([p for p in range(-(-(num_tokens + 1) // bs)) if (p + 1) * bs > num_tokens - window + 1])
    assert used == expected
    assert len(out.outputs[0].token_ids) == 16 and all(0 <= t < 256 for t in out.outputs[0].token_ids)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    llm.engine.kv_manager.pool.check_invariants()


@pytest.mark.parametrize("spec", ["snapkv:keep=1.0", "knorm:keep=1.0", "streaming:sinks=4,window=100000"])
def test_keep_all_is_the_identity(spec):
    llm = make_tiny_llm()
    full = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    assert llm.generate(PROMPT, GREEDY, kv_compression=spec)[0].outputs[0].token_ids == full


def test_first_token_comes_from_the_full_prompt():
    llm = make_tiny_llm()
    full = llm.generate(PROMPT, GREEDY)[0].outputs[0].token_ids
    compressed = llm.generate(PROMPT, GREEDY, kv_compression="snapkv:keep=0.1")[0].outputs[0].token_ids
    assert compressed[0] == full[0]


def test_survivors_are_written_where_the_policy_says(monkeypatch):
    llm = make_tiny_llm(max_num_batched_tokens=1000)
    runner = llm.engine.runner
    compactor = runner.compactor
    seen = {}
    original = compactor.compact

    def spy(request_id, spec, tables, num_tokens, queries, channels=None):
        bs = compactor.block_size
        before = {}
        for layer in range(tables.shape[0]):
            pages = tables[layer, :-(-num_tokens // bs)]
            blocks = runner.kv_pool[torch.from_numpy(pages)].clone()  # [P, 2, bs, Hkv, D]
            before[layer] = blocks[:, 0].reshape(-1, *blocks.shape[-2:])[:num_tokens].transpose(0, 1)  # [Hkv, T, D]
        seen.update(before=before, queries={k: v.clone() for k, v in queries.items()}, tables=tables.copy())
        result = original(request_id, spec, tables, num_tokens, queries, channels)
        seen["result"] = result
        return result

    monkeypatch.setattr(compactor, "compact", spy)
    llm.generate(PROMPT, SamplingParams(max_tokens=1), kv_compression="snapkv:keep=0.25")
    (policy,) = build_policy("snapkv:keep=0.25")
    bs = compactor.block_size
    for layer, keys in seen["before"].items():
        plan = policy.plan(layer, 2, keys, keys, seen["queries"][layer])
        expected = plan.gather(keys)  # [Hkv, K, D]
        kept = seen["result"].num_kept_tokens[layer]
        assert kept == plan.num_kept
        pages = torch.from_numpy(seen["tables"][layer, :-(-kept // bs)])
        written = runner.kv_pool[pages][:, 0].reshape(-1, *keys.shape[::2])[:kept].transpose(0, 1)
        assert torch.equal(written, expected)


def test_abort_after_compaction_frees_everything():
    llm = make_tiny_llm()
    stream = llm.generate_stream(PROMPT, SamplingParams(max_tokens=50, ignore_eos=True), kv_compression="tova:keep=0.2")
    next(stream)
    next(stream)
    stream.close()
    assert llm.engine.kv_manager.pool.num_used_blocks == 0
    llm.engine.kv_manager.pool.check_invariants()


@pytest.mark.parametrize("spec,match", [("nope:keep=0.5", "unknown method"), ("snapkv:keep=0", "keep"),
                                        ("snapkv:keep=0.5,foo=1", "foo"),
                                        ("minicache:group=12", "multiple of the KV block size")])
def test_invalid_or_unsupported_specs(spec, match):
    llm = make_tiny_llm()
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPT, GREEDY, kv_compression=spec)
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


def test_compression_boundary_keeps_the_question_uncompressed():
    llm = make_tiny_llm(max_num_batched_tokens=64)
    prompt = list(PROMPT.encode())
    boundary = len(prompt) - 20
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, kv_compression_boundary=boundary)
    full = llm.generate([prompt], params)[0]
    compressed = llm.generate([prompt], params, kv_compression="snapkv:keep=0.25")[0]

    def logprobs(out):
        return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]

    full_lp, comp_lp = logprobs(full), logprobs(compressed)
    # Up to the boundary both runs see the same full cache; after it the question attends to the survivors.
    assert comp_lp[:boundary - 1] == pytest.approx(full_lp[:boundary - 1], abs=1e-5)
    assert comp_lp[boundary:] != pytest.approx(full_lp[boundary:], abs=1e-5)
    # Pages: the 25% survivors of the context plus the 20 question tokens, per layer.
    stream = llm.generate_stream(prompt, SamplingParams(max_tokens=3, ignore_eos=True, kv_compression_boundary=boundary),
                                 kv_compression="snapkv:keep=0.25")
    next(stream)
    kept = kept_tokens_per_layer("snapkv:keep=0.25", 2, boundary)
    assert llm.engine.kv_manager.pool.num_used_blocks == sum(-(-(k + 20) // 8) for k in kept)
    stream.close()
