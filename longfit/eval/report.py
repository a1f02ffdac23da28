"""Report of ``longfit eval``: a markdown table and a matplotlib plot from the results file. No torch.

Task scores are RULER's (mean per-sample score ×100). ``retention = score / full-cache score`` of the same engine,
task and length; where that baseline is below ``WEAK_BASELINE`` the row is flagged instead of reporting a
retention, since a ratio of two small numbers measures noise. Perplexity rows report ``exp(mean NLL)`` and its
change against the full cache; agreement rows report top-1 agreement (%) and the mean top-k KL (see
``agreement.py``). KV bytes are the stored bytes of the context (``compression.storage.kv_bytes``).

Shared-context rows (``kind="shared"``, ``shared_context.py``) get their own table: the score over all turns, and
turn 1 against turns >= 2 (SCBench's split: a cache compressed for, or before, the first question must still
answer the later ones), each with its retention against the full cache's same turns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FULL = "full"
WEAK_BASELINE = 20.0  # full-cache task score (out of 100) below which retention is not reported


def method_name(spec: str) -> str:
    """Line label of a spec in the plot: the method names without their parameters ("snapkv", "snapkv+kivi")."""
    return "+".join(stage.split(":")[0] for stage in spec.split("+"))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (engine, kind, task, length, spec), in first-seen order."""
    from longfit.eval.perplexity import corpus_perplexity

    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(record["engine"], record["kind"], record["task"], int(record["length"]), record["spec"])].append(record)
    rows = []
    for (engine, kind, task, length, spec), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        row: dict[str, Any] = {"engine": engine, "kind": kind, "task": task, "length": length, "spec": spec,
                               "n": len(ok), "status": "ok" if ok else group[0].get("status", "error"),
                               "message": next((r.get("message") for r in group if r.get("message")), None),
                               "kv_bytes": _mean([r["kv_bytes"] for r in group if "kv_bytes" in r]),
                               "kv_bytes_full": _mean([r["kv_bytes_full"] for r in group if "kv_bytes_full" in r])}
        if kind == "perplexity":
            row["score"] = corpus_perplexity(ok)
        elif kind == "agreement":
            row["score"] = None if not ok else round(100.0 * sum(r["score"] for r in ok) / len(ok), 2)
            row["kl"] = _mean([r["kl"] for r in ok])
        else:
            row["score"] = None if not ok else round(100.0 * sum(r["score"] for r in ok) / len(ok), 2)
        if kind == "shared":
            row.update(_turn_scores(ok))
        rows.append(row)
    base = {(r["engine"], r["kind"], r["task"], r["length"]): r for r in rows if r["spec"] == FULL}
    for row in rows:
        # The kvpress peer's baseline is longfit's full cache when it ran none of its own.
        full = base.get((row["engine"], row["kind"], row["task"], row["length"])) or base.get(
            ("longfit", row["kind"], row["task"], row["length"]))
        row["baseline"] = None if full is None else full["score"]
        row["retention"] = None
        row["weak_baseline"] = False
        if row["score"] is None or row["baseline"] is None:
            continue
        if row["kind"] == "perplexity":
            row["retention"] = row["score"] / row["baseline"]  # ratio of perplexities (1.03 = +3%)
        elif row["kind"] in ("task", "shared") and row["baseline"] < WEAK_BASELINE:
            row["weak_baseline"] = True
        elif row["baseline"] > 0:
            row["retention"] = row["score"] / row["baseline"]
    for row in rows:
        if row["kind"] == "shared":
            full = base.get((row["engine"], "shared", row["task"], row["length"])) or {}
            for part in ("turn1", "later"):
                score, baseline = row[f"score_{part}"], full.get(f"score_{part}")
                row[f"retention_{part}"] = (None if score is None or baseline is None or baseline < WEAK_BASELINE
                                            else score / baseline)
    return rows


