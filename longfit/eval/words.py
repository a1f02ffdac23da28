"""Aggregation tasks: common-words (cwe) and frequent-words (fwe) extraction, after RULER. No torch.

Paper: "RULER: What's the Real Context Size of Your Long-Context Language Models?"; NVIDIA/RULER
``scripts/data/synthetic/common_words_extraction.py`` and ``freq_words_extraction.py``.

- cwe: a numbered list where ``num_cw`` words appear ``freq_cw`` times and the others ``freq_ucw`` times; name the
  common ones. RULER's settings: 30/3 with a 40-word 10/3 example from 4096 tokens, 6/1 with a 20-word 3/1 example
  below. Below what RULER supports, longfit drops the example and then lowers the common frequency (3, then 2).
- fwe: coded 6-letter words with Zipf counts ``int(N k^-alpha / zeta(alpha))``; rank 1 is the noise word "..." and
  the answer is ranks 2 to 4.
"""

from __future__ import annotations

import math
import random
import string

import numpy as np

from longfit.eval import haystack as hay
from longfit.eval.tasks import PromptTooLongError, Sample, SampleRequest

_CWE_INTRO = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "Question: What are the {num} most common words in the above list?"
_CWE_PREFIX = " Answer: The top {num} words that appear most often in the list are:"
_FWE_INTRO = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
# NOTE: RULER's question says '....' (four dots) while the noise word is '...' (three); kept verbatim.
_FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(common: list[str], uncommon: list[str], freq_cw: int, freq_ucw: int, order_seed: str) -> str:
    entries = common * freq_cw + uncommon * freq_ucw
    random.Random(order_seed).shuffle(entries)  # a fixed shuffle per sample, so the list for n is reproducible
    return _numbered(entries)


def _cwe_ladder(length: int, freq_cw: int | None, freq_ucw: int | None, fewshot: bool) -> list[tuple]:
    """(example (num_words, freq_cw, freq_ucw) or None, main (freq_cw, freq_ucw)) settings, RULER's first."""
    example, main = ((40, 10, 3), (30, 3)) if length >= 4096 else ((20, 3, 1), (6, 1))
    if freq_cw is not None or freq_ucw is not None:
        main = (freq_cw or main[0], freq_ucw or main[1])
    ladder: list[tuple] = [(example, main)] if fewshot else []
    ladder.append((None, main))
    if freq_cw is None:
        ladder += [(None, (f, 1)) for f in (3, 2) if f < main[0]]
    return ladder


def generate_cwe(
    request: SampleRequest,
    *,
    num_cw: int = 10,
    freq_cw: int | None = None,
    freq_ucw: int | None = None,
    fewshot: bool = True,
    max_new_tokens: int = 120,
) -> Sample:
    """One common-words sample. ``freq_cw`` / ``freq_ucw`` override RULER's length-dependent repetitions."""
    task, rng = request.task, request.rng
    if not 1 <= num_cw <= 100:
        raise ValueError(f"{task}: num_cw must be in [1, 100], got {num_cw}")
    for name, value in (("freq_cw", freq_cw), ("freq_ucw", freq_ucw)):
        if value is not None and not 1 <= value <= 1000:
            raise ValueError(f"{task}: {name} must be None or in [1, 1000], got {value}")
    bundled = sorted(set(hay.ADJECTIVES) | set(hay.NOUNS) | set(hay.VERBS))
    order = rng.sample(bundled, len(bundled))
    common, uncommon = order[:num_cw], order[num_cw:]
    question, prefix = _CWE_QUESTION.format(num=num_cw), _CWE_PREFIX.format(num=num_cw)
    budget = request.budget(max_new_tokens)
    example_rng = request.derived_rng("example")
    example_pool = sorted(set(bundled) - set(common))
    for example_setting, main_freq in _cwe_ladder(request.length, freq_cw, freq_ucw, fewshot):
        example = ""
        if example_setting is not None:
            num_words, example_cw, example_ucw = example_setting
            words = example_rng.sample(example_pool, num_words)
            listed = _cwe_list(words[:num_cw], words[num_cw:], example_cw, example_ucw, f"{request.seed_text}:ex")
            example = _CWE_INTRO + listed + "\n" + question + prefix + " " + _numbered(words[:num_cw]) + "\n"
        try:
            context, meta = _fit_cwe(request, example, common, uncommon, main_freq, question + prefix, budget)
        except PromptTooLongError:
            continue
        return Sample(
            task=task,
            index=request.index,
            context=context,
            question=question,
            answer_prefix=prefix,
            answers=tuple(common),
            metric="string_match_all",
            target_length=request.length,
            max_new_tokens=max_new_tokens,
            meta=meta,
        )
    shortest = request.count_tokens(_CWE_INTRO + _cwe_list(common, [], 2, 1, "") + "\n" + question + prefix)
    raise PromptTooLongError(shortest, budget)


