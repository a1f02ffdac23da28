"""Analytic cost model: parameter and weight bytes, full-cache KV bytes and pages, FLOPs, and time lower bounds.

Standard arithmetic after "Challenges in Deploying Long-Context Transformers: A Theoretical Peak Performance
Analysis": decode is bound by bytes read ÷ bandwidth (weights + the KV it re-reads), prefill by FLOPs ÷ compute
(linear layers + attention's quadratic term). A calibrated profile adds the engine's measured per-step costs to the
decode bound (``decode_time``). Pure functions of a ``ModelConfig``; no torch, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from longfit.config import ModelConfig

_SCALE_BYTES = 2  # int8 per-channel scales and int4 group scales/zeros are stored in bf16 (the kernels' dtype)


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Peak (or measured) figures of one machine, in SI base units. Times computed from them are lower bounds.

    ``memory_bandwidth`` is the read bandwidth decode sees; ``host_link_bandwidth`` is the device↔host link
    (None where the KV already lives in host memory: CPUs, unified memory); disk figures are None when unknown.
    """

    name: str
    kind: Annotated[str, "'cpu', 'gpu' or 'unified'"]
    memory_bandwidth: Annotated[float, "bytes/s read from the memory holding weights and KV"]
    bf16_flops: Annotated[float, "dense bf16 matmul FLOP/s"]
    fp32_flops: Annotated[float, "dense fp32 matmul FLOP/s"]
    memory_bytes: Annotated[int | None, "capacity of that memory; None: give --memory"] = None
    host_link_bandwidth: Annotated[float | None, "bytes/s per direction device↔host (PCIe); None: not needed"] = None
    disk_read_bandwidth: Annotated[float | None, "bytes/s"] = None
    disk_write_bandwidth: Annotated[float | None, "bytes/s"] = None
    source: Annotated[str, "where the figures come from"] = ""
    measured: Annotated[bool, "True for a calibration of this machine"] = False
    # Costs of longfit's engine on this machine beyond the bandwidth/compute bound (``longfit plan --calibrate``
    # measures them; the defaults keep a profile a pure lower bound). See ``decode_overhead_s`` for the formula.
    step_overhead_s: Annotated[float, "seconds per decode step, fixed (scheduling, embedding, LM head and sampler "
                                      "dispatch)"] = 0.0
    step_overhead_per_seq_s: Annotated[float, "seconds per sequence per decode step (sampling a row, output "
                                              "bookkeeping)"] = 0.0
    step_overhead_per_layer_s: Annotated[float, "seconds per decoder layer per decode step (eager dispatch: norms, "
                                                "RoPE, attention glue)"] = 0.0
    step_overhead_per_seq_layer_s: Annotated[float, "seconds per sequence per layer per decode step"] = 0.0
    kv_read_factor: Annotated[float, "bytes moved per KV byte read at decode (>= 1: the engine gathers and "
                                     "converts the pages it reads)"] = 1.0
    kv_dequant_s_per_element: Annotated[tuple[tuple[str, float], ...], "seconds per quantized K or V element the "
                                        "engine expands in one decode step (it expands a quantized stream whole at "
                                        "every step), by storage format (``dequant_format``); a JSON object or "
                                        "pairs"] = ()
    kv_stream_layer_s: Annotated[tuple[tuple[str, float], ...], "seconds per layer holding a quantized stream, per "
                                 "sequence per decode step (the fixed cost of that layer's stream path), by storage "
                                 "format"] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu", "unified"):
            raise ValueError(f"HardwareProfile.kind must be 'cpu', 'gpu' or 'unified', got {self.kind!r}")
        for name in ("memory_bandwidth", "bf16_flops", "fp32_flops"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"HardwareProfile.{name} must be a positive number, got {value!r}")
        for name in ("memory_bytes", "host_link_bandwidth", "disk_read_bandwidth", "disk_write_bandwidth"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"HardwareProfile.{name} must be positive or None, got {value!r}")
        for name, low in zip(OVERHEAD_FIELDS, (0.0, 0.0, 0.0, 0.0, 1.0)):
            value = getattr(self, name)
            # NOTE: `not value >= low` also rejects NaN; bool is an int subclass but never a duration.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not value >= low:
                raise ValueError(f"HardwareProfile.{name} must be a finite number >= {low:g}, got {value!r}")
        for name in STREAM_COST_FIELDS:
            costs = getattr(self, name)
            pairs = list(costs.items()) if isinstance(costs, dict) else list(costs)
            for pair in pairs:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str) \
                        or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)) \
                        or not math.isfinite(pair[1]) or not pair[1] >= 0:
                    raise ValueError(f"HardwareProfile.{name} must map storage formats to finite seconds >= 0, "
                                     f"got {costs!r}")
            object.__setattr__(self, name, tuple((k, float(v)) for k, v in pairs))

    def stream_costs(self, fmt: str | None) -> tuple[float, float]:
        """(seconds per stream layer per sequence, seconds per expanded element) of storage format ``fmt``
        (``compression.storage.dequant_format``): its calibrated figures, else those of the format with the dearest
        element (a format the calibration did not time is assumed no cheaper), else zeros."""
        elements = dict(self.kv_dequant_s_per_element)
        if fmt is None or not elements:
            return 0.0, 0.0
        if fmt not in elements:
            fmt = max(elements, key=elements.__getitem__)
        return dict(self.kv_stream_layer_s).get(fmt, 0.0), elements[fmt]

    @property
    def has_engine_overheads(self) -> bool:
        """True when decode times computed from this profile are estimates, not pure lower bounds."""
        return any(overhead_coefficients(self)) or any(v > 0 for name in STREAM_COST_FIELDS
                                                       for _, v in getattr(self, name))


