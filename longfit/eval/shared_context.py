"""``longfit eval --shared-context``: one context compressed once, then several questions in turn. No torch.

Follows SCBench's multi-turn protocol (paper "SCBench: A KV Cache-Centric Analysis of Long-Context Methods"): a
long context is shared by K questions, asked one after the other; earlier turns are fed with their *golden*
answers, so turn i's prompt is

    [BOS] + context + (q_1 + prefix_1 + gold_1) + ... + (q_{i-1} + prefix_{i-1} + gold_{i-1}) + q_i + prefix_i

and the model decodes the answer to q_i greedily. Where the KV is compressed (``kv_compression_boundary``):

- question-agnostic (default): at the end of the context. Every turn sees the same compressed context, compressed
  without knowing any question: the SCBench setting where a cache is built once and reused.
- query-aware (``--query-aware``): at the end of the FIRST question, so the compressed context is tuned to q_1
  and must still answer q_2..q_K (SCBench's key finding is that query-aware methods lose much of their accuracy
  on the later turns). The rest of every turn's prompt is prefilled uncompressed.

How turns are run. Each turn is its own request with the same token ids up to the boundary and the same
boundary. Compression in longfit is a function of the tokens up to the boundary (the compactor sees the KV and
the observation-window queries of those tokens only), so turn i gets exactly the compressed context that turn 1
built. The compressed pages are *rebuilt per turn* (same values, one prefill + compaction per turn), not shared in
memory across turns: the measured quantity is quality, not the saved prefill. The full cache runs the same
prompts without compression.

Samples. ``scbench_kv``: K key→value needles (RULER's "One of the special magic numbers for {key} is: {value}.",
``niah.NEEDLE``) in a prose haystack, one question per key. ``scbench_qa``: K gold documents of templated facts
about fictitious people (``templated_qa``) among distractor documents, one question per gold person. ``length``
follows RULER's convention applied to the *longest* turn: ``tokens(last turn's prompt) + max_new_tokens <=
length``, within about 5% (or one haystack unit), measured with ``count_tokens`` on the pieces exactly as they are
encoded (``turn_pieces``), so every turn fits. Generation is deterministic for (task, seed, index), never touches
the global random state, and only appends when more samples are asked for, like ``tasks.generate``.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from longfit.eval import haystack as hay
from longfit.eval import templated_qa as tqa
from longfit.eval.niah import DEPTHS, NEEDLE, _distinct
from longfit.eval.scorers import score_prediction
from longfit.eval.tasks import CountTokens, PromptTooLongError, SampleRequest, fit_units

KIND = "shared"  # ``kind`` of the result rows
MAX_QUESTIONS = 10
_KV_INTRO = ("Some special magic {kinds} are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the {kinds} afterwards.\n")
_KV_QUESTION = "What is the special magic {kind} for {key}?"
_KV_PREFIX = " The special magic {kind} for {key} is"
_KV_SEPARATORS = {"noise": "\n", "essay": " "}


# ------------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True, slots=True)
class SharedSample:
    """One context and its K questions. Turn ``t`` (1-based) asks ``questions[t-1]``.

    ``golds[j]`` is the text fed after ``answer_prefixes[j]`` when turn j+1 is an *earlier* turn (the golden
    answer plus the turn separator); ``answers[j]`` are the strings turn j+1 is scored against with ``metric``.
    ``depths[j]`` is the relative position of question j+1's needle (or gold document) in the haystack.
    """

    task: str
    index: int
    context: str
    questions: tuple[str, ...]
    answer_prefixes: tuple[str, ...]
    golds: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    metric: str
    target_length: int
    max_new_tokens: int
    depths: tuple[float, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.questions)

    def prompt(self, turn: int) -> str:
        """Turn ``turn``'s prompt text (no BOS): the context, then the pieces of ``turn_pieces``."""
        return self.context + "".join(turn_pieces(self, turn))

    def score(self, turn: int, prediction: str) -> float:
        """Score the generated text of turn ``turn`` against its expected answers; in [0, 1]."""
        return score_prediction(self.metric, prediction, self.answers[_check_turn(self, turn) - 1])

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("questions", "answer_prefixes", "golds", "depths"):
            record[name] = list(record[name])
        record["answers"] = [list(a) for a in self.answers]
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> SharedSample:
        tuples = {name: tuple(record[name]) for name in ("questions", "answer_prefixes", "golds", "depths")}
        return cls(**{**record, **tuples, "answers": tuple(tuple(a) for a in record["answers"])})


def _check_turn(sample: SharedSample, turn: int) -> int:
    if not 1 <= turn <= sample.num_turns:
        raise ValueError(f"{sample.task}: turn must be in [1, {sample.num_turns}], got {turn}")
    return turn


