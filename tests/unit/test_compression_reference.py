"""Each policy's choices against a slow, obviously-correct reference written here (Python loops over heads, queries
and tokens). Parity with kvpress's own presses is in test_compression_kvpress.py (importing kvpress alone takes
5-8 s, so it lives in its own file to keep this one fast)."""

from __future__ import annotations

import math

import pytest
import torch

from longfit.compression.chunkkv import ChunkKVPolicy
from longfit.compression.duo_attention import DuoAttentionPolicy
from longfit.compression.h2o import H2OPolicy
from longfit.compression.knorm import KnormPolicy
from longfit.compression.merging import MiniCachePolicy, slerp_direction, unmerge_layers
from longfit.compression.pyramidkv import PyramidKVPolicy
from longfit.compression.quest import QuestPolicy, page_bounds, page_upper_bounds, pages_to_tokens, select_pages
from longfit.compression.shadowkv import factorize_keys
from longfit.compression.snapkv import SnapKVPolicy
from longfit.compression.spec import pyramid_kept
from longfit.compression.streaming_llm import StreamingLLMPolicy
from longfit.compression.think import ThinKPolicy
from longfit.compression.tova import TOVAPolicy
from tests.unit.compression_tensors import layer_tensors

_tensors = layer_tensors


# ---------------------------------------------------------------------------------------------------------------
# Slow references: plain Python floats and loops.


