"""Fidelity results files for ``longfit plan --fidelity``: records, loading, and retention per spec.

The format is docs/PLANNING.md §4. No torch here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class FidelityRecord:
    """One row of a fidelity results file (docs/PLANNING.md): a spec's score on one task at one context length.

    ``retention`` = score ÷ the full-cache score of the same task and length (methods.md §12.3); when absent it
    is computed from ``score`` and the file's ``spec: "none"`` row for that task and length.
    """

    spec: str
    task: str
    length: int
    score: float | None = None
    retention: float | None = None


def load_fidelity(path: str | Path) -> list[FidelityRecord]:
    """Read a JSON list of ``{spec, task, length, score, retention}`` (or ``{"results": [...]}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"fidelity file {str(path)!r} could not be read as JSON: {exc}") from None
    if isinstance(data, dict) and "results" in data:
        data = data["results"]
    if not isinstance(data, list):
        raise ValueError(f"fidelity file {str(path)!r} must hold a list of {{spec, task, length, score, retention}}")
    records = []
    for index, item in enumerate(data):
        where = f"fidelity file {str(path)!r} entry {index}"
        if not isinstance(item, dict) or not {"spec", "task", "length"} <= set(item):
            raise ValueError(f"{where} must be an object with spec, task, length and score or retention")
        score, kept = item.get("score"), item.get("retention")
        if score is None and kept is None:
            raise ValueError(f"{where} needs a score or a retention")
        if not isinstance(item["length"], int) or item["length"] <= 0:
            raise ValueError(f"{where}: length must be a positive integer, got {item['length']!r}")
        records.append(FidelityRecord(str(item["spec"]), str(item["task"]), item["length"],
                                      None if score is None else float(score), None if kept is None else float(kept)))
    return records


def retention_by_spec(records: Sequence[FidelityRecord], context: int,
                      canonical: Callable[[str], str] | None = None) -> dict[str, tuple[float, int, int | None]]:
    """Spec → (mean retention over tasks, number of tasks, length used), at the measured length nearest the
    planned context (log distance; ties to the longer). ``canonical`` spells specs one way (default: the
    planner's ``canonical_spec``)."""
    if canonical is None:
        from longfit.plan.planner import canonical_spec  # lazy: the planner imports this module

        canonical = canonical_spec
    baseline = {(r.task, r.length): r.score for r in records if canonical(r.spec) == "none" and r.score}
    by_spec: dict[str, dict[int, list[float]]] = {}
    for r in records:
        kept = r.retention
        if kept is None and r.score is not None and baseline.get((r.task, r.length)):
            kept = r.score / baseline[(r.task, r.length)]  # type: ignore[operator]
        if kept is not None:
            by_spec.setdefault(canonical(r.spec), {}).setdefault(r.length, []).append(kept)
    result = {}
    for spec, lengths in by_spec.items():
        length = min(lengths, key=lambda n: (abs(math.log(n / context)), -n))
        values = lengths[length]
        result[spec] = (sum(values) / len(values), len(values), length)
    return result
