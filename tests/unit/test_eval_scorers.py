"""RULER string-match scorers: a table of right, wrong and partial answers, and RULER's own batch formulas."""

from __future__ import annotations

import random

import pytest

from longfit.eval import scorers
from longfit.eval.tasks import Sample, score

NUMBERS = ["1234567", "7654321", "5555555", "1010101"]

# (metric, prediction, references, expected score)
TABLE = [
    # niah single: right, wrong, right among noise, case-insensitive words
    ("string_match_all", " 1234567.", ["1234567"], 1.0),
    ("string_match_all", " 7654321.", ["1234567"], 0.0),
    ("string_match_all", "", ["1234567"], 0.0),
    ("string_match_all", "I think it is 1234567, or maybe 42.", ["1234567"], 1.0),
    ("string_match_all", "FEARLESS-CANOE", ["fearless-canoe"], 1.0),
    ("string_match_all", "fearless canoe", ["fearless-canoe"], 0.0),
    # multi-value: partial credit is the fraction of values found (RULER's string_match_all)
    ("string_match_all", "1234567, 7654321, 5555555 and 1010101", NUMBERS, 1.0),
    ("string_match_all", "1234567 and 5555555", NUMBERS, 0.5),
    ("string_match_all", "5555555", NUMBERS, 0.25),
    ("string_match_all", "1234567\n7654321\n5555555", NUMBERS, 0.75),
    ("string_match_all", "none of them", NUMBERS, 0.0),
    # variable tracking: upper-case names found in lower case, order irrelevant
    ("string_match_all", "qwert asdfg zxcvb", ["ZXCVB", "QWERT", "ASDFG", "POIUY"], 0.75),
    # control characters are turned into newlines (RULER postprocess), so they never glue two answers together
    ("string_match_all", "\x00 1234567\x1b7654321 ", ["1234567", "7654321"], 1.0),
    # QA: any accepted answer is enough, none is zero
    ("string_match_part", "Answer: Kelford", ["Kelford", "Kelford town"], 1.0),
    ("string_match_part", " kelford.", ["Kelford"], 1.0),
    ("string_match_part", "Morvale", ["Kelford", "Kelford town"], 0.0),
    ("string_match_part", "1234567", NUMBERS, 1.0),
    # strict: every reference or nothing
    ("string_match_strict", "1234567 and 5555555", NUMBERS, 0.0),
    ("string_match_strict", " ".join(NUMBERS), NUMBERS, 1.0),
]


@pytest.mark.parametrize(("metric", "prediction", "references", "expected"), TABLE)
def test_score_table(metric: str, prediction: str, references: list[str], expected: float) -> None:
    assert scorers.score_prediction(metric, prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(("metric", "prediction", "references", "expected"), TABLE)
def test_sample_score_dispatches_on_metric(
    metric: str, prediction: str, references: list[str], expected: float
) -> None:
    sample = Sample("t", 0, "ctx\n", "Q?", " A:", tuple(references), metric, 128, 16)
    assert score(sample, prediction) == pytest.approx(expected)


def test_postprocess_like_ruler() -> None:
    assert scorers.postprocess("\t abc\x01def \n") == "abc\ndef"
    assert scorers.postprocess("  \x00\x1f  ") == ""
    assert scorers.postprocess("keep  inner  spaces") == "keep  inner  spaces"


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="metric"):
        scorers.score_prediction("rouge", "x", ["x"])
    with pytest.raises(TypeError, match="single string"):
        scorers.string_match_all("abc", "abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one"):
        scorers.string_match_part("abc", [])
    with pytest.raises(ValueError, match="scores"):
        scorers.aggregate([])
    with pytest.raises(ValueError, match="Sample.metric"):
        score(Sample("t", 0, "", "", "", ("x",), "bleu", 128, 16), "x")


def test_aggregate_is_mean_times_100_rounded() -> None:
    assert scorers.aggregate([1.0, 0.5, 0.0]) == 50.0
    assert scorers.aggregate([1 / 3]) == 33.33
    assert scorers.aggregate([2 / 3, 1.0]) == 83.33


def _ruler_string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    # Transcription of RULER scripts/eval/synthetic/constants.py (batch form, unscaled).
    return sum(
        sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref) for p, ref in zip(preds, refs)
    ) / len(preds)


def _ruler_string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    return sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs)) / len(preds)


def test_matches_ruler_batch_formulas_on_random_cases() -> None:
    rng = random.Random(0)
    vocab = ["alpha", "Beta", "GAMMA", "delta", "1234567", "epsilon-zeta"]
    preds, refs = [], []
    for _ in range(200):
        refs.append(rng.sample(vocab, rng.randint(1, 4)))
        preds.append(
            " ".join(word.upper() if rng.random() < 0.3 else word for word in rng.sample(vocab, rng.randint(0, 5)))
        )
    ours_all = sum(scorers.string_match_all(p, r) for p, r in zip(preds, refs)) / len(preds)
    ours_part = sum(scorers.string_match_part(p, r) for p, r in zip(preds, refs)) / len(preds)
    assert ours_all == pytest.approx(_ruler_string_match_all(preds, refs))
    assert ours_part == pytest.approx(_ruler_string_match_part(preds, refs))
    assert 0.0 < ours_all < 1.0 and 0.0 < ours_part < 1.0  # the random table really mixes right and wrong