# The per-storage-format costs of quantized streams (``HardwareProfile.stream_costs``).
STREAM_COST_FIELDS = ("kv_stream_layer_s", "kv_dequant_s_per_element")
# The engine-overhead fields of HardwareProfile, in the order of ``overhead_terms``.
OVERHEAD_FIELDS = ("step_overhead_s", "step_overhead_per_seq_s", "step_overhead_per_layer_s",
                   "step_overhead_per_seq_layer_s", "kv_read_factor")


def overhead_terms(num_layers: int, batch: int, kv_bytes_read: float, bandwidth: float) -> tuple[float, ...]:
    """What each coefficient of ``OVERHEAD_FIELDS`` multiplies in one decode step: 1, batch, layers,
    layers · batch, and the KV bytes the step reads ÷ bandwidth (seconds; its coefficient is kv_read_factor − 1)."""
    return (1.0, float(batch), float(num_layers), float(num_layers * batch), kv_bytes_read / bandwidth)


def overhead_coefficients(hardware: HardwareProfile) -> tuple[float, ...]:
    """The coefficients matching ``overhead_terms`` (seconds, except the last: kv_read_factor − 1, unitless)."""
    return (hardware.step_overhead_s, hardware.step_overhead_per_seq_s, hardware.step_overhead_per_layer_s,
            hardware.step_overhead_per_seq_layer_s, hardware.kv_read_factor - 1.0)


# ---------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How linear weights are stored: bf16/fp32 dense, int8 per output channel, int4 per group of input channels.

    RTN layouts of methods.md §10.1: int8 = 1 byte/weight + one bf16 scale per output row; int4 = ½ byte/weight +
    a bf16 scale and zero per output row per group of ``group_size`` input channels (32/G extra bits per weight).
    """

    name: str
    bits: int
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16, 32):
            raise ValueError(f"WeightFormat.bits must be 4, 8, 16 or 32, got {self.bits}")
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"WeightFormat.group_size must be 32, 64, 128 or 256 for int4, got {self.group_size}")

    @property
    def dense_bytes(self) -> int:
        """Bytes per element of tensors kept dense (embeddings, norms, biases): fp32 for fp32, bf16 otherwise."""
        return 4 if self.bits == 32 else 2

    def matrix_bytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(total bytes, of which scale/zero bytes) of one ``[out, in]`` weight matrix in this format."""
        if self.bits >= 16:
            return out_features * in_features * self.bits // 8, 0
        if self.bits == 8:
            scales = out_features * _SCALE_BYTES
            return out_features * in_features + scales, scales
        assert self.group_size is not None
        # NOTE: ceil: a row whose width is not a multiple of G (SmolLM2's 576 at G=128) still needs a last group.
        scales = out_features * math.ceil(in_features / self.group_size) * 2 * _SCALE_BYTES
        return math.ceil(out_features * in_features / 2) + scales, scales


