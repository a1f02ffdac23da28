"""load_model: a model name or path → (model in its compute form, ModelConfig, tokenizer)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from longfit.config import ModelConfig, RuntimeConfig
from longfit.models.base import DecoderModel
from longfit.models.layers import WeightSource, random_weights
from longfit.models.registry import build_model
from longfit.models.tiny import TINY_PRESETS, ByteTokenizer, tiny_model_config
from longfit.quant.linear import prepack_dense_layers
from longfit.runtime.host_memory import LOADING_SLACK, release_free_heap

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(slots=True)
class LoadedModel:
    model: DecoderModel
    config: ModelConfig
    tokenizer: object  # models.tokenizer.Tokenizer or models.tiny.ByteTokenizer
    path: str


# Random-weight configs that replace a ``tiny-*`` preset while ``synthetic_config`` is open (calibration builds
# models of a real model's shape without its weights).
_SYNTHETIC_CONFIGS: dict[str, ModelConfig] = {}


@contextlib.contextmanager
def synthetic_config(name: str, config: ModelConfig) -> Iterator[str]:
    """While open, ``load_model(name)`` (a ``tiny-*`` preset name) builds ``config`` with random weights."""
    if name not in TINY_PRESETS:
        raise ValueError(f"synthetic_config: name must be one of {sorted(TINY_PRESETS)}, got {name!r}")
    previous = _SYNTHETIC_CONFIGS.get(name)
    _SYNTHETIC_CONFIGS[name] = config
    try:
        yield name
    finally:
        if previous is None:
            del _SYNTHETIC_CONFIGS[name]
        else:
            _SYNTHETIC_CONFIGS[name] = previous


def load_model(name: str, runtime: RuntimeConfig) -> LoadedModel:
    """Build the model named ``name`` (short name, GGUF path, HF directory, or a ``tiny-*`` preset).

    Raises ValueError with one clear message for unknown names, missing packages and unreadable files.
    """
    dtype = TORCH_DTYPES[runtime.dtype]
    form = "dense" if runtime.weights == "bf16" else runtime.weights
    if name in TINY_PRESETS:
        config = _SYNTHETIC_CONFIGS.get(name) or tiny_model_config(name)
        source = WeightSource(random_weights(config, seed=runtime.weight_seed), form, dtype)
        tokenizer = ByteTokenizer(add_bos=config.add_bos_token)
        path = name
    else:
        from longfit.models.gguf_loader import load_gguf
        from longfit.models.hf_loader import load_hf_dir
        from longfit.models.resolve import resolve_model_path
        from longfit.models.tokenizer import Tokenizer

        path = resolve_model_path(name)
        checkpoint = load_hf_dir(path) if os.path.isdir(path) else load_gguf(path)
        config = checkpoint.config
        source = WeightSource(checkpoint.weights, form, dtype)
        tokenizer = Tokenizer.from_checkpoint(checkpoint)
    with torch.inference_mode():
        model = build_model(config, source).to(runtime.device)
        # CPU bf16 layers only (matmul.should_prepack); each freed plain weight leaves a hole the packed ones skip
        prepack_dense_layers(model, after_each=lambda: release_free_heap(LOADING_SLACK))
    model.eval()
    release_free_heap()  # the last loading temporaries (under LOADING_SLACK), kept by the allocator's policy
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, path=path)
