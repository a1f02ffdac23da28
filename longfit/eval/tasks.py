"""Registry of the synthetic long-context tasks and the ``Sample`` they produce. No torch.

Tasks follow RULER (paper "RULER: What's the Real Context Size of Your Long-Context Language Models?";
NVIDIA/RULER ``scripts/data/synthetic``), generated offline from a seed, plus a passkey task and templated QA.

How a harness uses this module::

    samples = generate("niah_single_2", num_samples=50, length=4096, count_tokens=lambda s: len(tok.encode(s)), seed=42)
    for sample in samples:                        # identical samples for the full cache and every compression spec
        text = sample.prompt()                    # context + question + answer prefix, completion style
        prediction = run_model(text, max_new_tokens=sample.max_new_tokens)   # greedy; the generated text only
        value = score(sample, prediction)         # in [0, 1]; task score = scorers.aggregate(values)

- ``length`` follows RULER's ``max_seq_length``: it includes the answer budget, so
  ``count_tokens(sample.prompt()) + sample.max_new_tokens <= length``, and the haystack is grown until the prompt
  is within about 5% (or one haystack unit) of that. Pass the model's own tokenizer (without special tokens):
  lengths are per tokenizer, so regenerate for each model (and pass ``length - 1`` if the model prepends a BOS
  token that must fit too). ``count_tokens`` is called O(log n) times per sample, on whole prompts.
- kvpress's split (``context`` / ``question`` / ``answer_prefix``) is kept: a query-agnostic method compresses
  ``sample.context`` only, then ``question + answer_prefix`` is appended. ``prompt()`` is their concatenation.
- ``generate`` is deterministic for its arguments and never touches global random state; asking for more samples
  only appends (the fit of sample i warm-starts from sample i-1). Sample ``i`` draws the same needles, keys and
  depths at every length, so per-length results line up. ``Sample.to_dict`` / ``from_dict`` round-trip through
  JSON for resumable result files.
- Use completion-style prompts (``prompt()`` as is) for small models; a chat template hurts them (methods.md §12).
"""

from __future__ import annotations

import importlib
import inspect
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from longfit.eval.scorers import METRICS, score_prediction

CountTokens = Callable[[str], int]
# The fit stops early once the prompt is this close to its budget (a fraction of the budget).
_EARLY_STOP = 0.005


@dataclass(frozen=True, slots=True)
class Sample:
    """One generated task instance.

    ``answers`` are the expected strings; ``metric`` names a scorer in ``scorers.METRICS``: "string_match_all"
    (fraction of answers found, RULER's niah/vt/cwe/fwe metric) or "string_match_part" (any accepted answer, QA).
    ``target_length`` is the requested ``length`` (prompt + ``max_new_tokens``); ``depth`` is the relative position
    of the (first) answer needle in the haystack, in [0, 1], or None where it has no meaning; ``meta`` holds
    task-specific facts (needle character offsets in ``context``, unit counts, the measured prompt tokens).
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    target_length: int
    max_new_tokens: int
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def prompt(self) -> str:
        """The text fed to the model: context, question and answer prefix (RULER ``base`` template)."""
        return self.context + self.question + self.answer_prefix

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["answers"] = list(self.answers)
        return record

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Sample:
        return cls(**{**record, "answers": tuple(record["answers"])})


class PromptTooLongError(ValueError):
    """The shortest prompt a generator can build does not fit the token budget."""

    def __init__(self, num_tokens: int, budget: int) -> None:
        super().__init__(f"the shortest prompt needs {num_tokens} tokens, the budget is {budget}")
        self.num_tokens = num_tokens
        self.budget = budget


@dataclass(slots=True)
class SampleRequest:
    """What a task generator gets for one sample: where it is, how long it must be, and its randomness."""

    task: str
    index: int
    length: int
    count_tokens: CountTokens
    seed_text: str
    rng: random.Random
    hints: dict[str, int]  # warm-start unit counts, shared by the samples of one generate() call

    def derived_rng(self, label: str) -> random.Random:
        """An independent stream for one part of the sample (e.g. its haystack), reproducible on its own."""
        return random.Random(f"{self.seed_text}:{label}")

    def budget(self, max_new_tokens: int) -> int:
        """Prompt tokens available when ``max_new_tokens`` are reserved for the answer (RULER convention)."""
        if max_new_tokens < 1 or max_new_tokens >= self.length:
            raise ValueError(f"{self.task}: max_new_tokens must be in [1, length={self.length}), got {max_new_tokens}")
        return self.length - max_new_tokens

    def fit(
        self,
        build: Callable[[int], str],
        budget: int,
        min_units: int,
        max_units: int,
        hint_key: str = "units",
    ) -> tuple[int, int]:
        """Largest unit count whose prompt fits ``budget`` tokens (see ``fit_units``); remembers it as the next
        sample's starting guess. Returns (num_units, num_prompt_tokens)."""
        num_units, num_tokens = fit_units(
            build, self.count_tokens, budget, min_units, max_units, hint=self.hints.get(hint_key)
        )
        self.hints[hint_key] = num_units
        return num_units, num_tokens


