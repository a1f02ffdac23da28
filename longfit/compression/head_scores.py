"""DuoAttention head-score files: the per (layer, KV head) retrieval scores ``longfit profile-heads`` writes and the
``duo_attention`` policy loads. No torch.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HEAD_SCORES_FORMAT = "longfit.head_scores"


@dataclass(frozen=True, slots=True)
class HeadScores:
    """Per (layer, KV head) retrieval score in [0, 1]; higher = needs the full context (a retrieval head)."""

    scores: tuple[tuple[float, ...], ...]
    model: str
    metadata: tuple[tuple[str, Any], ...] = ()


def write_head_scores(path: str | os.PathLike[str], scores: Sequence[Sequence[float]], model: str,
                      **metadata: Any) -> None:
    """Write the JSON head-score file ``read_head_scores`` loads.

    Format (version 1)::

        {"format": "longfit.head_scores", "version": 1, "model": "smollm2-135m",
         "num_layers": L, "num_kv_heads": H, "scores": [[s_00, ..., s_0H-1], ...],   # L rows of H floats in [0, 1]
         "metadata": {"method": "passkey-profile", "sink_size": 64, "recent_size": 256, ...}}
    """
    checked = check_head_scores(scores, str(path))
    doc = {"format": HEAD_SCORES_FORMAT, "version": 1, "model": model, "num_layers": len(checked),
           "num_kv_heads": len(checked[0]), "scores": [list(row) for row in checked], "metadata": metadata}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


def read_head_scores(path: str | os.PathLike[str]) -> HeadScores:
    """Load and validate a head-score file (cached per path and modification time)."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as e:
        raise ValueError(f"kv_compression: duo_attention:heads cannot read {str(path)!r}: {e.strerror}") from None
    return _read_head_scores(str(path), mtime)


@functools.lru_cache(maxsize=16)
def _read_head_scores(path: str, mtime: int) -> HeadScores:
    del mtime  # part of the cache key only
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"kv_compression: duo_attention:heads {path!r} is not a readable JSON file: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != HEAD_SCORES_FORMAT or doc.get("version") != 1:
        raise ValueError(f"kv_compression: {path!r} is not a {HEAD_SCORES_FORMAT} version 1 file")
    scores = check_head_scores(doc.get("scores"), path)
    if (doc.get("num_layers"), doc.get("num_kv_heads")) != (len(scores), len(scores[0])):
        raise ValueError(f"kv_compression: {path!r}: num_layers/num_kv_heads do not match the scores table")
    meta = doc.get("metadata") or {}
    return HeadScores(scores, str(doc.get("model", "")), tuple(sorted((str(k), v) for k, v in meta.items())))


def check_head_scores(scores: Any, where: str) -> tuple[tuple[float, ...], ...]:
    """The scores as a tuple table; ValueError unless a non-empty rectangular [layers][kv_heads] table in [0, 1]."""
    rows = scores if isinstance(scores, (list, tuple)) else []
    ok = bool(rows) and all(isinstance(r, (list, tuple)) and len(r) == len(rows[0]) and r for r in rows)
    ok = ok and all(isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x <= 1.0 for r in rows for x in r)
    if not ok:
        raise ValueError(f"kv_compression: head scores in {where!r} must be a non-empty [layers][kv_heads] table "
                         "of numbers in [0, 1]")
    return tuple(tuple(float(x) for x in row) for row in rows)


def require_heads_path(p: dict[str, Any]) -> str:
    """The ``heads`` path of a duo_attention stage's parameters; ValueError when missing."""
    if not p.get("heads"):
        raise ValueError("kv_compression: duo_attention needs heads=PATH of the model's head-score file "
                         "(made by `longfit profile-heads`)")
    return str(p["heads"])
