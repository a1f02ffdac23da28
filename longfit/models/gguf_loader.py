"""Load a GGUF checkpoint as HF-named, HF-convention RawWeights, dequantized lazily from a memory map.

Two conventions differ between llama.cpp's files and Hugging Face's modules, and are undone here:
- llama.cpp's converter permutes the q/k rows of ``llama`` models so its interleaved RoPE applies; HF's rotate-half
  RoPE needs the original order (transformers: ``LlamaTensorProcessor._reverse_permute_weights``).
- llama.cpp stores Gemma's RMSNorm weights with +1 added; HF's Gemma modules compute ``x * (1 + w)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from longfit.config import ModelConfig
from longfit.models.model_config import (
    GGUFFile,
    GGUFTensorInfo,
    gguf_rope_freqs,
    model_config_from_gguf_metadata,
    read_gguf,
)
from longfit.models.weights import RawWeight

_FLOAT_TYPES = ("F32", "F16", "BF16")
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",  # Gemma: norm after attention, before the residual add
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# NOTE: "ffn_norm" is the norm before the MLP: Llama calls it post_attention_layernorm, Gemma 3 (which has a
# separate post-attention norm) pre_feedforward_layernorm.
_FFN_NORM = {"llama": "post_attention_layernorm", "gemma3": "pre_feedforward_layernorm"}
_IGNORED = ("rope_freqs.weight",)  # Llama 3 scaling divisors: already folded into ModelConfig.rope_scaling


@dataclass(slots=True)
class Checkpoint:
    """A loaded checkpoint: config, lazily materialized weights under HF names, and what the tokenizer needs.

    ``tokenizer_metadata`` holds the GGUF ``tokenizer.*`` keys (plus ``general.architecture``) for GGUF files, or
    ``{"tokenizer_json": path, "tokenizer_config_json": path | None}`` for Hugging Face directories.
    """

    config: ModelConfig
    weights: dict[str, RawWeight]
    tokenizer_metadata: dict[str, object] = field(default_factory=dict)
    path: str = ""


def hf_name(gguf_name: str, architecture: str) -> str | None:
    """HF parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` → ``model.layers.3.self_attn.q_proj.weight``),
    or None when the tensor has no HF counterpart."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        part = _FFN_NORM[architecture] if parts[2] == "ffn_norm" else _LAYER.get(parts[2])
        if part is not None:
            return f"model.layers.{parts[1]}.{part}.{suffix}"
    return None


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row gather that undoes llama.cpp's q/k permutation: ``hf = gguf[index]``, int64 ``[num_rows]``.

    llama.cpp (convert_hf_to_gguf.py, ``LlamaModel.permute``) reorders each head's rows from
    ``[first half; second half]`` (HF rotate-half pairs i and i + d/2) to interleaved ``[0, d/2, 1, d/2 + 1, ...]``.
    Within head h, GGUF row ``2j + k`` holds HF row ``k * d/2 + j``.
    """
    if num_rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {num_rows} rows into {num_heads} heads of even size")
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(num_rows)


def _raw_weight(gguf_file: GGUFFile, info: GGUFTensorInfo, name: str, rows: np.ndarray | None,
                norm_offset: float) -> RawWeight:
    """A RawWeight whose closures read ``info`` from the map only when called (nothing is held in memory)."""
    qtype = GGMLQuantizationType[info.qtype]
    is_matrix = len(info.shape) >= 2

    def stored_rows() -> np.ndarray:
        data = gguf_file.raw(info.name)  # uint8 [*shape[:-1], row_bytes], a read-only view of the file
        # NOTE: GGUF rows are independent blocks, so gathering stored rows is exact.
        return data[rows] if rows is not None and is_matrix else data

    def dequantize() -> torch.Tensor:
        values = np.asarray(gguf_dequantize(stored_rows(), qtype), dtype=np.float32)  # [*shape], fp32
        if rows is not None and not is_matrix:  # a q/k bias: one block row, permute its elements
            values = values[rows]
        if not values.flags.writeable:  # F32 tensors dequantize to a view of the read-only map
            values = values.copy()
        tensor = torch.from_numpy(values)
        return tensor - norm_offset if norm_offset else tensor

    def dequantize_rows(start: int, stop: int) -> torch.Tensor:
        # Only the blocks of these rows are read and dequantized (a view of the map when no un-permutation).
        values = np.asarray(gguf_dequantize(stored_rows()[start:stop], qtype), dtype=np.float32)  # [rows, in]
        return torch.from_numpy(values if values.flags.writeable else values.copy())

    quant_rows = None if info.qtype in _FLOAT_TYPES else stored_rows
    return RawWeight(name=name, shape=info.shape, qtype=info.qtype, _dequantize=dequantize, _quant_rows=quant_rows,
                     _dequantize_rows=dequantize_rows if is_matrix and not norm_offset else None,
                     _release=lambda: gguf_file.release(info.name))


def check_weights(weights: dict[str, RawWeight], config: ModelConfig, path: str) -> None:
    """Raise a ValueError naming what is missing, rather than failing later inside a model's constructor."""
    per_layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if config.architecture == "gemma3":
        per_layer += ["self_attn.q_norm", "self_attn.k_norm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    required += [] if config.tie_word_embeddings else ["lm_head.weight"]
    required += [f"model.layers.{i}.{part}.weight" for i in range(config.num_layers) for part in per_layer]
    missing = [name for name in required if name not in weights]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors this architecture needs, e.g. {missing[:3]}")
    q_rows = weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    if q_rows != config.num_heads * config.head_dim:
        raise ValueError(f"{path}: q_proj has {q_rows} rows, config says {config.num_heads} heads x {config.head_dim}")


def load_gguf(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a GGUF file: config from its metadata, RawWeights under HF names in HF conventions.

    Weights stay in the file's format (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K, ...) until
    ``RawWeight.dequantize()`` (fp32 ``[out, in]``) or ``quant_rows()`` (uint8 ``[out, row_bytes]``) is called.

    Raises:
        ValueError: "<path> is not a valid GGUF file: ..." for a corrupt or truncated file; an unsupported
            architecture; tensors missing for the architecture.
    """
    gguf_file = read_gguf(path)
    meta, path = gguf_file.metadata, gguf_file.path
    config = model_config_from_gguf_metadata(meta, os.path.basename(path).removesuffix(".gguf"),
                                             tensor_names=gguf_file.tensors, rope_freqs=gguf_rope_freqs(gguf_file))
    gguf_arch = str(meta["general.architecture"])
    # Only llama.cpp's "llama" converter permutes q/k; qwen2 and gemma3 use NeoX-style RoPE and keep HF order.
    permute_heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads} if gguf_arch == "llama" else {}
    weights: dict[str, RawWeight] = {}
    for info in gguf_file.tensors.values():
        name = hf_name(info.name, config.architecture)
        if name is None:
            if info.name not in _IGNORED:
                warnings.warn(f"{path}: ignoring tensor {info.name!r}, which has no Hugging Face counterpart",
                              stacklevel=2)
            continue
        kind = info.name.split(".")[-2]
        rows = unpermute_rows(info.shape[0], permute_heads[kind]) if kind in permute_heads else None
        norm_offset = 1.0 if config.architecture == "gemma3" and kind.endswith("norm") else 0.0
        weights[name] = _raw_weight(gguf_file, info, name, rows, norm_offset)
    check_weights(weights, config, path)
    tokenizer_metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    tokenizer_metadata["general.architecture"] = gguf_arch
    return Checkpoint(config=config, weights=weights, tokenizer_metadata=tokenizer_metadata, path=path)