def fit_units(
    build: Callable[[int], str],
    count_tokens: CountTokens,
    budget: int,
    min_units: int,
    max_units: int,
    hint: int | None = None,
) -> tuple[int, int]:
    """Find the largest n in [min_units, max_units] with ``count_tokens(build(n)) <= budget``.

    Safeguarded interpolation search: a first guess from a characters-per-token estimate (strings are cheap to
    build, tokens are not), then secant steps between the best fitting and the smallest overflowing count, with a
    bisection (or doubling) step whenever the same end moved twice in a row. About 3 to 6 ``count_tokens`` calls
    for near-linear counts; stops early within 0.5% of the budget.

    Returns:
        (n, count_tokens(build(n))).
    Raises:
        PromptTooLongError: if even ``build(min_units)`` overflows.
    """
    max_units = max(max_units, min_units)
    counts: dict[int, int] = {}

    def measure(n: int) -> int:
        if n not in counts:
            counts[n] = count_tokens(build(n))
        return counts[n]

    lo, f_lo, hi, f_hi = min_units, -1, max_units + 1, -1  # f(lo) <= budget < f(hi) once both are measured
    start = min(max(hint if hint is not None else min_units, min_units), max_units)
    f_start = measure(start)
    if f_start <= budget:
        lo, f_lo = start, f_start
    else:
        hi, f_hi = start, f_start
        f_lo = measure(min_units)
        if f_lo > budget:
            raise PromptTooLongError(f_lo, budget)
    # Tokens per unit, first estimated from characters, then from measured points.
    reference = lo if f_hi < 0 else hi
    step = min(8, max_units - reference) if reference < max_units else -min(8, reference - min_units)
    chars_per_token = len(build(reference)) / max(1, counts[reference])
    unit_chars = abs(len(build(reference + step)) - len(build(reference))) / abs(step) if step else 1.0
    rate = max(unit_chars / max(chars_per_token, 1e-9), 1e-6)
    moved: list[str] = []
    fitting = [(lo, f_lo)] if lo in counts else []  # measured fitting points, for the slope while unbounded
    for _ in range(64):
        if hi - lo <= 1 or budget - f_lo <= _EARLY_STOP * budget:
            break
        if f_hi >= 0:
            rate = max((f_hi - f_lo) / (hi - lo), 1e-6)  # secant through the bracket
        elif len(fitting) >= 2:
            rate = max((fitting[-1][1] - fitting[-2][1]) / (fitting[-1][0] - fitting[-2][0]), 1e-6)
        guess = lo + int((budget - f_lo) / rate)
        if len(moved) >= 2 and moved[-1] == moved[-2]:
            # NOTE: the same end moved twice: interpolation is creeping, so bisect (or double when unbounded).
            guess = (lo + hi) // 2 if f_hi >= 0 else lo + 2 * max(1, lo - min_units)
        probe = min(max(guess, lo + 1), hi - 1)
        value = measure(probe)
        if value <= budget:
            lo, f_lo = probe, value
            fitting.append((lo, f_lo))
            moved.append("lo")
        else:
            hi, f_hi = probe, value
            moved.append("hi")
    return lo, f_lo


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task: the generator function (``module:function``) and its fixed preset kwargs."""

    name: str
    generator: str
    preset: dict[str, Any]
    description: str


def _niah(haystack: str, key: str, value: str, k: int, v: int, q: int) -> dict[str, Any]:
    return {
        "haystack": haystack,
        "key_type": key,
        "value_type": value,
        "num_keys": k,
        "num_values": v,
        "num_queries": q,
    }


_NIAH = "longfit.eval.niah:generate_niah"
_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("niah_single_1", _NIAH, _niah("noise", "words", "numbers", 1, 1, 1), "one number in noise lines"),
        TaskSpec("niah_single_2", _NIAH, _niah("essay", "words", "numbers", 1, 1, 1), "one number in prose"),
        TaskSpec("niah_single_3", _NIAH, _niah("essay", "words", "uuids", 1, 1, 1), "one UUID in prose"),
        TaskSpec("niah_multikey_1", _NIAH, _niah("essay", "words", "numbers", 4, 1, 1), "1 of 4 keys in prose"),
        TaskSpec("niah_multikey_2", _NIAH, _niah("needle", "words", "numbers", 1, 1, 1), "1 key among needles"),
        TaskSpec("niah_multikey_3", _NIAH, _niah("needle", "uuids", "uuids", 1, 1, 1), "1 UUID key among needles"),
        TaskSpec("niah_multivalue", _NIAH, _niah("essay", "words", "numbers", 1, 4, 1), "4 values of one key"),
        TaskSpec("niah_multiquery", _NIAH, _niah("essay", "words", "numbers", 4, 1, 4), "values of 4 keys"),
        TaskSpec("vt", "longfit.eval.variable_tracking:generate_vt", {}, "variable tracking, 1 chain of 4 hops"),
        TaskSpec("cwe", "longfit.eval.words:generate_cwe", {}, "10 most common words of a numbered list"),
        TaskSpec("fwe", "longfit.eval.words:generate_fwe", {}, "3 most frequent coded words (Zipf)"),
        TaskSpec("qa_templated", "longfit.eval.templated_qa:generate_qa", {"hops": 1}, "one-hop QA, fictitious facts"),
        TaskSpec("qa_templated_2hop", "longfit.eval.templated_qa:generate_qa", {"hops": 2}, "two-hop QA"),
        TaskSpec("passkey", "longfit.eval.niah:generate_passkey", {}, "5-digit pass key in filler text"),
    )
}


def list_tasks() -> list[str]:
    """Registered task names, RULER's 13 first (qa_1 / qa_2 replaced by templated QA), then passkey."""
    return list(_TASKS)


