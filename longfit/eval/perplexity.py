"""Perplexity under a compressed KV cache (StreamingLLM ``eval_long_ppl.py`` style, paper "Efficient Streaming
Language Models with Attention Sinks"), on long windows of real prose every machine has (``corpus.long_text``).

What is measured, exactly. The text is tokenized once and cut into consecutive, non-overlapping windows of
``length`` tokens (window i = tokens ``[i·length, (i+1)·length)``, BOS prepended when the model adds one). In each
window the first ``P = length - tail`` tokens are the *context*, ``tail = min(256, length // 4)``:

1. the context is prefilled and its KV compressed with the spec (``kv_compression_boundary = P``);
2. the tail is then prefilled uncompressed on top of the compressed cache (teacher forcing), and
3. ``prompt_logprobs`` give ``log p(x_t | x_<t)`` for every tail position.

Scored positions are ``P + 1 ... length - 1``: the prediction of token ``P`` comes from the context's last hidden
state, computed before compression, so it is identical for every spec and is left out. The reported number is
``exp(mean negative log-likelihood)`` over the scored tokens of all windows (token-weighted), per (length, spec).
The full cache runs the same windows without compression. A spec the engine refuses is recorded "unsupported".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from longfit.eval.corpus import long_text

TASK = "perplexity"
TAIL_TOKENS = 256


def tail_tokens(length: int) -> int:
    """Teacher-forced continuation tokens per window."""
    return max(2, min(TAIL_TOKENS, length // 4))


def window_layout(handle: Any, length: int) -> tuple[int, int]:
    """``(tokens, boundary)`` of a window for ``--lengths`` entry ``length``: at most ``max_model_len - 1`` tokens
    (the engine needs room for the one sampled token, so an 8k window on an 8192-token model has 8191), the
    context being the first ``boundary`` of them."""
    tokens = min(length, handle.max_model_len - 1)
    return tokens, tokens - tail_tokens(tokens)


def text_windows(handle: Any, length: int, count: int) -> list[list[int]]:
    """``count`` consecutive windows of ``length`` token ids (BOS included) from ``corpus.long_text``."""
    body = length - len(handle.bos)
    if body < 8:
        raise ValueError(f"--lengths must be >= {8 + len(handle.bos)} tokens for perplexity, got {length}")
    chars = 6 * body * count + 4096  # ~4 chars per token for prose; one retry with more text if short
    for _ in range(3):
        ids = handle.encode(long_text(chars))
        if len(ids) >= body * count:
            return [handle.bos + ids[i * body:(i + 1) * body] for i in range(count)]
        chars *= 2
    raise ValueError(f"the standard-library corpus is too short for {count} windows of {length} tokens")


def scored_logprobs(prompt_logprobs: Sequence[dict | None], ids: Sequence[int], start: int) -> list[float]:
    """``log p(ids[t] | ids[:t])`` for t in ``start .. len(ids) - 1``."""
    return [prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))]


def run_perplexity(handle: Any, store: Any, options: Any, progress: Callable[[int], None]) -> None:
    """Add one ``kind="perplexity"`` row per (length, spec, window) to ``store``; see the module docstring."""
    from longfit.eval.harness import ENGINE, FULL, unsupported_reason
    from longfit.sampling_params import SamplingParams

    for length in options.lengths:
        tokens, boundary = window_layout(handle, length)
        windows = text_windows(handle, tokens, options.samples)
        for spec in options.all_specs:
            todo = [i for i in range(len(windows)) if not store.has(ENGINE, "perplexity", TASK, length, spec, i)]
            reason = unsupported_reason(handle.llm, spec)
            rows = [{"engine": ENGINE, "kind": "perplexity", "task": TASK, "length": length, "spec": spec,
                     "index": i, "context_tokens": boundary, "prompt_tokens": tokens,
                     "kv_bytes": handle.kv_bytes(spec, boundary), "kv_bytes_full": handle.kv_bytes(FULL, boundary)}
                    for i in todo]
            if todo and reason is None:
                params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                        kv_compression_boundary=None if spec == FULL else boundary)
                outputs = handle.llm.generate([windows[i] for i in todo], params,
                                              kv_compression=None if spec == FULL else spec)
                for row, i, output in zip(rows, todo, outputs):
                    logprobs = scored_logprobs(output.prompt_logprobs, windows[i], boundary + 1)
                    nll = -sum(logprobs)
                    row.update(status="ok", nll_sum=nll, num_scored=len(logprobs),
                               score=math.exp(nll / len(logprobs)))
            for row in rows:
                if reason is not None:
                    row.update(status="unsupported", message=reason, score=None)
                store.add(row)
            store.save()
            progress(len(windows))


def corpus_perplexity(rows: Sequence[dict[str, Any]]) -> float | None:
    """Token-weighted perplexity of several window rows (``exp(sum nll / sum tokens)``); None if none are ok."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    return math.exp(sum(r["nll_sum"] for r in ok) / sum(r["num_scored"] for r in ok))
