"""ModelConfig parsing from GGUF metadata dicts and Hugging Face config.json dicts (no files, no torch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from longfit.config import RopeScaling
from longfit.models.model_config import (
    llama3_frequency_divisors,
    load_model_config,
    model_config_from_gguf_metadata,
    model_config_from_hf,
)

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"t{i}" for i in range(61)]


def smollm2_meta(**overrides: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
        "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": np.float32(1e-5), "llama.vocab_size": 49152,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.add_bos_token": False,
    }
    meta.update(overrides)
    return meta


def gemma3_meta(**overrides: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": 640,
        "gemma3.block_count": 18, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 512, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"] + ["x"] * 102
        + ["<start_of_turn>", "<end_of_turn>"], "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_bos_token": True,
    }
    meta.update(overrides)
    return meta


def test_smollm2_style_llama() -> None:
    config = model_config_from_gguf_metadata(smollm2_meta(), "smol", tensor_names=["token_embd.weight"])
    assert config.architecture == "llama" and config.name == "smol"
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.attention_bias and not config.qk_norm
    assert config.eos_token_ids == (0, 2)  # the file's EOS, then <|im_end|>
    assert config.bos_token_id == 1 and not config.add_bos_token and config.layer_types == ("full",) * 30


def test_gguf_variants() -> None:
    untied = model_config_from_gguf_metadata(smollm2_meta(), "m", tensor_names=["output.weight"])
    assert not untied.tie_word_embeddings
    qwen = model_config_from_gguf_metadata(
        {k.replace("llama.", "qwen2."): v for k, v in smollm2_meta(**{"general.architecture": "qwen2"}).items()}, "q")
    assert qwen.architecture == "llama" and qwen.attention_bias
    no_vocab_key = smollm2_meta()
    del no_vocab_key["llama.vocab_size"]
    assert model_config_from_gguf_metadata(no_vocab_key, "m").vocab_size == len(TOKENS)
    linear = model_config_from_gguf_metadata(
        smollm2_meta(**{"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}), "m")
    assert linear.rope_scaling == RopeScaling(rope_type="linear", factor=4.0)
    mistral = model_config_from_gguf_metadata(smollm2_meta(**{"llama.attention.sliding_window": 4096}), "m")
    assert mistral.layer_types == ("sliding",) * 30 and mistral.sliding_window == 4096
    spm = smollm2_meta(**{"tokenizer.ggml.model": "llama"})
    del spm["tokenizer.ggml.add_bos_token"]
    assert model_config_from_gguf_metadata(spm, "m").add_bos_token  # llama.cpp's default for SentencePiece


def test_gemma3_270m() -> None:
    config = model_config_from_gguf_metadata(gemma3_meta(), "gemma")
    assert config.architecture == "gemma3" and config.head_dim == 256 and config.num_kv_heads == 1
    assert config.hidden_act == "gelu_tanh" and config.qk_norm and config.add_bos_token
    assert config.rope_theta == 1e6 and config.rope_local_theta == 10000.0 and config.sliding_window == 512
    assert config.query_pre_attn_scalar == 256 and config.attention_scale == 1 / 16
    assert config.embedding_multiplier == pytest.approx(math.sqrt(640))
    assert config.layer_types == (("sliding",) * 5 + ("full",)) * 3
    assert config.eos_token_ids == (1, 106) and config.bos_token_id == 2
    big = model_config_from_gguf_metadata(gemma3_meta(**{
        "gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
        "gemma3.attention.head_count_kv": 16, "gemma3.attention.key_length": 128}), "27b")
    assert big.query_pre_attn_scalar == 168  # 27B scales by hidden / heads, as HF's config and llama.cpp do


def test_gguf_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'phi3'.*llama, qwen2, gemma3"):
        model_config_from_gguf_metadata(smollm2_meta(**{"general.architecture": "phi3"}), "m")
    missing = smollm2_meta()
    del missing["llama.block_count"]
    with pytest.raises(ValueError, match="llama.block_count"):
        model_config_from_gguf_metadata(missing, "m")
    with pytest.raises(ValueError, match="varies per layer"):
        model_config_from_gguf_metadata(smollm2_meta(**{"llama.attention.head_count_kv": [3, 3, 1]}), "m")
    with pytest.raises(ValueError, match=r"'llama.block_count' must be in 1..4096, got 3000000000"):
        model_config_from_gguf_metadata(smollm2_meta(**{"llama.block_count": 3_000_000_000}), "m")
    with pytest.raises(ValueError, match=r"'llama.attention.head_count' must be in"):
        model_config_from_gguf_metadata(smollm2_meta(**{"llama.attention.head_count": 0}), "m")
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        model_config_from_gguf_metadata(smollm2_meta(**{"llama.rope.scaling.type": "yarn"}), "m")


def _llama3_divisors_reference(factor: float, low: float, high: float, old_len: int, theta: float,
                               dim: int) -> np.ndarray:
    """transformers' _compute_llama3_parameters, one frequency at a time."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            new = freq
        elif wavelen > old_len / low:
            new = freq / factor
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            new = (1 - smooth) * freq / factor + smooth * freq
        out.append(freq / new)
    return np.array(out)