def _pieces(questions: Sequence[str], prefixes: Sequence[str], golds: Sequence[str], turn: int) -> list[str]:
    pieces: list[str] = []
    for j in range(turn):
        pieces.append(questions[j])
        pieces.append(prefixes[j] + (golds[j] if j < turn - 1 else ""))
    return pieces


def turn_pieces(sample: SharedSample, turn: int) -> list[str]:
    """The text after the context of turn ``turn``, in the pieces that are tokenized separately:
    ``[q_1, prefix_1 + gold_1, ..., q_turn, prefix_turn]``. Encoding q_1 on its own puts a token boundary exactly
    at the end of the first question (the query-aware compression boundary)."""
    s = sample
    return _pieces(s.questions, s.answer_prefixes, s.golds, _check_turn(s, turn))


def turn_ids(sample: SharedSample, turn: int, encode: Callable[[str], list[int]], bos: Sequence[int] = (),
             query_aware: bool = False) -> tuple[list[int], int]:
    """``(prompt ids, compression boundary)`` of turn ``turn``: ``bos + encode(context) + encode(piece)...``.

    The boundary is the end of the context, or with ``query_aware`` the end of the first question. Either way
    ``ids[:boundary]`` is the same for every turn of the sample, hence so is the compressed context.
    """
    context = list(bos) + encode(sample.context)
    ids, first_question_end = list(context), 0
    for position, piece in enumerate(turn_pieces(sample, turn)):
        ids += encode(piece)
        if position == 0:
            first_question_end = len(ids)
    return ids, (first_question_end if query_aware else len(context))


def _fit_context(request: SampleRequest, build: Callable[[int], str], dialogue: Sequence[str],
                 max_new_tokens: int) -> tuple[int, int]:
    """Largest unit count whose context plus the last turn's pieces fit ``length - max_new_tokens`` tokens;
    (num_units, tokens of the last turn's prompt). The pieces are counted one by one, as they are encoded."""
    budget = request.budget(max_new_tokens)
    dialogue_tokens = sum(request.count_tokens(piece) for piece in dialogue)
    num_units, num_tokens = fit_units(build, lambda text: request.count_tokens(text) + dialogue_tokens, budget, 0,
                                      budget, hint=request.hints.get("units"))
    request.hints["units"] = num_units
    return num_units, num_tokens


def _check_questions(task: str, num_questions: int) -> None:
    if not 1 <= num_questions <= MAX_QUESTIONS:
        raise ValueError(f"{task}: num_questions must be in [1, {MAX_QUESTIONS}], got {num_questions}")


def generate_kv(request: SampleRequest, *, num_questions: int = 4, haystack: str = "essay",
                key_type: str = "words", value_type: str = "numbers", max_new_tokens: int = 32) -> SharedSample:
    """K key→value needles in a haystack; question j asks for the value of key j (shuffled order).

    Args:
        num_questions: K, needles and questions (one value per key).
        haystack: "essay" (stdlib prose sentences) or "noise" (RULER's repeated line).
        key_type, value_type: "numbers", "words" or "uuids" (``haystack.RANDOM_VALUES``).
        max_new_tokens: answer budget per turn.
    """
    task, rng = request.task, request.rng
    _check_questions(task, num_questions)
    if haystack not in _KV_SEPARATORS:
        raise ValueError(f"{task}: haystack must be one of {sorted(_KV_SEPARATORS)}, got {haystack!r}")
    for name, kind in (("key_type", key_type), ("value_type", value_type)):
        if kind not in hay.RANDOM_VALUES:
            raise ValueError(f"{task}: {name} must be one of {sorted(hay.RANDOM_VALUES)}, got {kind!r}")
    taken: set[str] = set()
    keys = _distinct(lambda: hay.random_value(key_type, rng), num_questions, taken)
    values = _distinct(lambda: hay.random_value(value_type, rng), num_questions, taken)
    fractions = ([d / 100 for d in rng.sample(DEPTHS, num_questions)] if haystack == "essay"
                 else [rng.random() for _ in keys])
    order = rng.sample(range(num_questions), num_questions)  # the order the keys are asked in
    kind = value_type[:-1]
    intro = _KV_INTRO.format(kinds=value_type)
    needles = [NEEDLE.format(kind=value_type, key=key, value=value) for key, value in zip(keys, values)]
    questions = tuple(_KV_QUESTION.format(kind=kind, key=keys[k]) for k in order)
    prefixes = tuple(_KV_PREFIX.format(kind=kind, key=keys[k]) for k in order)
    golds = tuple(f" {values[k]}.\n" for k in order)

    def assemble(n: int) -> tuple[str, list[list[int]], list[int]]:
        positions = [int(n * f) for f in fractions]
        units = hay.essay_units(n) if haystack == "essay" else hay.noise_units(n)
        pieces, where = hay.insert_items(units, list(zip(positions, needles)))
        text, offsets = hay.join_with_offsets(pieces, _KV_SEPARATORS[haystack], where, base=len(intro))
        return intro + text + "\n", offsets, positions

    dialogue = _pieces(questions, prefixes, golds, num_questions)
    num_units, num_tokens = _fit_context(request, lambda n: assemble(n)[0], dialogue, max_new_tokens)
    context, offsets, positions = assemble(num_units)
    meta = {"haystack": haystack, "num_units": num_units, "needle_offsets": [offsets[k] for k in order],
            "needle_units": [positions[k] for k in order], "keys": [keys[k] for k in order],
            "num_prompt_tokens": num_tokens}
    return SharedSample(task=task, index=request.index, context=context, questions=questions,
                        answer_prefixes=prefixes, golds=golds, answers=tuple((values[k],) for k in order),
                        metric="string_match_all", target_length=request.length, max_new_tokens=max_new_tokens,
                        depths=tuple(fractions[k] for k in order), meta=meta)


