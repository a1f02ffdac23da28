"""Load a Hugging Face model directory (config.json + *.safetensors, single or sharded) as lazy RawWeights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from longfit.models.gguf_loader import Checkpoint, check_weights
from longfit.models.model_config import model_config_from_hf, read_hf_tokenizer_facts
from longfit.models.weights import RawWeight

_FLOAT_DTYPES = ("F32", "BF16", "F16")
# Multimodal Gemma 3 checkpoints nest the text model; older and newer transformers name it differently.
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."))


def _text_name(name: str) -> str | None:
    """HF text-model name of a checkpoint tensor, or None for tensors a text model does not use (vision tower)."""
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name if name.startswith(("model.", "lm_head.")) else None


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index maps tensor names to shard files
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = sorted({directory / shard for shard in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {missing[:3]}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files (other weight formats are not supported)")
    return files


def _raw_weight(file: Path, stored_name: str, name: str, shape: tuple[int, ...], dtype: str) -> RawWeight:
    def dequantize() -> torch.Tensor:
        # NOTE: opened per call: safe_open memory-maps the file and reads only this tensor's bytes.
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(stored_name).to(torch.float32)

    def dequantize_rows(start: int, stop: int) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_slice(stored_name)[start:stop].to(torch.float32)

    return RawWeight(name=name, shape=shape, qtype=dtype, _dequantize=dequantize,
                     _dequantize_rows=dequantize_rows if len(shape) >= 2 else None)


def load_hf_dir(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a Hugging Face directory: config from ``config.json``, lazily read F32/BF16/F16 safetensors weights.

    ``tokenizer_metadata`` holds ``tokenizer_json`` and ``tokenizer_config_json`` paths (None when absent).

    Raises:
        ValueError: no config.json, no safetensors, an unsupported architecture or dtype, or missing tensors.
    """
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    add_bos, vocab = read_hf_tokenizer_facts(directory)
    config = model_config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), directory.name,
                                  add_bos_token=add_bos, vocab=vocab)
    weights: dict[str, RawWeight] = {}
    for file in _safetensors_files(directory):
        with safe_open(str(file), framework="pt") as handle:
            for stored_name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name = _text_name(stored_name)
                if name is None:
                    continue
                tensor_slice = handle.get_slice(stored_name)
                dtype = tensor_slice.get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise ValueError(f"{file}: tensor {stored_name!r} has dtype {dtype}; supported: {_FLOAT_DTYPES}")
                shape = tuple(int(d) for d in tensor_slice.get_shape())
                weights[name] = _raw_weight(file, stored_name, name, shape, dtype)
    check_weights(weights, config, str(directory))
    tokenizer_metadata: dict[str, object] = {
        "tokenizer_json": str(directory / "tokenizer.json") if (directory / "tokenizer.json").is_file() else None,
        "tokenizer_config_json": (str(directory / "tokenizer_config.json")
                                  if (directory / "tokenizer_config.json").is_file() else None),
    }
    return Checkpoint(config=config, weights=weights, tokenizer_metadata=tokenizer_metadata, path=str(directory))
