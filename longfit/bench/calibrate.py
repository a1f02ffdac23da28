"""Measure this machine for the planner: memory bandwidth, bf16/fp32 matmul FLOP/s, disk bandwidth, and the
per-step costs of longfit's own decode step beyond that bound.

``python -m longfit.bench.calibrate`` (what ``longfit plan --calibrate`` runs) writes the ``this`` hardware profile
to ``$LONGFIT_CACHE_DIR/hardware.json`` (default ``~/.cache/longfit``). Every figure is the median of several timed
runs after a warm-up; run it on a quiet machine (one busy foreign process slows 2-thread torch 10–50×).

Engine overheads (``measure_engine_steps``): the real engine (``LLM``, bf16 weights, the default CPU path) decodes
random-weight models with SmolLM2-135M's layer shapes at a few (layers, batch, depth) points; the median step time
minus the cost model's bound for that step is fitted by ``plan.overheads.fit_overheads``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from longfit.config import ModelConfig, env_num_threads
from longfit.plan import cost_model as cm
from longfit.plan.cost_model import HardwareProfile
from longfit.plan.hardware import calibration_path, save_profile
from longfit.plan.overheads import StepSample, fit_overheads
from longfit.quant import matmul

# SmolLM2-135M's shape (the model the planner is checked against), with the layer count varied per point: two layer
# counts separate per-step from per-layer costs. Its vocabulary is kept: the LM head and sampler are per-step costs.
ENGINE_MODEL = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=1, num_heads=9, num_kv_heads=3, head_dim=64, max_model_len=8192 + 256,
                           rope_theta=1e5, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                           name="calibration-smollm2-shape")
# (layers, batch, depth). The batch-1 deep points use the full 30-layer SmolLM2 shape: decode attention's cost per
# KV byte grows with depth (measured on SmolLM2 itself, 1 thread: ~8x the bandwidth bound at 2k, ~17x at 8k), and
# models of 1-4 layers did not reproduce it (their fitted factor, 4.4, predicted an 8k SmolLM2 step 2.1x too fast).
# There are no batched deep points: batched paged decode reads a KV byte several times cheaper than batch 1 does
# (paged_decode), so one factor fitted over both missed both. With batched 4-layer points at 4k it fell to 2.2 on
# an AVX2 EPYC and predicted the 30-layer 8k step 43% too fast (docs/PLANNING.md §6, run B). The factor is the
# batch-1 one; batched deep steps are then estimated pessimistically.
ENGINE_POINTS = ((1, 1, 32), (1, 4, 32), (1, 8, 32), (30, 1, 2048), (30, 1, 8192),
                 (12, 1, 32), (12, 4, 32), (12, 8, 32))
# (layers, batch, depth, spec): decode steps over quantized streams, which the engine expands whole at every step. Per
# storage format, the time beyond the fitted model above is split into a cost per stream layer and one per expanded
# element (on the 2-core EPYC, 1 thread, SmolLM2 shape at 2k, the element costs were 4-7 ns and a 512-token stream
# layer cost far more per element than a 2k one). Four depths per format, not two: with two the fit solves exactly
# and every bit of timing noise lands in the two costs (one format's element cost moved 3x between calibrations,
# int8 1.4-4.3 ns, and an 8k prediction missed by 2.25x; docs/PLANNING.md §6). And an 8k depth: fitted on 512-4096
# only, KIVI-2 and KVQuant-4 streams at 8000 tokens took 1.6x the predicted step (run D), deeper streams costing
# more per element than the 4096-token points showed.
# One spec per storage format the planner prices (``compression.storage.dequant_format``); ShadowKV's rank 48 (its
# per-element cost grows with the rank), below its default budget here, so every stored key is rebuilt.
DEQUANT_POINTS = tuple((30, 1, depth, spec) for spec in ("kivi:bits=2", "kivi:bits=4", "int8", "kvquant:bits=4",
                                                         "think:channels=0.5", "shadowkv:rank=48", "minicache")
                       for depth in (512, 2048, 4096, 8192))
ENGINE_FLUSH_BYTES = 128 << 20  # read between timed steps (see measure_engine_steps): 4x a 32 MiB L3
# Speed change during a calibration (bandwidth start to end, engine rounds apart) beyond which it warns: a ±25%
# prediction has little room left for the cost model's own error.
STEADY_LIMIT = 0.15


def _median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up: page faults, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Read bandwidth (sum of a large fp32 tensor: bytes ÷ time) and copy bandwidth (read + write ÷ time).

    The buffer is much larger than the last-level cache so DRAM, not cache, is measured. Decode streams weights
    and KV read-only, so the planner uses the read figure.
    """
    source = torch.ones(num_bytes // 4, dtype=torch.float32)  # ones(): every page committed before timing
    target = torch.empty_like(source)
    target.copy_(source)
    read_s, read_runs = _median_seconds(lambda: source.sum(), repeats)
    copy_s, copy_runs = _median_seconds(lambda: target.copy_(source), repeats)
    return {"buffer_bytes": source.numel() * 4, "read_bytes_per_s": source.numel() * 4 / read_s,
            "copy_bytes_per_s": 2 * source.numel() * 4 / copy_s, "read_runs_s": read_runs, "copy_runs_s": copy_runs}


def measure_matmul(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Square ``[size, size] @ [size, size]`` matmul: ``2 · size³`` FLOPs ÷ median time."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    seconds, runs = _median_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return {"size": size, "flops": 2 * size**3 / seconds, "runs_s": runs}


def measure_disk(directory: Path, num_bytes: int = 256 << 20) -> dict[str, Any]:
    """Sequential write (with fsync) and read-back of a temporary file; the page cache is dropped between them
    (``posix_fadvise`` DONTNEED) so the read reaches the disk."""
    block = os.urandom(1 << 20)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="calibrate-", delete=False) as handle:
        path = Path(handle.name)
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as file:
            file.writelines(block for _ in range(num_bytes // len(block)))
            os.fsync(file.fileno())
        write_s = time.perf_counter() - start
        with open(path, "rb", buffering=0) as file:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while file.read(1 << 24):
                pass
            read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return {"file_bytes": num_bytes, "write_bytes_per_s": num_bytes / write_s, "read_bytes_per_s": num_bytes / read_s}


def _with_layers(base: ModelConfig, num_layers: int) -> ModelConfig:
    """``base`` with ``num_layers`` full-attention layers (the overhead model has no sliding-window term)."""
    if "sliding" in base.layer_types:
        raise ValueError(f"calibration base model must have only full-attention layers, got {base.layer_types}")
    return dataclasses.replace(base, num_layers=num_layers, layer_types=())


def _time_decode(engine: Any, batch: int, depth: int, steps: int, vocab: int,
                 flush: torch.Tensor | None = None, kv_compression: str | None = None) -> list[float]:
    """Seconds of each pure decode step of ``batch`` random prompts of ``depth`` tokens (as ``bench decode``
    runs them: prefill all, then time the steps in which every sequence decodes one token), compressed with
    ``kv_compression`` if given. ``flush`` is read before each step, untimed, so the step starts with cold
    caches."""
    from longfit.bench.decode import step_until_decoding  # NOTE: here, bench.decode imports this module
    from longfit.bench.peers import prompt_ids
    from longfit.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    # Prompt i is the same in every round and batch: the prefix cache spares its prefill.
    for prompt in prompt_ids(0, batch, depth, vocab):
        engine.add_request(None, prompt, params, kv_compression=kv_compression)
    step_until_decoding(engine)
    times = []
    while engine.has_unfinished_requests():
        if flush is not None:
            flush.sum()
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[:steps]  # the last step also finishes the requests and frees their pages


def measure_engine_steps(points: Sequence[tuple[int, int, int] | tuple[int, int, int, str]] = ENGINE_POINTS,
                         base: ModelConfig = ENGINE_MODEL,
                         steps: int = 8, rounds: int = 3, num_threads: int | None = None,
                         flush_bytes: int = ENGINE_FLUSH_BYTES) -> list[dict[str, Any]]:
    """Decode step time of longfit's engine (bf16 weights) at each ``(layers, batch, depth)`` point.

    One random-weight model of ``base``'s shape per layer count, each warmed up first (kernel selection,
    allocator). Every point runs ``rounds`` times, the rounds interleaved over all points; a round's figure is the
    median of its ``steps`` steps and the point's is the fastest round's (a foreign process slowing one round
    does not count). ``flush_bytes`` (0: none) are read before every step, untimed. Returns one record per point:
    ``num_layers``, ``batch``, ``depth`` (prompt tokens), ``kv_tokens`` (mean tokens in the cache over the timed
    steps), ``measured_s`` (seconds) and every round's ``step_times_s``; a point's optional fourth element is a
    ``kv_compression`` spec (kept as ``spec``).
    """
    from longfit.llm import LLM
    from longfit.models.loader import synthetic_config

    if steps < 2 or rounds < 1:
        raise ValueError(f"steps must be >= 2 and rounds >= 1, got steps={steps}, rounds={rounds}")
    engines = {}
    for layers in dict.fromkeys(p[0] for p in points):
        config = _with_layers(base, layers)
        shapes = [(p[1], p[2]) for p in points if p[0] == layers]
        max_batch = max(b for b, _ in shapes)
        # Room for every point's prompts at once (the prefix cache keeps them for the next round) plus growth.
        pages = sum(b * layers * -(-(d + steps + 3) // 32) for b, d in shapes) + layers * max_batch * 4
        with synthetic_config("tiny-llama", config) as name:  # LLM(name) builds config, random weights
            llm = LLM(name, dtype="bfloat16", weights="bf16", block_size=32,
                      memory_bytes=(pages + 2) * cm.page_bytes(config), max_num_seqs=max_batch,
                      max_num_batched_tokens=2048, num_threads=num_threads, decode_steps=1)  # one step timed
        if llm.engine.model_config != config:
            raise RuntimeError("calibration could not build its synthetic model (the loader changed?)")
        _time_decode(llm.engine, max_batch, 8, 4, config.vocab_size)  # warm-up
        engines[layers] = llm.engine
    # A real model's step streams far more than the L3 (SmolLM2: 269 MB of weights + its KV), so every layer
    # reads its weights and KV from DRAM. These small models would find part of theirs still cached from the last
    # step (measured: decode attention at 8k tokens 1.8x faster per layer in a 1-layer model than in an 8-layer
    # one; with the flush both cost the same), so a buffer larger than the L3 is read between steps.
    flush = torch.ones(flush_bytes // 4, dtype=torch.float32) if flush_bytes > 0 else None
    runs: list[list[list[float]]] = [[] for _ in points]
    for round_index in range(rounds):
        order = list(enumerate(points))
        for index, (layers, batch, depth, *spec) in order if round_index % 2 == 0 else order[::-1]:  # spread drift
            runs[index].append(_time_decode(engines[layers], batch, depth, steps, base.vocab_size, flush,
                                            spec[0] if spec else None))
    return [{"num_layers": layers, "batch": batch, "depth": depth, "kv_tokens": depth + (steps + 1) / 2,
             "measured_s": min(statistics.median(r) for r in rounds_times), "step_times_s": rounds_times,
             **({"spec": spec[0]} if spec else {})}
            for (layers, batch, depth, *spec), rounds_times in zip(points, runs)]


def engine_samples(records: Sequence[dict[str, Any]], base: ModelConfig,
                   profile: HardwareProfile) -> list[StepSample]:
    """Each record as a ``StepSample``: its bound is the planner's own decode bound (bf16 weights, full cache) on
    ``profile`` for a model of the record's layer count at the record's mean cache depth. Adds
    ``lower_bound_s`` and ``kv_bytes_read`` to every record (they are saved with the raw points)."""
    fmt = cm.parse_weight_format("bf16")
    samples = []
    for record in records:
        config = _with_layers(base, record["num_layers"])
        context = round(record["kv_tokens"])
        kv = cm.full_kv_bytes(config, context)
        flops = cm.decode_flops(config, context, sum(cm.layer_tokens(config, context)))
        bound = cm.decode_time(profile, config.num_layers, record["batch"], cm.weight_bytes(config, fmt).read_per_step,
                               kv, flops, cm.compute_rate(profile, fmt)).lower_bound
        record["lower_bound_s"], record["kv_bytes_read"] = bound.seconds, record["batch"] * kv
        samples.append(StepSample(record["num_layers"], record["batch"], record["batch"] * kv, bound.seconds,
                                  record["measured_s"]))
    return samples


def _nonnegative_fit2(rows: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """``(a, b) >= 0`` minimising ``Σ (a·x + b·y − r)²`` over rows ``(x, y, r)`` (a 2-column NNLS). A weighted
    fit passes its rows pre-scaled (``fit_dequant`` divides each by its measured step time)."""
    sxx = sum(x * x for x, _, _ in rows)
    syy = sum(y * y for _, y, _ in rows)
    sxy = sum(x * y for x, y, _ in rows)
    sxr = sum(x * r for x, _, r in rows)
    syr = sum(y * r for _, y, r in rows)
    det = sxx * syy - sxy * sxy
    if det > 1e-12 * max(sxx * syy, 1e-300):
        a, b = (sxr * syy - syr * sxy) / det, (syr * sxx - sxr * sxy) / det
        if a >= 0 and b >= 0:
            return a, b
    only_a = (max(0.0, sxr / sxx), 0.0) if sxx else (0.0, 0.0)
    only_b = (0.0, max(0.0, syr / syy)) if syy else (0.0, 0.0)

    def loss(ab: tuple[float, float]) -> float:
        return sum((ab[0] * x + ab[1] * y - r) ** 2 for x, y, r in rows)

    return min(only_a, only_b, key=loss)


def fit_dequant(records: Sequence[dict[str, Any]], base: ModelConfig, profile: HardwareProfile,
                steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per storage format, ``(kv_stream_layer_s, kv_dequant_s_per_element)`` from quantized-stream records
    (``measure_engine_steps`` with a spec): the non-negative least-squares fit of each step's time beyond
    ``profile``'s estimate (its other overheads already fitted) to the stream layers and the K/V elements the
    planner says it expands. Each row is divided by its measured step time, so the fit minimises the relative
    error of the step estimate (the planner is judged by it) rather than letting the deepest, slowest point
    decide both costs. Adds ``estimate_without_dequant_s``, ``stream_layers``, ``dequant_elements`` and
    ``dequant_format`` to every record."""
    from longfit.plan.planner import kv_footprint

    fmt = cm.parse_weight_format("bf16")
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for record in records:
        config = _with_layers(base, record["num_layers"])
        footprint = kv_footprint(config, record["spec"], record["depth"], steps // 2 + 1)
        if footprint.streams.fmt is None:
            raise ValueError(f"calibration point {record['spec']!r} has no quantized stream to time")
        context = round(record["kv_tokens"])
        weights = cm.weight_bytes(config, fmt).read_per_step
        estimate = cm.decode_time(profile, config.num_layers, record["batch"], weights, footprint.read_bytes,
                                  cm.decode_flops(config, context, footprint.read_keys),
                                  cm.compute_rate(profile, fmt)).seconds
        layers, elements = record["batch"] * footprint.streams.layers, record["batch"] * footprint.streams.elements
        record.update(estimate_without_dequant_s=estimate, stream_layers=layers, dequant_elements=elements,
                      dequant_format=footprint.streams.fmt)
        measured = record["measured_s"]
        rows.setdefault(footprint.streams.fmt, []).append((layers / measured, elements / measured,
                                                           (measured - estimate) / measured))
    fits = {name: _nonnegative_fit2(points) for name, points in rows.items()}
    return {name: a for name, (a, _) in fits.items()}, {name: b for name, (_, b) in fits.items()}


def calibrate_engine(profile: HardwareProfile, points: Sequence[tuple[int, int, int]] = ENGINE_POINTS,
                     base: ModelConfig = ENGINE_MODEL, steps: int = 8, rounds: int = 3,
                     num_threads: int | None = None, flush_bytes: int = ENGINE_FLUSH_BYTES,
                     dequant_points: Sequence[tuple[int, int, int, str]] = DEQUANT_POINTS,
                     dequant_steps: int = 16, dequant_rounds: int = 2,
                     ) -> tuple[HardwareProfile, dict[str, Any]]:
    """``profile`` with its engine-overhead fields fitted to longfit's decode steps (``measure_engine_steps``,
    whose arguments these are; ``dequant_points``, may be empty, fit ``kv_dequant_s_per_element``), and the raw
    points with their bounds and fit errors.

    The quantized-stream points run ``dequant_rounds`` rounds of ``dequant_steps`` steps: a compressed request
    bypasses the prefix cache, so every round prefills its prompt again (three rounds of the 21 default points
    were 2/3 of a 25-minute calibration on the 2-core EPYC). Two rounds, not one: they are interleaved over all
    points, minutes apart, and a virtual machine whose speed moves by 1.4x for minutes at a time (docs/PLANNING.md
    §6, run F) otherwise leaves whole formats fitted to its slow stretch."""
    records = measure_engine_steps(points, base, steps, rounds, num_threads, flush_bytes)
    quantized = (measure_engine_steps(dequant_points, base, dequant_steps, dequant_rounds, num_threads, flush_bytes)
                 if dequant_points else [])
    fit = fit_overheads(engine_samples(records, base, profile), profile.memory_bandwidth)
    for record, error in zip(records, fit.relative_errors):
        record["fit_relative_error"] = error
    fitted = dataclasses.replace(profile, **fit.coefficients)
    per_layer, per_element = fit_dequant(quantized, base, fitted, dequant_steps)
    for record in quantized:
        name = record["dequant_format"]
        estimate = (record["estimate_without_dequant_s"] + per_layer[name] * record["stream_layers"]
                    + per_element[name] * record["dequant_elements"])
        record["fit_relative_error"] = estimate / record["measured_s"] - 1.0
    shape = {k: getattr(base, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_heads",
                                           "num_kv_heads", "head_dim", "tie_word_embeddings")}
    raw = {"model": shape, "weights": "bf16", "dtype": "bfloat16", "steps_per_point": steps, "rounds": rounds,
           "steps_per_dequant_point": dequant_steps, "dequant_rounds": dequant_rounds,
           "flush_bytes": flush_bytes,
           "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "points": records,
           "fit": {**fit.coefficients, "kv_stream_layer_s": per_layer, "kv_dequant_s_per_element": per_element},
           "rms_relative_error": fit.rms_relative_error, "dequant_points": quantized}
    return dataclasses.replace(fitted, kv_stream_layer_s=per_layer, kv_dequant_s_per_element=per_element), raw


def round_spread(records: Sequence[dict[str, Any]]) -> list[float]:
    """Per point with at least two rounds: slowest round's median step / fastest round's, minus 1.

    The rounds of ``measure_engine_steps`` are interleaved over all points, minutes apart, so this is how much the
    machine's speed moved during the calibration (0.0 on a steady machine). A virtual machine that slows 2x for a
    few minutes (docs/PLANNING.md §6, run E) shows up here as spreads near 1.0.
    """
    spreads = []
    for record in records:
        medians = [statistics.median(times) for times in record["step_times_s"] if times]
        if len(medians) >= 2:
            spreads.append(max(medians) / min(medians) - 1.0)
    return spreads


def stability(bandwidth_start: float, bandwidth_end: float, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How steady the machine was while it was calibrated: the read bandwidth at the end against the start
    (``bandwidth_drift``, end / start - 1) and the engine points' round-to-round spread (``round_spread_median``,
    ``round_spread_max``; None without repeated rounds). ``steady`` is False when either drift exceeds
    ``STEADY_LIMIT``: the fitted costs then describe whichever speed the fastest rounds caught."""
    spreads = round_spread(records)
    median = statistics.median(spreads) if spreads else None
    drift = bandwidth_end / bandwidth_start - 1.0
    steady = abs(drift) <= STEADY_LIMIT and (median is None or median <= STEADY_LIMIT)
    return {"bandwidth_start_bytes_per_s": bandwidth_start, "bandwidth_end_bytes_per_s": bandwidth_end,
            "bandwidth_drift": drift, "round_spread_median": median,
            "round_spread_max": max(spreads) if spreads else None, "steady": steady}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _foreign_load(num_threads: int | None) -> str | None:
    """A warning when other processes keep the cores busy (the 1-minute load average leaves fewer cores than the
    threads torch will spin on): timings then come out slow and noisy, 10-50x so for 2 threads on 2 cores."""
    if not hasattr(os, "getloadavg"):
        return None
    cores = os.cpu_count() or 1
    threads = num_threads or env_num_threads() or torch.get_num_threads()
    load = os.getloadavg()[0]
    if load + threads <= cores + 0.5:
        return None
    return (f"load average {load:.2f} on {cores} cores with {threads} torch threads: other processes are running, "
            "so the figures will be slow and noisy; calibrate on a quiet machine (or with fewer threads, "
            "LONGFIT_NUM_THREADS, and run the engine with the same)")


def calibrate(num_threads: int | None = None, bandwidth_bytes: int = 1 << 30, matmul_size: int = 2048,
              repeats: int = 5, disk: bool = True, engine: bool = True) -> tuple[HardwareProfile, dict[str, Any]]:
    """Measure this machine; returns the profile and the raw measurements.

    Args:
        num_threads: torch threads for the run (and the engine); None: ``$LONGFIT_NUM_THREADS`` if set (what the
            engine would use), else torch's default (the physical cores).
        bandwidth_bytes: buffer size of the bandwidth test (keep it well above the last-level cache).
        matmul_size: side of the square matmuls.
        repeats: timed runs per figure (the median is kept).
        disk: also time a temporary file in the cache directory.
        engine: also fit the engine's decode overheads (``calibrate_engine``); without it the profile stays a
            pure lower bound.
    """
    num_threads = num_threads or env_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    with torch.inference_mode():
        bandwidth = measure_bandwidth(bandwidth_bytes, repeats)
        bf16 = measure_matmul(torch.bfloat16, matmul_size, repeats)
        fp32 = measure_matmul(torch.float32, matmul_size, repeats)
    disk_result = measure_disk(calibration_path().parent) if disk else None
    # The engine multiplies bf16 weights in fp32 where this CPU's bf16 GEMM is slow (quant.matmul), so that is the
    # rate its "bf16" prefill runs at.
    bf16_rate = bf16["flops"] if matmul.bf16_matmul_fast() else max(bf16["flops"], fp32["flops"])
    bf16["engine_products"] = "bf16" if matmul.bf16_matmul_fast() else "fp32 (bf16 GEMM slow on this CPU)"
    threads = torch.get_num_threads()
    measurements = {"cpu": _cpu_name(), "num_threads": threads, "torch": torch.__version__,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "bandwidth": bandwidth, "matmul_bf16": bf16,
                    "matmul_fp32": fp32, "disk": disk_result}
    profile = HardwareProfile(
        name="this", kind="cpu", memory_bandwidth=bandwidth["read_bytes_per_s"], bf16_flops=bf16_rate,
        fp32_flops=fp32["flops"], memory_bytes=_host_memory_bytes(), host_link_bandwidth=None,
        disk_read_bandwidth=disk_result["read_bytes_per_s"] if disk_result else None,
        disk_write_bandwidth=disk_result["write_bytes_per_s"] if disk_result else None,
        source=f"measured by longfit plan --calibrate on {_cpu_name()} with {threads} threads "
               f"(median of {repeats} runs)", measured=True)
    if engine:
        started = time.perf_counter()
        profile, measurements["engine_overheads"] = calibrate_engine(profile, num_threads=threads)
        measurements["engine_overheads"]["seconds"] = time.perf_counter() - started
        profile = dataclasses.replace(profile, source=profile.source + "; decode overheads fitted to longfit's "
                                      "engine (bf16 weights, SmolLM2-135M layer shapes)")
        with torch.inference_mode():  # a second bandwidth reading, minutes later: did the machine's speed move?
            end = measure_bandwidth(bandwidth_bytes, repeats)["read_bytes_per_s"]
        overheads = measurements["engine_overheads"]
        measurements["stability"] = stability(bandwidth["read_bytes_per_s"], end,
                                              overheads["points"] + overheads["dequant_points"])
    return profile, measurements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure this machine for `longfit plan --hardware this`.")
    parser.add_argument("--threads", type=int,
                        help="torch threads, engine included (default: $LONGFIT_NUM_THREADS, else torch's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure; the median is kept")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth buffer size in MiB")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk test")
    parser.add_argument("--no-engine", action="store_true",
                        help="skip the engine decode-overhead fit (the profile stays a pure lower bound)")
    parser.add_argument("--output", help=f"profile path (default {calibration_path()})")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.bandwidth_mib < 1 or args.matmul_size < 16 or (args.threads or 1) < 1:
        parser.error("--repeats, --bandwidth-mib, --threads must be positive and --matmul-size >= 16")
    busy = _foreign_load(args.threads)
    if busy:
        print(f"longfit calibrate: warning: {busy}", file=sys.stderr)
    profile, measurements = calibrate(args.threads, args.bandwidth_mib << 20, args.matmul_size, args.repeats,
                                      disk=not args.no_disk, engine=not args.no_engine)
    path = save_profile(profile, args.output, measurements)
    disk = (f", disk read {profile.disk_read_bandwidth / 1e9:.2f} / write {profile.disk_write_bandwidth / 1e9:.2f} GB/s"
            if profile.disk_read_bandwidth and profile.disk_write_bandwidth else "")
    print(f"memory read {profile.memory_bandwidth / 1e9:.1f} GB/s (copy "
          f"{measurements['bandwidth']['copy_bytes_per_s'] / 1e9:.1f}), bf16 {profile.bf16_flops / 1e9:.0f} GFLOP/s"
          f"{'' if matmul.bf16_matmul_fast() else ' (products in fp32: bf16 GEMM is slow on this CPU)'}, "
          f"fp32 {profile.fp32_flops / 1e9:.0f} GFLOP/s{disk} with {measurements['num_threads']} threads -> {path}")
    if "engine_overheads" in measurements:
        fit = measurements["engine_overheads"]
        print(f"decode overheads: {profile.step_overhead_s * 1e3:.3f} ms/step + "
              f"{profile.step_overhead_per_seq_s * 1e3:.3f} ms/seq + {profile.step_overhead_per_layer_s * 1e3:.3f} "
              f"ms/layer + {profile.step_overhead_per_seq_layer_s * 1e3:.4f} ms/seq/layer, KV read factor "
              f"{profile.kv_read_factor:.2f} (rms fit error {100 * fit['rms_relative_error']:.1f}% over "
              f"{len(fit['points'])} points, {fit['seconds']:.1f} s); quantized streams: "
              + ", ".join(f"{name} {profile.stream_costs(name)[0] * 1e3:.3f} ms/layer + {cost * 1e9:.2f} ns/element"
                          for name, cost in profile.kv_dequant_s_per_element)
              + " (fit errors " + ", ".join(f"{100 * r['fit_relative_error']:+.0f}%" for r in fit["dequant_points"])
              + ")")
        if fit["rms_relative_error"] > 0.1:  # 1-4% on the project machine with 1 thread, even while shared
            print("longfit calibrate: warning: the decode points fit poorly (noisy machine?); rerun when it is quiet",
                  file=sys.stderr)
        steady = measurements["stability"]
        spread = steady["round_spread_median"]
        print(f"stability: read bandwidth {steady['bandwidth_drift']:+.0%} from start to end, engine rounds "
              + ("-" if spread is None else f"{spread:.0%} apart (median; max {steady['round_spread_max']:.0%})"))
        if not steady["steady"]:
            print(f"longfit calibrate: warning: this machine's speed moved by more than {STEADY_LIMIT:.0%} while it "
                  "was calibrated; decode estimates from this profile are no better than that. Rerun when it is "
                  "steady", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
