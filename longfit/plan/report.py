"""Plain-text rendering of a ``Plan`` (one column per KV spec), the preset list, and the ``--plot`` PNG.

No rich and no torch; matplotlib is imported only inside ``write_plot``. JSON output is ``Plan.to_json()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from longfit.config import ModelConfig
from longfit.plan.cost_model import HardwareProfile
from longfit.plan.hardware import get_preset, list_presets, resolve_hardware
from longfit.plan.planner import Plan, SpecPlan, users_curve


def format_bytes(num_bytes: float | None) -> str:
    """Binary units: ``23040`` → ``22.5 KiB``."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 100:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def format_rate(value: float | None, unit: str = "tok/s") -> str:
    if value is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def format_overheads(hw: HardwareProfile) -> str:
    """The engine-overhead fields in one line (``-`` for a profile without them: a pure lower bound)."""
    if not hw.has_engine_overheads:
        return "-"
    return (f"{format_seconds(hw.step_overhead_s)}/step + {format_seconds(hw.step_overhead_per_seq_s)}/seq + "
            f"{format_seconds(hw.step_overhead_per_layer_s)}/layer + "
            f"{format_seconds(hw.step_overhead_per_seq_layer_s)}/seq/layer, KV read x{hw.kv_read_factor:.2f}"
            + "".join(f", {name} stream {format_seconds(hw.stream_costs(name)[0])}/layer + {cost * 1e9:.3g} ns/element"
                      for name, cost in hw.kv_dequant_s_per_element))


def _rows(plan: Plan) -> list[tuple[str, Callable[[SpecPlan], str]]]:
    users = plan.users or 1
    estimate = plan.decode_time_basis == "calibrated_estimate"
    kind = " (estimate)" if estimate else " (lower bound)"
    rate_kind = " (estimate)" if estimate else " (upper bound)"  # tokens/s of a lower-bound time
    rows: list[tuple[str, Callable[[SpecPlan], str]]] = [
        ("KV bytes / token", lambda s: f"{s.kv_bytes_per_token:,.1f}"),
        ("KV / request (exact)", lambda s: format_bytes(s.kv_bytes_per_request)),
        ("KV / request (pages)",
         lambda s: format_bytes(s.kv_bytes_per_request_paged)),
        ("compression rate", lambda s: f"{s.compression_rate:.2f}x"),
        ("max users", lambda s: f"{s.max_users:,}"),
    ]
    if plan.users is not None:
        rows.append((f"fits {plan.users} user{'s' if plan.users > 1 else ''}", lambda s: "yes" if s.fits else "NO"))
    rows += [
        (f"max context @ {users} user{'s' if users > 1 else ''}",
         lambda s: f"{s.max_context:,}" + (" (model)" if s.max_context_limited_by == "model" else "")),
        ("prefill (lower bound)", lambda s: f"{format_seconds(s.prefill_s)} {s.prefill_bound[:3]}"),
    ]
    if estimate:  # the pure bound next to the estimate, so the overhead's share is visible
        rows.append(("decode / token, batch 1 (lower bound)",
                     lambda s: f"{format_seconds(s.decode_batch1_lower_bound_s)} {s.decode_batch1_bound[:3]}"))
    rows += [
        ("decode / token, batch 1" + kind, lambda s: format_seconds(s.decode_batch1_s) + (
            "" if estimate else f" {s.decode_batch1_bound[:3]}")),
        ("decode / token, max batch" + kind, lambda s: f"{format_seconds(s.decode_max_batch_s)} @ {s.max_batch}"),
        ("throughput, batch 1" + rate_kind, lambda s: format_rate(s.throughput_batch1)),
        ("throughput, max batch" + rate_kind, lambda s: format_rate(s.throughput_max_batch)),
    ]
    if plan.users is not None:
        rows.append((f"throughput, {plan.users} user{'s' if plan.users > 1 else ''}" + rate_kind,
                     lambda s: format_rate(s.throughput_users)))
    rows += [
        ("request latency, batch 1" + kind, lambda s: format_seconds(s.request_latency_s)),
        ("swap to host + back", lambda s: format_seconds(s.swap_host_s)),
        ("swap to disk + back", lambda s: format_seconds(s.swap_disk_s)),
    ]
    if any(s.retention is not None for s in plan.specs):
        rows.append(("retention", lambda s: "-" if s.retention is None else
                     f"{s.retention:.3f}" + (f" @{s.retention_length}" if s.retention_length else "")))
    return rows