def ref_attention_rows(keys: torch.Tensor, queries: torch.Tensor, window: int) -> list[list[list[float]]]:
    """rows[h][i][j]: softmax attention of window query i (at position T-W+i) of query head h over key j."""
    num_kv, num_tokens, dim = keys.shape
    groups = queries.shape[0] // num_kv
    k, q = keys.tolist(), queries[:, -window:].tolist()
    rows = []
    for h in range(queries.shape[0]):
        head_rows = []
        for i in range(window):
            position = num_tokens - window + i
            logits = [sum(a * b for a, b in zip(q[h][i], k[h // groups][j])) / math.sqrt(dim)
                      for j in range(position + 1)]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            head_rows.append([e / total for e in exps] + [0.0] * (num_tokens - position - 1))
        rows.append(head_rows)
    return rows


def ref_top(scores: list[float], num_kept: int, protected: list[int] = ()) -> list[int]:
    """Protected positions first (the most recent first), then the highest scores, ties to the lower index."""
    chosen = sorted(protected, reverse=True)[:num_kept]
    rest = sorted((j for j in range(len(scores)) if j not in chosen), key=lambda j: (-scores[j], j))
    return sorted(chosen + rest[: num_kept - len(chosen)])


def ref_pool(row: list[float], kernel: int, pool: str) -> list[float]:
    half = kernel // 2
    out = []
    for j in range(len(row)):
        window = [row[j + o] if 0 <= j + o < len(row) else 0.0 for o in range(-half, half + 1)]
        out.append(sum(window) / kernel if pool == "avg" else max(x for x, inside in
                                                                  zip(window, range(-half, half + 1))
                                                                  if 0 <= j + inside < len(row)))
    return out


def ref_snapkv(keys, queries, num_kept, window, kernel, pool) -> list[list[int]]:
    num_kv, num_tokens, _ = keys.shape
    groups = queries.shape[0] // num_kv
    rows = ref_attention_rows(keys, queries, window)
    kept = []
    for kv in range(num_kv):
        per_head = []
        for h in range(kv * groups, (kv + 1) * groups):
            mean = [sum(rows[h][i][j] for i in range(window)) / window for j in range(num_tokens - window)]
            per_head.append(ref_pool(mean, kernel, pool))
        scores = [sum(p[j] for p in per_head) / groups for j in range(num_tokens - window)] + [0.0] * window
        kept.append(ref_top(scores, num_kept, list(range(num_tokens - window, num_tokens))))
    return kept


@pytest.mark.parametrize("num_kept, window, kernel, pool, groups", [
    (20, 8, 5, "avg", 2), (9, 8, 1, "avg", 1), (30, 4, 3, "max", 3), (5, 8, 5, "avg", 2),
])
def test_snapkv_matches_reference(num_kept: int, window: int, kernel: int, pool: str, groups: int) -> None:
    keys, values, queries = _tensors(2, groups, 48, 8, seed=1)
    policy = SnapKVPolicy(budget=num_kept, window=window, kernel=kernel, pool=pool)
    plan = policy.plan(0, 1, keys, values, queries)
    assert plan.kept_indices.tolist() == ref_snapkv(keys, queries, num_kept, window, kernel, pool)


def ref_chunkkv(keys, queries, num_kept, window, chunk) -> list[int]:
    """Window kept; then whole chunks of past tokens by mean attention (summed over heads and window queries), ties
    to the earlier chunk; the chunk at the budget's edge keeps its best tokens (ties to the earlier token)."""
    num_tokens = keys.shape[1]
    rows = ref_attention_rows(keys, queries, window)
    past = num_tokens - window
    token = [sum(rows[h][i][j] for h in range(queries.shape[0]) for i in range(window)) for j in range(past)]
    chunks = [list(range(start, min(start + chunk, past))) for start in range(0, past, chunk)]
    ranked = sorted(range(len(chunks)), key=lambda c: (-sum(token[j] for j in chunks[c]) / len(chunks[c]), c))
    kept = list(range(past, num_tokens))[-num_kept:]
    for c in ranked:
        room = num_kept - len(kept)
        if room <= 0:
            break
        kept += sorted(chunks[c], key=lambda j: (-token[j], j))[:room]
    return sorted(kept)


@pytest.mark.parametrize("num_kept, window, chunk, groups", [
    (20, 8, 5, 2), (9, 8, 3, 1), (31, 4, 7, 3), (5, 8, 4, 2), (44, 4, 1, 2), (30, 6, 50, 1),
])
def test_chunkkv_matches_reference(num_kept: int, window: int, chunk: int, groups: int) -> None:
    keys, values, queries = _tensors(2, groups, 48, 8, seed=5)
    plan = ChunkKVPolicy(budget=num_kept, window=window, chunk=chunk).plan(0, 1, keys, values, queries)
    expected = ref_chunkkv(keys, queries, num_kept, window, chunk)
    assert plan.kept_indices.tolist() == [expected, expected]  # the same chunks for every KV head


def test_chunkkv_keeps_whole_chunks() -> None:
    """Kept past tokens form whole chunks but for at most one, the budget's edge."""
    keys, values, queries = _tensors(3, 2, 300, 16, seed=6)
    plan = ChunkKVPolicy(keep=0.25, window=16, chunk=10).plan(0, 1, keys, values, queries)
    past = [j for j in plan.kept_indices[0].tolist() if j < 300 - 16]
    counts = {}
    for j in past:
        counts[j // 10] = counts.get(j // 10, 0) + 1
    sizes = sorted(counts.values())
    assert plan.num_kept == 75 and len(past) == 75 - 16
    assert sizes[1:] == [10] * (len(sizes) - 1) and sizes[0] == 59 % 10


def test_pyramidkv_selects_like_snapkv_with_its_layer_budget() -> None:
    keys, values, queries = _tensors(2, 2, 60, 8, seed=2)
    policy = PyramidKVPolicy(keep=0.4, window=6, beta=2)
    for layer in range(4):
        num_kept = pyramid_kept(layer, 4, 60, 0.4, None, 6, 2)
        plan = policy.plan(layer, 4, keys, values, queries)
        assert plan.kept_indices.tolist() == ref_snapkv(keys, queries, num_kept, 6, 5, "avg")


def test_h2o_matches_reference() -> None:
    keys, values, queries = _tensors(2, 2, 40, 8, seed=3)
    policy = H2OPolicy(budget=16, recent_ratio=0.25, observe=12)
    rows = ref_attention_rows(keys, queries, 12)
    recent = int(16 * 0.25)
    expected = []
    for kv in range(2):
        accumulated = [sum(rows[h][i][j] for h in (2 * kv, 2 * kv + 1) for i in range(12)) / 2 for j in range(40)]
        expected.append(ref_top(accumulated[: 40 - recent] + [0.0] * recent, 16, list(range(40 - recent, 40))))
    assert policy.plan(0, 1, keys, values, queries).kept_indices.tolist() == expected


def test_tova_matches_reference() -> None:
    keys, values, queries = _tensors(2, 2, 30, 8, seed=4)
    rows = ref_attention_rows(keys, queries, 1)
    last = [sum(rows[h][0][j] for h in range(4)) / 4 for j in range(29)] + [0.0]
    expected = ref_top(last, 10, [29])
    assert TOVAPolicy(budget=10).plan(0, 1, keys, values, queries).kept_indices.tolist() == [expected, expected]


def test_knorm_matches_reference() -> None:
    keys, values, _ = _tensors(3, 1, 25, 8, seed=5, dtype=torch.bfloat16)
    norms = [[math.sqrt(sum(x * x for x in token)) for token in head] for head in keys.float().tolist()]
    expected = [ref_top([-n for n in head], 10) for head in norms]
    assert KnormPolicy(budget=10).plan(0, 1, keys, values, None).kept_indices.tolist() == expected
    assert KnormPolicy(budget=10, skip_layers=1).plan(0, 2, keys, values, None).is_keep_all


def test_streaming_matches_reference() -> None:
    keys, values, _ = _tensors(2, 1, 50, 8)
    plan = StreamingLLMPolicy(sinks=3, window=7).plan(0, 1, keys, values, None)
    assert plan.kept_indices.tolist() == [[0, 1, 2] + list(range(43, 50))] * 2


def test_duo_attention_matches_reference() -> None:
    scores = ((0.9, 0.1), (0.2, 0.3), (0.25, 0.05))
    keys, values, _ = _tensors(2, 1, 40, 8)
    head = DuoAttentionPolicy(head_scores=scores, sparsity=0.5, sinks=2, window=5, granularity="head")
    assert head.streaming_mask() == [[False, True], [True, False], [False, True]]  # the 3 lowest of 6 heads
    layer = DuoAttentionPolicy(head_scores=scores, sparsity=0.34, sinks=2, window=5)
    assert layer.streaming_mask() == [[False, False], [False, False], [True, True]]  # layer 2's best head is lowest
    kept = [layer.plan(i, 3, keys, values, None).kept_indices.tolist() for i in range(3)]
    assert kept[2] == [[0, 1, 35, 36, 37, 38, 39]] * 2 and len(kept[0][0]) == len(kept[1][0]) == 40
    assert all(head.plan(i, 3, keys, values, None).is_keep_all for i in range(3))  # mixed layers stay whole


def test_think_matches_frobenius_reference() -> None:
    """Paper form: channel j of KV head h scores ||Q[:, j] K[:, j]ᵀ||_F over the group's window queries."""
    keys, _, queries = _tensors(2, 2, 20, 8, seed=6)
    pruned = ThinKPolicy(channels=0.5, window=4).prune(keys, queries)
    k, q = keys.tolist(), queries[:, -4:].tolist()
    for kv in range(2):
        scores = []
        for j in range(8):
            group = (q[2 * kv], q[2 * kv + 1])
            products = [qh[i][j] * k[kv][t][j] for qh in group for i in range(4) for t in range(20)]
            scores.append(math.sqrt(sum(p * p for p in products)))
        assert pruned.channels[kv].tolist() == ref_top(scores, 4)
    # scoring with the kept channels equals scoring with the pruned channels zeroed
    decode_query = torch.randn(4, 1, 8)
    zeroed = pruned.restore().repeat_interleave(2, dim=0)
    projected = pruned.project_queries(decode_query) @ pruned.keys.repeat_interleave(2, dim=0).transpose(1, 2)
    assert torch.allclose(projected, decode_query @ zeroed.transpose(1, 2), atol=1e-5)


def test_shadowkv_reaches_the_optimal_rank_error() -> None:
    keys = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(7))
    flat = keys.transpose(0, 1).reshape(64, 24).double()
    singular = torch.linalg.svdvals(flat)
    for rank in (1, 4, 10):
        factors = factorize_keys(keys, rank)
        assert factors is not None
        error = float((factors.reconstruct().double() - keys.double()).norm())
        assert error == pytest.approx(float(singular[rank:].norm()), rel=1e-4)  # Eckart–Young
    assert factorize_keys(keys, 24) is None  # factors would not be smaller


def test_minicache_against_reference() -> None:
    a = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(8))
    b = a + 0.3 * torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(9))
    b[0, 7] = -a[0, 7]  # an opposite token: must be retained
    # slow SLERP of one pair of vectors
    ua, ub = a[1, 3] / a[1, 3].norm(), b[1, 3] / b[1, 3].norm()
    omega = math.acos(float((ua * ub).sum()))
    expected = (math.sin(omega / 2) * (ua + ub)) / math.sin(omega)
    direction, _ = slerp_direction(a[1, 3], b[1, 3])
    assert torch.allclose(direction, expected / expected.norm(), atol=1e-5)
    pair = MiniCachePolicy(retain=0.1, group=10).merge(a, a.clone(), b, b.clone())  # 3 groups, 1 retained each
    assert pair is not None and pair.retained.shape == (2, 3, 1) and pair.retained[0, 0].tolist() == [7]
    keys_a, _, keys_b, _ = unmerge_layers(pair)
    assert torch.equal(keys_a[0, 7], a[0, 7]) and torch.equal(keys_b[0, 7], b[0, 7])
    assert not torch.equal(keys_b[1, 3], b[1, 3])  # merged
    tail = MiniCachePolicy(retain=0.1, group=8).merge(a, a.clone(), b, b.clone())  # 24 merged, the last 6 exact
    assert tail is not None and torch.equal(unmerge_layers(tail)[2][:, 24:], b[:, 24:])
    same = MiniCachePolicy(retain=0.0, group=10).merge(a, a, a, a)
    assert same is not None and torch.allclose(unmerge_layers(same)[0], a, atol=1e-5)  # identical layers: lossless


def test_quest_bound_and_selection_against_reference() -> None:
    g = torch.Generator().manual_seed(10)
    keys, query = torch.randn(2, 70, 8, generator=g), torch.randn(4, 8, generator=g)
    low, high = page_bounds(keys, 16)
    assert low.shape == (2, 5, 8)
    bounds = page_upper_bounds(query, low, high)  # [4, 5]
    for h in range(4):
        for page in range(5):
            tokens = keys[h // 2, page * 16:(page + 1) * 16]
            ref = sum(max(float(query[h, i] * low[h // 2, page, i]), float(query[h, i] * high[h // 2, page, i]))
                      for i in range(8))
            assert float(bounds[h, page]) == pytest.approx(ref, rel=1e-5, abs=1e-5)
            assert float(bounds[h, page]) >= float((tokens @ query[h]).max()) - 1e-5  # an upper bound
    for keep_last in (False, True):
        selected = select_pages(query, low, high, 2, keep_last=keep_last).tolist()
        for kv in range(2):
            score = [max(float(bounds[2 * kv, p]), float(bounds[2 * kv + 1, p])) for p in range(5)]
            assert selected[kv] == ref_top(score, 2, [4] if keep_last else [])
    mask = pages_to_tokens(torch.tensor([[0, 4]]), 16, 70)
    assert mask.shape == (1, 70) and int(mask.sum()) == 16 + 6 and bool(mask[0, 69])
    policy = QuestPolicy(budget=48, page=16)
    assert policy.num_pages_kept(5) == 3 and policy.is_dense(1, 5) and not policy.is_dense(2, 5)