def test_llama3_rope_freqs_are_recognized() -> None:
    scaling = RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    divisors = llama3_frequency_divisors(scaling, 500000.0, 64)
    np.testing.assert_allclose(divisors, _llama3_divisors_reference(32.0, 1.0, 4.0, 8192, 500000.0, 64), rtol=1e-6)
    meta = smollm2_meta(**{"llama.rope.freq_base": 500000.0})
    assert model_config_from_gguf_metadata(meta, "m", rope_freqs=divisors).rope_scaling == scaling
    with pytest.raises(ValueError, match="rope_freqs"):
        model_config_from_gguf_metadata(meta, "m", rope_freqs=np.linspace(1, 8, 32, dtype=np.float32))


LLAMA31 = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def test_hf_llama31() -> None:
    config = model_config_from_hf(LLAMA31, "llama", vocab={"<|eot_id|>": 128009})
    assert config.architecture == "llama" and config.head_dim == 64 and config.num_kv_heads == 8
    assert config.rope_scaling == RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert config.eos_token_ids == (128001, 128008, 128009) and config.add_bos_token and config.tie_word_embeddings
    v5 = {k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = dict(LLAMA31["rope_scaling"], rope_theta=500000.0)  # transformers 5 layout
    assert model_config_from_hf(v5, "llama") == model_config_from_hf(LLAMA31, "llama")


def test_hf_mistral_and_qwen2() -> None:
    base = {k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "head_dim")}
    mistral = model_config_from_hf(dict(base, architectures=["MistralForCausalLM"], sliding_window=4096), "m")
    assert mistral.layer_types == ("sliding",) * 16 and mistral.sliding_window == 4096 and mistral.head_dim == 64
    qwen = model_config_from_hf(dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=4096,
                                     use_sliding_window=False, eos_token_id=151645), "q",
                                vocab={"<|im_end|>": 151645, "<|endoftext|>": 151643})
    assert qwen.attention_bias and not qwen.add_bos_token and qwen.layer_types == ("full",) * 16
    assert qwen.eos_token_ids == (151645,) and qwen.sliding_window is None
    qwen_sliding = model_config_from_hf(dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=64,
                                             use_sliding_window=True, max_window_layers=12), "q")
    assert qwen_sliding.layer_types == ("full",) * 12 + ("sliding",) * 4


GEMMA3_TEXT = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "sliding_window": 512, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
    "bos_token_id": 2, "eos_token_id": 1, "rope_scaling": None, "final_logit_softcapping": None,
    "sliding_window_pattern": 6,
}


def test_hf_gemma3_layouts_agree_with_gguf() -> None:
    from_gguf = model_config_from_gguf_metadata(gemma3_meta(**{"gemma3.vocab_size": 262144}), "gemma")
    text = model_config_from_hf(GEMMA3_TEXT, "gemma", vocab={"<end_of_turn>": 106})
    assert text == from_gguf
    nested = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": dict(GEMMA3_TEXT, architectures=None)}
    assert model_config_from_hf(nested, "gemma", vocab={"<end_of_turn>": 106}) == from_gguf
    v5 = {k: v for k, v in GEMMA3_TEXT.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    v5["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    v5["layer_types"] = ["sliding_attention"] * 17 + ["full_attention"]
    config = model_config_from_hf(v5, "gemma")
    assert config.rope_scaling == RopeScaling(rope_type="linear", factor=8.0) and config.rope_local_theta == 1e4
    assert config.layer_types == ("sliding",) * 17 + ("full",)


def test_hf_errors() -> None:
    with pytest.raises(ValueError, match=r"unsupported Hugging Face architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        model_config_from_hf({"architectures": ["GPT2LMHeadModel"]}, "g")
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        model_config_from_hf(dict(LLAMA31, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "m")


def test_load_model_config_from_json_and_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    by_dir, by_file = load_model_config(tmp_path), load_model_config(tmp_path / "config.json")
    assert by_dir == by_file and not by_dir.add_bos_token and by_dir.name == tmp_path.name
    with pytest.raises(ValueError, match="does not exist"):
        load_model_config(tmp_path / "nope.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(empty)
