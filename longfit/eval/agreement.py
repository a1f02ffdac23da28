"""Agreement of a compressed KV cache with the full cache: top-1 next-token agreement and mean KL divergence.

Protocol (teacher forcing, as in the perplexity windows of ``perplexity.py``): each window of ``length`` tokens is
split at ``P = length - tail``; the prefix's KV is compressed (``kv_compression_boundary = P``) and the rest is
prefilled on top of it. At every position ``t = P + 1 ... length - 1`` (position ``P`` is predicted from the
prefix's last hidden state before compression, identical for every spec, so it is left out) both runs return the
top-20 log-probabilities (``prompt_logprobs=20``) plus the actual token.

- **top-1 agreement**: fraction of positions where the compressed run's most likely token equals the full run's.
- **KL(full ‖ compressed), top-k approximation.** Only the top-20 of each distribution is known, so KL is
  computed on a common coarsening of the vocabulary: one bucket per token known in *both* runs (the union of the
  two top-k sets and the actual token, minus tokens reported by only one run), plus one tail bucket holding all
  remaining probability mass (``1 - sum of the known buckets``, for each run). A token reported by only one run
  falls into the tail bucket of both, so the two coarsened distributions live on the same partition. By the
  data-processing inequality this is a **lower bound** on the true KL; it is exactly 0 when the runs agree.
  Reported: the mean over scored positions of all windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from longfit.eval.perplexity import text_windows, window_layout

TASK = "agreement"
TOP_K = 20
_TINY = 1e-12  # floor for a tail bucket that rounds to zero mass in the compressed run


def top1(position: Mapping[int, Any]) -> int:
    """Most likely token of one position's logprob dict (rank 1; the highest logprob if ranks are missing)."""
    for token, entry in position.items():
        if entry.rank == 1:
            return token
    return max(position, key=lambda token: position[token].logprob)


def topk_kl(full: Mapping[int, Any], compressed: Mapping[int, Any]) -> float:
    """KL(full ‖ compressed) on the common partition "tokens known in both + one tail bucket" (module docstring)."""
    common = [token for token in full if token in compressed]
    p = [math.exp(full[token].logprob) for token in common]
    q = [math.exp(compressed[token].logprob) for token in common]
    kl = sum(pi * (math.log(pi) - math.log(max(qi, _TINY))) for pi, qi in zip(p, q) if pi > 0.0)
    p_tail, q_tail = max(0.0, 1.0 - sum(p)), max(_TINY, 1.0 - sum(q))
    if p_tail > _TINY:
        kl += p_tail * (math.log(p_tail) - math.log(q_tail))
    return max(0.0, kl)


def compare(full: Sequence[Mapping[int, Any]], compressed: Sequence[Mapping[int, Any]]) -> tuple[int, float, int]:
    """(positions whose top-1 agree, sum of KL, number of positions) over aligned position dicts."""
    if len(full) != len(compressed):
        raise ValueError(f"compressed run must cover the same positions: {len(compressed)} vs {len(full)}")
    agree = sum(top1(f) == top1(c) for f, c in zip(full, compressed))
    return agree, sum(topk_kl(f, c) for f, c in zip(full, compressed)), len(full)


def run_agreement(handle: Any, store: Any, options: Any, progress: Callable[[int], None]) -> None:
    """Add one ``kind="agreement"`` row per (length, spec, window); score = top-1 agreement, ``kl`` = mean KL."""
    from longfit.eval.harness import ENGINE, FULL, unsupported_reason
    from longfit.sampling_params import SamplingParams

    for length in options.lengths:
        tokens, boundary = window_layout(handle, length)
        windows = text_windows(handle, tokens, options.samples)

        def base_row(spec: str, index: int) -> dict[str, Any]:
            return {"engine": ENGINE, "kind": "agreement", "task": TASK, "length": length, "spec": spec,
                    "index": index, "context_tokens": boundary, "prompt_tokens": tokens,
                    "kv_bytes": handle.kv_bytes(spec, boundary), "kv_bytes_full": handle.kv_bytes(FULL, boundary)}

        def run(spec: str, indices: list[int]) -> list[list[Mapping[int, Any]]]:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K,
                                    kv_compression_boundary=None if spec == FULL else boundary)
            outputs = handle.llm.generate([windows[i] for i in indices], params,
                                          kv_compression=None if spec == FULL else spec)
            return [list(output.prompt_logprobs[boundary + 1:]) for output in outputs]

        todo = {spec: [i for i in range(len(windows)) if not store.has(ENGINE, "agreement", TASK, length, spec, i)]
                for spec in options.specs}
        reasons = {spec: unsupported_reason(handle.llm, spec) for spec in options.specs}
        needed = sorted({i for spec, indices in todo.items() if reasons[spec] is None for i in indices})
        reference = dict(zip(needed, run(FULL, needed))) if needed else {}
        for i in range(len(windows)):  # the baseline agrees with itself by definition
            if not store.has(ENGINE, "agreement", TASK, length, FULL, i):
                store.add({**base_row(FULL, i), "status": "ok", "score": 1.0, "kl": 0.0,
                           "num_scored": tokens - boundary - 1})
        progress(len(windows))
        for spec in options.specs:
            rows = [base_row(spec, i) for i in todo[spec]]
            if reasons[spec] is not None:
                for row in rows:
                    row.update(status="unsupported", message=reasons[spec], score=None)
            elif rows:
                for row, i, dists in zip(rows, todo[spec], run(spec, todo[spec])):
                    agree, kl_sum, count = compare(reference[i], dists)
                    row.update(status="ok", score=agree / count, kl=kl_sum / count, num_scored=count)
            for row in rows:
                store.add(row)
            store.save()
            progress(len(windows))
