"""Shared-context (SCBench) samples: determinism, answers in context, length fitting, turn prompts and their
compression boundary, scoring, the harness options and the report's shared section. No model."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from longfit.eval import report
from longfit.eval.harness import EvalOptions, add_eval_arguments, options_from_args, parse_tasks, row_key
from longfit.eval.shared_context import (
    DEFAULT_TASKS,
    SharedSample,
    generate_shared,
    list_shared_tasks,
    turn_ids,
    turn_pieces,
)
from longfit.eval.tasks import list_tasks

TASKS = list_shared_tasks()


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    return (len(text) + 3) // 4


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def piecewise(count, sample: SharedSample, turn: int) -> int:
    """Prompt tokens of a turn counted the way the harness encodes it: context, then each piece on its own."""
    return count(sample.context) + sum(count(piece) for piece in turn_pieces(sample, turn))


def test_registry_is_separate_from_the_single_question_tasks() -> None:
    assert set(TASKS) == {"scbench_kv", "scbench_qa"} and tuple(TASKS) == DEFAULT_TASKS
    assert not set(TASKS) & set(list_tasks())
    with pytest.raises(ValueError, match="--shared-context"):
        generate_shared("niah_single_1", 1, 1024, words, seed=0)
    with pytest.raises(ValueError, match="unknown option"):
        generate_shared("scbench_kv", 1, 1024, words, seed=0, bogus=1)
    with pytest.raises(ValueError, match="num_questions"):
        generate_shared("scbench_qa", 1, 1024, words, seed=0, num_questions=0)
    with pytest.raises(ValueError, match="too short"):
        generate_shared("scbench_kv", 1, 64, words, seed=0)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_for_a_seed_and_append_only(task: str) -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    first = generate_shared(task, 2, 1024, chars, seed=3)
    assert random.random() == expected, "generation must leave the global random state alone"
    assert first == generate_shared(task, 2, 1024, chars, seed=3)
    assert generate_shared(task, 3, 1024, chars, seed=3)[:2] == first
    assert [s.prompt(1) for s in first] != [s.prompt(1) for s in generate_shared(task, 2, 1024, chars, seed=4)]
    assert first[0].prompt(1) != first[1].prompt(1)
    # JSON round trip, as the results file stores samples.
    assert [SharedSample.from_dict(json.loads(json.dumps(s.to_dict()))) for s in first] == first


@pytest.mark.parametrize("count", [words, chars])
@pytest.mark.parametrize("length", [700, 2048, 6000])
@pytest.mark.parametrize("task", TASKS)
def test_answers_in_context_and_length_within_tolerance(task: str, length: int, count) -> None:
    for index, sample in enumerate(generate_shared(task, 3, length, count, seed=5)):
        assert (sample.task, sample.index, sample.target_length, sample.num_turns) == (task, index, length, 4)
        assert len(sample.answers) == len(sample.golds) == len(sample.answer_prefixes) == 4
        assert len(sample.depths) == 4 and all(0.0 <= d <= 1.0 for d in sample.depths)
        # The longest (last) turn plus the answer budget fits, within 5% or one haystack unit.
        total = piecewise(count, sample, 4) + sample.max_new_tokens
        assert length - max(0.05 * length, 80) <= total <= length, (total, length)
        assert sample.meta["num_prompt_tokens"] == piecewise(count, sample, 4)
        assert count(sample.prompt(4)) + sample.max_new_tokens <= length
        flat = [answer for answers in sample.answers for answer in answers]
        assert len(set(flat)) == len(flat), "answers must differ, or an earlier gold would answer a later turn"
        for turn, answers in enumerate(sample.answers, 1):
            for answer in answers:
                assert answer.lower() in sample.context.lower(), f"turn {turn}: {answer!r} missing from the context"
                assert answer in sample.golds[turn - 1]
        if task == "scbench_kv":
            for (start, end), (answer,), key, question in zip(sample.meta["needle_offsets"], sample.answers,
                                                              sample.meta["keys"], sample.questions):
                assert answer in sample.context[start:end] and key in sample.context[start:end] and key in question
        else:
            assert all(any(a in sample.context[s:e] for s, e in sample.meta["gold_offsets"]) for (a,) in sample.answers)


@pytest.mark.parametrize("task", TASKS)
def test_turn_prompts_feed_earlier_gold_answers_and_place_the_boundary(task: str) -> None:
    sample = generate_shared(task, 1, 1500, lambda text: len(byte_encode(text)), seed=2)[0]
    bos = [1]
    context_ids = bos + byte_encode(sample.context)
    prefixes = {}
    for turn in range(1, 5):
        text = sample.prompt(turn)
        dialogue = text[len(sample.context):]
        assert text.startswith(sample.context)
        expected = "".join(sample.questions[j] + sample.answer_prefixes[j] + sample.golds[j] for j in range(turn - 1))
        assert dialogue == expected + sample.questions[turn - 1] + sample.answer_prefixes[turn - 1]
        for j in range(turn - 1):
            assert sample.golds[j] in dialogue  # earlier turns carry their golden answers
        for answer in sample.answers[turn - 1]:
            assert answer not in dialogue  # ... but never the answer of the turn being asked
        ids, boundary = turn_ids(sample, turn, byte_encode, bos)
        assert ids == bos + byte_encode(text)
        assert boundary == len(context_ids) and ids[:boundary] == context_ids  # end of the context, exactly
        aware_ids, aware = turn_ids(sample, turn, byte_encode, bos, query_aware=True)
        assert aware_ids == ids and aware == len(context_ids) + len(byte_encode(sample.questions[0]))
        assert bytes(ids[len(bos):aware]).decode() == sample.context + sample.questions[0]  # end of question 1
        prefixes[turn] = tuple(ids[:aware])
    assert len(set(prefixes.values())) == 1, "every turn must compress the very same tokens"
    for bad in (0, 5):
        with pytest.raises(ValueError, match="turn"):
            sample.prompt(bad)


@pytest.mark.parametrize("task", TASKS)
def test_no_turn_is_answered_by_the_earlier_turns(task: str) -> None:
    for sample in generate_shared(task, 12, 1200, words, seed=1):
        for turn in range(1, 5):
            dialogue = "".join(turn_pieces(sample, turn)).lower()
            assert not any(answer.lower() in dialogue for answer in sample.answers[turn - 1]), (turn, dialogue)


SCORE_TABLE = [  # (task, prediction of turn 2 built from the sample, expected score)
    ("scbench_kv", lambda s: s.golds[1], 1.0),
    ("scbench_kv", lambda s: f" The value is {s.answers[1][0]}, I think.", 1.0),
    ("scbench_kv", lambda s: s.golds[0], 0.0),  # another turn's answer does not count
    ("scbench_kv", lambda s: s.answers[1][0][:-1], 0.0),  # a truncated number is wrong
    ("scbench_kv", lambda s: "", 0.0),
    ("scbench_qa", lambda s: s.answers[1][0].upper(), 1.0),  # case-insensitive, like RULER
    ("scbench_qa", lambda s: "\x00 " + s.answers[1][0] + "\n", 1.0),
    ("scbench_qa", lambda s: s.answers[2][0], 0.0),
    ("scbench_qa", lambda s: "I do not know", 0.0),
]


@pytest.mark.parametrize(("task", "prediction", "expected"), SCORE_TABLE)
def test_scorer_table(task: str, prediction, expected: float) -> None:
    sample = generate_shared(task, 1, 1024, words, seed=9)[0]
    assert sample.metric == ("string_match_all" if task == "scbench_kv" else "string_match_part")
    assert sample.score(2, prediction(sample)) == expected


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(["--output", "x", *argv])


def test_harness_options_and_row_keys() -> None:
    options = options_from_args(_args("--shared-context", "--kv-compression", "snapkv:keep=0.5"))
    assert options.shared_context and options.tasks == DEFAULT_TASKS
    assert options_from_args(_args()).tasks == parse_tasks(None) and not options_from_args(_args()).shared_context
    assert parse_tasks("all", shared=True) == tuple(TASKS)
    with pytest.raises(ValueError, match="--shared-context"):
        options_from_args(_args("--shared-context", "--peer", "kvpress"))
    with pytest.raises(ValueError, match="--shared-context"):
        options_from_args(_args("--shared-context", "--tasks", "passkey"))
    with pytest.raises(ValueError, match="task"):
        EvalOptions(model="m", specs=(), tasks=("scbench_kv",), lengths=(1024,), samples=1, seed=0, output="x")
    # Old rows (no turn) keep a key; shared rows of different turns are different rows.
    row = {"engine": "longfit", "kind": "task", "task": "a", "length": 8, "spec": "full", "index": 0}
    assert row_key(row) == ("longfit", "task", "a", 8, "full", 0, 0)
    assert row_key({**row, "kind": "shared", "turn": 2}) != row_key({**row, "kind": "shared", "turn": 3})


def _shared(spec: str, index: int, turn: int, score: float, kind: str = "shared") -> dict:
    return {"engine": "longfit", "kind": kind, "task": "scbench_kv", "length": 2048, "spec": spec, "index": index,
            "turn": turn, "status": "ok", "score": score, "kv_bytes": 100 if spec == "full" else 25,
            "kv_bytes_full": 100}


def test_report_splits_turn_one_from_later_turns(tmp_path) -> None:
    full = [_shared("full", i, t, 1.0) for i in range(2) for t in range(1, 5)]
    snap = [_shared("snapkv:keep=0.25", i, t, 1.0 if t == 1 else (0.5 if t == 2 else 0.0))
            for i in range(2) for t in range(1, 5)]
    rows = {r["spec"]: r for r in report.summarize(full + snap)}
    row = rows["snapkv:keep=0.25"]
    assert row["n"] == 8 and row["score"] == 37.5 and row["retention"] == pytest.approx(0.375)
    assert row["turn_scores"] == {1: 100.0, 2: 50.0, 3: 0.0, 4: 0.0}
    assert row["score_turn1"] == 100.0 and row["score_later"] == pytest.approx(16.67)
    assert row["retention_turn1"] == 1.0 and row["retention_later"] == pytest.approx(0.1667)
    md = report.markdown(list(rows.values()), {"model": "m", "query_aware": True})
    assert "Shared context (SCBench" in md and "first question" in md
    assert ("| scbench_kv | 2048 | snapkv:keep=0.25 | longfit | 8 | 37.50 | 38% | 100.00 | 16.67 | 100% | 17% | "
            "100 / 50 / 0 / 0 | 0.00 MiB (25%) |  |") in md
    assert report.plot(list(rows.values()), tmp_path / "shared.png")
    assert (tmp_path / "shared.png").read_bytes()[:4] == b"\x89PNG"
    # A weak full cache flags the row instead of reporting retentions.
    weak = report.summarize([_shared("full", 0, 1, 0.0), _shared("full", 0, 2, 0.1), _shared("knorm", 0, 1, 0.0)])
    knorm = next(r for r in weak if r["spec"] == "knorm")
    assert knorm["weak_baseline"] and knorm["retention"] is None and knorm["retention_turn1"] is None
    # Files without shared rows: no shared section.
    single = [{**_shared("full", 0, 0, 1.0, kind="task"), "task": "passkey"}]
    assert "Shared context" not in report.markdown(report.summarize(single), {})
