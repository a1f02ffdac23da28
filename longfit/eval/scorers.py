"""RULER string-match scorers: does the model's answer contain the expected strings? No torch.

Definitions follow RULER (NVIDIA/RULER ``scripts/eval/synthetic/constants.py`` and ``evaluate.py``):

- ``string_match_all``: the fraction of references that occur in the prediction (case-insensitive substring).
  Used for niah, variable tracking, common- and frequent-words extraction. Despite its name it gives
  partial credit: 2 of 4 values found scores 0.5.
- ``string_match_part``: 1 if any reference occurs in the prediction, else 0. Used for QA, where the references
  are alternative accepted answers.
- ``string_match_strict`` (longfit addition, not in RULER): 1 only if every reference occurs.

Predictions are post-processed like RULER first: strip, replace control characters ``[\\x00-\\x1f]`` by a
newline, strip again. Task scores are the mean over samples, reported ×100 with two decimals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters to newlines, strip again."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: Sequence[str]) -> list[bool]:
    if isinstance(references, str):
        # NOTE: a bare string would be iterated character by character and score almost anything as found.
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("references must hold at least one expected answer")
    text = postprocess(prediction).lower()
    return [reference.lower() in text for reference in references]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``prediction`` (RULER ``string_match_all``), in [0, 1]."""
    found = _found(prediction, references)
    return sum(found) / len(found)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` is found in ``prediction`` (RULER ``string_match_part``), else 0.0."""
    return 1.0 if any(_found(prediction, references)) else 0.0


def string_match_strict(prediction: str, references: Sequence[str]) -> float:
    """1.0 only if every one of ``references`` is found in ``prediction``, else 0.0 (no partial credit)."""
    return 1.0 if all(_found(prediction, references)) else 0.0


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "string_match_strict": string_match_strict,
}


def score_prediction(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one prediction with the metric named ``metric`` (a key of ``METRICS``); result in [0, 1]."""
    try:
        scorer = METRICS[metric]
    except KeyError:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}") from None
    return scorer(prediction, references)


def aggregate(scores: Sequence[float]) -> float:
    """RULER task score: mean of per-sample scores ×100, rounded to two decimals."""
    if len(scores) == 0:
        raise ValueError("scores must hold at least one sample score")
    return round(100.0 * sum(scores) / len(scores), 2)