def generate_qa(request: SampleRequest, *, num_questions: int = 4, num_facts: int = 4,
                max_new_tokens: int = 32) -> SharedSample:
    """K gold documents (one fictitious person each) among distractor documents; question j asks one attribute
    of gold person j. Answers are distinct across questions, and no distractor names a gold person or holds an
    answer, so only the gold documents answer (``templated_qa``'s guarantee, for every question).

    Args:
        num_questions: K, gold documents and questions.
        num_facts: facts per document, in [2, 7].
        max_new_tokens: answer budget per turn (RULER's QA budget).
    """
    task, rng = request.task, request.rng
    _check_questions(task, num_questions)
    if not 2 <= num_facts <= len(tqa._ATTRIBUTES):
        raise ValueError(f"{task}: num_facts must be in [2, {len(tqa._ATTRIBUTES)}], got {num_facts}")
    people = tqa._People()
    entities = [people.new(rng) for _ in range(num_questions)]
    names = " ".join(entities).lower()
    golds_docs, answers, queries = [], [], []
    for entity in entities:
        attribute = rng.choice(list(tqa._ATTRIBUTES))
        for _attempt in range(1000):
            text, facts = tqa._document(rng, entity, num_facts, must=(attribute,))
            # NOTE: distinct answers, none inside a question's name: earlier turns (their questions and golden
            # answers) are in every later prompt and must never answer the turn being asked.
            if facts[attribute] not in answers and facts[attribute].lower() not in names:
                break
        else:
            raise ValueError(f"{task}: could not draw {num_questions} distinct answers")
        golds_docs.append(text)
        answers.append(facts[attribute])
        queries.append(f"What is the {attribute} of {entity}?")
    forbidden = [a.lower() for a in answers] + [name.lower() for name in people.taken]
    fractions = [rng.random() for _ in golds_docs]
    distractors: list[str] = []
    distractor_rng = request.derived_rng("distractors")

    def units(n: int) -> list[str]:
        while len(distractors) < n:  # a lazily grown stream: units(n) is a prefix of units(n + 1)
            text = tqa._document(distractor_rng, people.new(distractor_rng), num_facts)[0]
            if not any(marker in text.lower() for marker in forbidden):
                distractors.append(text)
        return distractors[:n]

    def assemble(n: int) -> tuple[str, list[list[int]], list[int]]:
        positions = [int(n * fraction) for fraction in fractions]
        pieces, where = hay.insert_items(units(n), list(zip(positions, golds_docs)))
        headers = [f"Document {i + 1}:\n" for i in range(len(pieces))]
        text, offsets = hay.join_with_offsets([h + p for h, p in zip(headers, pieces)], "\n\n", where,
                                              len(tqa._INTRO))
        offsets = [[start + len(headers[i]), end] for (start, end), i in zip(offsets, where)]
        return tqa._INTRO + text + "\n\n" + tqa._INSTRUCTION + "\n\n", offsets, positions

    questions = tuple(f"Question: {query}" for query in queries)
    prefixes = (" Answer:",) * num_questions
    golds = tuple(f" {answer}\n" for answer in answers)
    dialogue = _pieces(questions, prefixes, golds, num_questions)
    num_documents, num_tokens = _fit_context(request, lambda n: assemble(n)[0], dialogue, max_new_tokens)
    context, offsets, positions = assemble(num_documents)
    meta = {"num_units": num_documents, "gold_offsets": offsets, "gold_units": positions,
            "num_prompt_tokens": num_tokens}
    return SharedSample(task=task, index=request.index, context=context, questions=questions,
                        answer_prefixes=prefixes, golds=golds, answers=tuple((a,) for a in answers),
                        metric="string_match_part", target_length=request.length, max_new_tokens=max_new_tokens,
                        depths=tuple(fractions), meta=meta)


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True, slots=True)
class SharedTaskSpec:
    """A registered shared-context task: its generator and fixed preset kwargs."""

    name: str
    generator: Callable[..., SharedSample]
    preset: dict[str, Any]
    description: str


