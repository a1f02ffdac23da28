"""ShadowKV's decode-time chunk selection inside the engine: each KV head reads its outlier chunks, its most recent
chunks and the chunks whose landmarks score best, and rebuilds only those keys. The decode logits equal a slow
reference that selects per decode query and KV head in Python loops; reading every chunk equals the dense path;
batches equal solo runs; preemption keeps outputs; the planner counts the tokens read."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longfit import SamplingParams
from longfit.compression.shadowkv import key_basis
from longfit.compression.spec import make_stage, parse_spec
from longfit.config import ModelConfig
from longfit.models.layers import RotaryEmbedding
from longfit.models.quant_decode import shadowkv_decode_attention
from longfit.plan.planner import kv_footprint
from longfit.runtime.quant_pages import PageQuantFormat
from tests.conftest import check_preemption_keeps_outputs, make_tiny_llm, run_together
from tests.model.reference import apply_rope, reference_logits

PROMPT = "the quick brown fox jumps over the lazy dog; " * 6  # 270 byte tokens: 33 chunks of 8
SELECT = "shadowkv:rank=8,budget=32,chunk=8,outliers=2,local=1"  # 4 + 2 + 1 of 33+ chunks per KV head and step
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)


def _selecting_view(spec: str, num_prompt: int, model, select: bool = True):
    """Reference of the engine's ShadowKV schedule: the prompt attends exactly; stored keys are the projections onto
    the SVD basis of the prompt's pre-RoPE keys (``torch.linalg.svd``), rotated again; the decode query at position
    t reads the stored tokens flushed before it (whole chunks) — with ``select``, per KV head only the chunks it
    picks: outlier chunks (lowest min-cosine to their landmark, among the prompt's chunks), the ``local`` latest,
    then the best by the max over its query heads of softmax(q · landmark / sqrt(D)), ties to the lower chunk."""
    stage = parse_spec(spec).stage("lowrank")
    rank, chunk, outliers, local = (stage.get(k) for k in ("rank", "chunk", "outliers", "local"))
    count = -(-stage.get("budget") // chunk) + outliers + local
    config = model.config
    group = config.num_heads // config.num_kv_heads

    def view(layer, queries, keys, values):
        if config.layer_window(layer) is not None:
            return None
        n = keys.shape[0]
        inv_freq = model.layers[layer].attn.rope.inv_freq
        positions = torch.arange(n)
        pre_rope = apply_rope(keys.float(), -positions, inv_freq).reshape(n, -1)  # [T, Hkv*D]
        basis = torch.linalg.svd(pre_rope[:num_prompt], full_matrices=False)[2][:rank]
        stored_k = apply_rope((pre_rope @ basis.T @ basis).reshape(keys.shape), positions, inv_freq)
        t = torch.arange(n)
        flushed = torch.where(t >= num_prompt, t - t % chunk, 0)  # stored tokens query t reads
        use = torch.arange(n)[None, :] < flushed[:, None]
        visible = torch.ones(config.num_kv_heads, n, n, dtype=torch.bool)
        if not select:
            return stored_k, values, use, visible
        marks = [keys[c * chunk:(c + 1) * chunk].float().mean(0) for c in range(n // chunk)]  # [Hkv, D] each
        prompt_chunks = num_prompt // chunk
        for head in range(config.num_kv_heads):
            worst = [min(float(F.cosine_similarity(keys[c * chunk + i, head].float(), marks[c][head], dim=0))
                         for i in range(chunk)) for c in range(prompt_chunks)]
            outlier = set(sorted(range(prompt_chunks), key=lambda c: (worst[c], c))[:outliers])
            for query in range(num_prompt, n):
                held = int(flushed[query]) // chunk
                if held <= count:
                    continue
                forced = outlier | set(range(held - local, held))
                score = [max(torch.tensor([float(queries[query, qh].float() @ marks[c][head]) / math.sqrt(
                    config.head_dim) for c in range(held)]).softmax(0)[c] for qh in range(head * group,
                                                                                       (head + 1) * group))
                         for c in range(held)]
                chosen = sorted(range(held), key=lambda c: (c not in forced, -float(score[c]), c))[:count]
                for c in set(range(held)) - set(chosen):
                    visible[head, query, c * chunk:(c + 1) * chunk] = False
        return stored_k, values, use, visible

    return view


def _logprobs(out) -> torch.Tensor:
    return torch.tensor([step[tok].logprob for step, tok in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)])


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_decode_logits_match_the_selecting_reference(model):
    llm = make_tiny_llm(model, max_num_batched_tokens=100)
    out = llm.generate(PROMPT, GREEDY, kv_compression=SELECT)[0]
    prompt, generated = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    decoder = llm.engine.runner.model
    rows, targets = torch.arange(len(generated)), torch.tensor(generated)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(generated) - 1)

    def ref(select: bool) -> torch.Tensor:
        logits = reference_logits(decoder, prompt + generated, _selecting_view(SELECT, len(prompt), decoder, select))
        return logits[positions].log_softmax(-1)[rows, targets]

    engine, selected, every_chunk = _logprobs(out), ref(True), ref(False)
    assert torch.allclose(engine, selected, atol=2e-3), (engine - selected).abs().max()
    assert (every_chunk - selected).abs().max() > 10 * (engine - selected).abs().max()  # the selection matters
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


def test_reading_every_chunk_equals_the_dense_stream() -> None:
    """``shadowkv_decode_attention`` asked for more chunks than a row holds: the same attention as dequantizing the
    whole stream (rotated to its positions) and one SDPA with the tail, rows of different lengths batched."""
    heads, kv_heads, dim, rank, chunk = 4, 2, 16, 6, 4
    stage = make_stage("shadowkv", rank=rank, budget=64, chunk=chunk, outliers=1, local=1)
    fmt = PageQuantFormat.from_stage(stage, kv_heads, dim, "float32")
    rope = RotaryEmbedding(dim, 10000.0, None, 256)
    g = torch.Generator().manual_seed(3)
    num_chunks, tail = [5, 3], 3
    records, bases = [], []
    for n in num_chunks:
        pre = torch.randn(n * chunk, kv_heads, dim, generator=g)
        basis = key_basis(pre.reshape(n * chunk, -1), rank)
        rotated = rope.rotate(pre, torch.arange(n * chunk))
        rec = fmt.encode(pre, torch.randn(n * chunk, kv_heads, dim, generator=g), basis, rotated, prompt=True)
        records.append(torch.cat([rec, torch.randint(0, 255, (max(num_chunks) - n, fmt.record_bytes), generator=g,
                                                     dtype=torch.uint8)]))  # padding: garbage bytes
        bases.append(basis)
    records, bases, held = torch.stack(records), torch.stack(bases), torch.tensor(num_chunks)
    q = torch.randn(2, heads, dim, generator=g)
    tail_k, tail_v = torch.randn(2, kv_heads, tail, dim, generator=g), torch.randn(2, kv_heads, tail, dim, generator=g)
    tail_ok = torch.tensor([[True, True, True], [True, False, False]])
    got = shadowkv_decode_attention(q, records, fmt, held, bases, rope, tail_k, tail_v, tail_ok, 0.25)
    for row in range(2):
        n = num_chunks[row] * chunk
        keys, values = fmt.decode(records[row, :num_chunks[row]], bases[row])  # [n, Hkv, D] pre-RoPE
        keys = rope.rotate(keys, torch.arange(n))
        k = torch.cat([keys.transpose(0, 1), tail_k[row]], 1).repeat_interleave(2, 0)  # [Hq, S, D]
        v = torch.cat([values.transpose(0, 1), tail_v[row]], 1).repeat_interleave(2, 0)
        ok = torch.cat([torch.ones(n, dtype=torch.bool), tail_ok[row]])
        probs = (q[row].unsqueeze(1) @ k.transpose(1, 2) * 0.25).masked_fill(~ok, float("-inf")).softmax(-1)
        assert torch.allclose(got[row], (probs @ v).squeeze(1), atol=1e-5)


def test_batches_equal_solo_runs():
    llm = make_tiny_llm(max_num_batched_tokens=200)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    specs = [SELECT, "shadowkv:rank=8,budget=0", "kivi:bits=2,group=8,residual=16", None, SELECT]
    prompts = [PROMPT, PROMPT[5:], PROMPT[9:], PROMPT[3:], PROMPT[40:]]
    alone = [llm.generate(p, params, kv_compression=s)[0].outputs[0].token_ids for p, s in zip(prompts, specs)]
    assert run_together(llm, prompts, params, specs) == alone
    assert llm.engine.kv_manager.pool.num_used_blocks == 0


def test_preemption_keeps_outputs():
    check_preemption_keeps_outputs(SELECT, PROMPT)


def test_planner_counts_the_tokens_read() -> None:
    """SmolLM2's shape at 8,000 tokens with the default budget: 999 chunks stored per layer, each KV head rebuilds
    2048 / 8 + 48 + 4 = 308 of them, plus the dense tail; every byte is still held."""
    smollm2 = ModelConfig.tiny(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, max_model_len=8192)
    full = kv_footprint(smollm2, "shadowkv:rank=48,budget=0", 8000)
    selecting = kv_footprint(smollm2, "shadowkv:rank=48", 8000)
    assert full.read_keys == 30 * 8000
    assert selecting.read_keys == 30 * (308 * 8 + 8000 % 8)
    assert selecting.streams.elements == 30 * 308 * 8 * 2 * 3 * 64
    assert selecting.exact_bytes == full.exact_bytes + 30 * 1000 * (3 * 64 + 3) * 2  # the landmarks and flags
