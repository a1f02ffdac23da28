"""Needle-in-a-haystack generators: RULER's niah family and the passkey task. No torch.

niah follows RULER ``scripts/data/synthetic/niah.py`` (paper "RULER: What's the Real Context Size of Your
Long-Context Language Models?"): needles "One of the special magic {numbers} for {key} is: {value}." hidden in
noise lines, prose sentences or distractor needles; the question asks for every value of the queried key(s).
passkey follows the landmark-attention / KIVI / Quest passkey test ("The pass key is NNNNN. Remember it.").
"""

from __future__ import annotations

import numpy as np

from longfit.eval import haystack as hay
from longfit.eval.tasks import Sample, SampleRequest, check_depth

# RULER: needle depths (percent) drawn without replacement for the essay haystack.
DEPTHS: list[int] = np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int).tolist()
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_HAYSTACKS = ("noise", "essay", "needle")
_SEPARATORS = {"noise": "\n", "essay": " ", "needle": "\n"}
_PLURAL = (
    (
        "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards.\n"
    ),
    "What are all the special magic {kind} for {query} mentioned in the provided text?",
    " The special magic {kind} for {query} mentioned in the provided text are",
)
# RULER makes the template singular when exactly one value is asked for (q * v == 1).
_SINGULAR = (
    (
        "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {kind} afterwards.\n"
    ),
    "What is the special magic {kind} for {query} mentioned in the provided text?",
    " The special magic {kind} for {query} mentioned in the provided text is",
)
_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
_PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."


def _distinct(draw, count: int, taken: set[str]) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in taken:
            taken.add(value)
            values.append(value)
    return values


def _check_niah_options(task: str, haystack: str, key_type: str, value_type: str, counts: tuple[int, ...]) -> None:
    if haystack not in _HAYSTACKS:
        raise ValueError(f"{task}: haystack must be one of {_HAYSTACKS}, got {haystack!r}")
    for name, kind in (("key_type", key_type), ("value_type", value_type)):
        if kind not in hay.RANDOM_VALUES:
            raise ValueError(f"{task}: {name} must be one of {sorted(hay.RANDOM_VALUES)}, got {kind!r}")
    if min(counts) < 1 or max(counts[0], counts[2]) * counts[1] > len(DEPTHS):
        raise ValueError(f"{task}: num_keys, num_values, num_queries must be >= 1 with needles <= 40, got {counts}")


