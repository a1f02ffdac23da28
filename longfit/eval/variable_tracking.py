"""Variable tracking (multi-hop tracing), after RULER ``scripts/data/synthetic/variable_tracking.py``. No torch.

Paper: "RULER: What's the Real Context Size of Your Long-Context Language Models?". A chain
``VAR A = 12345``, ``VAR B = VAR A``, ... (``num_hops`` hops) is scattered, in order, among noise lines; the question
asks for every variable that ends up holding the value. One in-context example with 3-letter names (RULER's ICL
example, at most 500 tokens) is prepended when it fits in a quarter of the budget.
"""

from __future__ import annotations

import random
import string

from longfit.eval import haystack as hay
from longfit.eval.tasks import PromptTooLongError, Sample, SampleRequest, fit_units

_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
# RULER generates its in-context example with max_seq_length=500 and 30 tokens to generate.
_ICL_MAX_TOKENS = 470


def _chains(rng: random.Random, num_chains: int, num_hops: int, name_length: int) -> tuple[list[list[str]], list[str]]:
    """Variable names per chain (unique over all chains) and each chain's 5-digit value (unique too)."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    values: list[str] = []
    while len(values) < num_chains:
        value = str(rng.randint(10000, 99999))
        if value not in values:
            values.append(value)
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    return chains, values


def _statements(chain: list[str], value: str) -> list[str]:
    return [f"VAR {chain[0]} = {value}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]}" for j in range(len(chain) - 1)]


class _Instance:
    """One task instance; ``text(n)`` renders it with ``n`` noise lines (statements at fixed fractions of n)."""

    def __init__(self, rng: random.Random, num_chains: int, num_hops: int, name_length: int) -> None:
        self.chains, self.values = _chains(rng, num_chains, num_hops, name_length)
        self.items: list[tuple[float, str]] = []
        for chain, value in zip(self.chains, self.values):
            fractions = sorted(rng.random() for _ in chain)  # statements of one chain keep their order
            self.items += list(zip(fractions, _statements(chain, value)))
        self.question = _QUESTION.format(query=self.values[0])
        self.prefix = _PREFIX.format(num_v=len(self.chains[0]), query=self.values[0])

    def context(self, num_lines: int, base: int = 0) -> tuple[str, list[list[int]]]:
        placed = [(int(num_lines * fraction), statement) for fraction, statement in self.items]
        pieces, where = hay.insert_items(hay.noise_units(num_lines), placed)
        text, offsets = hay.join_with_offsets(pieces, "\n", where, base=base + len(_INTRO))
        return _INTRO + text + "\n", offsets


def _icl_example(request: SampleRequest, budget: int, num_chains: int, num_hops: int) -> str:
    """RULER's in-context example (3-letter names, its answer appended), or "" if it cannot fit ``budget``."""
    example = _Instance(request.derived_rng("icl"), num_chains, min(num_hops, 10), name_length=3)

    def render(num_lines: int) -> str:
        answer = " ".join(example.chains[0])
        return example.context(num_lines)[0] + example.question + example.prefix.rstrip() + " " + answer + "\n\n"

    try:
        num_lines, _ = fit_units(render, request.count_tokens, budget, 0, budget, hint=request.hints.get("icl"))
    except PromptTooLongError:
        return ""
    request.hints["icl"] = num_lines
    return render(num_lines)


def generate_vt(
    request: SampleRequest,
    *,
    num_chains: int = 1,
    num_hops: int = 4,
    fewshot: bool = True,
    max_new_tokens: int = 30,
) -> Sample:
    """One variable-tracking sample (RULER defaults: 1 chain, 4 hops, 30 tokens to generate).

    Args:
        num_chains: chains in the haystack; only the first is asked about, the others are distractors.
        num_hops: assignments after the first, so the answer names ``num_hops + 1`` variables.
        fewshot: prepend the in-context example when it fits (at most a quarter of the budget, 470 tokens).
    """
    if not 1 <= num_chains <= 10:
        raise ValueError(f"{request.task}: num_chains must be in [1, 10], got {num_chains}")
    if not 1 <= num_hops <= 20:
        raise ValueError(f"{request.task}: num_hops must be in [1, 20], got {num_hops}")
    budget = request.budget(max_new_tokens)
    icl = _icl_example(request, min(_ICL_MAX_TOKENS, budget // 4), num_chains, num_hops) if fewshot else ""
    instance = _Instance(request.rng, num_chains, num_hops, name_length=5)
    tail = instance.question + instance.prefix
    num_lines, num_tokens = request.fit(lambda n: icl + instance.context(n)[0] + tail, budget, 0, budget)
    context, offsets = instance.context(num_lines, base=len(icl))
    meta = {
        "num_units": num_lines,
        "statement_offsets": offsets,
        "chains": instance.chains,
        "values": instance.values,
        "fewshot": bool(icl),
        "num_prompt_tokens": num_tokens,
    }
    return Sample(
        task=request.task,
        index=request.index,
        context=icl + context,
        question=instance.question,
        answer_prefix=instance.prefix,
        answers=tuple(instance.chains[0]),
        metric="string_match_all",
        target_length=request.length,
        max_new_tokens=max_new_tokens,
        meta=meta,
    )
