"""``longfit eval`` end to end on the tiny random model: files written, resume, unsupported specs, perplexity and
agreement, and the identities a keep=1.0 spec must satisfy."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from longfit.eval import agreement, report
from longfit.eval.harness import FULL, EvalOptions, ResultStore, canonical_specs, evaluate
from longfit.outputs import Logprob

SPECS = ("snapkv:keep=0.5", "streaming:sinks=4,window=64", "snapkv:keep=1.0", "snapkv:keep=0.5+kvquant")


@pytest.fixture(scope="module")
def llm():
    from longfit import LLM

    return LLM("tiny-llama", dtype="float32")


def _options(out, specs=SPECS, tasks=("passkey", "niah_single_1"), samples=2, **kw) -> EvalOptions:
    return EvalOptions(model="tiny-llama", specs=canonical_specs(specs), tasks=tasks, lengths=(640,), samples=samples,
                       seed=3, output=str(out), dtype="float32", max_new_tokens=6, **kw)


def _summary(store, kind, spec):
    rows = report.summarize(store.records)
    return next(r for r in rows if r["kind"] == kind and r["spec"] == spec and r["engine"] == "longfit")


def test_end_to_end_writes_files_and_resumes(llm, tmp_path):
    evaluate(_options(tmp_path, perplexity=True, agreement=True), llm=llm, show_progress=False)
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    task_rows = [r for r in data["records"] if r["kind"] == "task"]
    # full + 4 specs, 2 tasks, 2 samples each; every sample is stored once per (task, length)
    assert len(task_rows) == 5 * 2 * 2
    assert sorted(data["samples"]) == ["niah_single_1@640", "passkey@640"]
    assert all(len(v) == 2 for v in data["samples"].values())
    ok = [r for r in task_rows if r["status"] == "ok"]
    assert len(ok) == 4 * 2 * 2 and all(0.0 <= r["score"] <= 1.0 and "prediction" in r for r in ok)
    assert all(r["prompt_tokens"] + 6 <= 640 + 32 for r in ok)

    # A spec the engine refuses (pre-RoPE kvquant after eviction) is recorded as unsupported with the engine's
    # message, not crashed on.
    refused = [r for r in data["records"] if r["spec"] == "snapkv:keep=0.5+kvquant"]
    assert refused and all(r["status"] == "unsupported" and "does not combine" in r["message"] for r in refused)
    assert {r["kind"] for r in refused} == {"task", "perplexity", "agreement"}

    # KV bytes: exact spec formula; snapkv keep=0.5 stores half the context (rounded per layer).
    half = [r for r in ok if r["spec"] == "snapkv:keep=0.5"]
    assert all(abs(r["kv_bytes"] / r["kv_bytes_full"] - 0.5) < 0.01 for r in half)
    md = (tmp_path / "results.md").read_text()
    assert "| passkey | 640 | snapkv:keep=0.5 | longfit | 2 |" in md and "unsupported" in md

    # Resume: a second run with one more spec only runs that spec's rows; the old rows are left untouched.
    before = {json.dumps(r, sort_keys=True) for r in data["records"]}
    calls = []
    original = llm.generate

    def counting(prompts, *args, **kwargs):
        calls.append((len(prompts), kwargs.get("kv_compression")))
        return original(prompts, *args, **kwargs)

    llm.generate = counting
    try:
        again = evaluate(_options(tmp_path, specs=(*SPECS, "knorm:keep=0.5"), perplexity=True, agreement=True),
                         llm=llm, show_progress=False)
    finally:
        del llm.generate
    assert {spec for _, spec in calls} <= {"knorm:keep=0.5", None}
    # task groups (2) + perplexity (1) + agreement: full reference (1) + knorm (1)
    assert sum(1 for _, spec in calls if spec == "knorm:keep=0.5") == 4
    after = {json.dumps(r, sort_keys=True) for r in again.records}
    assert before <= after and len(after) == len(before) + 2 * 2 + 2 + 2


def test_keep_one_matches_full_cache(llm, tmp_path):
    store = evaluate(_options(tmp_path, specs=("snapkv:keep=1.0", "snapkv:keep=0.25"), tasks=("passkey",),
                              perplexity=True, agreement=True), llm=llm, show_progress=False)
    full_ppl = _summary(store, "perplexity", FULL)["score"]
    same_ppl = _summary(store, "perplexity", "snapkv:keep=1.0")["score"]
    low_ppl = _summary(store, "perplexity", "snapkv:keep=0.25")["score"]
    assert math.isfinite(full_ppl) and full_ppl > 1.0
    assert same_ppl == pytest.approx(full_ppl, rel=1e-4)
    assert abs(low_ppl - full_ppl) / full_ppl > 1e-3  # a real eviction changes the numbers
    same = _summary(store, "agreement", "snapkv:keep=1.0")
    assert same["score"] == 100.0 and same["kl"] < 1e-6
    low = _summary(store, "agreement", "snapkv:keep=0.25")
    assert low["score"] < 100.0 and low["kl"] > 1e-4
    # Identical generations: keep=1.0 predictions equal the full cache's, sample by sample.
    preds = {(r["spec"], r["index"]): r["prediction"] for r in store.records if r["kind"] == "task"}
    assert all(preds[("snapkv:keep=1.0", i)] == preds[(FULL, i)] for i in range(2))


def test_windows_at_the_full_context_leave_room_for_the_sampled_token(llm, tmp_path):
    # --lengths equal to the model's context (8k on SmolLM2): windows get max_model_len - 1 tokens, not an error.
    length = llm.engine.max_model_len
    store = evaluate(EvalOptions(model="tiny-llama", specs=canonical_specs(["snapkv:keep=0.5"]), tasks=(),
                                 lengths=(length,), samples=1, seed=3, output=str(tmp_path), dtype="float32",
                                 perplexity=True, agreement=True), llm=llm, show_progress=False)
    rows = [r for r in store.records if r["kind"] in ("perplexity", "agreement")]
    assert len(rows) == 4 and all(r["status"] == "ok" and r["prompt_tokens"] == length - 1 for r in rows)
    assert all(r["length"] == length for r in rows)


def test_query_aware_compresses_the_question_too(llm, tmp_path):
    store = evaluate(_options(tmp_path, specs=("snapkv:keep=0.5",), tasks=("passkey",), query_aware=True),
                     llm=llm, show_progress=False)
    rows = [r for r in store.records if r["kind"] == "task"]
    assert rows and all(r["context_tokens"] == r["prompt_tokens"] - 1 for r in rows)
    half = [r for r in rows if r["spec"] == "snapkv:keep=0.5"]
    assert all(abs(r["kv_bytes"] / r["kv_bytes_full"] - 0.5) < 0.01 for r in half)
    assert "Protocol: query-aware" in (tmp_path / "results.md").read_text()
    # One protocol per results file: resuming it question-agnostic is refused, naming the flag.
    with pytest.raises(ValueError, match="--query-aware"):
        evaluate(_options(tmp_path, specs=("snapkv:keep=0.5",), tasks=("passkey",)), llm=llm, show_progress=False)


def _lp(**probs):
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    return {int(k[1:]): Logprob(math.log(p), rank) for rank, (k, p) in enumerate(ranked, 1)}


def test_topk_kl_and_top1():
    full = _lp(t1=0.5, t2=0.3, t3=0.1)  # tail 0.1
    same = _lp(t1=0.5, t2=0.3, t3=0.1)
    assert agreement.topk_kl(full, same) == pytest.approx(0.0, abs=1e-12)
    other = _lp(t1=0.2, t2=0.6, t4=0.1)  # t3 unknown in `other`, t4 unknown in `full`: both go to the tail
    # common buckets t1, t2; tails: full 0.2, other 0.2
    expected = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.6) + 0.2 * math.log(0.2 / 0.2)
    assert agreement.topk_kl(full, other) == pytest.approx(expected)
    assert agreement.top1(full) == 1 and agreement.top1(other) == 2
    assert agreement.compare([full, full], [same, other])[:1] == (1,)


def test_report_retention_and_weak_baseline(tmp_path):
    def row(task, spec, index, score):
        return {"engine": "longfit", "kind": "task", "task": task, "length": 2048, "spec": spec, "index": index,
                "status": "ok", "score": score, "kv_bytes": 50 if spec != FULL else 100, "kv_bytes_full": 100}

    records = [row("a", FULL, 0, 1.0), row("a", FULL, 1, 1.0), row("a", "snapkv:keep=0.5", 0, 1.0),
               row("a", "snapkv:keep=0.5", 1, 0.0), row("b", FULL, 0, 0.1), row("b", "snapkv:keep=0.5", 0, 0.0)]
    rows = {(r["task"], r["spec"]): r for r in report.summarize(records)}
    assert rows[("a", "snapkv:keep=0.5")]["score"] == 50.0
    assert rows[("a", "snapkv:keep=0.5")]["retention"] == pytest.approx(0.5)
    assert rows[("b", "snapkv:keep=0.5")]["weak_baseline"] and rows[("b", "snapkv:keep=0.5")]["retention"] is None
    store = SimpleNamespace(records=records, meta={"model": "m"})
    report.write_report(store, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "baseline too weak" in md and "| a | 2048 | snapkv:keep=0.5 | longfit | 2 | 50.00 | 50% |" in md
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bad_input_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="samples"):
        _options(tmp_path, samples=0)
    with pytest.raises(ValueError, match="task"):
        _options(tmp_path, tasks=("no_such_task",))
    with pytest.raises(ValueError, match="kv_compression"):
        canonical_specs(["snapkv:keep=7"])
    (tmp_path / "results.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a longfit eval results file"):
        ResultStore(tmp_path / "results.json")


def test_specs_refused_for_this_engines_pages_are_unsupported(llm):
    """The engine's own geometry decides (block size, head dim, dtype), not only the spec's syntax: a flush unit
    that is not a multiple of the page size is recorded as unsupported before any sample runs."""
    from longfit.eval.harness import unsupported_reason

    block = llm.engine.kv_spec.block_size
    assert unsupported_reason(llm, f"kvquant:bits=2,group={block // 2}") is not None
    assert "multiple of the KV block size" in unsupported_reason(llm, f"kvquant:bits=2,group={block // 2}")
    assert unsupported_reason(llm, f"kvquant:bits=2,group={block}") is None