def generate_niah(
    request: SampleRequest,
    *,
    haystack: str,
    key_type: str,
    value_type: str,
    num_keys: int,
    num_values: int,
    num_queries: int,
    depth: float | None = None,
    max_new_tokens: int = 128,
) -> Sample:
    """One RULER niah sample.

    Args:
        haystack: "noise" (RULER ``repeat`` lines), "essay" (stdlib prose sentences) or "needle" (distractor
            needles with other keys).
        key_type, value_type: "numbers" (7 digits), "words" (adjective-noun) or "uuids".
        num_keys, num_values, num_queries: RULER's k, v, q; k is raised to q.
        depth: None draws RULER's depths (essay: from ``DEPTHS`` without replacement; other haystacks: uniform);
            a fraction in [0, 1] puts every answer needle at that depth (adjacent, in shuffled order) and the
            needles of unqueried keys at random depths. Depth is counted in haystack units.
        max_new_tokens: RULER's ``tokens_to_generate`` (128).
    """
    task, rng = request.task, request.rng
    depth = check_depth(task, depth)
    _check_niah_options(task, haystack, key_type, value_type, (num_keys, num_values, num_queries))
    num_keys = max(num_keys, num_queries)
    taken: set[str] = set()
    keys = _distinct(lambda: hay.random_value(key_type, rng), num_keys, taken)
    values = [_distinct(lambda: hay.random_value(value_type, rng), num_values, taken) for _ in keys]
    needles = [(k, value) for k in range(num_keys) for value in values[k]]
    rng.shuffle(needles)
    queried = rng.sample(range(num_keys), num_queries)
    answers = tuple(value for k in queried for value in values[k])
    query_keys = [keys[k] for k in queried]
    query = query_keys[0] if num_queries == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]

    random_fractions = (
        [d / 100 for d in rng.sample(DEPTHS, len(needles))] if haystack == "essay" else [rng.random() for _ in needles]
    )
    fractions = [depth if depth is not None and k in queried else f for (k, _), f in zip(needles, random_fractions)]
    intro, question, prefix = _SINGULAR if num_queries * num_values == 1 else _PLURAL
    kind = value_type[:-1] if num_queries * num_values == 1 else value_type
    intro, question, prefix = (part.format(kind=kind, query=query) for part in (intro, question, prefix))
    needle_texts = [NEEDLE.format(kind=value_type, key=keys[k], value=value) for k, value in needles]

    distractors: list[str] = []
    distractor_rng = request.derived_rng("distractors")

    def units(n: int) -> list[str]:
        if haystack == "noise":
            return hay.noise_units(n)
        if haystack == "essay":
            return hay.essay_units(n)
        while len(distractors) < n:  # a lazily grown stream, so units(n) is a prefix of units(n + 1)
            key, value = hay.random_value(key_type, distractor_rng), hay.random_value(value_type, distractor_rng)
            if key not in taken and value not in taken:  # a distractor must never carry a real key or answer
                distractors.append(NEEDLE.format(kind=value_type, key=key, value=value))
        return distractors[:n]

    def assemble(n: int) -> tuple[str, list[list[int]], list[int]]:
        positions = [int(n * f) for f in fractions]
        pieces, where = hay.insert_items(units(n), list(zip(positions, needle_texts)))
        text, offsets = hay.join_with_offsets(pieces, _SEPARATORS[haystack], where, base=len(intro))
        return intro + text + "\n", offsets, positions

    budget = request.budget(max_new_tokens)
    num_units, num_tokens = request.fit(lambda n: assemble(n)[0] + question + prefix, budget, 0, budget)
    context, offsets, positions = assemble(num_units)
    answer_needles = [i for i, (k, _) in enumerate(needles) if k in queried]
    meta = {
        "haystack": haystack,
        "num_units": num_units,
        "needle_offsets": offsets,
        "needle_units": positions,
        "answer_needles": answer_needles,
        "haystack_span": [len(intro), len(context) - 1],
        "query_keys": query_keys,
        "num_prompt_tokens": num_tokens,
    }
    sample_depth = depth if depth is not None else min(fractions[i] for i in answer_needles)
    return Sample(
        task=task,
        index=request.index,
        context=context,
        question=question,
        answer_prefix=prefix,
        answers=answers,
        metric="string_match_all",
        target_length=request.length,
        max_new_tokens=max_new_tokens,
        depth=sample_depth,
        meta=meta,
    )


def generate_passkey(request: SampleRequest, *, depth: float | None = None, max_new_tokens: int = 16) -> Sample:
    """One passkey sample: a 5-digit key in repeated filler, asked for in completion style.

    Args:
        depth: fraction of filler lines before the key line; None draws it uniformly.
        max_new_tokens: answer budget (the key is 5 digits).
    """
    depth = check_depth(request.task, depth)
    passkey = hay.random_number(request.rng, num_digits=5)
    fraction = depth if depth is not None else request.rng.random()
    line = _PASSKEY_LINE.format(key=passkey)
    question, prefix = "What is the pass key?", " The pass key is"

    def assemble(n: int) -> tuple[str, list[int], int]:
        position = int(n * fraction)
        before, after = " ".join(hay.noise_units(position)), " ".join(hay.noise_units(n - position))
        start = len(_PASSKEY_INTRO) + (len(before) + 1 if before else 0)
        body = "\n".join(part for part in (before, line, after) if part)
        return _PASSKEY_INTRO + body + "\n", [start, start + len(line)], position

    budget = request.budget(max_new_tokens)
    num_units, num_tokens = request.fit(lambda n: assemble(n)[0] + question + prefix, budget, 0, budget)
    context, offsets, position = assemble(num_units)
    meta = {
        "haystack": "noise",
        "num_units": num_units,
        "needle_offsets": [offsets],
        "needle_units": [position],
        "answer_needles": [0],
        "haystack_span": [len(_PASSKEY_INTRO), len(context) - 1],
        "num_prompt_tokens": num_tokens,
    }
    return Sample(
        task=request.task,
        index=request.index,
        context=context,
        question=question,
        answer_prefix=prefix,
        answers=(passkey,),
        metric="string_match_all",
        target_length=request.length,
        max_new_tokens=max_new_tokens,
        depth=fraction,
        meta=meta,
    )