def parse_weight_format(text: str) -> WeightFormat:
    """``bf16`` | ``fp32`` | ``int8`` | ``int4`` (group 128) | ``int4-g32`` / ``int4-g64`` / ``int4-g128``."""
    value = text.strip().lower()
    if value in ("bf16", "bfloat16"):
        return WeightFormat("bf16", 16)
    if value in ("fp32", "float32"):
        return WeightFormat("fp32", 32)
    if value == "int8":
        return WeightFormat("int8", 8)
    if value == "int4":
        return WeightFormat("int4-g128", 4, 128)
    if value.startswith("int4-g") and value[6:].isdigit() and int(value[6:]) in (32, 64, 128, 256):
        return WeightFormat(value, 4, int(value[6:]))
    raise ValueError(f"weights must be one of bf16, fp32, int8, int4, int4-g32, int4-g64, int4-g128, got {text!r}")


@dataclass(frozen=True, slots=True)
class WeightBytes:
    """Resident weight bytes by part. ``read_per_step`` is what one decode step streams: everything except an
    embedding table that is only gathered from (a tied, shared table is the LM head and is read whole)."""

    num_params: int
    embedding: int
    lm_head: int
    linear: int
    scales: int
    norms_and_biases: int
    total: int
    read_per_step: int


def _layer_linear_shapes(model: ModelConfig) -> list[tuple[int, int]]:
    """``[out, in]`` of one decoder layer's matrices: q, k, v, o, gate, up, down."""
    d, D = model.hidden_size, model.head_dim
    q_out, kv_out = model.num_heads * D, model.num_kv_heads * D
    ffn = model.intermediate_size
    return [(q_out, d), (kv_out, d), (kv_out, d), (d, q_out), (ffn, d), (ffn, d), (d, ffn)]


def _layer_small_params(model: ModelConfig) -> int:
    """Norm weights and biases of one layer (kept dense in every format)."""
    d = model.hidden_size
    norms = 4 * d if model.architecture == "gemma3" else 2 * d  # Gemma 3 adds pre/post feed-forward norms
    if model.qk_norm:
        norms += 2 * model.head_dim
    bias = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim if model.attention_bias else 0
    return norms + bias


def count_parameters(model: ModelConfig) -> int:
    """Unique parameters: embeddings, every layer, final norm, and the LM head unless tied to the embeddings."""
    per_layer = sum(o * i for o, i in _layer_linear_shapes(model)) + _layer_small_params(model)
    embedding = model.vocab_size * model.hidden_size
    lm_head = 0 if model.tie_word_embeddings else embedding
    return model.num_layers * per_layer + embedding + lm_head + model.hidden_size


def linear_parameters(model: ModelConfig) -> int:
    """Matmul weights of the decoder layers (what prefill multiplies every token by), LM head excluded."""
    return model.num_layers * sum(o * i for o, i in _layer_linear_shapes(model))


def weight_bytes(model: ModelConfig, fmt: WeightFormat) -> WeightBytes:
    """Bytes of every parameter in ``fmt``.

    Linear layers and the LM head are quantized; the embedding table, norms and biases stay dense (methods.md
    §10.1: keep embeddings in bf16). A tied LM head shares the table when dense; quantized, it is a separate
    quantized copy next to the dense table used for lookups.
    """
    dense = fmt.dense_bytes
    linear = scales = 0
    for out_features, in_features in _layer_linear_shapes(model):
        total, scale = fmt.matrix_bytes(out_features, in_features)
        linear += model.num_layers * total
        scales += model.num_layers * scale
    embedding = model.vocab_size * model.hidden_size * dense
    head_total, head_scales = fmt.matrix_bytes(model.vocab_size, model.hidden_size)
    shared_head = model.tie_word_embeddings and fmt.bits >= 16
    lm_head = 0 if shared_head else head_total
    scales += 0 if shared_head else head_scales
    small = (model.num_layers * _layer_small_params(model) + model.hidden_size) * dense
    total = embedding + lm_head + linear + small
    read = total if shared_head else total - embedding
    return WeightBytes(num_params=count_parameters(model), embedding=embedding, lm_head=lm_head, linear=linear,
                       scales=scales, norms_and_biases=small, total=total, read_per_step=read)