_TASKS: dict[str, SharedTaskSpec] = {
    spec.name: spec
    for spec in (
        SharedTaskSpec("scbench_kv", generate_kv, {}, "4 key-value needles in prose, one key asked per turn"),
        SharedTaskSpec("scbench_qa", generate_qa, {}, "4 gold fact documents, one person asked per turn"),
    )
}
DEFAULT_TASKS = tuple(_TASKS)


def list_shared_tasks() -> list[str]:
    """Registered shared-context task names (separate from ``tasks.list_tasks``)."""
    return list(_TASKS)


def shared_task_spec(task: str) -> SharedTaskSpec:
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(f"--shared-context: task must be one of {list_shared_tasks()}, got {task!r}") from None


def generate_shared(task: str, num_samples: int, length: int, count_tokens: CountTokens, seed: int,
                    **task_kwargs: Any) -> list[SharedSample]:
    """``num_samples`` samples of shared-context ``task`` (same conventions as ``tasks.generate``; sample i uses
    ``random.Random(f"{task}:{seed}:{i}")``). ``task_kwargs`` override the preset (e.g. ``num_questions=2``)."""
    spec = shared_task_spec(task)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if length < 16:
        raise ValueError(f"length must be >= 16 tokens, got {length}")
    accepted = [name for name in inspect.signature(spec.generator).parameters if name != "request"]
    unknown = sorted(set(task_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{task}: unknown option(s) {unknown}; accepted options: {accepted}")
    hints: dict[str, int] = {}
    samples = []
    for index in range(num_samples):
        seed_text = f"{task}:{seed}:{index}"
        request = SampleRequest(task, index, length, count_tokens, seed_text, random.Random(seed_text), hints)
        try:
            samples.append(spec.generator(request, **{**spec.preset, **task_kwargs}))
        except PromptTooLongError as error:
            raise ValueError(f"length={length} is too short for {task}: {error} after reserving the answer "
                             f"tokens and the other turns") from None
    return samples


# ------------------------------------------------------------------------------------------------ runner
def load_shared_samples(store: Any, handle: Any, task: str, length: int, count: int,
                        seed: int) -> list[SharedSample]:
    """The stored samples of (task, length), generated (and stored) if missing or too few (append-only)."""
    key = f"{task}@{length}"
    stored = store.samples.get(key, [])
    if len(stored) < count:
        fresh = generate_shared(task, count, length - len(handle.bos), handle.count_tokens, seed)
        stored = stored + [s.to_dict() for s in fresh[len(stored):]]
        store.samples[key] = stored
    return [SharedSample.from_dict(record) for record in stored[:count]]


def run_shared_group(handle: Any, store: Any, task: str, length: int, spec: str, samples: Sequence[SharedSample],
                     max_new_tokens: int | None, reason: str | None) -> int:
    """Generate and score every (sample, turn) of one (task, length, spec) not yet in ``store``, all turns in one
    ``llm.generate`` batch (each turn is its own request; see the module docstring); returns rows added."""
    from longfit.eval.harness import ENGINE, FULL, generate_rows
    from longfit.sampling_params import SamplingParams

    todo = [(s, t) for s in samples for t in range(1, s.num_turns + 1)
            if not store.has(ENGINE, KIND, task, length, spec, s.index, t)]
    if not todo:
        return 0
    rows: list[dict[str, Any]] = []
    prompts, params = [], []
    for sample, turn in todo:
        ids, boundary = turn_ids(sample, turn, handle.encode, handle.bos, handle.query_aware)
        budget = sample.max_new_tokens if max_new_tokens is None else min(max_new_tokens, sample.max_new_tokens)
        prompts.append(ids)
        params.append(SamplingParams(max_tokens=budget, temperature=0.0,
                                     kv_compression_boundary=None if spec == FULL else boundary))
        rows.append({"engine": ENGINE, "kind": KIND, "task": task, "length": length, "spec": spec,
                     "index": sample.index, "turn": turn, "num_turns": sample.num_turns, "prompt_tokens": len(ids),
                     "context_tokens": boundary, "kv_bytes": handle.kv_bytes(spec, boundary),
                     "kv_bytes_full": handle.kv_bytes(FULL, boundary), "answers": list(sample.answers[turn - 1]),
                     "depth": sample.depths[turn - 1] if sample.depths else None})
    return generate_rows(handle, store, spec, prompts, params, rows, reason,
                         lambda i, prediction: todo[i][0].score(todo[i][1], prediction))