def task_spec(task: str) -> TaskSpec:
    try:
        return _TASKS[task]
    except KeyError:
        raise ValueError(f"task must be one of {list_tasks()}, got {task!r}") from None


def _resolve(spec: TaskSpec) -> Callable[..., Sample]:
    # NOTE: generator modules import this one (for Sample), so they are imported lazily, not at the top.
    module_name, function_name = spec.generator.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def generate(
    task: str, num_samples: int, length: int, count_tokens: CountTokens, seed: int, **task_kwargs: Any
) -> list[Sample]:
    """Generate ``num_samples`` samples of ``task`` whose prompt + answer budget fits ``length`` tokens.

    Args:
        task: a name from ``list_tasks()``.
        num_samples: number of samples (>= 0); sample i uses ``random.Random(f"{task}:{seed}:{i}")``.
        length: requested tokens, prompt plus the task's ``max_new_tokens`` (RULER's ``max_seq_length``).
        count_tokens: the model tokenizer's length function (text → number of tokens, no special tokens).
        seed: base seed; never touches the global ``random`` state.
        task_kwargs: task options, e.g. ``depth`` (niah, passkey, QA) or ``max_new_tokens`` (all tasks); they may
            also override a preset (``value_type="words"`` on a niah task), keeping the task's name.
    Raises:
        ValueError: unknown task or option, out-of-range option, or a ``length`` too short for the task.
    """
    spec = task_spec(task)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if length < 16:
        raise ValueError(f"length must be >= 16 tokens, got {length}")
    generator = _resolve(spec)
    accepted = [name for name in inspect.signature(generator).parameters if name != "request"]
    unknown = sorted(set(task_kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{task}: unknown option(s) {unknown}; accepted options: {accepted}")
    hints: dict[str, int] = {}
    samples = []
    for index in range(num_samples):
        seed_text = f"{task}:{seed}:{index}"
        request = SampleRequest(task, index, length, count_tokens, seed_text, random.Random(seed_text), hints)
        try:
            samples.append(generator(request, **{**spec.preset, **task_kwargs}))
        except PromptTooLongError as error:
            raise ValueError(
                f"length={length} is too short for {task}: {error} after reserving the answer tokens"
            ) from None
    return samples


def score(sample: Sample, prediction: str) -> float:
    """Score a model's generated text (without the prompt) against ``sample.answers``; in [0, 1]."""
    if sample.metric not in METRICS:
        raise ValueError(f"Sample.metric must be one of {sorted(METRICS)}, got {sample.metric!r}")
    return score_prediction(sample.metric, prediction, sample.answers)


def check_depth(task: str, depth: float | None) -> float | None:
    """Validate a ``depth`` option: None (random, RULER-style) or a fraction in [0, 1]."""
    if depth is not None and not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"{task}: depth must be None or in [0, 1], got {depth!r}")
    return None if depth is None else float(depth)
