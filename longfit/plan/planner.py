"""Capacity planner: will a model fit, how many users, how fast, at what quality cost (``longfit plan``).

Turns the four long-context costs of "Challenges in Deploying Long-Context Transformers: A Theoretical Peak
Performance Analysis" (prefill compute, concurrent users, KV re-reads at decode, swapping) into numbers for one
model, memory budget, hardware profile and list of KV compression specs. Memory figures are exact (the engine's
paged layout). Prefill and swap times are lower bounds; decode times are lower bounds for presets and, with a
calibrated profile (``--hardware this``), estimates of longfit's engine: the bound plus the measured per-step
overheads (``cost_model.decode_time``). No torch here.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longfit.config import ModelConfig, SchedulerConfig, parse_bytes, parse_tokens
from longfit.plan import cost_model as cm
from longfit.plan.cost_model import HardwareProfile, WeightBytes

# NOTE: load_fidelity is re-exported: the fidelity file code moved to plan/fidelity.py, callers import it from here.
from longfit.plan.fidelity import FidelityRecord, load_fidelity, retention_by_spec  # noqa: F401
from longfit.plan.hardware import list_presets, resolve_hardware

FULL_CACHE_SPECS = ("none", "full", "")
_EXTRAPOLATION_LIMIT = 1 << 24  # search bound for max context when the model's limit is lifted (16M tokens)


# ---------------------------------------------------------------------------------------------- KV per spec
@dataclass(frozen=True, slots=True)
class KVFootprint:
    """KV of one request holding ``num_tokens`` tokens under one spec.

    exact_bytes: stored bytes (codes, scales, residual windows), no page rounding.
    paged_bytes: whole pages, at the peak of the request's life so far (what the pool must hold for it).
    read_bytes: what one decode step reads from it (all of it unless the spec reads a subset).
    read_keys: tokens one decode step attends to, summed over layers (for attention FLOPs).
    streams: the quantized streams one decode step expands (``cost_model.StreamRead``): their storage format
        (``compression.storage.dequant_format``), the layers holding one, and their K and V elements (``2 · Hkv · D``
        per stream token per layer). The engine expands each stream whole at every step (ShadowKV with chunk
        selection: the chunks it reads), a cost beyond the bytes it reads.
    """

    exact_bytes: int
    paged_bytes: int
    read_bytes: int
    read_keys: int
    streams: cm.StreamRead = cm.StreamRead()


def _spec_module(name: str = "spec") -> Any:
    """``longfit.compression.spec`` (or ``.storage``, its byte math; both torch-free), imported when a compressed
    spec is first planned."""
    try:
        return importlib.import_module(f"longfit.compression.{name}")
    except ImportError as exc:
        raise ValueError(f"kv_compression specs other than 'none' need longfit.compression.{name}, which is not "
                         "available in this build") from exc


def is_full_cache(spec: str) -> bool:
    return spec.strip().lower() in FULL_CACHE_SPECS


def kv_footprint(model: ModelConfig, spec: str, num_prompt_tokens: int, num_output_tokens: int = 0, *,
                 block_size: int = 32, dtype_bytes: int = 2) -> KVFootprint:
    """KV footprint of one request: a ``num_prompt_tokens`` prompt, then ``num_output_tokens`` generated.

    Evicting specs compress the prompt once at the end of prefill (``compression.storage.kv_bytes``); generated
    tokens are appended in the spec's storage format (same function, eviction stage removed). With decode-time
    re-compression (``every``) the footprint is the peak: each layer at most its trigger
    (``compression.spec.decode_budgets``). Paged bytes are exact for the full cache, for evict/select specs (pages
    of ``block_size`` tokens per layer) and for the storage the engine packs into its pages (KIVI, int8, ThinK,
    KVQuant, ShadowKV: ``compression.storage.stored_layout``; MiniCache: ``minicache_layouts``), whose exact bytes
    then follow the engine's per-layer token counts.
    """
    held = kv_tokens_held(num_prompt_tokens, num_output_tokens)
    page = cm.page_bytes(model, block_size, dtype_bytes)
    if is_full_cache(spec):
        exact = cm.full_kv_bytes(model, held, dtype_bytes)
        return KVFootprint(exact, cm.full_kv_pages(model, held, block_size) * page, exact,
                           sum(cm.layer_tokens(model, held)))
    module, sizes = _spec_module(), _spec_module("storage")
    parsed = module.parse_spec(spec)
    if parsed.is_empty:
        return kv_footprint(model, "none", num_prompt_tokens, num_output_tokens, block_size=block_size,
                            dtype_bytes=dtype_bytes)
    grown = held - num_prompt_tokens
    exact = sizes.kv_bytes(parsed, model, num_prompt_tokens, dtype_bytes=dtype_bytes)
    if grown:
        appended = module.compose([s for s in parsed.stages if s.kind != "evict"])
        exact += (sizes.kv_bytes(appended, model, held, dtype_bytes=dtype_bytes)
                  - sizes.kv_bytes(appended, model, num_prompt_tokens, dtype_bytes=dtype_bytes))
    windows = [model.layer_window(layer) for layer in range(model.num_layers)]
    kept = module.kept_tokens_per_layer(parsed, model.num_layers, num_prompt_tokens, layer_windows=windows)
    tokens = [n + grown if w is None else min(held, w) for n, w in zip(kept, windows)]
    budgets = module.decode_budgets(parsed, model.num_layers, num_prompt_tokens, layer_windows=windows)
    if any(budgets):  # decode-time re-compression (eviction only): the peak, just before a layer is evicted again
        tokens = [module.peak_decode_tokens(n, grown, b) if w is None else t
                  for n, w, b, t in zip(kept, windows, budgets, tokens)]
        exact = sum(tokens) * cm.kv_bytes_per_token_per_layer(model, dtype_bytes)
    dense = sum(tokens) * cm.kv_bytes_per_token_per_layer(model, dtype_bytes)
    storage = parsed.stage("merge", "lowrank", "quantize")
    layouts = None
    if storage is not None and storage.name == "minicache":
        layouts = sizes.minicache_layouts(storage, model.num_kv_heads, model.head_dim, tokens,
                                          [w is None for w in windows], dtype_bytes)
    elif storage is not None:
        layouts = [sizes.stored_layout(storage, model.num_kv_heads, n, model.head_dim, dtype_bytes)
                   if w is None else None for n, w in zip(tokens, windows)]
    dequant = stream_layers = unread = 0
    chunks_read = sizes.shadowkv_chunks_read(storage) if storage is not None and storage.name == "shadowkv" else None
    if layouts is not None and any(layouts):  # records on the first pages, the other tokens after them (engine)
        per_token = cm.kv_bytes_per_token_per_layer(model, dtype_bytes)
        exact, pages = 0, 0
        for n, w, layout in zip(tokens, windows, layouts):
            if w is not None:
                exact += min(held, w) * per_token
                pages += cm.peak_layer_pages(held, w, block_size)
                continue
            stream_tokens, stream_bytes, side = layout or (0, 0, 0)
            rebuilt = stream_tokens  # ShadowKV's selection: each KV head rebuilds and attends its chosen chunks only
            if chunks_read is not None:
                rebuilt = min(stream_tokens, chunks_read * storage.get("chunk"))
                unread += stream_tokens - rebuilt
            dequant += rebuilt * 2 * model.num_kv_heads * model.head_dim
            stream_layers += stream_tokens > 0
            exact += stream_bytes + side + (n - stream_tokens) * per_token
            pages += -(-stream_bytes // page) + -(-(n - stream_tokens) // block_size)
        paged = pages * page + sum(layout[2] for layout in layouts if layout)
    else:  # whole pages per layer, plus any page metadata the select stage stores beside them
        pages = sum(-(-n // block_size) if w is None else cm.peak_layer_pages(held, w, block_size)
                    for n, w in zip(tokens, windows))
        paged = pages * page + exact - dense
    read, skipped = exact, 0
    select = parsed.stage("select")
    if select is not None:  # Quest: layers from dense_layers on read at most `budget` tokens per step
        skipped = sum(max(0, n - select.get("budget")) for layer, (n, w) in enumerate(zip(tokens, windows))
                      if w is None and layer >= select.get("dense_layers"))
        read = exact - skipped * exact // max(sum(tokens), 1)
    return KVFootprint(exact, paged, read, sum(tokens) - skipped - unread,
                       streams=cm.StreamRead(sizes.dequant_format(storage), stream_layers, dequant) if dequant
                       else cm.StreamRead())


def canonical_spec(spec: str) -> str:
    """One spelling per spec (``compression.spec``'s canonical text), so fidelity rows and specs match."""
    if is_full_cache(spec):
        return "none"
    try:
        return str(_spec_module().parse_spec(spec).text)
    except ValueError:
        return "".join(spec.split()).lower()


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True, slots=True)
class SpecPlan:
    """Every figure for one KV spec. Bytes are bytes, times seconds, rates tokens/s; None: not applicable.

    Decode times (``decode_*_s``, throughputs, the decode part of the latency) are the lower bound plus the
    hardware profile's engine overheads: equal to the bound for presets (``Plan.decode_time_basis``). The
    ``*_lower_bound_s`` fields always hold the pure bound.
    """

    spec: str
    kv_bytes_per_token: float  # exact request bytes ÷ tokens held (sliding windows make it depend on length)
    kv_bytes_per_request: int  # exact, at kv_tokens_per_request tokens
    kv_bytes_per_request_paged: int  # whole pages, peak over the request's life
    prefill_peak_kv_bytes: int  # the request during its prefill (uncompressed prompt + pages) if larger
    compression_rate: float  # full-cache exact bytes ÷ this spec's exact bytes (EfficientLLM)
    max_users: int  # concurrent requests of this context the KV budget holds
    fits: bool | None  # users ≤ max_users, None when no users were given
    max_context: int  # longest prompt max_context_users requests can each have
    max_context_users: int
    max_context_limited_by: str  # "memory" or "model" (its context limit)
    prefill_s: float
    prefill_bound: str
    decode_batch1_s: float  # one decode step at batch 1 = time per output token
    decode_batch1_bound: str
    max_batch: int
    decode_max_batch_s: float | None
    throughput_batch1: float  # tokens/s
    throughput_max_batch: float | None  # aggregate tokens/s of max_batch requests
    decode_users_s: float | None
    throughput_users: float | None
    request_latency_s: float  # prefill + output_tokens decode steps at batch 1
    swap_host_s: float | None  # one request's pages to host memory and back (GPUs)
    swap_disk_s: float | None  # to disk and back
    memory_used_bytes: int | None  # weights + reserve + users' KV pages, when users were given
    retention: float | None = None  # mean over tasks of score ÷ full-cache score, at retention_length
    retention_tasks: int = 0
    retention_length: int | None = None
    meets_min_retention: bool | None = None
    decode_batch1_lower_bound_s: float | None = None  # the bandwidth/compute bound alone
    decode_max_batch_lower_bound_s: float | None = None
    decode_users_lower_bound_s: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """The answer of ``plan()``: shared facts, then one ``SpecPlan`` per requested spec."""

    model: str
    num_params: int
    weights: str
    weight_bytes: WeightBytes
    context: int
    output_tokens: int
    users: int | None
    kv_tokens_per_request: int
    memory_bytes: int | None
    reserve_bytes: int
    kv_budget_bytes: int
    block_size: int
    kv_dtype_bytes: int
    page_bytes: int
    hardware: HardwareProfile
    specs: list[SpecPlan]
    min_retention: float | None = None
    cheapest_spec: str | None = None
    notes: list[str] = field(default_factory=list)
    # "lower_bound" (no engine overheads in the profile: presets) or "calibrated_estimate" (bound + overheads)
    decode_time_basis: str = "lower_bound"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _validate(model: ModelConfig, context: int, users: int | None, output_tokens: int, block_size: int,
              kv_dtype_bytes: int, allow_extrapolation: bool, min_retention: float | None) -> None:
    _positive_int(context, "context")
    if users is not None:
        _positive_int(users, "users")
    if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
        raise ValueError(f"output_tokens must be an integer >= 0, got {output_tokens!r}")
    if _positive_int(block_size, "block_size") % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
    if kv_dtype_bytes not in (2, 4):
        raise ValueError(f"kv_dtype_bytes must be 2 (bfloat16) or 4 (float32), got {kv_dtype_bytes!r}")
    if min_retention is not None and not 0.0 < min_retention <= 1.0:
        raise ValueError(f"min_retention must be in (0, 1], got {min_retention!r}")
    if context + output_tokens > model.max_model_len and not allow_extrapolation:
        raise ValueError(f"context ({context}) + output_tokens ({output_tokens}) = {context + output_tokens} exceeds "
                         f"the model's max_model_len={model.max_model_len}; use a context <= "
                         f"{model.max_model_len - output_tokens} or allow_extrapolation (--allow-extrapolation)")


