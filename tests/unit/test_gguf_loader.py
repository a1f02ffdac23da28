"""GGUF / HF-directory loading on tiny files written in the test: names, conventions, lazy dequantization, errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from safetensors.torch import save_file

from longfit.config import RopeScaling
from longfit.models.gguf_loader import hf_name, load_gguf, unpermute_rows
from longfit.models.hf_loader import load_hf_dir
from longfit.models.model_config import llama3_frequency_divisors, load_model_config, read_gguf
from longfit.quant.linear import dequantized

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 96, 4, 2, 16, 32, 2


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order, written out row by row: GGUF row h*d + 2j + k holds HF row h*d + k*d/2 + j."""
    out = np.empty_like(weight)
    d = weight.shape[0] // num_heads
    for h in range(num_heads):
        for j in range(d // 2):
            for k in range(2):
                out[h * d + 2 * j + k] = weight[h * d + k * (d // 2) + j]
    return out


def write_gguf(path: Path, arch: str, metadata: dict[str, object], tensors: list[tuple[str, np.ndarray, QT]]) -> Path:
    """Write a GGUF file. ``tensors`` hold arrays in the file's row order: float arrays are quantized here,
    uint8 arrays are taken as already-encoded blocks."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)  # type: ignore[arg-type]
    for name, array, qtype in tensors:
        data = array if array.dtype == np.uint8 else gguf_quantize(array.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_metadata(arch: str = "llama") -> dict[str, object]:
    return {
        f"{arch}.context_length": 256, f"{arch}.embedding_length": HIDDEN, f"{arch}.block_count": LAYERS,
        f"{arch}.feed_forward_length": FFN, f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)], "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


@pytest.fixture(scope="module")
def hf_weights() -> dict[str, np.ndarray]:
    """HF-order float32 weights of the tiny llama model (layer 0 and 1), keyed by GGUF name."""
    rng = np.random.default_rng(0)
    weights = {"token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)), "output_norm.weight": rng.random(HIDDEN)}
    for i in range(LAYERS):
        weights |= {
            f"blk.{i}.attn_norm.weight": rng.random(HIDDEN), f"blk.{i}.ffn_norm.weight": rng.random(HIDDEN),
            f"blk.{i}.attn_q.weight": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN)),
            f"blk.{i}.attn_k.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            f"blk.{i}.attn_v.weight": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)),
            f"blk.{i}.attn_output.weight": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM)),
            f"blk.{i}.ffn_gate.weight": rng.standard_normal((FFN, HIDDEN)),
            f"blk.{i}.ffn_up.weight": rng.standard_normal((FFN, HIDDEN)),
            f"blk.{i}.ffn_down.weight": rng.standard_normal((HIDDEN, FFN)),
        }
    return {k: v.astype(np.float32) for k, v in weights.items()}


# One quantization type per projection, so every supported type is read at least once.
QTYPES = {"token_embd": QT.Q8_0, "attn_q": QT.Q8_0, "attn_k": QT.F32, "attn_v": QT.Q4_1, "attn_output": QT.F16,
          "ffn_gate": QT.Q4_0, "ffn_up": QT.Q5_0, "ffn_down": QT.BF16}


def qtype_of(name: str) -> QT:
    return QTYPES.get(name.split(".")[-2], QT.F32)


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory: pytest.TempPathFactory, hf_weights: dict[str, np.ndarray]) -> Path:
    tensors = []
    for name, weight in hf_weights.items():
        if ".attn_q." in name:
            weight = llama_cpp_permute(weight, HEADS)
        elif ".attn_k." in name:
            weight = llama_cpp_permute(weight, KV_HEADS)
        tensors.append((name, weight, qtype_of(name)))
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", "llama", llama_metadata(), tensors)


def expected(name: str, weight: np.ndarray) -> np.ndarray:
    """What a weight reads back as: quantized then dequantized, per row (so row order does not matter)."""
    qtype = qtype_of(name)
    return gguf_dequantize(gguf_quantize(weight, qtype).view(np.uint8) if qtype != QT.F32 else weight, qtype)


def test_unpermute_rows_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(llama_cpp_permute(weight, heads)[unpermute_rows(48, heads)], weight)
    with pytest.raises(ValueError, match="un-permute"):
        unpermute_rows(10, 4)


def test_hf_names() -> None:
    assert hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert hf_name("output.weight", "llama") == "lm_head.weight"
    assert hf_name("blk.7.attn_k.bias", "llama") == "model.layers.7.self_attn.k_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_name("blk.0.post_attention_norm.weight", "gemma3") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.2.post_ffw_norm.weight", "gemma3") == "model.layers.2.post_feedforward_layernorm.weight"
    assert hf_name("blk.1.attn_q_norm.weight", "gemma3") == "model.layers.1.self_attn.q_norm.weight"
    assert hf_name("rope_freqs.weight", "llama") is None


def test_llama_weights_in_hf_order_and_names(llama_file: Path, hf_weights: dict[str, np.ndarray]) -> None:
    checkpoint = load_gguf(llama_file)
    assert checkpoint.config.tie_word_embeddings and "lm_head.weight" not in checkpoint.weights
    assert len(checkpoint.weights) == len(hf_weights)
    for gguf_name, weight in hf_weights.items():
        raw = checkpoint.weights[hf_name(gguf_name, "llama")]  # type: ignore[index]
        assert raw.shape == weight.shape and raw.qtype == qtype_of(gguf_name).name
        tensor = raw.dequantize()
        assert tensor.dtype == torch.float32 and tensor.is_contiguous()
        np.testing.assert_array_equal(tensor.numpy(), expected(gguf_name, weight), err_msg=gguf_name)


def test_quant_rows_are_hf_ordered_gguf_blocks(llama_file: Path, hf_weights: dict[str, np.ndarray]) -> None:
    checkpoint = load_gguf(llama_file)
    q = checkpoint.weights["model.layers.1.self_attn.q_proj.weight"]
    assert q.is_quantized
    rows = q.quant_rows()
    # Quantizing the HF-order weight gives the same blocks: GGUF rows are independent.
    np.testing.assert_array_equal(rows, gguf_quantize(hf_weights["blk.1.attn_q.weight"], QT.Q8_0))
    assert rows.dtype == np.uint8 and rows.shape == (HEADS * HEAD_DIM, HIDDEN // 32 * 34)
    assert checkpoint.weights["model.layers.0.self_attn.k_proj.weight"].quant_rows() is None  # F32
    assert checkpoint.weights["model.layers.0.mlp.down_proj.weight"].quant_rows() is None  # BF16


@pytest.mark.parametrize("block_rows", [1, 3, 7, 1000])
def test_row_blocks_and_release_read_the_same_values(llama_file: Path, block_rows: int) -> None:
    """The loader's memory-light paths: row blocks (q rows un-permuted, every file type), ``dequantized`` built
    from them, and the file pages dropped after a read all give exactly ``dequantize()``'s values."""
    checkpoint = load_gguf(llama_file)
    for name, raw in checkpoint.weights.items():
        whole = raw.dequantize()
        blocks = list(raw.row_blocks(block_rows))
        if len(raw.shape) == 2:  # every matrix of this file reads by rows
            assert len(blocks) == -(-raw.shape[0] // block_rows), name
        torch.testing.assert_close(torch.cat(blocks) if len(raw.shape) == 2 else blocks[0], whole, rtol=0, atol=0)
        for dtype in (torch.bfloat16, torch.float32):
            built = dequantized([raw], dtype, block_rows)
            assert built.dtype == dtype and built.shape == whole.shape, name
            torch.testing.assert_close(built, whole.to(dtype), rtol=0, atol=0)
        raw.release()  # the map stays readable: the pages fault back in
        torch.testing.assert_close(raw.dequantize(), whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block_rows"):
        next(checkpoint.weights["model.embed_tokens.weight"].row_blocks(0))


def test_k_quant_rows_permute_exactly(tmp_path: Path) -> None:
    """Q4_K / Q6_K (gguf cannot quantize them): permuting raw rows == permuting dequantized rows."""
    rng = np.random.default_rng(1)
    hidden, heads = 256, 2
    metadata = llama_metadata() | {"llama.embedding_length": hidden, "llama.attention.head_count": heads,
                                   "llama.attention.head_count_kv": heads, "llama.block_count": 1}
    tensors = [(n, rng.random(hidden), QT.F32) for n in ("output_norm.weight", "blk.0.attn_norm.weight",
                                                       "blk.0.ffn_norm.weight")]
    tensors += [(f"blk.0.{n}.weight", rng.standard_normal((s, hidden)), QT.Q8_0)
                for n, s in (("attn_v", hidden), ("attn_output", hidden), ("ffn_gate", FFN), ("ffn_up", FFN))]
    tensors += [("token_embd.weight", rng.standard_normal((VOCAB, hidden)), QT.F32),
                ("blk.0.ffn_down.weight", rng.standard_normal((hidden, FFN)), QT.F32)]
    raw_q = rng.integers(0, 256, (hidden, 144), dtype=np.uint8)  # random Q4_K blocks with finite scales
    raw_q[:, :4] = np.frombuffer(np.float16([0.01, 0.002]).tobytes(), np.uint8)  # d, dmin of each super-block
    raw_k = rng.integers(0, 256, (hidden, 210), dtype=np.uint8)  # random Q6_K blocks, scale d at the end
    raw_k[:, 208:] = np.frombuffer(np.float16([0.01]).tobytes(), np.uint8)
    tensors += [("blk.0.attn_q.weight", raw_q, QT.Q4_K), ("blk.0.attn_k.weight", raw_k, QT.Q6_K)]
    path = write_gguf(tmp_path / "kquant.gguf", "llama", metadata, tensors)
    checkpoint = load_gguf(path)
    gguf_to_hf = llama_cpp_permute(np.arange(hidden)[:, None], heads)[:, 0]  # GGUF row i holds HF row gguf_to_hf[i]
    for name, raw, qtype in (("q_proj", raw_q, QT.Q4_K), ("k_proj", raw_k, QT.Q6_K)):
        weight = checkpoint.weights[f"model.layers.0.self_attn.{name}.weight"]
        hf_rows, hf_values = np.empty_like(raw), np.empty((hidden, hidden), np.float32)
        hf_rows[gguf_to_hf], hf_values[gguf_to_hf] = raw, gguf_dequantize(raw, qtype)
        np.testing.assert_array_equal(weight.dequantize().numpy(), hf_values)
        np.testing.assert_array_equal(weight.quant_rows(), hf_rows)


def test_gemma3_norms_lose_their_plus_one_and_qk_keep_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    hidden, heads, head_dim, layers = 64, 2, 32, 6
    metadata = {
        "gemma3.context_length": 512, "gemma3.embedding_length": hidden, "gemma3.block_count": layers,
        "gemma3.feed_forward_length": FFN, "gemma3.attention.head_count": heads,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": head_dim,
        "gemma3.attention.value_length": head_dim, "gemma3.rope.freq_base": 1e6,
        "gemma3.attention.sliding_window": 16, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<end_of_turn>"],
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.bos_token_id": 2,
    }
    norms = {f"blk.{i}.{n}.weight": rng.standard_normal(head_dim if "attn_" in n else hidden)
             for i in range(layers) for n in ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm",
                                              "attn_q_norm", "attn_k_norm")}
    norms["output_norm.weight"] = rng.standard_normal(hidden)
    mats = {"token_embd.weight": rng.standard_normal((4, hidden))}
    for i in range(layers):
        mats |= {f"blk.{i}.attn_q.weight": rng.standard_normal((heads * head_dim, hidden)),
                 f"blk.{i}.attn_k.weight": rng.standard_normal((head_dim, hidden)),
                 f"blk.{i}.attn_v.weight": rng.standard_normal((head_dim, hidden)),
                 f"blk.{i}.attn_output.weight": rng.standard_normal((hidden, heads * head_dim)),
                 f"blk.{i}.ffn_gate.weight": rng.standard_normal((FFN, hidden)),
                 f"blk.{i}.ffn_up.weight": rng.standard_normal((FFN, hidden)),
                 f"blk.{i}.ffn_down.weight": rng.standard_normal((hidden, FFN))}
    tensors = [(n, (w + 1).astype(np.float32), QT.F32) for n, w in norms.items()]  # llama.cpp stores 1 + w
    tensors += [(n, w, QT.F32) for n, w in mats.items()]
    checkpoint = load_gguf(write_gguf(tmp_path / "gemma.gguf", "gemma3", metadata, tensors))
    config = checkpoint.config
    assert config.architecture == "gemma3" and config.eos_token_ids == (1, 3) and config.add_bos_token
    assert config.layer_types == ("sliding",) * 5 + ("full",)
    for name, weight in norms.items():
        loaded = checkpoint.weights[hf_name(name, "gemma3")].dequantize().numpy()  # type: ignore[index]
        np.testing.assert_array_equal(loaded, (weight + 1).astype(np.float32) - np.float32(1), err_msg=name)
    for name, weight in mats.items():  # no q/k permutation outside llama.cpp's "llama" architecture
        loaded = checkpoint.weights[hf_name(name, "gemma3")].dequantize().numpy()  # type: ignore[index]
        np.testing.assert_array_equal(loaded, weight.astype(np.float32), err_msg=name)


def test_untied_output_and_unknown_and_missing_tensors(tmp_path: Path, hf_weights: dict[str, np.ndarray]) -> None:
    tensors = [(n, w, QT.F32) for n, w in hf_weights.items()]
    extra = [("output.weight", hf_weights["token_embd.weight"] * 2, QT.F32),
             ("blk.0.mystery.weight", np.ones(32), QT.F32)]
    with pytest.warns(UserWarning, match="mystery"):
        checkpoint = load_gguf(write_gguf(tmp_path / "untied.gguf", "llama", llama_metadata(), tensors + extra))
    assert not checkpoint.config.tie_word_embeddings
    np.testing.assert_array_equal(checkpoint.weights["lm_head.weight"].dequantize().numpy(),
                                  hf_weights["token_embd.weight"] * 2)
    missing = [t for t in tensors if t[0] != "blk.1.ffn_up.weight"]
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load_gguf(write_gguf(tmp_path / "missing.gguf", "llama", llama_metadata(), missing))


def test_reader_agrees_with_gguf_reader(llama_file: Path) -> None:
    ours, reference = read_gguf(llama_file), gguf.GGUFReader(llama_file)
    for key, field in reference.fields.items():
        if not key.startswith("GGUF."):
            value = ours.metadata[key]
            assert (np.asarray(value) == np.asarray(field.contents())).all(), key
    assert [t.name for t in reference.tensors] == list(ours.tensors)
    for tensor in reference.tensors:
        np.testing.assert_array_equal(ours.raw(tensor.name).reshape(-1), tensor.data.view(np.uint8).reshape(-1))
        assert ours.tensors[tensor.name].shape == tuple(reversed(tensor.shape.tolist()))


def test_load_model_config_reads_gguf_header(llama_file: Path) -> None:
    config = load_model_config(llama_file)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (LAYERS, HEADS, KV_HEADS, 16)
    assert config.vocab_size == VOCAB and config.name == "tiny-llama" and config.rms_norm_eps == 1e-5


def _corrupt_files(tmp_path: Path, good: Path) -> list[Path]:
    data = good.read_bytes()
    paths = []
    for cut in (0, 3, 4, 8, 20, 40, 100, 300, 700, len(data) // 2, len(data) - 1):
        paths.append(tmp_path / f"cut{cut}.gguf")
        paths[-1].write_bytes(data[:cut])
    rng = np.random.default_rng(3)
    paths.append(tmp_path / "random.gguf")
    paths[-1].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    paths.append(tmp_path / "magic-then-random.gguf")  # a plausible header followed by garbage
    paths[-1].write_bytes(data[:24] + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    paths.append(tmp_path / "text.gguf")
    paths[-1].write_text("this is not a model\n" * 50)
    paths.append(tmp_path / "does-not-exist.gguf")
    paths.append(tmp_path)  # a directory
    return paths


def test_corrupt_files_raise_clear_value_error(tmp_path: Path, llama_file: Path) -> None:
    for path in _corrupt_files(tmp_path, llama_file):
        for loader in (load_gguf, read_gguf):
            with pytest.raises(ValueError, match="is not a valid GGUF file") as info:
                loader(path)
            assert str(path) in str(info.value)


def test_hf_dir_single_and_sharded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
              "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "vocab_size": VOCAB, "max_position_embeddings": 128, "tie_word_embeddings": False}
    tensors = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16),
               "lm_head.weight": torch.randn(VOCAB, HIDDEN), "model.norm.weight": torch.randn(HIDDEN)}
    for part, shape in (("input_layernorm", (HIDDEN,)), ("post_attention_layernorm", (HIDDEN,)),
                        ("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (32, HIDDEN)),
                        ("self_attn.v_proj", (32, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                        ("mlp.gate_proj", (FFN, HIDDEN)), ("mlp.up_proj", (FFN, HIDDEN)),
                        ("mlp.down_proj", (HIDDEN, FFN))):
        tensors[f"model.layers.0.{part}.weight"] = torch.randn(*shape, dtype=torch.float16)
    for layout in ("single", "sharded"):
        directory = tmp_path / layout
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        names = sorted(tensors)
        if layout == "single":
            save_file(tensors, str(directory / "model.safetensors"))
        else:
            shards = {"a.safetensors": names[:5], "b.safetensors": names[5:]}
            for file, part in shards.items():
                save_file({n: tensors[n] for n in part}, str(directory / file))
            index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        checkpoint = load_hf_dir(directory)
        assert set(checkpoint.weights) == set(tensors) and checkpoint.config.num_layers == 1
        for name, tensor in tensors.items():
            raw = checkpoint.weights[name]
            assert raw.qtype == {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[tensor.dtype]
            assert not raw.is_quantized and raw.shape == tuple(tensor.shape)
            torch.testing.assert_close(raw.dequantize(), tensor.float(), rtol=0, atol=0)
            if tensor.dim() == 2:  # read by row slices of the file
                torch.testing.assert_close(torch.cat(list(raw.row_blocks(5))), tensor.float(), rtol=0, atol=0)
                assert len(list(raw.row_blocks(5))) == -(-tensor.shape[0] // 5)
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_dir(tmp_path)


def test_llama3_rope_freqs_tensor_sets_rope_scaling(tmp_path: Path, hf_weights: dict[str, np.ndarray]) -> None:
    scaling = RopeScaling(rope_type="llama3", factor=8.0)
    divisors = llama3_frequency_divisors(scaling, 500000.0, HEAD_DIM)
    tensors = [(n, w, QT.F32) for n, w in hf_weights.items()] + [("rope_freqs.weight", divisors, QT.F32)]
    path = write_gguf(tmp_path / "llama3.gguf", "llama", llama_metadata() | {"llama.rope.freq_base": 500000.0}, tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rope_freqs is used, not reported as an unknown tensor
        checkpoint = load_gguf(path)
    assert checkpoint.config.rope_scaling == scaling == load_model_config(path).rope_scaling
    assert "rope_freqs.weight" not in checkpoint.weights
