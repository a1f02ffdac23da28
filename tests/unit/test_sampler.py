"""Sampler: each parameter against a slow per-row reference."""

from __future__ import annotations

import pytest
import torch

from longfit.runtime import native
from longfit.runtime.sampler import SamplingTensors, apply_penalties, compute_logprobs, greedy, sample
from longfit.sampling_params import SamplingParams

V = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def _draw(logits, params, seeds=None, n=1):
    tensors = SamplingTensors.from_params(params, V)
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in (seeds or [None] * len(params))]
    return torch.stack([sample(logits, tensors, gens) for _ in range(n)])  # [n, B]


def _allowed_reference(row: torch.Tensor, p: SamplingParams) -> set[int]:
    """The tokens a parameter set may ever produce, computed the slow way."""
    probs = (row / p.temperature).softmax(-1).tolist()
    order = sorted(range(V), key=lambda t: -probs[t])
    allowed = set(order[:p.top_k] if p.top_k > 0 else order)
    if p.min_p > 0:
        allowed &= {t for t in range(V) if probs[t] >= p.min_p * max(probs)}
    if p.top_p < 1:
        kept, mass = set(), 0.0
        renorm = sum(probs[t] for t in allowed)
        for t in order:
            if t in allowed and mass < p.top_p:
                kept.add(t)
                mass += probs[t] / renorm
        allowed = kept
    return allowed


def test_greedy_rows_take_argmax():
    logits = _logits(4)
    out = _draw(logits, [SamplingParams(temperature=0)] * 4)
    assert out[0].tolist() == logits.argmax(-1).tolist()


def test_greedy_in_c_is_torchs_argmax():
    """``greedy``'s C path (``native.argmax_rows``) against ``max(dim).indices``: ties give the first index, a NaN
    counts as maximal (the first NaN wins), -inf rows and a row of one token."""
    if native.library() is None:
        pytest.skip("the C kernels are not built here")
    logits = torch.randn(8, 49152, generator=torch.Generator().manual_seed(3))
    logits[1, [10, 20, 30]] = 50.0  # a tie
    logits[2, [40, 7]] = float("nan")
    logits[3] = float("-inf")
    logits[4, -1] = 99.0  # the last index
    logits[5, 0] = float("inf")
    for x in (logits, logits[:, :1].contiguous(), logits[:, :17].contiguous()):
        assert torch.equal(native.argmax_rows(x), x.max(dim=-1).indices)
        assert torch.equal(greedy(x), x.max(dim=-1).indices)
    assert native.argmax_rows(logits)[:3].tolist() == [logits[0].argmax().item(), 10, 7]


@pytest.mark.parametrize("params", [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(min_p=0.2),
                                    SamplingParams(top_k=5, top_p=0.8, temperature=0.7)])
def test_masks_match_reference(params):
    logits = _logits(3, seed=1)
    draws = _draw(logits, [params] * 3, n=300)
    for row in range(3):
        produced = set(draws[:, row].tolist())
        allowed = _allowed_reference(logits[row], params)
        assert produced <= allowed
        assert len(produced) > 1 or len(allowed) == 1


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    draws = _draw(logits, [SamplingParams(temperature=1.0)], seeds=[123], n=1)
    gen = torch.Generator().manual_seed(5)
    tensors = SamplingTensors.from_params([SamplingParams()], V)
    counts = torch.bincount(torch.stack([sample(logits, tensors, [gen]) for _ in range(4000)]).flatten(), minlength=V)
    expected = logits.softmax(-1)[0] * 4000
    chi2 = (((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum()
    assert chi2 < 16.3  # χ² with 3 degrees of freedom at p = 0.001
    assert draws.numel() == 1


def test_seeded_rows_are_reproducible_and_batch_independent():
    logits = _logits(3, seed=2)
    params = [SamplingParams(seed=7), SamplingParams(), SamplingParams(seed=7)]
    first = _draw(logits[[0, 1, 2]], params, seeds=[7, None, 7])
    again = _draw(logits[[0, 0]], [params[0], params[0]], seeds=[7, 7])
    assert first[0, 0] == again[0, 0]


def test_penalties_match_reference():
    logits = _logits(1, seed=3)
    prompt, output = [1, 2, 3], [3, 3, 4]
    p = SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    got = logits.clone()
    apply_penalties(got, [0], [p], [prompt], [output])
    want = logits.clone()[0]
    for token in set(prompt) | set(output):
        want[token] = want[token] / 1.5 if want[token] > 0 else want[token] * 1.5
    for token in set(output):
        want[token] -= 0.5 + 0.25 * output.count(token)
    assert torch.allclose(got[0], want)


def test_logprobs_and_ranks():
    logits = _logits(2, seed=4)
    tokens = torch.tensor([int(logits[0].argmax()), int(logits[1].argmin())])
    entries = compute_logprobs(logits, tokens, [3, 0])
    ref = logits.log_softmax(-1)
    assert entries[0][int(tokens[0])].rank == 1 and len(entries[0]) == 3
    assert entries[1][int(tokens[1])].rank == V and len(entries[1]) == 1
    assert abs(entries[1][int(tokens[1])].logprob - float(ref[1, tokens[1]])) < 1e-6


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                         ("min_p", 2.0), ("max_tokens", -1), ("n", 0), ("repetition_penalty", 0),
                                         ("presence_penalty", 3), ("frequency_penalty", -3), ("logprobs", 21),
                                         ("seed", -1), ("stop", [""]), ("stop_token_ids", [-1]),
                                         ("temperature", float("nan"))])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
