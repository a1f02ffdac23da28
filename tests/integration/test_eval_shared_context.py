"""``longfit eval --shared-context`` end to end on the tiny random model: files written, one row per (sample, turn),
resume, and every row equal to a direct ``llm.generate`` of the same prompt built independently from the text."""

from __future__ import annotations

import json

import pytest

from longfit.eval.harness import FULL, EvalOptions, canonical_specs, evaluate
from longfit.eval.shared_context import KIND, SharedSample
from longfit.sampling_params import SamplingParams

SPECS = ("snapkv:keep=0.5",)
TASKS = ("scbench_kv", "scbench_qa")
LENGTH = 1536  # byte tokenizer: 4 turns of questions and golden answers plus a small haystack
MAX_NEW = 6


@pytest.fixture(scope="module")
def llm():
    from longfit import LLM

    return LLM("tiny-llama", dtype="float32")


def _options(out, specs=SPECS, tasks=TASKS, samples=2, **kw) -> EvalOptions:
    return EvalOptions(model="tiny-llama", specs=canonical_specs(specs), tasks=tasks, lengths=(LENGTH,),
                       samples=samples, seed=3, output=str(out), dtype="float32", max_new_tokens=MAX_NEW,
                       shared_context=True, **kw)


def _direct(llm, data, row, boundary: int | None) -> str:
    """The row's prompt rebuilt from the stored sample's text (not via turn_ids), generated on its own."""
    tokenizer = llm.get_tokenizer()
    sample = SharedSample.from_dict(data["samples"][f"{row['task']}@{row['length']}"][row["index"]])
    ids = tokenizer.encode(sample.prompt(row["turn"]), add_special_tokens=False)
    spec = None if row["spec"] == FULL else row["spec"]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, kv_compression_boundary=boundary if spec else None)
    output = llm.generate([ids], params, kv_compression=spec)[0]
    assert len(ids) == row["prompt_tokens"]
    return tokenizer.decode(output.outputs[0].token_ids)


def test_end_to_end_rows_files_resume_and_direct_generate(llm, tmp_path):
    evaluate(_options(tmp_path), llm=llm, show_progress=False)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["records"]
    # full + 1 spec, 2 tasks, 2 samples, 4 turns each; every row is of the shared kind and unique
    assert len(rows) == 2 * 2 * 2 * 4 and all(r["kind"] == KIND for r in rows)
    assert len({(r["spec"], r["task"], r["index"], r["turn"]) for r in rows}) == len(rows)
    assert sorted(data["samples"]) == [f"{t}@{LENGTH}" for t in sorted(TASKS)]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows) and all(0.0 <= r["score"] <= 1.0 for r in ok)
    assert all(r["prompt_tokens"] + MAX_NEW <= LENGTH for r in ok)

    for row in ok:
        sample = SharedSample.from_dict(data["samples"][f"{row['task']}@{LENGTH}"][row["index"]])
        # The boundary is the end of the context for every turn; KV bytes are the context's under the spec.
        assert row["context_tokens"] == len(sample.context.encode()) and row["answers"] == list(
            sample.answers[row["turn"] - 1])
        if row["spec"] == "snapkv:keep=0.5":
            assert abs(row["kv_bytes"] / row["kv_bytes_full"] - 0.5) < 0.01
        else:
            assert row["kv_bytes"] == row["kv_bytes_full"]
    # Prompts grow turn by turn (earlier questions and golden answers are fed).
    kv0 = sorted((r for r in ok if r["spec"] == FULL and r["task"] == "scbench_kv" and r["index"] == 0),
                 key=lambda r: r["turn"])
    assert [r["turn"] for r in kv0] == [1, 2, 3, 4]
    assert all(a["prompt_tokens"] < b["prompt_tokens"] for a, b in zip(kv0, kv0[1:]))

    # Full-cache and compressed rows equal a direct generation of the same prompt and boundary.
    for row in ok:
        assert row["prediction"] == _direct(llm, data, row, row["context_tokens"]), row
    compressed = {(r["task"], r["index"], r["turn"]): r["prediction"] for r in ok if r["spec"] != FULL}
    full = {(r["task"], r["index"], r["turn"]): r["prediction"] for r in ok if r["spec"] == FULL}
    assert compressed != full, "keep=0.5 should change some generation of the random model"

    md = (tmp_path / "results.md").read_text()
    assert "Shared context (SCBench" in md and f"| scbench_kv | {LENGTH} | snapkv:keep=0.5 | longfit | 8 |" in md

    # Resume: rerunning computes nothing; one more spec runs only that spec's rows, all turns in one batch per task.
    calls = []
    original = llm.generate

    def counting(prompts, *args, **kwargs):
        calls.append((len(prompts), kwargs.get("kv_compression")))
        return original(prompts, *args, **kwargs)

    llm.generate = counting
    try:
        same = evaluate(_options(tmp_path), llm=llm, show_progress=False)
        assert calls == [] and same.records == rows
        again = evaluate(_options(tmp_path, specs=(*SPECS, "knorm:keep=0.5")), llm=llm, show_progress=False)
    finally:
        del llm.generate
    assert calls == [(2 * 4, "knorm:keep=0.5")] * 2
    before = {json.dumps(r, sort_keys=True) for r in rows}
    after = {json.dumps(r, sort_keys=True) for r in again.records}
    assert before <= after and len(after) == len(before) + 2 * 2 * 4


def test_query_aware_compresses_up_to_the_first_question(llm, tmp_path):
    store = evaluate(_options(tmp_path, specs=("snapkv:keep=0.5",), tasks=("scbench_kv",), samples=1,
                              query_aware=True), llm=llm, show_progress=False)
    sample = SharedSample.from_dict(store.samples[f"scbench_kv@{LENGTH}"][0])
    boundary = len((sample.context + sample.questions[0]).encode())
    rows = [r for r in store.records if r["kind"] == KIND]
    assert len(rows) == 2 * 4 and all(r["status"] == "ok" and r["context_tokens"] == boundary for r in rows)
    data = json.loads((tmp_path / "results.json").read_text())
    for row in rows:
        if row["spec"] != FULL:
            assert row["prediction"] == _direct(llm, data, row, boundary)
    assert "first question" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="--query-aware"):  # one protocol per results file
        evaluate(_options(tmp_path, specs=("snapkv:keep=0.5",), tasks=("scbench_kv",), samples=1), llm=llm,
                 show_progress=False)


def test_refused_spec_is_recorded_per_turn(llm, tmp_path, monkeypatch):
    from longfit.eval import harness

    monkeypatch.setattr(harness, "unsupported_reason", lambda _llm, spec: None if spec == FULL else "refused here")
    store = evaluate(_options(tmp_path, tasks=("scbench_kv",), samples=1), llm=llm, show_progress=False)
    refused = [r for r in store.records if r["spec"] != FULL]
    assert [r["turn"] for r in refused] == [1, 2, 3, 4]
    assert all(r["status"] == "unsupported" and r["message"] == "refused here" and r["score"] is None
               for r in refused)
    assert "unsupported: refused here" in (tmp_path / "results.md").read_text()