# ---------------------------------------------------------------------------------------------- full KV
def kv_bytes_per_token_per_layer(model: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V of one token in one layer: ``2 · Hkv · D · dtype_bytes``."""
    return 2 * model.num_kv_heads * model.head_dim * dtype_bytes


def page_bytes(model: ModelConfig, block_size: int = 32, dtype_bytes: int = 2) -> int:
    """One page: ``block_size`` tokens of one layer, keys and values (``block_size · 2 · Hkv · D · dtype_bytes``)."""
    return block_size * kv_bytes_per_token_per_layer(model, dtype_bytes)


def layer_tokens(model: ModelConfig, num_tokens: int) -> list[int]:
    """Tokens of KV each layer holds after ``num_tokens`` tokens: all of them, or the last ``window``."""
    return [num_tokens if (w := model.layer_window(i)) is None else min(num_tokens, w) for i in range(model.num_layers)]


def full_kv_bytes(model: ModelConfig, num_tokens: int, dtype_bytes: int = 2) -> int:
    """Exact KV bytes of one request holding ``num_tokens`` tokens (no page rounding)."""
    return sum(layer_tokens(model, num_tokens)) * kv_bytes_per_token_per_layer(model, dtype_bytes)


def _window_pages(num_tokens: int, window: int | None, block_size: int) -> int:
    """Pages spanned by positions ``[max(0, t - window), t - 1]``; pages wholly before the window are freed."""
    if window is None or num_tokens <= window:
        return -(-num_tokens // block_size)
    return (num_tokens - 1) // block_size - (num_tokens - window) // block_size + 1


def peak_layer_pages(num_tokens: int, window: int | None, block_size: int) -> int:
    """Most pages one layer holds at any point while a request grows to ``num_tokens`` tokens.

    A full layer only grows. A sliding layer's page count is periodic in t (period ``block_size``) once
    t ≥ window and smaller before, so the maximum is over the last ``block_size`` lengths; at most
    ``ceil(window / block_size) + 1``.
    """
    if window is None or num_tokens <= window:
        return _window_pages(num_tokens, window, block_size)
    start = max(window, num_tokens - block_size + 1)
    return max(_window_pages(t, window, block_size) for t in range(start, num_tokens + 1))


def full_kv_pages(model: ModelConfig, num_tokens: int, block_size: int = 32) -> int:
    """Peak pages over a request's lifetime up to ``num_tokens`` tokens, summed over layers."""
    by_window: dict[int | None, int] = {}
    for i in range(model.num_layers):
        window = model.layer_window(i)
        by_window[window] = by_window.get(window, 0) + 1
    return sum(count * peak_layer_pages(num_tokens, window, block_size) for window, count in by_window.items())


# ---------------------------------------------------------------------------------------------- FLOPs
def causal_keys(num_tokens: int, window: int | None) -> int:
    """Σ over queries i < n of the keys query i attends to: ``n(n+1)/2``, or capped at ``window`` per query."""
    n = num_tokens
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def prefill_flops(model: ModelConfig, num_tokens: int) -> int:
    """FLOPs of one prompt: ``2 · linear params · n`` + LM head for the last token + attention ``4 · H · D · Σkeys``
    per layer (QKᵀ and PV, causal, sliding layers capped by their window)."""
    attention = sum(causal_keys(num_tokens, model.layer_window(i)) for i in range(model.num_layers))
    return (2 * linear_parameters(model) * num_tokens + 2 * model.vocab_size * model.hidden_size
            + 4 * model.num_heads * model.head_dim * attention)


def decode_flops(model: ModelConfig, context: int, attended_keys: int | None = None) -> int:
    """FLOPs of one decode token after ``context`` cached tokens: every matmul weight once (LM head included) plus
    attention ``4 · H · D`` per key per layer. ``attended_keys`` (summed over layers) overrides the full-cache
    count ``Σ_layers min(context + 1, window)`` for caches that keep or read fewer tokens."""
    attention = sum(layer_tokens(model, context + 1)) if attended_keys is None else attended_keys
    return (2 * (linear_parameters(model) + model.vocab_size * model.hidden_size)
            + 4 * model.num_heads * model.head_dim * attention)


def activation_bytes(model: ModelConfig, num_batched_tokens: int, num_logit_rows: int, act_bytes: int = 2) -> int:
    """Rough transient working set of one step: hidden states, q/k/v, attention output, gate/up/act for
    ``num_batched_tokens`` tokens, plus fp32 logits for ``num_logit_rows`` rows. An estimate, not a measurement."""
    d, D, ffn = model.hidden_size, model.head_dim, model.intermediate_size
    per_token = 2 * d + (2 * model.num_heads + 2 * model.num_kv_heads) * D + 3 * ffn
    return num_batched_tokens * per_token * act_bytes + num_logit_rows * model.vocab_size * 4


# ---------------------------------------------------------------------------------------------- times
@dataclass(frozen=True, slots=True)
class StepTime:
    """Lower bound of one step: the larger of the bandwidth and compute bounds, and which one binds."""

    seconds: float
    bytes_read: int
    flops: int
    bound: str  # "memory" or "compute"


def step_time(bytes_read: int, flops: int, bandwidth: float, compute: float) -> StepTime:
    memory_s, compute_s = bytes_read / bandwidth, flops / compute
    return StepTime(max(memory_s, compute_s), bytes_read, flops, "memory" if memory_s >= compute_s else "compute")


def compute_rate(hardware: HardwareProfile, fmt: WeightFormat) -> float:
    """FLOP/s a step runs at: weight-only int8/int4 still multiply in bf16; fp32 weights in fp32."""
    return hardware.fp32_flops if fmt.bits == 32 else hardware.bf16_flops


@dataclass(frozen=True, slots=True)
class DecodeTime:
    """One decode step: ``seconds`` = the lower bound + the profile's engine overheads (= the bound for presets)."""

    seconds: float
    lower_bound: StepTime
    overhead_s: float


@dataclass(frozen=True, slots=True)
class StreamRead:
    """What a decode step expands of quantized streams, for all its sequences: ``layers`` (layer · sequence pairs
    holding a stream) and ``elements`` (K and V elements expanded), of storage format ``fmt``."""

    fmt: str | None = None
    layers: int = 0
    elements: int = 0


def decode_overhead_s(hardware: HardwareProfile, num_layers: int, batch: int, kv_bytes_read: float,
                      streams: StreamRead = StreamRead()) -> float:
    """Seconds one decode step spends beyond the bound: ``step + batch · per_seq + layers · (per_layer + batch ·
    per_seq_layer) + (kv_read_factor − 1) · kv_bytes_read / bandwidth + stream_layer · streams.layers +
    per_element · streams.elements`` (``HardwareProfile.stream_costs``). ``kv_bytes_read`` and ``streams`` cover
    every sequence. Exactly 0.0 for a profile without overheads."""
    terms = overhead_terms(num_layers, batch, kv_bytes_read, hardware.memory_bandwidth)
    per_layer, per_element = hardware.stream_costs(streams.fmt)
    return (sum(c * t for c, t in zip(overhead_coefficients(hardware), terms))
            + per_layer * streams.layers + per_element * streams.elements)


def decode_time(hardware: HardwareProfile, num_layers: int, batch: int, weight_bytes_read: int,
                kv_bytes_read_per_seq: int, flops_per_seq: int, compute: float,
                streams_per_seq: StreamRead = StreamRead()) -> DecodeTime:
    """One decode step of ``batch`` sequences: weights read once, each sequence's KV and FLOPs (``compute`` FLOP/s),
    then the engine overheads on top (``decode_overhead_s``; ``streams_per_seq``: the quantized streams one
    sequence's step expands)."""
    bound = step_time(weight_bytes_read + batch * kv_bytes_read_per_seq, batch * flops_per_seq,
                      hardware.memory_bandwidth, compute)
    streams = StreamRead(streams_per_seq.fmt, batch * streams_per_seq.layers, batch * streams_per_seq.elements)
    overhead = decode_overhead_s(hardware, num_layers, batch, batch * kv_bytes_read_per_seq, streams)
    return DecodeTime(bound.seconds + overhead, bound, overhead)