def _turn_scores(ok: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-turn scores (x100) of the ok rows of one shared-context group, turn 1 and the mean of turns >= 2."""
    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in ok:
        by_turn[int(r["turn"])].append(r["score"])
    turn_scores = {turn: round(100.0 * _mean(by_turn[turn]), 2) for turn in sorted(by_turn)}
    later = [score for turn, scores in by_turn.items() if turn >= 2 for score in scores]
    return {"turn_scores": turn_scores, "score_turn1": turn_scores.get(1),
            "score_later": None if not later else round(100.0 * _mean(later), 2)}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _kv(row: dict[str, Any]) -> str:
    if row["kv_bytes"] is None:
        return "–"
    ratio = row["kv_bytes"] / row["kv_bytes_full"] if row["kv_bytes_full"] else float("nan")
    return f"{row['kv_bytes'] / 2**20:.2f} MiB ({100 * ratio:.0f}%)"


def markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> str:
    """The tables of results.md: tasks, then per-length averages, then perplexity and agreement."""
    meta = meta or {}
    lines = [f"# longfit eval: {meta.get('model', '?')} ({meta.get('dtype', '?')})", ""]
    lines += ["Score: RULER string match ×100 (mean over samples). Retention = score / full-cache score of the "
              "same task and length. KV = stored bytes of the context under the spec (share of the full cache). "
              f"Rows whose full-cache score is below {WEAK_BASELINE:g} are flagged: retention is not measurable "
              "there.",
              "Protocol: " + ("query-aware (context + question compressed; SnapKV's observation window sees the "
                              "question)." if meta.get("query_aware") else
                              "question-agnostic (only the context is compressed; the question is prefilled "
                              "after it, uncompressed)."), ""]
    task_rows = [r for r in rows if r["kind"] == "task"]
    if task_rows:
        lines += ["| task | length | spec | engine | n | score | retention | KV (context) | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(task_rows, key=lambda r: (r["length"], r["task"], r["engine"] != "longfit")):
            note = ("baseline too weak (< %g)" % WEAK_BASELINE) if r["weak_baseline"] else ""
            if r["status"] != "ok":
                note = f"{r['status']}: {(r['message'] or '')[:90]}"
            retention = f"{100 * r['retention']:.0f}%" if r["retention"] is not None else "–"
            lines.append(f"| {r['task']} | {r['length']} | {r['spec']} | {r['engine']} | {r['n']} | "
                         f"{_fmt(r['score'])} | {retention} | {_kv(r)} | {note} |")
        lines += ["", "Average over the tasks each spec completed:", "",
                  "| length | spec | engine | tasks | mean score | mean retention (measurable tasks) |",
                  "|---|---|---|---|---|---|"]
        for (length, spec, engine), group in _by_spec(task_rows).items():
            scores = [r["score"] for r in group if r["score"] is not None]
            kept = [r["retention"] for r in group if r["retention"] is not None]
            lines.append(f"| {length} | {spec} | {engine} | {len(scores)} | {_fmt(_mean(scores))} | "
                         f"{'–' if not kept else f'{100 * _mean(kept):.0f}%'} |")
    shared = [r for r in rows if r["kind"] == "shared"]
    if shared:
        lines += _shared_table(shared, meta)
    ppl = [r for r in rows if r["kind"] == "perplexity"]
    if ppl:
        lines += ["", "Perplexity (teacher-forced continuation after the compressed context; see perplexity.py):", "",
                  "| length | spec | windows | perplexity | vs full | KV (context) | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(ppl, key=lambda r: r["length"]):
            change = "–" if r["retention"] is None else f"{100 * (r['retention'] - 1):+.2f}%"
            note = "" if r["status"] == "ok" else f"{r['status']}: {(r['message'] or '')[:90]}"
            lines.append(f"| {r['length']} | {r['spec']} | {r['n']} | {_fmt(r['score'], 3)} | {change} | "
                         f"{_kv(r)} | {note} |")
    agree = [r for r in rows if r["kind"] == "agreement"]
    if agree:
        lines += ["", "Agreement with the full cache (top-1 %, mean KL on the top-20 + tail partition, a lower "
                  "bound; see agreement.py):", "",
                  "| length | spec | windows | top-1 agreement (%) | mean KL | KV (context) | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(agree, key=lambda r: r["length"]):
            note = "" if r["status"] == "ok" else f"{r['status']}: {(r['message'] or '')[:90]}"
            lines.append(f"| {r['length']} | {r['spec']} | {r['n']} | {_fmt(r['score'])} | {_fmt(r.get('kl'), 4)} | "
                         f"{_kv(r)} | {note} |")
    return "\n".join(lines) + "\n"


def _shared_table(shared: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The shared-context section of results.md."""
    where = ("the context and the first question (``--query-aware``): the cache is tuned to question 1"
             if meta.get("query_aware") else "the context alone, before any question is seen")

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.0f}%"

    lines = ["", "Shared context (SCBench multi-turn; see shared_context.py): one context per sample, its questions "
             "asked in turn, earlier turns fed their golden answers. Compressed: " + where + "; every turn sees the "
             "same compressed context. n = scored turns. Turn 1 vs turns >= 2: can a cache compressed once still "
             "answer the later questions? Retention per part is against the full cache's same turns.", "",
             "| task | length | spec | engine | n | score | retention | turn 1 | turns >= 2 | retention turn 1 | "
             "retention turns >= 2 | per turn | KV (context) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(shared, key=lambda r: (r["length"], r["task"], r["engine"] != "longfit")):
        note = ("baseline too weak (< %g)" % WEAK_BASELINE) if r["weak_baseline"] else ""
        if r["status"] != "ok":
            note = f"{r['status']}: {(r['message'] or '')[:90]}"
        per_turn = " / ".join(f"{score:.0f}" for score in r["turn_scores"].values()) or "–"
        lines.append(f"| {r['task']} | {r['length']} | {r['spec']} | {r['engine']} | {r['n']} | {_fmt(r['score'])} | "
                     f"{pct(r['retention'])} | {_fmt(r['score_turn1'])} | {_fmt(r['score_later'])} | "
                     f"{pct(r['retention_turn1'])} | {pct(r['retention_later'])} | {per_turn} | {_kv(r)} | {note} |")
    return lines


def _by_spec(task_rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in task_rows:
        groups[(r["length"], r["spec"], r["engine"])].append(r)
    return groups


_MARKERS = ("o", "s", "^", "D")


def plot(rows: Sequence[dict[str, Any]], path: str | Path) -> bool:
    """Score vs compression (1 - KV bytes / full KV bytes): one line per method and engine, one panel per length.

    The y value is the mean task score over the tasks of that (length, spec); shared-context rows get panels of
    their own (score over all turns). Returns False if there is nothing to plot (no completed task or shared rows).
    """
    scored = [r for r in rows if r["kind"] in ("task", "shared") and r["score"] is not None
              and r["kv_bytes"] is not None]
    if not scored:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One panel per length of the single-question tasks, then one per length of the shared-context tasks.
    panels = [(kind, length) for kind in ("task", "shared")
              for length in sorted({r["length"] for r in scored if r["kind"] == kind})]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (kind, length) in zip(axes[0], panels):
        task_rows = [r for r in scored if r["kind"] == kind]
        points: dict[str, list[tuple[float, float]]] = defaultdict(list)
        full_points = []
        for (row_length, spec, engine), group in _by_spec(task_rows).items():
            if row_length != length:
                continue
            x = 1.0 - sum(r["kv_bytes"] for r in group) / max(1.0, sum(r["kv_bytes_full"] for r in group))
            y = _mean([r["score"] for r in group])
            if spec == FULL:
                full_points.append((x, y))
            else:
                label = method_name(spec) if engine == "longfit" else f"{engine}:{method_name(spec)}"
                points[label].append((x, y))
        for index, (label, xy) in enumerate(sorted(points.items())):
            xy = sorted(full_points[:1] + xy)
            # The default cycle repeats after 10 methods: tab20's 10 dark hues, then its light ones, each group of
            # 10 with its own marker.
            color = plt.get_cmap("tab20")(2 * index % 20 + index // 10 % 2)
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker=_MARKERS[index // 10 % len(_MARKERS)],
                    color=color, linestyle="--" if ":" in label else "-", label=label)
        if full_points:
            ax.axhline(full_points[0][1], color="grey", linewidth=0.8, label="full cache")
        ax.set_title(f"{length} tokens" if kind == "task" else f"{length} tokens, shared context (all turns)")
        ax.set_xlabel("compression (1 - KV bytes / full)")
        ax.set_ylabel("mean task score")
        ax.set_xlim(-0.02, 1.0)
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(store: Any, out: str | Path) -> list[dict[str, Any]]:
    """Write ``out/results.md`` and ``out/results.png`` from a ``ResultStore``; returns the summary rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(store.records)
    (out / "results.md").write_text(markdown(rows, store.meta))
    plot(rows, out / "results.png")
    return rows
