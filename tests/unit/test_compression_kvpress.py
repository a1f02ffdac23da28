"""SnapKV / StreamingLLM / Knorm / TOVA / PyramidKV / ThinK (and ChunkKV where the two definitions coincide) select
exactly what kvpress's presses select on the same tensors. kvpress's score functions are driven directly through a
minimal stand-in attention module (skipped when kvpress is not installed; importing it, with transformers, is most
of this file's run time)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.compression_tensors import layer_tensors
from longfit.compression.chunkkv import ChunkKVPolicy
from longfit.compression.knorm import KnormPolicy
from longfit.compression.pyramidkv import PyramidKVPolicy
from longfit.compression.snapkv import SnapKVPolicy
from longfit.compression.spec import pyramid_kept
from longfit.compression.streaming_llm import StreamingLLMPolicy
from longfit.compression.think import ThinKPolicy
from longfit.compression.tova import TOVAPolicy

pytest.importorskip("kvpress")


_tensors = layer_tensors


def _module(num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int = 0, num_layers: int = 1):
    config = SimpleNamespace(num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                             num_hidden_layers=num_layers)
    return SimpleNamespace(config=config, head_dim=head_dim, q_proj=lambda x: x, layer_idx=layer_idx)


def _kvpress_kept(press, keys, values, queries, layer_idx: int = 0, num_layers: int = 1) -> list[list[int]]:
    """Indices kvpress's ``compress`` keeps: queries enter as hidden states through an identity ``q_proj`` with
    RoPE cos=1, sin=0; values carry their own position in channel 0 so the output reveals the kept set."""
    num_kv, num_tokens, dim = keys.shape
    hidden = queries.transpose(0, 1).reshape(1, num_tokens, -1)  # [1, T, Hq*D]
    tagged = values.clone()
    tagged[..., 0] = torch.arange(num_tokens, dtype=values.dtype)
    kwargs = {"position_embeddings": (torch.ones(1, num_tokens, dim), torch.zeros(1, num_tokens, dim)),
              "hidden_states": hidden}
    module = _module(queries.shape[0], num_kv, dim, layer_idx, num_layers)
    _, out = press.compress(module, hidden, keys[None].clone(), tagged[None], None, kwargs)
    return [sorted(int(x) for x in row) for row in out[0, :, :, 0].tolist()]


@pytest.mark.parametrize("ratio, window, kernel, groups", [(0.5, 8, 5, 2), (0.75, 16, 3, 3), (0.25, 4, 1, 1)])
def test_snapkv_equals_kvpress(ratio: float, window: int, kernel: int, groups: int) -> None:
    from kvpress.presses.snapkv_press import SnapKVPress

    keys, values, queries = _tensors(2, groups, 128, 16, seed=11)
    press = SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel)
    ours = SnapKVPolicy(keep=1 - ratio, window=window, kernel=kernel).plan(0, 1, keys, values, queries)
    assert ours.kept_indices.tolist() == _kvpress_kept(press, keys, values, queries)


@pytest.mark.parametrize("ratio, sinks", [(0.5, 4), (0.75, 1), (0.25, 0)])
def test_streaming_equals_kvpress(ratio: float, sinks: int) -> None:
    from kvpress.presses.streaming_llm_press import StreamingLLMPress

    keys, values, queries = _tensors(2, 2, 64, 8, seed=12)
    ours = StreamingLLMPolicy(sinks=sinks, keep=1 - ratio).plan(0, 1, keys, values, None)
    expected = _kvpress_kept(StreamingLLMPress(compression_ratio=ratio, n_sink=sinks), keys, values, queries)
    assert ours.kept_indices.tolist() == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_knorm_equals_kvpress(dtype: torch.dtype) -> None:
    from kvpress.presses.knorm_press import KnormPress

    keys, values, queries = _tensors(3, 1, 96, 16, seed=13, dtype=dtype)
    ours = KnormPolicy(keep=0.25).plan(0, 1, keys, values, None)
    assert ours.kept_indices.tolist() == _kvpress_kept(KnormPress(compression_ratio=0.75), keys, values, queries)


@pytest.mark.parametrize("groups", [1, 3])
def test_tova_equals_kvpress(groups: int) -> None:
    from kvpress.presses.tova_press import TOVAPress

    keys, values, queries = _tensors(2, groups, 80, 16, seed=14)
    ours = TOVAPolicy(keep=0.5).plan(0, 1, keys, values, queries)
    assert ours.kept_indices.tolist() == _kvpress_kept(TOVAPress(compression_ratio=0.5), keys, values, queries)


def test_pyramidkv_equals_kvpress() -> None:
    from kvpress.presses.pyramidkv_press import PyramidKVPress

    for num_tokens, ratio, window, beta, num_layers in [(200, 0.5, 8, 2, 4), (500, 0.75, 16, 20, 6),
                                                       (100, 0.7, 8, 20, 3), (64, 0.5, 32, 4, 5)]:
        press = PyramidKVPress(compression_ratio=ratio, window_size=window, beta=beta)
        for layer in range(num_layers):
            expected = press.get_layer_budget(_module(4, 2, 8, layer, num_layers), num_tokens)
            assert pyramid_kept(layer, num_layers, num_tokens, 1 - ratio, None, window, beta) == expected
    keys, values, queries = _tensors(2, 2, 200, 8, seed=15)
    press = PyramidKVPress(compression_ratio=0.5, window_size=8, beta=2)
    policy = PyramidKVPolicy(keep=0.5, window=8, beta=2)
    for layer in (0, 3):
        ours = policy.plan(layer, 4, keys, values, queries)
        assert ours.kept_indices.tolist() == _kvpress_kept(press, keys, values, queries, layer, 4)


def test_think_channels_equal_kvpress() -> None:
    from kvpress.presses.think_press import ThinKPress

    keys, values, queries = _tensors(2, 2, 40, 16, seed=16)
    pruned = ThinKPolicy(channels=0.25, window=8).prune(keys, queries)
    press = ThinKPress(key_channel_compression_ratio=0.75, window_size=8)
    hidden = queries.transpose(0, 1).reshape(1, 40, -1)
    kwargs = {"position_embeddings": (torch.ones(1, 40, 16), torch.zeros(1, 40, 16)), "hidden_states": hidden}
    zeroed, _ = press.compress(_module(4, 2, 16), hidden, keys[None].clone(), values[None], None, kwargs)
    assert torch.equal(pruned.restore(), zeroed[0])  # same channels kept, the rest zero


@pytest.mark.parametrize("num_tokens, chunk, keep, groups", [(120, 8, 0.4, 2), (200, 10, 0.25, 3), (96, 16, 0.5, 1)])
def test_chunkkv_equals_kvpress_where_they_coincide(num_tokens: int, chunk: int, keep: float, groups: int) -> None:
    """kvpress's ChunkKVPress over SnapKVPress without pooling ranks chunks as longfit does (its window tokens score
    the maximum, so the window's chunk always wins). With the window one whole chunk and ``int(C * keep)`` chunks
    equal to longfit's token count, both keep the same whole chunks."""
    from kvpress.presses.chunkkv_press import ChunkKVPress
    from kvpress.presses.snapkv_press import SnapKVPress

    assert num_tokens % chunk == 0 and int(num_tokens * keep) == int(num_tokens // chunk * keep) * chunk
    keys, values, queries = _tensors(2, groups, num_tokens, 16, seed=17)
    press = ChunkKVPress(press=SnapKVPress(compression_ratio=1 - keep, window_size=chunk, kernel_size=1),
                         chunk_length=chunk)
    ours = ChunkKVPolicy(keep=keep, window=chunk, chunk=chunk).plan(0, 1, keys, values, queries)
    assert ours.kept_indices.tolist() == _kvpress_kept(press, keys, values, queries)
