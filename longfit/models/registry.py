"""Architecture name → model class."""

from __future__ import annotations

from longfit.config import ModelConfig
from longfit.models.base import DecoderModel
from longfit.models.gemma3 import Gemma3ForCausalLM
from longfit.models.layers import WeightSource
from longfit.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[DecoderModel]] = {"llama": LlamaForCausalLM, "gemma3": Gemma3ForCausalLM}


def build_model(config: ModelConfig, source: WeightSource) -> DecoderModel:
    return MODEL_CLASSES[config.architecture](config, source)