def _fit_cwe(
    request: SampleRequest,
    example: str,
    common: list[str],
    uncommon: list[str],
    freq: tuple[int, int],
    tail: str,
    budget: int,
) -> tuple[str, dict]:
    """Fit the number of uncommon words of one cwe setting; returns (context, meta)."""

    def render(n: int) -> str:
        listed = _cwe_list(common, uncommon[:n], freq[0], freq[1], f"{request.seed_text}:order")
        return example + _CWE_INTRO + listed + "\n"

    num_uncommon, num_tokens = request.fit(lambda n: render(n) + tail, budget, 0, len(uncommon))
    if num_uncommon == len(uncommon) and budget - num_tokens > 0.05 * budget:
        # The bundled words ran out: extend with the stdlib vocabulary (parses the whole library, once).
        extra = hay.common_word_tiers()[1]
        uncommon = uncommon + random.Random(f"{request.seed_text}:more").sample(extra, len(extra))
        num_uncommon, num_tokens = request.fit(lambda n: render(n) + tail, budget, 0, len(uncommon))
    meta = {
        "num_units": num_uncommon,
        "num_words": len(common) + num_uncommon,
        "freq": list(freq),
        "fewshot": bool(example),
        "num_prompt_tokens": num_tokens,
    }
    return render(num_uncommon), meta


def zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1: a direct sum plus the Euler-Maclaurin tail (accurate to ~1e-12)."""
    if alpha <= 1.0:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    k = np.arange(1, 1000, dtype=np.float64)
    cut = 1000.0
    return float(
        np.sum(k**-alpha) + cut ** (1 - alpha) / (alpha - 1) + 0.5 * cut**-alpha + alpha * cut ** (-alpha - 1) / 12
    )


def zipf_counts(num_words: int, vocab_size: int, alpha: float) -> np.ndarray:
    """RULER's counts ``int(num_words * k^-alpha / zeta(alpha))`` for ranks k = 1..vocab_size; int64 [vocab_size]."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    return (num_words * ranks**-alpha / zeta(alpha)).astype(np.int64)


def _min_unambiguous_words(alpha: float) -> int:
    """Smallest word count from which ranks 2..5 have strictly decreasing counts at every larger count too."""
    weights = np.arange(1, 6, dtype=np.float64) ** -alpha / zeta(alpha)
    return math.ceil(max(1.0 / (weights[k] - weights[k + 1]) for k in range(1, 4)))


def generate_fwe(
    request: SampleRequest,
    *,
    alpha: float = 2.0,
    coded_wordlen: int = 6,
    vocab_size: int | None = None,
    max_new_tokens: int = 50,
) -> Sample:
    """One frequent-words sample (RULER: alpha 2, 6-letter words, vocabulary ``length // 50``, at least 5 here)."""
    task, rng = request.task, request.rng
    if not 1.0 < alpha <= 10.0:
        raise ValueError(f"{task}: alpha must be in (1, 10], got {alpha}")
    if not 3 <= coded_wordlen <= 20:
        raise ValueError(f"{task}: coded_wordlen must be in [3, 20], got {coded_wordlen}")
    size = max(5, request.length // 50) if vocab_size is None else vocab_size
    if not 5 <= size <= 100_000:
        raise ValueError(f"{task}: vocab_size must be None or in [5, 100000], got {vocab_size}")
    coded: set[str] = set()
    while len(coded) < size:
        coded.add("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(coded)
    rng.shuffle(vocab)
    vocab[0] = "..."  # RULER: the most frequent "word" is noise

    def render(num_words: int) -> str:
        counts = zipf_counts(num_words, size, alpha)
        words = [word for word, count in zip(vocab, counts.tolist()) for _ in range(count)]
        random.Random(f"{request.seed_text}:order").shuffle(words)
        return _FWE_INTRO + " ".join(words) + "\n"

    budget = request.budget(max_new_tokens)
    num_words, num_tokens = request.fit(
        lambda n: render(n) + _FWE_QUESTION + _FWE_PREFIX, budget, _min_unambiguous_words(alpha), 2 * budget
    )
    meta = {
        "num_units": num_words,
        "vocab_size": size,
        "top_counts": zipf_counts(num_words, size, alpha)[:5].tolist(),
        "num_prompt_tokens": num_tokens,
    }
    return Sample(
        task=task,
        index=request.index,
        context=render(num_words),
        question=_FWE_QUESTION,
        answer_prefix=_FWE_PREFIX,
        answers=tuple(vocab[1:4]),
        metric="string_match_all",
        target_length=request.length,
        max_new_tokens=max_new_tokens,
        meta=meta,
    )