def kv_tokens_held(context: int, output_tokens: int) -> int:
    """Tokens of KV a request holds at its end: the prompt and every output token but the last, which is
    sampled and never fed back (the engine allocates slots before each step)."""
    return context + max(output_tokens - 1, 0)


class _SpecCapacity:
    """Fit arithmetic for one spec: u requests fit iff (u - 1)·steady + max(steady, prefill peak) ≤ capacity.

    The peak covers the one request being prefilled, whose uncompressed prompt is resident until its policy runs.
    """

    def __init__(self, model: ModelConfig, spec: str, capacity: int, block_size: int, dtype_bytes: int,
                 output_tokens: int) -> None:
        self.model, self.spec, self.capacity = model, spec, capacity
        self.block_size, self.dtype_bytes, self.output_tokens = block_size, dtype_bytes, output_tokens

    def footprint(self, context: int) -> KVFootprint:
        return kv_footprint(self.model, self.spec, context, self.output_tokens, block_size=self.block_size,
                            dtype_bytes=self.dtype_bytes)

    def prefill_peak(self, context: int, steady: KVFootprint) -> int:
        if is_full_cache(self.spec):
            return steady.paged_bytes
        prompt = cm.full_kv_pages(self.model, context, self.block_size)
        return max(steady.paged_bytes, prompt * cm.page_bytes(self.model, self.block_size, self.dtype_bytes))

    def max_users(self, context: int) -> int:
        steady = self.footprint(context)
        peak = self.prefill_peak(context, steady)
        if steady.paged_bytes <= 0 or self.capacity < peak:
            return 0
        return 1 + (self.capacity - peak) // steady.paged_bytes

    def max_context(self, users: int, limit: int) -> int:
        """Largest prompt length ≤ limit at which ``users`` requests fit; 0 if none does (binary search on a
        footprint that only grows with the prompt)."""
        low, high = 0, limit
        while low < high:
            mid = (low + high + 1) // 2
            if self.max_users(mid) >= users:
                low = mid
            else:
                high = mid - 1
        return low


