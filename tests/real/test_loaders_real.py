"""Loaders and tokenizers on the real embedded models (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M) against
transformers' GGUF loading and llama.cpp's known token counts. ~60 s, most of it inside transformers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from longfit.models.gguf_loader import Checkpoint, load_gguf
from longfit.models.model_config import load_model_config
from longfit.models.resolve import resolve_model_path
from longfit.models.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.real_model
GPL3 = Path("/usr/share/common-licenses/GPL-3")
TEXTS = ["Hello world  x\tz \n  12345 élan 🤗 ", "  leading spaces\n\n\nand   tabs\t\t end ",
         "日本語のテキストです。中文也可以。", "def f(x):\n    return x**2  # comment\n",
         "Ünïcödé — “quotes” ‘x’ … 12.5%", "a\u200bb\u00a0c\r\nd", "The year 2024 had 366 days; π≈3.14159."]


def _checkpoint(name: str) -> tuple[Checkpoint, Tokenizer]:
    try:
        path = resolve_model_path(name)
    except ValueError as error:
        pytest.skip(str(error))
    checkpoint = load_gguf(path)
    return checkpoint, Tokenizer.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Checkpoint, Tokenizer]:
    return _checkpoint("smollm2-135m")


@pytest.fixture(scope="module")
def gemma3() -> tuple[Checkpoint, Tokenizer]:
    return _checkpoint("gemma3-270m")


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    return transformers


def test_smollm2_config(smollm2: tuple[Checkpoint, Tokenizer]) -> None:
    checkpoint, tokenizer = smollm2
    config = checkpoint.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.rope_theta == 1e5 and config.tie_word_embeddings and not config.add_bos_token
    assert load_model_config(checkpoint.path) == config
    assert tokenizer.eos_token_ids == config.eos_token_ids == (2,)  # <|im_end|> is the file's EOS
    qtypes = {w.qtype for w in checkpoint.weights.values()}
    assert qtypes == {"Q4_1", "Q8_0", "F32"}


def test_smollm2_tokenizer_matches_llama_cpp(smollm2: tuple[Checkpoint, Tokenizer]) -> None:
    _, tokenizer = smollm2
    if GPL3.is_file():  # llama.cpp gives 7,639 tokens for this file (machine.md); transformers gives 7,658
        text = GPL3.read_text(encoding="utf-8")
        assert len(tokenizer.encode(text)) == 7639
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("year 2024")) == ["year", "Ġ", "2", "0", "2", "4"]
    assert tokenizer.encode("<|im_start|>user") == [1, tokenizer.token_to_id("user")]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}]) + tokenizer.encode("".join(TEXTS))
    stream = IncrementalDetokenizer(tokenizer)
    chunks = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(chunks) == tokenizer.decode(ids) and not any("\ufffd" in chunk for chunk in chunks)


def test_smollm2_weights_equal_transformers(smollm2: tuple[Checkpoint, Tokenizer]) -> None:
    checkpoint, _ = smollm2
    transformers = _transformers()
    directory, file = os.path.split(checkpoint.path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    reference = model.state_dict()
    names = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.q_proj.weight",
             "model.layers.29.self_attn.k_proj.weight", "model.layers.7.input_layernorm.weight",
             "model.layers.7.mlp.down_proj.weight"]
    for name in names:
        torch.testing.assert_close(checkpoint.weights[name].dequantize(), reference[name], rtol=0, atol=1e-6)
    assert set(checkpoint.weights) == set(reference) - {"lm_head.weight"}  # tied


def test_gemma3_config_and_tokenizer(gemma3: tuple[Checkpoint, Tokenizer]) -> None:
    checkpoint, tokenizer = gemma3
    config = checkpoint.config
    assert config.architecture == "gemma3" and config.layer_types[:6] == ("sliding",) * 5 + ("full",)
    assert (config.sliding_window, config.rope_local_theta, config.rope_theta) == (512, 1e4, 1e6)
    assert config.eos_token_ids == (1, 106) and config.add_bos_token and config.query_pre_attn_scalar == 256
    assert {w.qtype for w in checkpoint.weights.values()} == {"F32", "Q5_0", "Q4_K", "Q6_K", "Q8_0"}
    q = checkpoint.weights["model.layers.0.self_attn.q_proj.weight"]
    assert q.quant_rows().shape[0] == q.shape[0] == 1024
    assert tokenizer.encode("Hi")[0] == 2 and tokenizer.encode("<bos>Hi") == tokenizer.encode("Hi")
    assert tokenizer.encode("<start_of_turn>", add_special_tokens=False) == [105]
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nHi<end_of_turn>\n" \
                                                              "<start_of_turn>model\n"


def test_gemma3_tokenizer_equals_transformers(gemma3: tuple[Checkpoint, Tokenizer]) -> None:
    checkpoint, tokenizer = gemma3
    transformers = _transformers()
    directory, file = os.path.split(checkpoint.path)
    reference = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file)
    texts = TEXTS + ([GPL3.read_text(encoding="utf-8")] if GPL3.is_file() else [])
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text[:40]
        assert tokenizer.decode(ids) == reference.decode(ids) == text


def test_gemma3_weights_equal_transformers_conversion(gemma3: tuple[Checkpoint, Tokenizer]) -> None:
    """transformers' own GGUF tensor processor (norm - 1) and name map, without loading its whole model."""
    checkpoint, _ = gemma3
    transformers = _transformers()
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    from longfit.models.model_config import read_gguf

    config = checkpoint.config
    hf_config = transformers.Gemma3TextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim)
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(hf_config)
    processor = TENSOR_PROCESSORS["gemma3"](config={})
    name_map = get_gguf_hf_weights_map(model, processor)
    gguf_file = read_gguf(checkpoint.path)
    for gguf_name in ["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                      "blk.3.attn_q_norm.weight", "blk.3.attn_k_norm.weight", "blk.5.ffn_norm.weight",
                      "blk.5.post_attention_norm.weight", "blk.17.post_ffw_norm.weight", "blk.9.ffn_down.weight"]:
        info = gguf_file.tensors[gguf_name]
        values = dequantize(gguf_file.raw(gguf_name), GGMLQuantizationType[info.qtype])
        expected = processor.process(weights=values, name=gguf_name).weights
        ours = checkpoint.weights[name_map[gguf_name]].dequantize()
        torch.testing.assert_close(ours, torch.from_numpy(np.asarray(expected, dtype=np.float32)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_truncated_real_files_raise_value_error(name: str, tmp_path: Path) -> None:
    try:
        path = Path(resolve_model_path(name))
    except ValueError as error:
        pytest.skip(str(error))
    size = path.stat().st_size
    with path.open("rb") as source:
        head = source.read(1 << 20)
    (tmp_path / "head.gguf").write_bytes(head)  # the first MB: the header is cut (Gemma) or the data is
    almost = tmp_path / "almost.gguf"
    with path.open("rb") as source, almost.open("wb") as target:
        shutil.copyfileobj(source, target)
        target.truncate(size - 4096)  # only the last tensor is incomplete
    for broken in (tmp_path / "head.gguf", almost):
        with pytest.raises(ValueError, match="is not a valid GGUF file") as info:
            load_gguf(broken)
        assert str(broken) in str(info.value)
