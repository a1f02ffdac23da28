"""`longfit profile-heads`: head scores equal the attention shares a slow reference computes, and the file they
are written to drives DuoAttention inside the engine."""

from __future__ import annotations

import pytest
import torch

from longfit import SamplingParams
from longfit.compression.head_scores import read_head_scores
from longfit.eval import tasks as task_registry
from longfit.eval.heads import profile_heads
from longfit.cli import main
from tests.conftest import make_tiny_llm
from tests.model.reference import reference_logits


def _reference_scores(llm, samples, window):
    config = llm.engine.model_config
    tokenizer = llm.get_tokenizer()
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
    totals = torch.zeros(config.num_layers, config.num_kv_heads, dtype=torch.float64)
    for sample in samples:
        start, end = sample.meta["needle_offsets"][0]
        enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        span = (len(bos + enc(sample.context[:start])), len(bos + enc(sample.context[:end])))
        ids = bos + enc(sample.context) + enc(sample.question + sample.answer_prefix)

        def hook(layer, q, k, v):
            n, groups = len(ids), config.num_heads // config.num_kv_heads
            for h in range(config.num_heads):
                for t in range(n - window, n):
                    probs = (q[t, h].float() @ k[:t + 1, h // groups].float().T * config.attention_scale).softmax(-1)
                    totals[layer, h // groups] += float(probs[span[0]:span[1]].sum()) / (window * groups)
            return None

        reference_logits(llm.engine.runner.model, ids, hook)
    return totals / totals.max()


def test_scores_equal_the_reference_and_drive_duo_attention(tmp_path):
    llm = make_tiny_llm(max_num_batched_tokens=128)
    scores = torch.tensor(profile_heads(llm, samples=2, length=300, window=8, seed=1), dtype=torch.float64)
    tokenizer = llm.get_tokenizer()
    samples = task_registry.generate("passkey", 2, 300, lambda t: len(tokenizer.encode(t, add_special_tokens=False)),
                                     1)
    assert torch.allclose(scores, _reference_scores(llm, samples, 8), atol=1e-4)
    assert float(scores.max()) == 1.0 and float(scores.min()) >= 0.0
    assert llm.engine.kv_manager.pool.num_used_blocks == 0

    path = tmp_path / "heads.json"
    assert main(["profile-heads", "--model", "tiny-llama", "--dtype", "float32", "--samples", "1", "--length", "320",
                 "--output", str(path)]) == 0
    assert len(read_head_scores(path).scores) == llm.engine.model_config.num_layers
    out = llm.generate("the quick brown fox " * 20, SamplingParams(max_tokens=4, ignore_eos=True),
                       kv_compression=f"duo_attention:heads={path},sparsity=0.5,sinks=4,window=16")
    assert len(out[0].outputs[0].token_ids) == 4


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["profile-heads", "--model", "tiny-llama", "--samples", "0"]) == 2
    assert "samples" in capsys.readouterr().err