def plan(model: ModelConfig, *, context: int, users: int | None, output_tokens: int, memory_bytes: int | None,
         weights: str, specs: Sequence[str], hardware: HardwareProfile, kv_memory_bytes: int | None = None,
         reserve_bytes: int | None = None, block_size: int = 32, kv_dtype_bytes: int = 2,
         allow_extrapolation: bool = False, fidelity: Sequence[FidelityRecord] | str | Path | None = None,
         min_retention: float | None = None) -> Plan:
    """Plan serving ``model`` at ``context`` prompt tokens (+ ``output_tokens``) within ``memory_bytes``.

    Args:
        memory_bytes: all memory for weights, activations and KV; None: the hardware profile's capacity.
        weights: ``bf16``, ``fp32``, ``int8``, ``int4`` or ``int4-g32/64/128``.
        specs: KV compression specs (``none`` = full cache); each gets a ``SpecPlan``.
        kv_memory_bytes: KV budget given directly (as the engine's ``CacheConfig.memory_bytes``); overrides
            memory - weights - reserve.
        reserve_bytes: activations and workspace kept out of the KV budget; None: ``cm.activation_bytes`` for the
            scheduler's default token budget.
        fidelity: records (or a path to the JSON file, see ``plan/fidelity.py``) giving each spec's retention.
        min_retention: quality floor; ``Plan.cheapest_spec`` is the spec with the smallest KV per request meeting it.

    Raises:
        ValueError: naming the field, for non-positive users/context, a context beyond the model's limit without
            ``allow_extrapolation``, an unknown weight format or spec, or no memory figure at all.
    """
    _validate(model, context, users, output_tokens, block_size, kv_dtype_bytes, allow_extrapolation, min_retention)
    fmt = cm.parse_weight_format(weights)
    wb = cm.weight_bytes(model, fmt)
    specs = list(specs) or ["none"]
    notes: list[str] = []
    if memory_bytes is None and kv_memory_bytes is None:
        memory_bytes = hardware.memory_bytes
        if memory_bytes is None:
            raise ValueError(f"memory must be given (e.g. 16GiB): hardware {hardware.name!r} has no capacity figure")
    sched = SchedulerConfig()
    reserve = reserve_bytes if reserve_bytes is not None else cm.activation_bytes(
        model, sched.max_num_batched_tokens, sched.max_num_seqs)
    if reserve < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve}")
    if kv_memory_bytes is not None:
        kv_budget = _positive_int(kv_memory_bytes, "kv_memory_bytes")
    else:
        assert memory_bytes is not None
        kv_budget = _positive_int(memory_bytes, "memory_bytes") - wb.total - reserve
        if kv_budget <= 0:
            notes.append(f"weights ({wb.total} B) and reserve ({reserve} B) leave no memory for KV")
    page = cm.page_bytes(model, block_size, kv_dtype_bytes)
    # Page 0 of the engine's pool is a null page; the rest hold KV (runtime: num_blocks = budget // page_bytes).
    capacity = max(0, kv_budget // page - 1) * page
    limit = _EXTRAPOLATION_LIMIT if allow_extrapolation else model.max_model_len - output_tokens
    compute = cm.compute_rate(hardware, fmt)
    records = load_fidelity(fidelity) if isinstance(fidelity, (str, Path)) else list(fidelity or [])
    retention = retention_by_spec(records, context, canonical_spec) if records else {}
    plans = [_plan_spec(model, spec, context, users, output_tokens, capacity, limit, block_size, kv_dtype_bytes,
                        wb, fmt, compute, hardware, reserve, retention, min_retention) for spec in specs]
    basis = "calibrated_estimate" if hardware.has_engine_overheads else "lower_bound"
    if hardware.measured and not hardware.has_engine_overheads:
        notes.append(f"hardware {hardware.name!r} has no engine overheads (an older calibration?): decode times are "
                     "lower bounds; rerun `longfit plan --calibrate` for estimates of the engine")
    cheapest = None
    if min_retention is not None:
        meeting = [p for p in plans if p.meets_min_retention]
        if meeting:
            cheapest = min(meeting, key=lambda p: (p.kv_bytes_per_request_paged, -(p.retention or 0.0))).spec
        else:
            notes.append(f"no spec with known retention meets min_retention={min_retention}")
    return Plan(model=model.name, num_params=wb.num_params, weights=fmt.name, weight_bytes=wb, context=context,
                output_tokens=output_tokens, users=users, kv_tokens_per_request=kv_tokens_held(context, output_tokens),
                memory_bytes=memory_bytes, reserve_bytes=reserve, kv_budget_bytes=kv_budget, block_size=block_size,
                kv_dtype_bytes=kv_dtype_bytes, page_bytes=page, hardware=hardware, specs=plans,
                min_retention=min_retention, cheapest_spec=cheapest, notes=notes, decode_time_basis=basis)


def _plan_spec(model: ModelConfig, spec: str, context: int, users: int | None, output_tokens: int, capacity: int,
               limit: int, block_size: int, dtype_bytes: int, wb: WeightBytes, fmt: cm.WeightFormat, compute: float,
               hardware: HardwareProfile, reserve: int, retention: dict[str, tuple[float, int]],
               min_retention: float | None) -> SpecPlan:
    cap = _SpecCapacity(model, spec, capacity, block_size, dtype_bytes, output_tokens)
    held = kv_tokens_held(context, output_tokens)
    steady = cap.footprint(context)
    at_context = kv_footprint(model, spec, context, block_size=block_size, dtype_bytes=dtype_bytes)
    max_users = cap.max_users(context)
    context_users = users or 1
    max_context = cap.max_context(context_users, limit)
    limited_by = "model" if max_context >= limit else "memory"
    # Prefill: every linear weight once, the uncompressed prompt KV written, and the FLOPs of the whole prompt.
    prefill = cm.step_time(wb.read_per_step + cm.full_kv_bytes(model, context, dtype_bytes),
                           cm.prefill_flops(model, context), hardware.memory_bandwidth, compute)

    def decode(batch: int, kv: KVFootprint = at_context) -> cm.DecodeTime:  # weights once, each request's KV
        return cm.decode_time(hardware, model.num_layers, batch, wb.read_per_step, kv.read_bytes,
                              cm.decode_flops(model, context, kv.read_keys), compute, kv.streams)

    one = decode(1)
    at_max = decode(max_users) if max_users >= 1 else None
    at_users = decode(users) if users and users <= max_users else None
    # the average step of the request: half its output generated
    mid = decode(1, kv_footprint(model, spec, context, output_tokens // 2 + 1, block_size=block_size,
                                 dtype_bytes=dtype_bytes))
    full_exact = cm.full_kv_bytes(model, held, 2)
    name = canonical_spec(spec)
    kept = retention.get(name)
    if kept is None and is_full_cache(spec) and (retention or min_retention is not None):
        kept = (1.0, 0, None)  # the full cache is the baseline retention is measured against
    meets = None if min_retention is None else (kept is not None and kept[0] >= min_retention)
    return SpecPlan(
        spec=spec, kv_bytes_per_token=steady.exact_bytes / held, kv_bytes_per_request=steady.exact_bytes,
        kv_bytes_per_request_paged=steady.paged_bytes, prefill_peak_kv_bytes=cap.prefill_peak(context, steady),
        compression_rate=full_exact / steady.exact_bytes if steady.exact_bytes else math.inf,
        max_users=max_users,
        fits=None if users is None else users <= max_users, max_context=max_context,
        max_context_users=context_users, max_context_limited_by=limited_by,
        prefill_s=prefill.seconds, prefill_bound=prefill.bound, decode_batch1_s=one.seconds,
        decode_batch1_bound=one.lower_bound.bound, max_batch=max_users,
        decode_max_batch_s=at_max.seconds if at_max else None, throughput_batch1=1.0 / one.seconds,
        throughput_max_batch=max_users / at_max.seconds if at_max else None,
        decode_users_s=at_users.seconds if at_users else None,
        throughput_users=users / at_users.seconds if at_users and users else None,
        request_latency_s=prefill.seconds + output_tokens * mid.seconds,
        swap_host_s=_swap_host(steady.paged_bytes, hardware), swap_disk_s=_swap_disk(steady.paged_bytes, hardware),
        memory_used_bytes=None if users is None else wb.total + reserve + users * steady.paged_bytes,
        retention=kept[0] if kept else None, retention_tasks=kept[1] if kept else 0,
        retention_length=kept[2] if kept else None, meets_min_retention=meets,
        decode_batch1_lower_bound_s=one.lower_bound.seconds,
        decode_max_batch_lower_bound_s=at_max.lower_bound.seconds if at_max else None,
        decode_users_lower_bound_s=at_users.lower_bound.seconds if at_users else None,
    )


def _swap_host(num_bytes: int, hardware: HardwareProfile) -> float | None:
    """Out to host memory and back over the device link; None where KV already lives in host memory."""
    return 2 * num_bytes / hardware.host_link_bandwidth if hardware.host_link_bandwidth else None


def _swap_disk(num_bytes: int, hardware: HardwareProfile) -> float | None:
    """Write to disk and read back (through the host link too on a GPU); None when disk figures are unknown."""
    if not (hardware.disk_read_bandwidth and hardware.disk_write_bandwidth):
        return None
    seconds = num_bytes / hardware.disk_write_bandwidth + num_bytes / hardware.disk_read_bandwidth
    return seconds + (_swap_host(num_bytes, hardware) or 0.0)


def users_curve(model: ModelConfig, spec: str, contexts: Sequence[int], *, kv_budget_bytes: int, output_tokens: int,
                block_size: int = 32, kv_dtype_bytes: int = 2) -> list[int]:
    """Max concurrent users at each context for one spec and KV budget (the ``--plot`` lines)."""
    page = cm.page_bytes(model, block_size, kv_dtype_bytes)
    cap = _SpecCapacity(model, spec, max(0, kv_budget_bytes // page - 1) * page, block_size, kv_dtype_bytes,
                        output_tokens)
    return [cap.max_users(c) for c in contexts]


# ---------------------------------------------------------------------------------------------- CLI
def _count(text: str) -> int:
    """Token count that may be 0 (``--output-tokens 0`` plans prefill only)."""
    return 0 if text.strip() == "0" else parse_tokens(text, "output_tokens")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``longfit plan``."""
    add = parser.add_argument
    add("--model", help="GGUF file, Hugging Face directory or config.json (no weights needed), or tiny-llama")
    add("--context", type=lambda s: parse_tokens(s, "context"), help="prompt tokens, e.g. 32k (default: the model's)")
    add("--users", type=int, help="concurrent requests to fit")
    add("--output-tokens", type=_count, default=256, help="generated tokens per request (default 256)")
    add("--memory", type=lambda s: parse_bytes(s, "memory"), help="memory for weights + KV, e.g. 16GiB")
    add("--kv-memory", type=lambda s: parse_bytes(s, "kv_memory"), help="KV budget directly (overrides --memory)")
    add("--reserve", type=lambda s: 0 if s.strip() == "0" else parse_bytes(s, "reserve"),
        help="activation/workspace bytes kept out of the KV budget (default: an estimate)")
    add("--weights", default="bf16", help="bf16 | fp32 | int8 | int4 | int4-g32/64/128 (default bf16)")
    add("--kv-compression", action="append", metavar="SPEC", help="KV spec; repeat to compare (default: none)")
    add("--hardware", default="this", help=f"'this' (see --calibrate), a .json/.yaml profile, or {list_presets()}")
    add("--block-size", type=int, default=32, help="tokens per KV page (default 32)")
    add("--kv-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="dtype of uncompressed KV")
    add("--allow-extrapolation", action="store_true", help="plan contexts beyond the model's limit")
    add("--fidelity", help="fidelity results JSON: a list of {spec, task, length, score, retention}")
    add("--min-retention", type=float, help="quality floor for the cheapest spec, e.g. 0.95")
    add("--json", action="store_true", help="print the plan as JSON")
    add("--plot", metavar="PNG", help="write max users vs context length, one line per spec")
    add("--calibrate", action="store_true", help="measure this machine and save the 'this' profile first")
    add("--list-hardware", action="store_true", help="list the hardware presets and exit")


def _default_load_model(name: str) -> ModelConfig:
    if name in ("tiny-llama", "tiny-gemma3"):
        return ModelConfig.tiny(name.split("-", 1)[1])
    from longfit.models.model_config import load_model_config  # torch-free; imported only when a path is given

    return load_model_config(name)


def run_plan_command(args: argparse.Namespace, load_model: Callable[[str], ModelConfig] | None = None) -> int:
    """Run ``longfit plan``; returns the exit code. ``load_model`` lets the CLI resolve short model names."""
    from longfit.plan import report  # report imports matplotlib lazily, only for --plot

    if args.list_hardware:
        print(report.format_presets())
        return 0
    if args.calibrate:
        # NOTE: a subprocess, not an import: bench/ sits above plan/ (no package imports bench/) and needs torch.
        code = subprocess.call([sys.executable, "-m", "longfit.bench.calibrate"])
        if code or not args.model:
            return code
    if not args.model:
        print("longfit plan: --model is required (or --calibrate / --list-hardware)", file=sys.stderr)
        return 2
    try:
        model = (load_model or _default_load_model)(args.model)
        hardware = resolve_hardware(args.hardware)
        context = args.context or model.max_model_len - args.output_tokens
        result = plan(model, context=context, users=args.users, output_tokens=args.output_tokens,
                      memory_bytes=args.memory, weights=args.weights, specs=args.kv_compression or ["none"],
                      hardware=hardware, kv_memory_bytes=args.kv_memory, reserve_bytes=args.reserve,
                      block_size=args.block_size, kv_dtype_bytes=2 if args.kv_dtype == "bfloat16" else 4,
                      allow_extrapolation=args.allow_extrapolation, fidelity=args.fidelity,
                      min_retention=args.min_retention)
        if args.plot:
            report.write_plot(result, model, args.plot, allow_extrapolation=args.allow_extrapolation)
    except ValueError as exc:
        print(f"longfit plan: {exc}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else report.format_plan(result))
    return 0