def format_plan(plan: Plan) -> str:
    """The human-readable plan: header lines, then a metric × spec table, then the cheapest spec and notes."""
    wb, hw = plan.weight_bytes, plan.hardware
    lines = [
        (f"model {plan.model}: {plan.num_params / 1e6:,.1f}M parameters, weights {plan.weights} = "
         f"{format_bytes(wb.total)} ({format_bytes(wb.read_per_step)} read per decode step)"),
        (f"request: {plan.context:,} prompt + {plan.output_tokens:,} output tokens "
         f"({plan.kv_tokens_per_request:,} tokens of KV held)"),
        (f"hardware {hw.name}{' (measured)' if hw.measured else ''}: {format_rate(hw.memory_bandwidth, 'B/s')}, "
         f"bf16 {format_rate(hw.bf16_flops, 'FLOP/s')}, fp32 {format_rate(hw.fp32_flops, 'FLOP/s')}"),
    ]
    if plan.memory_bytes is not None:
        lines.append(f"memory {format_bytes(plan.memory_bytes)} - weights {format_bytes(wb.total)} - reserve "
                     f"{format_bytes(plan.reserve_bytes)} = KV budget {format_bytes(plan.kv_budget_bytes)}")
    else:
        lines.append(f"KV budget {format_bytes(plan.kv_budget_bytes)} (given)")
    lines.append(f"pages of {plan.block_size} tokens x 1 layer = {format_bytes(plan.page_bytes)}; "
                 "prefill and swap times are lower bounds (mem = bandwidth-bound, com = compute-bound)")
    if plan.decode_time_basis == "calibrated_estimate":
        lines.append(f"decode times are calibrated estimates of longfit's engine: lower bound + overheads "
                     f"{format_overheads(hw)}")
    else:
        lines.append("decode times are lower bounds (no engine overheads in this hardware profile)")
    header = ["", *(s.spec for s in plan.specs)]
    body = [[label, *(fn(s) for s in plan.specs)] for label, fn in _rows(plan)]
    lines += ["", _table(header, body)]
    if plan.min_retention is not None:
        lines.append("")
        lines.append(f"cheapest spec with retention >= {plan.min_retention}: {plan.cheapest_spec or 'none known'}")
    if plan.notes:
        lines += ["", *(f"note: {n}" for n in plan.notes)]
    return "\n".join(lines)


def format_presets() -> str:
    """The presets, then the calibrated ``this`` profile when one is saved, and its engine overheads."""
    profiles = [get_preset(name) for name in list_presets()]
    try:
        profiles.append(resolve_hardware("this"))
    except ValueError:
        pass  # not calibrated yet (or an unreadable file): list the presets alone
    rows = [[p.name, p.kind, format_rate(p.memory_bandwidth, "B/s"), format_rate(p.bf16_flops, "FLOP/s"),
             format_rate(p.fp32_flops, "FLOP/s"), format_bytes(p.memory_bytes),
             format_rate(p.host_link_bandwidth, "B/s")] for p in profiles]
    lines = [_table(["preset", "kind", "bandwidth", "bf16", "fp32", "memory", "host link"], rows), ""]
    lines += [f"{p.name}: decode overheads {format_overheads(p)}" for p in profiles if p.has_engine_overheads]
    lines.append("presets have no engine overheads: their decode times are lower bounds. Sources: "
                 "longfit/plan/hardware.py; `--hardware this` uses `longfit plan --calibrate`")
    return "\n".join(lines)


def context_grid(limit: int, context: int, num_points: int = 40, start: int = 256) -> list[int]:
    """Geometric grid of context lengths from ``start`` to ``limit``, plus the planned context."""
    start = min(start, limit)
    ratio = (limit / start) ** (1 / max(num_points - 1, 1))
    grid = {min(limit, round(start * ratio**i)) for i in range(num_points)} | {min(context, limit)}
    return sorted(grid)


def write_plot(plan: Plan, model: ModelConfig, path: str | Path, allow_extrapolation: bool = False) -> Path:
    """PNG of max concurrent users vs context length, one line per spec, at the plan's KV budget."""
    import matplotlib  # lazy: only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = model.max_model_len - plan.output_tokens
    if allow_extrapolation:
        limit = max(limit, 4 * plan.context)
    contexts = context_grid(max(limit, 1), plan.context)
    figure, axes = plt.subplots(figsize=(8, 5))
    for spec in plan.specs:
        users = users_curve(model, spec.spec, contexts, kv_budget_bytes=plan.kv_budget_bytes,
                            output_tokens=plan.output_tokens, block_size=plan.block_size,
                            kv_dtype_bytes=plan.kv_dtype_bytes)
        axes.plot(contexts, [u if u > 0 else math.nan for u in users], marker=".", label=spec.spec)
    if plan.users:
        axes.axhline(plan.users, color="grey", linestyle="--", linewidth=1, label=f"{plan.users} users")
    axes.axvline(plan.context, color="grey", linestyle=":", linewidth=1, label=f"context {plan.context:,}")
    if allow_extrapolation and model.max_model_len <= contexts[-1]:
        axes.axvline(model.max_model_len, color="red", linestyle=":", linewidth=1, label="model context limit")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context length (prompt tokens)")
    axes.set_ylabel("max concurrent users")
    memory = (f"memory {format_bytes(plan.memory_bytes)}, " if plan.memory_bytes is not None else "")
    axes.set_title(f"{plan.model}, {plan.weights} weights, {memory}KV budget {format_bytes(plan.kv_budget_bytes)}, "
                   f"{plan.hardware.name}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    target = Path(path)
    figure.savefig(target, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return target

