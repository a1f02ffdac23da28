"""Tiny random Hugging Face checkpoints (Llama, Qwen2 with QKV bias, Gemma 3 with sliding windows), saved as
config.json + safetensors + tokenizer.json, loaded by longfit as a directory: logits equal transformers'."""

from __future__ import annotations

import json

import pytest
import torch

from longfit import LLM, SamplingParams

transformers = pytest.importorskip("transformers")


def _byte_tokenizer(directory) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))


def _config(kind: str):
    common = dict(vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0, head_dim=16)
    if kind == "llama3-rope":
        return transformers.LlamaConfig(**common, head_dim=16, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=10000.0)
    return transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16, sliding_window=24,
                                         query_pre_attn_scalar=16, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                                         layer_types=["sliding_attention"] * 3 + ["full_attention"])


@pytest.fixture(scope="module", params=["llama", "llama3-rope", "qwen2", "gemma3"])
def checkpoint(request, tmp_path_factory):
    torch.manual_seed(0)
    config = _config(request.param)
    model_cls = {"llama": transformers.LlamaForCausalLM, "llama3-rope": transformers.LlamaForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM,
                 "gemma3": transformers.Gemma3ForCausalLM}[request.param]
    model = model_cls(config).eval()
    with torch.no_grad():  # random init leaves biases and norms trivial: perturb them so they are tested
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    _byte_tokenizer(directory)
    return request.param, directory, model


def test_directory_model_matches_transformers(checkpoint):
    kind, directory, reference = checkpoint
    llm = LLM(str(directory), dtype="float32", block_size=8, max_num_batched_tokens=40)
    prompt = [1] + [int(t) for t in torch.randint(3, 259, (90,), generator=torch.Generator().manual_seed(1))]
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=0))[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    want = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    got = torch.tensor([entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], prompt[1:])])
    assert torch.allclose(got, want, atol=1e-4), (kind, (got - want).abs().max())
    with torch.no_grad():
        greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert out.outputs[0].token_ids == greedy[0, len(prompt):].tolist(), kind
    assert llm.get_tokenizer().decode(llm.get_tokenizer().encode("héllo wörld", add_special_tokens=False)) == \
        "héllo wörld"
