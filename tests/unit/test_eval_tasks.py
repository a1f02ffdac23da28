"""Synthetic task generators: determinism, length fitting, needle depth, answers in context, corpus."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter

import pytest

from longfit.eval import corpus, haystack
from longfit.eval.scorers import METRICS
from longfit.eval.tasks import PromptTooLongError, Sample, fit_units, generate, list_tasks, score

RULER_TASKS = [
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_templated",
]  # fmt: skip


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    return (len(text) + 3) // 4


class CountingTokens:
    def __init__(self, count=words) -> None:
        self.count, self.calls = count, 0

    def __call__(self, text: str) -> int:
        self.calls += 1
        return self.count(text)


def test_registry_has_the_ruler_tasks_and_passkey() -> None:
    names = list_tasks()
    assert set(RULER_TASKS + ["passkey", "qa_templated_2hop"]) <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("length", [256, 4096])
@pytest.mark.parametrize("task", list_tasks())
def test_every_task_fits_its_length_with_answers_in_context(task: str, length: int) -> None:
    counter = CountingTokens()
    samples = generate(task, 3, length, counter, seed=7)
    assert counter.calls <= 12 * len(samples) + 12, "count_tokens must be called O(log n) times per sample"
    for index, sample in enumerate(samples):
        assert (sample.task, sample.index, sample.target_length) == (task, index, length)
        total = words(sample.prompt()) + sample.max_new_tokens
        assert total <= length
        if length == 4096:
            assert total >= 0.95 * length, f"{task}: prompt + answer budget {total} is not within 5% of {length}"
        assert sample.meta["num_prompt_tokens"] == words(sample.prompt())
        assert sample.prompt() == sample.context + sample.question + sample.answer_prefix
        assert sample.metric in METRICS and sample.answers
        for answer in sample.answers:
            assert answer.lower() in sample.context.lower(), f"{task}: answer {answer!r} missing from the context"
        assert score(sample, " ".join(sample.answers)) == 1.0
        assert score(sample, "") == 0.0
        assert sample.depth is None or 0.0 <= sample.depth <= 1.0


@pytest.mark.parametrize("task", list_tasks())
def test_deterministic_for_a_seed_and_different_across_seeds(task: str) -> None:
    first = generate(task, 2, 1024, chars, seed=3)
    assert first == generate(task, 2, 1024, chars, seed=3)
    assert [s.prompt() for s in first] != [s.prompt() for s in generate(task, 2, 1024, chars, seed=4)]
    assert first[0].prompt() != first[1].prompt()


def test_generation_leaves_global_random_state_alone() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    generate("niah_multikey_2", 2, 1024, words, seed=0)
    generate("cwe", 1, 1024, words, seed=0)
    assert random.random() == expected


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "passkey", "qa_templated"])
def test_same_index_draws_the_same_needles_at_every_length(task: str) -> None:
    short, long = generate(task, 2, 1024, words, seed=1), generate(task, 2, 3000, words, seed=1)
    assert [s.answers for s in short] == [s.answers for s in long]
    assert all(s.meta["num_units"] < l.meta["num_units"] for s, l in zip(short, long))


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe", "qa_templated_2hop"])
@pytest.mark.parametrize("length", [700, 2048, 5000])
def test_length_within_tolerance_under_a_character_count(task: str, length: int) -> None:
    for sample in generate(task, 2, length, chars, seed=5):
        total = chars(sample.prompt()) + sample.max_new_tokens
        # Within 5%, or within one haystack unit when that is larger (a QA document is about 60 such tokens).
        assert length - max(0.05 * length, 80) <= total <= length


# ---- needle depth ----------------------------------------------------------------------------------------------


def _answer_line_index(lines: list[str], answer: str) -> int:
    return next(i for i, line in enumerate(lines) if answer in line)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("task", ["niah_single_1", "niah_multikey_2", "niah_multikey_3"])
def test_needle_at_requested_depth_in_line_haystacks(task: str, depth: float) -> None:
    for sample in generate(task, 2, 2048, words, seed=11, depth=depth):
        start, end = sample.meta["haystack_span"]
        lines = sample.context[start:end].split("\n")
        needle = _answer_line_index(lines, sample.answers[0])
        num_units = len(lines) - 1  # every line but the answer needle is haystack
        assert abs(needle - depth * num_units) <= 1, (needle, depth, num_units)
        assert sample.depth == depth
        offset = sample.meta["needle_offsets"][sample.meta["answer_needles"][0]]
        assert sample.answers[0] in sample.context[offset[0] : offset[1]]
        assert sample.context[offset[0] : offset[1]].startswith("One of the special magic")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_needle_at_requested_depth_in_prose(depth: float) -> None:
    for sample in generate("niah_single_2", 2, 3000, words, seed=2, depth=depth):
        start, end = sample.meta["needle_offsets"][0]
        needle = sample.context[start:end]
        span_start, span_end = sample.meta["haystack_span"]
        before = sample.context[span_start:start].strip()
        after = sample.context[end:span_end].strip()
        # The haystack minus the needle is exactly the first n prose sentences, and the needle sits between two.
        joined = (before + " " + after).strip()
        sentences = haystack.essay_units(sum(map(joined.count, ".!?")) + 1)  # every sentence ends with one
        ends, total = {}, -1  # len(" ".join(sentences[:k])) -> k
        for count, sentence in enumerate(sentences, start=1):
            total += len(sentence) + 1
            ends[total] = count
        n, k = ends[len(joined)], ends[len(before)] if before else 0
        assert " ".join(sentences[:n]) == joined and " ".join(sentences[:k]) == before
        assert abs(k - depth * n) <= 1
        assert needle == f"One of the special magic numbers for {sample.meta['query_keys'][0]} is: {sample.answers[0]}."


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_and_qa_at_requested_depth(depth: float) -> None:
    for sample in generate("passkey", 2, 2048, words, seed=4, depth=depth):
        start, end = sample.meta["needle_offsets"][0]
        assert (
            sample.context[start:end]
            == f"The pass key is {sample.answers[0]}. Remember it. {sample.answers[0]} is the pass key."
        )
        before, total = (
            sample.context[:start].count(haystack.NOISE_SENTENCE),
            sample.context.count(haystack.NOISE_SENTENCE),
        )
        assert abs(before - depth * total) <= 1
    for sample in generate("qa_templated", 2, 2048, words, seed=4, depth=depth):
        start, _ = sample.meta["gold_offsets"][0]
        documents_before = sample.context[:start].count("Document ") - 1
        num_distractors = sample.context.count("Document ") - 1
        assert abs(documents_before - depth * num_distractors) <= 1


# ---- task-specific content ---------------------------------------------------------------------------------------


def test_niah_templates_singular_and_plural() -> None:
    single = generate("niah_single_1", 1, 512, words, seed=0)[0]
    assert single.context.startswith("A special magic number is hidden")
    assert single.question.startswith("What is the special magic number for ")
    assert single.answer_prefix.endswith("mentioned in the provided text is")
    multi = generate("niah_multivalue", 1, 512, words, seed=0)[0]
    assert multi.context.startswith("Some special magic numbers are hidden")
    assert multi.answer_prefix.endswith(" are") and len(multi.answers) == 4
    word = generate("niah_single_1", 1, 512, words, seed=0, value_type="words")[0]
    assert re.fullmatch(r"[a-z]+-[a-z]+", word.answers[0]) and "special magic word " in word.question
    uuid = generate("niah_single_3", 1, 512, words, seed=0)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.answers[0])


@pytest.mark.parametrize("task", ["niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multiquery"])
def test_queried_keys_and_answers_occur_once(task: str) -> None:
    for sample in generate(task, 3, 2048, words, seed=9):
        for key in sample.meta["query_keys"]:
            assert key in sample.question and sample.context.count(key) == 1
        for answer in sample.answers:
            assert sample.context.count(answer) == 1
    assert len(generate("niah_multiquery", 1, 1024, words, seed=0)[0].answers) == 4
    assert len(generate("niah_multikey_1", 1, 1024, words, seed=0)[0].meta["needle_offsets"]) == 4


def test_variable_tracking_chain_is_in_order() -> None:
    for sample in generate("vt", 3, 2048, words, seed=1):
        names, value = sample.answers, sample.meta["values"][0]
        statements = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in itertools.pairwise(names)]
        positions = [sample.context.index(statement) for statement in statements]
        assert positions == sorted(positions) and len(names) == 5
        assert value in sample.question and "5 variables" in sample.answer_prefix
        assert sample.meta["fewshot"]  # 2048 tokens leave room for the in-context example
        assert [sample.context[a:b] for a, b in sample.meta["statement_offsets"]] == statements


def test_cwe_answers_are_the_most_common_words() -> None:
    for length in (1024, 4096):
        for sample in generate("cwe", 2, length, words, seed=2):
            main_list = sample.context.rsplit("Memorize the ones that appear most often.\n", 1)[1]
            counts = Counter(re.findall(r"\d+\. (\S+)", main_list))
            common_cw, common_ucw = sample.meta["freq"]
            assert all(counts[word] == common_cw for word in sample.answers)
            assert all(count == common_ucw for word, count in counts.items() if word not in sample.answers)
            assert len(set(sample.answers)) == 10


def test_fwe_answers_are_ranks_two_to_four() -> None:
    for sample in generate("fwe", 2, 2048, words, seed=3):
        coded = sample.context.split("coded words. ", 1)[1]
        ranked = Counter(coded.split()).most_common()
        assert ranked[0][0] == "..."
        assert tuple(word for word, _ in ranked[1:4]) == sample.answers
        assert ranked[3][1] > ranked[4][1]  # the answer is unambiguous


@pytest.mark.parametrize("task", ["qa_templated", "qa_templated_2hop"])
def test_qa_only_gold_documents_answer(task: str) -> None:
    for sample in generate(task, 3, 2048, words, seed=6):
        answer = sample.answers[0]
        assert sample.context.lower().count(answer.lower()) == 1
        entity = sample.question.rsplit(" of ", 1)[1].rstrip("?")
        gold = [sample.context[a:b] for a, b in sample.meta["gold_offsets"]]
        assert all(entity in doc for doc in gold[:1]) and answer in gold[-1]
        assert sample.context.count("The ") > 4 * sample.meta["num_units"]  # distractors really are there
        assert sample.metric == "string_match_part"


# ---- validation and records --------------------------------------------------------------------------------------


def test_bad_options_raise_value_error_naming_them() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        generate("niah_single_9", 1, 1024, words, seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        generate("fwe", 1, 1024, words, seed=0, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        generate("niah_single_1", 1, 1024, words, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="num_samples"):
        generate("vt", -1, 1024, words, seed=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate("passkey", 1, 64, words, seed=0, max_new_tokens=64)
    with pytest.raises(ValueError, match="too short for cwe"):
        generate("cwe", 1, 150, words, seed=0)


def test_sample_round_trips_through_json() -> None:
    for task in ("niah_multivalue", "vt", "qa_templated"):
        sample = generate(task, 1, 1024, words, seed=0)[0]
        assert Sample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample


# ---- fitting -----------------------------------------------------------------------------------------------------


def _largest_fit(sizes: list[int], budget: int) -> int:
    # Slow reference: scan every unit count.
    total, best = 0, 0
    for n, size in enumerate(sizes, start=1):
        total += size
        if total <= budget:
            best = n
    return best


@pytest.mark.parametrize("trial", range(30))
def test_fit_units_finds_the_largest_fitting_count(trial: int) -> None:
    rng = random.Random(trial)
    sizes = [rng.randint(1, 40) for _ in range(rng.choice([5, 300, 20_000]))]
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    budget = rng.randint(1, prefix[-1] + 50)
    counter = CountingTokens(len)
    hint = rng.choice([None, rng.randint(0, len(sizes))])
    n, tokens = fit_units(lambda k: "x" * prefix[k], counter, budget, 0, len(sizes), hint=hint)
    best = _largest_fit(sizes, budget)
    assert tokens == prefix[n] <= budget
    assert n == best or budget - tokens <= 0.005 * budget  # exact, or stopped early within 0.5%
    assert counter.calls <= 6 + 2 * math.ceil(math.log2(len(sizes) + 1))


def test_fit_units_few_calls_for_linear_counts_and_raises_when_nothing_fits() -> None:
    counter = CountingTokens(len)
    n, _ = fit_units(lambda k: "ab" * k + "header", counter, 100_001, 0, 10**6)
    assert n == (100_001 - 6) // 2 and counter.calls <= 4
    with pytest.raises(PromptTooLongError):
        fit_units(lambda k: "y" * (50 + k), len, 40, 0, 100)


# ---- text sources ------------------------------------------------------------------------------------------------


def test_prose_filter_keeps_sentences_and_drops_code() -> None:
    prose = "Return the number of items in the\n    queue, which may be stale when read."
    assert haystack.prose_paragraph(prose) == "Return the number of items in the queue, which may be stale when read."
    assert haystack.prose_paragraph(">>> queue.qsize()\n3") is None
    assert haystack.prose_paragraph("Set x = y[0] when the flag is on, and also at start.") is None
    assert haystack.prose_paragraph("Too short to keep.") is None


def test_insert_items_and_offsets() -> None:
    pieces, where = haystack.insert_items(["a", "b", "c"], [(3, "Z"), (1, "X"), (1, "Y"), (0, "W")])
    assert pieces == ["W", "a", "X", "Y", "b", "c", "Z"] and where == [6, 2, 3, 0]
    text, offsets = haystack.join_with_offsets(pieces, "--", where, base=5)
    assert [text[a - 5 : b - 5] for a, b in offsets] == ["Z", "X", "Y", "W"]


def test_corpus_is_deterministic_prefix_stable_stdlib_prose() -> None:
    short, long = corpus.long_text(2_000), corpus.long_text(20_000)
    assert len(short) >= 2_000 and len(long) >= 20_000 and long.startswith(short)
    assert corpus.long_text(20_000) == long
    assert "\n\n" in long and ">>>" not in long
    with pytest.raises(ValueError, match="min_chars"):
        corpus.long_text(0)


def test_corpus_reports_when_the_library_is_too_small(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    source = tmp_path / "tiny.py"
    source.write_text('"""A module docstring that is long enough to count as a real prose paragraph here."""\n')
    docs = haystack._StdlibDocstrings()
    docs._sources = [str(source)]
    monkeypatch.setattr(haystack, "_DOCS", docs)
    assert corpus.long_text(10) == "A module docstring that is long enough to count as a real prose paragraph here."
    with pytest.raises(ValueError, match="min_chars must be <="):
        corpus.long_text(1_000)
    # The essay haystack repeats a short library from its start instead of failing.
    assert haystack.essay_units(3) == [corpus.long_text(10)] * 3
