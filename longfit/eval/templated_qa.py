"""Templated QA over generated facts: longfit's stand-in for RULER's qa_1 / qa_2. No torch.

RULER's QA tasks (paper "RULER: What's the Real Context Size of Your Long-Context Language Models?") put the gold
paragraphs of SQuAD (qa_1) or HotpotQA (qa_2) among distractor paragraphs. longfit bundles no dataset, so the
documents state generated facts ("The {attribute} of {entity} is {value}.") about fictitious people. One gold
document answers a one-hop question; for two hops a second gold document links the entity to its mentor, whose
document holds the answer. Documents are formatted ``Document {i}:\\n{doc}`` and scored with ``string_match_part``.
"""

from __future__ import annotations

import random

from longfit.eval import haystack as hay
from longfit.eval.tasks import Sample, SampleRequest, check_depth

_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
_INTRO = _INSTRUCTION + "\n\nThe following are given documents.\n\n"
_SYLLABLES = hay.word_list(
    "ba bel cor da del dor el fa fen gar hal is jo ka kel lan lo mar mei mor na nel no or pa per quin ra ren ri sa "
    "sel tan tor ul va vel vin wen yar zan zor"
)
_PROFESSIONS = hay.word_list(
    "architect baker beekeeper blacksmith carpenter cartographer chemist clockmaker engineer falconer gardener "
    "geologist glassblower historian jeweler librarian locksmith navigator pharmacist potter sculptor tailor "
    "translator weaver"
)
_COLORS = hay.word_list(
    "amber azure beige crimson emerald indigo lavender magenta maroon ochre olive scarlet teal turquoise"
)
_PETS = hay.word_list("cat dog parrot tortoise rabbit ferret hamster goldfish canary iguana hedgehog pony")
_INSTRUMENTS = hay.word_list("accordion banjo cello clarinet drums flute harp oboe piano saxophone trombone violin")
_TOWN_SUFFIXES = hay.word_list("ford ton vale burg mere wick haven field stead bridge")
_COMPANY_SUFFIXES = ("Works", "Industries", "Laboratories", "Trading Company", "Foundry", "Press", "Shipyards")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"


# attribute -> value generator; "mentor" links two people and is only used by the two-hop variant.
_ATTRIBUTES = {
    "hometown": lambda rng: _word(rng, 2) + rng.choice(_TOWN_SUFFIXES),
    "profession": lambda rng: rng.choice(_PROFESSIONS),
    "favorite color": lambda rng: rng.choice(_COLORS),
    "pet": lambda rng: rng.choice(_PETS),
    "favorite instrument": lambda rng: rng.choice(_INSTRUMENTS),
    "employer": lambda rng: f"{_word(rng, 2)} {rng.choice(_COMPANY_SUFFIXES)}",
    "birth year": lambda rng: str(rng.randint(1850, 1999)),
}


class _People:
    """Draws people with unique names, so a question's entity is never described twice."""

    def __init__(self) -> None:
        self.taken: set[str] = set()

    def new(self, rng: random.Random) -> str:
        while (name := _person(rng)) in self.taken:
            pass
        self.taken.add(name)
        return name


def _document(
    rng: random.Random, person: str, num_facts: int, must: tuple[str, ...] = (), mentor: str | None = None
) -> tuple[str, dict[str, str]]:
    """A document of ``num_facts`` facts about ``person`` (including the attributes in ``must``), shuffled."""
    others = [name for name in _ATTRIBUTES if name not in must]
    chosen = list(must) + rng.sample(others, max(0, num_facts - len(must)))
    facts = {name: _ATTRIBUTES[name](rng) for name in chosen}
    if mentor is not None:
        facts["mentor"] = mentor
    sentences = [f"The {name} of {person} is {value}." for name, value in facts.items()]
    rng.shuffle(sentences)
    return " ".join(sentences), facts


def generate_qa(
    request: SampleRequest,
    *,
    hops: int,
    depth: float | None = None,
    num_facts: int = 4,
    max_new_tokens: int = 32,
) -> Sample:
    """One templated QA sample (RULER's qa template and 32 tokens to generate).

    Args:
        hops: 1 (the entity's own document answers) or 2 (its mentor's document answers).
        depth: fraction of distractor documents before the first gold document; None draws it uniformly.
        num_facts: facts per document, in [2, 7].
    """
    task, rng = request.task, request.rng
    depth = check_depth(task, depth)
    if hops not in (1, 2):
        raise ValueError(f"{task}: hops must be 1 or 2, got {hops}")
    if not 2 <= num_facts <= len(_ATTRIBUTES):
        raise ValueError(f"{task}: num_facts must be in [2, {len(_ATTRIBUTES)}], got {num_facts}")
    people = _People()
    attribute = rng.choice(list(_ATTRIBUTES))
    entity = people.new(rng)
    if hops == 1:
        gold_text, facts = _document(rng, entity, num_facts, must=(attribute,))
        golds = [gold_text]
        answer = facts[attribute]
        query = f"What is the {attribute} of {entity}?"
    else:
        mentor = people.new(rng)
        link_text, _ = _document(rng, entity, num_facts - 1, mentor=mentor)
        mentor_text, facts = _document(rng, mentor, num_facts, must=(attribute,))
        golds = [link_text, mentor_text]
        answer = facts[attribute]
        query = f"What is the {attribute} of the mentor of {entity}?"
    forbidden = [answer.lower(), entity.lower()] + ([mentor.lower()] if hops == 2 else [])
    fractions = [depth if depth is not None else rng.random()] + [rng.random() for _ in golds[1:]]

    distractors: list[str] = []
    distractor_rng = request.derived_rng("distractors")

    def units(n: int) -> list[str]:
        while len(distractors) < n:  # a lazily grown stream: units(n) is a prefix of units(n + 1)
            person = people.new(distractor_rng)
            mentor = people.new(distractor_rng) if hops == 2 and distractor_rng.random() < 0.5 else None
            facts_count = num_facts - 1 if mentor is not None else num_facts
            text = _document(distractor_rng, person, facts_count, mentor=mentor)[0]
            # NOTE: a distractor never contains the answer or a gold name, so only the gold documents answer.
            if not any(marker in text.lower() for marker in forbidden):
                distractors.append(text)
        return distractors[:n]

    def assemble(n: int) -> tuple[str, list[list[int]], list[int]]:
        positions = [int(n * fraction) for fraction in fractions]
        pieces, where = hay.insert_items(units(n), list(zip(positions, golds)))
        headers = [f"Document {i + 1}:\n" for i in range(len(pieces))]
        text, offsets = hay.join_with_offsets([h + p for h, p in zip(headers, pieces)], "\n\n", where, len(_INTRO))
        offsets = [[start + len(headers[i]), end] for (start, end), i in zip(offsets, where)]
        return _INTRO + text + "\n\n" + _INSTRUCTION + "\n\n", offsets, positions

    question, prefix = f"Question: {query}", " Answer:"
    budget = request.budget(max_new_tokens)
    num_documents, num_tokens = request.fit(lambda n: assemble(n)[0] + question + prefix, budget, 0, budget)
    context, offsets, positions = assemble(num_documents)
    meta = {
        "num_units": num_documents,
        "gold_offsets": offsets,
        "gold_units": positions,
        "attribute": attribute,
        "hops": hops,
        "num_prompt_tokens": num_tokens,
    }
    return Sample(
        task=task,
        index=request.index,
        context=context,
        question=question,
        answer_prefix=prefix,
        answers=(answer,),
        metric="string_match_part",
        target_length=request.length,
        max_new_tokens=max_new_tokens,
        depth=fractions[0],
        meta=meta,
    )
