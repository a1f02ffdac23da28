"""Per-layer decode metadata: layers with equal inputs share the computation, never the tensors under a graph."""

from __future__ import annotations

import types

import pytest
import torch

from longfit import SamplingParams
from tests.conftest import make_tiny_llm, run_together


def _capture(llm) -> list:
    """Every decode step's (AttentionMetadata, [Bd, L, maxP] page tables of its rows), as the runner builds it."""
    runner = llm.engine.runner
    seen = []
    original = runner._decode_metadata

    def record(items, meta):
        original(items, meta)
        seen.append((meta, [runner.states[it.request_id].tables.copy() for it in items]))

    runner._decode_metadata = record
    return seen


def _ptrs(tensors: list[torch.Tensor]) -> set[int]:
    return {t.data_ptr() for t in tensors}


def _window_start(meta, layer: int, row: int, block: int) -> int:
    """Table index of the first page a sliding layer reads (its window's), 0 on full layers."""
    return int(meta.decode_first_key[layer][row]) // block


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_equal_layers_get_equal_pages_and_own_tensors_under_a_graph(graph: bool, model: str) -> None:
    llm = make_tiny_llm(model, decode_steps=1)  # every step through the metadata builder
    if graph:  # a graph that never runs: the runner builds its metadata as for one (no shared tensors)
        llm.engine.runner.graph = types.SimpleNamespace(failed=None, eligible=lambda meta: False)
    seen = _capture(llm)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["the first prompt, long enough to leave a small sliding window behind " * 4, "second"]
    outputs = run_together(llm, prompts, params, [None, None])
    assert seen and all(len(o) == 12 for o in outputs)
    block = llm.engine.runner.block_size
    for meta, tables in seen:
        layers = len(meta.decode_block_tables)
        assert layers == llm.engine.model_config.num_layers > 1
        assert all(torch.equal(t, meta.decode_seq_lens[0]) for t in meta.decode_seq_lens)  # no compression
        for layer, table in enumerate(meta.decode_block_tables):  # each layer its own pages, then the null page
            for row, length in enumerate(meta.decode_seq_lens[layer].tolist()):
                start, used = _window_start(meta, layer, row, block), -(-length // block)
                count = min(used - start, table.shape[1])
                assert table[row, :count].tolist() == tables[row][layer, start:start + count].tolist()
                assert bool((table[row, count:] == 0).all())
        if graph:  # the graph guards on aliasing: every layer its own tensors
            for field in (meta.decode_block_tables, meta.decode_first_key, meta.decode_seq_lens):
                assert len(_ptrs(field)) == layers
        else:  # eager: equal first keys share one tensor (one mask for those layers)
            assert len(_ptrs(meta.decode_first_key)) == len({t.numpy().tobytes() for t in meta.decode_first_key})


def test_layers_with_different_lengths_keep_their_own_pages() -> None:
    """PyramidKV keeps a different number of tokens per layer: the shared computation must not leak across."""
    llm = make_tiny_llm()
    seen = _capture(llm)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = "a prompt long enough to be compressed differently in every layer of the tiny model " * 3
    run_together(llm, [prompt], params, ["pyramidkv:keep=0.5"])
    meta, tables = seen[-1]
    lens = [int(t[0]) for t in meta.decode_seq_lens]
    assert len(set(lens)) > 1
    block = llm.engine.runner.block_size
    for layer, (table, length) in enumerate(zip(meta.decode_block_tables, lens)):
        used = -(-length // block)
        assert table[0, :used].tolist() == tables[0][layer, :used].tolist()
        assert bool((table[0, used:] == 0).all())  # past a layer's own pages: the null page
