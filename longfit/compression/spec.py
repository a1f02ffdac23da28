"""KV-compression spec language, method descriptors and token counts. No torch.

A spec string picks and composes methods: ``"snapkv:keep=0.25+kivi:bits=2"``. This module parses and validates it
(every error is a ValueError naming the problem), holds the torch-free descriptor table of every method (kind, typed
parameters with ranges and defaults, aliases), and computes how many tokens each layer keeps (``storage.py``: how
many bytes the stored KV of one request takes). The policies in this package call the same counting functions, so
the capacity planner and the engine can never disagree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longfit.compression.head_scores import read_head_scores, require_heads_path

KINDS = ("evict", "select", "merge", "lowrank", "quantize")
STORAGE_KINDS = ("merge", "lowrank", "quantize")
SCALE_BYTES = 2  # NOTE: quantization scales and zero points are stored as float16, as in the KIVI reference
INDEX_BYTES = 8  # channel / token index tensors are int64 (torch indexing wants int64)
OUTLIER_INDEX_BYTES = 2  # dense-and-sparse outlier positions are 16-bit offsets inside their group


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One typed parameter of a method: ``low``/``high`` are inclusive unless ``*_open``; ``choices`` if non-empty."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] = ()

    def accepted(self) -> str:
        """Human-readable accepted values, used in error messages."""
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", str: "a string"}[self.type]
        low, high = (None if x is None else f"{x:g}" for x in (self.low, self.high))
        if low is not None and high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return kind if low is None else f"{kind} {'>' if self.low_open else '>='} {low}"

    def convert(self, method: str, raw: Any) -> Any:
        """Parse (if a string) and range-check one value; raises ValueError naming ``method:param``."""
        where = f"kv_compression: {method}:{self.name}"
        value = raw
        if isinstance(raw, str) and self.type is not str:
            try:
                value = self.type(raw.strip())
            except ValueError:
                raise ValueError(f"{where} must be {self.accepted()}, got {raw!r}") from None
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or isinstance(value, bool):  # user input: ValueError, as everywhere
            raise ValueError(f"{where} must be {self.accepted()}, got {raw!r}")  # noqa: TRY004
        bad = (bool(self.choices) and value not in self.choices) or (self.type is float and not math.isfinite(value))
        if self.low is not None:
            bad |= value <= self.low if self.low_open else value < self.low
        if self.high is not None:
            bad |= value >= self.high if self.high_open else value > self.high
        if self.type is str and not self.choices and any(c in value for c in ",+="):
            raise ValueError(f"{where} may not contain ',', '+' or '=', got {raw!r}")
        if bad:
            raise ValueError(f"{where} must be {self.accepted()}, got {raw!r}")
        return value


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """Descriptor of one method: its kind, parameters, aliases, and the parameters that make it a no-op."""

    name: str
    kind: str
    summary: str
    paper: str
    params: tuple[ParamSpec, ...]
    aliases: tuple[str, ...] = ()
    identity: tuple[tuple[str, Any], ...] = ()

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


_KEEP = ParamSpec("keep", float, None, "fraction of the prompt's tokens kept per layer", 0.0, 1.0, low_open=True)
_BUDGET = ParamSpec("budget", int, None, "tokens kept per layer (absolute budget, the alternative to keep)", 1)
_OBS_WINDOW = ParamSpec("window", int, 64, "observation window: last prompt tokens whose queries score, always kept", 1)
_KERNEL = ParamSpec("kernel", int, 5, "1-D pooling kernel over the key axis (odd)", 1)
_POOL = ParamSpec("pool", str, "avg", "pooling of the window scores", choices=("avg", "max"))
_BITS16 = "16 stores the model dtype unchanged"
_EVERY = ParamSpec("every", int, 0, "decode tokens between re-compressions back to the layer's budget (0: only at "
                   "the end of prefill)", 0)

METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("streaming_llm", "evict", "attention sinks + most recent window",
               "Efficient Streaming Language Models with Attention Sinks",
               (ParamSpec("sinks", int, 4, "first tokens always kept", 0),
                ParamSpec("window", int, None, "most recent tokens kept (alternative to keep/budget)", 0),
                _KEEP, _BUDGET, _EVERY),
               aliases=("streaming", "streamingllm", "sink"), identity=(("keep", 1.0),)),
    MethodSpec("h2o", "evict", "heavy hitters by accumulated attention of the last queries + recent tokens",
               "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
               (_KEEP, _BUDGET,
                ParamSpec("recent_ratio", float, 0.5, "share of the kept tokens that are the most recent", 0.0, 1.0),
                ParamSpec("observe", int, 256, "last prompt queries whose attention is accumulated", 1), _EVERY),
               identity=(("keep", 1.0),)),
    MethodSpec("snapkv", "evict", "observation-window attention, pooled, per KV head",
               "SnapKV: LLM Knows What You are Looking for Before Generation",
               (_KEEP, _BUDGET, _OBS_WINDOW, _KERNEL, _POOL, _EVERY), identity=(("keep", 1.0),)),
    MethodSpec("chunkkv", "evict", "observation-window attention per chunk of consecutive tokens; whole chunks kept, "
               "the same for every KV head",
               "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
               (_KEEP, _BUDGET, _OBS_WINDOW,
                ParamSpec("chunk", int, 20, "consecutive tokens scored and kept together", 1, 4096), _EVERY),
               aliases=("chunk_kv",), identity=(("keep", 1.0),)),
    MethodSpec("pyramidkv", "evict", "SnapKV scores with budgets decreasing linearly with depth",
               "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
               (_KEEP, _BUDGET, _OBS_WINDOW, _KERNEL, _POOL,
                ParamSpec("beta", int, 20, "pyramid steepness: the last layer gets 1/beta of the mean", 1)),
               aliases=("pyramid",), identity=(("keep", 1.0),)),
    MethodSpec("tova", "evict", "attention of the last prompt token, averaged over all heads",
               "Transformers are Multi-State RNNs", (_KEEP, _BUDGET, _EVERY), identity=(("keep", 1.0),)),
    MethodSpec("knorm", "evict", "keep the lowest-L2-norm keys",
               "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
               (_KEEP, _BUDGET, ParamSpec("skip_layers", int, 0, "first layers left uncompressed", 0), _EVERY),
               aliases=("keynorm", "l2norm"), identity=(("keep", 1.0),)),
    MethodSpec("duo_attention", "evict", "retrieval heads keep everything, streaming heads keep sinks + window",
               "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
               (ParamSpec("heads", str, None, "path of the model's head-score JSON file (longfit profile-heads)"),
                ParamSpec("sparsity", float, 0.5, "fraction of KV heads made streaming heads", 0.0, 1.0),
                ParamSpec("sinks", int, 64, "first tokens kept by streaming heads", 0),
                ParamSpec("window", int, 256, "recent tokens kept by streaming heads", 0),
                ParamSpec("granularity", str, "layer", "'layer': whole layers stream (frees pages now); "
                          "'head': per-head as the paper (mixed layers stay full)", choices=("layer", "head"))),
               aliases=("duo", "duoattention"), identity=(("sparsity", 0.0),)),
    MethodSpec("think", "lowrank", "prune key channels by query-key magnitude",
               "ThinK: Thinner Key Cache by Query-Driven Pruning",
               (ParamSpec("channels", float, 0.5, "fraction of key channels kept", 0.0, 1.0, low_open=True),
                ParamSpec("window", int, 32, "last prompt queries that score the channels", 1)),
               identity=(("channels", 1.0),)),
    MethodSpec("shadowkv", "lowrank", "pre-RoPE keys stored as a rank-r SVD factorization, values exact",
               "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference",
               (ParamSpec("rank", int, 160, "rank of the key factorization (per layer, across KV heads)", 1),
                ParamSpec("budget", int, 2048, "stored tokens each KV head reads per decode step, in whole chunks "
                          "chosen by their landmarks, beside the outlier and local chunks (0: read every token)", 0),
                ParamSpec("chunk", int, 8, "tokens per chunk (one landmark, the mean of its post-RoPE keys)", 1,
                          4096),
                ParamSpec("outliers", int, 48, "chunks per KV head always read: the prompt's chunks least like "
                          "their landmark", 0),
                ParamSpec("local", int, 4, "most recent stored chunks always read", 0)),
               identity=(("rank", 1 << 20),)),
    MethodSpec("minicache", "merge", "adjacent deep layers share one direction per token, outlier tokens kept",
               "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models",
               (ParamSpec("start", float, 0.5, "fraction of depth where layer pairs start merging", 0.0, 1.0),
                ParamSpec("retain", float, 0.05, "fraction of each group's tokens per head kept unmerged", 0.0, 1.0),
                ParamSpec("group", int, 64, "tokens merged together (retention is per group; fewer stay exact)", 1,
                          32768)),
               aliases=("merging",), identity=(("retain", 1.0),)),
    MethodSpec("quest", "select", "decode reads only the pages whose key bounds score highest",
               "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
               (ParamSpec("budget", int, 1024, "tokens read per decode step per layer", 1),
                ParamSpec("page", int, 16, "tokens per page (key min/max metadata per page)", 1),
                ParamSpec("dense_layers", int, 2, "first layers that always read everything", 0)),
               identity=(("budget", 1 << 30),)),
    MethodSpec("kivi", "quantize", "keys per channel over G-token groups, values per token, fp residual window",
               "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
               (ParamSpec("bits", int, 2, _BITS16, choices=(2, 4, 16)),
                ParamSpec("key_bits", int, None, "key code width when it differs from bits (KIVI's k_bits; values "
                          "keep bits)", choices=(2, 4)),
                ParamSpec("group", int, 32, "tokens per key group / channels per value group", 1),
                ParamSpec("residual", int, 128, "full-precision recent tokens (a multiple of group)", 1)),
               identity=(("bits", 16),)),
    MethodSpec("int8", "quantize", "symmetric int8 per token and KV head", "int8 KV cache (per-token, per-head)",
               (ParamSpec("bits", int, 8, _BITS16, choices=(8, 16)),), aliases=("kv8",), identity=(("bits", 16),)),
    MethodSpec("kvquant", "quantize", "pre-RoPE per-channel keys, per-token values, dense-and-sparse outliers",
               "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization",
               (ParamSpec("bits", int, 4, _BITS16, choices=(2, 3, 4, 8, 16)),
                ParamSpec("group", int, 32, "tokens per per-channel key group", 1),
                ParamSpec("outliers", float, 0.01, "fraction of values kept exact (sparse)", 0.0, 0.5, high_open=True)),
               identity=(("bits", 16),)),
)}

_ALIASES: dict[str, str] = {a: m.name for m in METHODS.values() for a in (m.name, *m.aliases)}


def known_methods() -> str:
    """``"duo_attention (duo, duoattention), h2o, ..."``: for error and help messages."""
    return ", ".join(f"{m.name} ({', '.join(m.aliases)})" if m.aliases else m.name for m in METHODS.values())


def resolve_method(name: str) -> MethodSpec:
    """Descriptor for a method name or alias; ValueError listing the known methods."""
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"kv_compression: unknown method {name!r}; known methods: {known_methods()}")
    return METHODS[_ALIASES[key]]


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One method with every accepted parameter, typed; ``None`` marks an optional parameter left unset."""

    name: str
    params: tuple[tuple[str, Any], ...]

    @property
    def kind(self) -> str:
        return METHODS[self.name].kind

    def get(self, name: str) -> Any:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(f"{self.name} has no parameter {name!r}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True, slots=True)
class CompressionSpec:
    """Stages in application order (evict → select → merge/lowrank/quantize); ``text`` is the canonical form."""

    stages: tuple[StageSpec, ...]
    text: str

    @property
    def is_empty(self) -> bool:
        return not self.stages

    def stage(self, *kinds: str) -> StageSpec | None:
        """The (single) stage of one of ``kinds``, or None."""
        return next((s for s in self.stages if s.kind in kinds), None)


NO_COMPRESSION = CompressionSpec(stages=(), text="none")


def make_stage(name: str, **params: Any) -> StageSpec:
    """Validated stage from a method name (or alias) and typed or string values; fills defaults."""
    method = resolve_method(name)
    values: dict[str, Any] = {}
    for key, raw in params.items():
        spec = method.param(key)
        if spec is None:
            accepted = ", ".join(p.name for p in method.params)
            raise ValueError(f"kv_compression: {method.name} does not accept {key!r}; accepted parameters: {accepted}")
        values[key] = None if raw is None else spec.convert(method.name, raw)
    for spec in method.params:
        values.setdefault(spec.name, spec.default)
    _check_stage(method.name, values)
    return StageSpec(method.name, tuple((p.name, values[p.name]) for p in method.params))


def _check_stage(name: str, p: dict[str, Any]) -> None:
    """Cross-parameter rules of one method."""
    where = f"kv_compression: {name}"
    if name == "streaming_llm" and sum(p[k] is not None for k in ("keep", "budget", "window")) != 1:
        raise ValueError(f"{where} needs exactly one of keep=FRACTION, budget=TOKENS or window=TOKENS")
    if name != "streaming_llm" and "keep" in p and "budget" in p and (p["keep"] is None) == (p["budget"] is None):
        raise ValueError(f"{where} needs exactly one of keep=FRACTION (0 < keep <= 1) or budget=TOKENS")
    if "kernel" in p and p["kernel"] % 2 == 0:
        raise ValueError(f"{where}:kernel must be an odd integer >= 1, got {p['kernel']}")
    if name == "pyramidkv" and p["budget"] is not None and p["budget"] <= p["window"]:
        raise ValueError(f"{where}:budget must be greater than window={p['window']}, got {p['budget']}")
    if name == "kivi" and p["key_bits"] is not None and p["bits"] == 16:
        raise ValueError(f"{where}:key_bits needs bits=2 or bits=4 (bits=16 stores the model dtype unchanged)")
    if name == "kivi" and p["residual"] % p["group"]:
        raise ValueError(f"{where}:residual must be a multiple of group={p['group']}, got {p['residual']}")


def parse_spec(text: str | CompressionSpec | None) -> CompressionSpec:
    """Parse ``"name:param=value,...+name..."``; ``None``, ``""`` and ``"none"`` mean no compression.

    Raises:
        ValueError: unknown method (lists the known ones), unknown parameter (lists the accepted ones), a value
            out of range (names ``method:param`` and the range), bad syntax, or an unsupported composition.
    """
    if isinstance(text, CompressionSpec):
        return text
    if text is None or text.strip().lower() in ("", "none"):
        return NO_COMPRESSION
    return _parse_text(text)


@functools.lru_cache(maxsize=256)  # the engine parses the same few specs for every request
def _parse_text(text: str) -> CompressionSpec:
    stages, explicit = [], []
    for part in text.split("+"):
        name, sep, rest = part.partition(":")
        if not name.strip() or (sep and not rest.strip()):
            raise ValueError(f"kv_compression: bad syntax in {part.strip()!r} of {text!r}: expected "
                             "name or name:param=value,param=value (stages joined by '+')")
        params: dict[str, str] = {}
        for item in rest.split(",") if sep else []:
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq or not key or not value.strip():
                raise ValueError(f"kv_compression: bad syntax {item.strip()!r} in {text!r}: expected param=value")
            if key in params:
                raise ValueError(f"kv_compression: {name.strip()}:{key} given twice in {text!r}")
            params[key] = value.strip()
        stage = make_stage(name, **params)
        stages.append(stage)
        explicit.append(tuple(k for k, _ in stage.params if k in params))
    return compose(stages, explicit)


def compose(stages: Sequence[StageSpec], explicit: Sequence[tuple[str, ...]] | None = None) -> CompressionSpec:
    """Order stages by kind, check the composition rules, and build the canonical text."""
    if explicit is None:
        explicit = [tuple(k for k, v in s.params if v is not None and v != METHODS[s.name].param(k).default)
                    for s in stages]
    order = sorted(range(len(stages)), key=lambda i: KINDS.index(stages[i].kind))
    ordered = [stages[i] for i in order]
    for group, label in ((("evict",), "eviction"), (("select",), "page-selection"),
                         (STORAGE_KINDS, "storage (quantize / lowrank / merge)")):
        names = [s.name for s in ordered if s.kind in group]
        if len(names) > 1:
            raise ValueError(f"kv_compression: at most one {label} stage, got {' and '.join(names)}")
    evict = next((s for s in ordered if s.kind == "evict"), None)
    if any(s.kind == "merge" for s in ordered) and evict is not None and evict.name != "streaming_llm":
        raise ValueError(f"kv_compression: minicache merges token i of two layers, so it composes only with "
                         f"streaming_llm (same positions in every layer), not with {evict.name}")
    parts = []
    for i in order:
        stage = stages[i]
        given = ",".join(f"{k}={stage.get(k)}" for k in explicit[i])
        parts.append(f"{stage.name}:{given}" if given else stage.name)
    return CompressionSpec(stages=tuple(ordered), text="+".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# Token counts. The policies call these same functions, so plans and capacity math agree by construction.


def ratio_kept(num_tokens: int, keep: float | None, budget: int | None) -> int:
    """Tokens kept by a keep fraction (``floor(n * keep)``, at least 1) or an absolute budget, capped at n.

    NOTE: the 1e-9 makes ``keep=0.57`` of 100 tokens keep 57 (``100 * 0.57`` is 56.999... in floating point).
    """
    if budget is not None:
        return min(num_tokens, budget)
    assert keep is not None
    return min(num_tokens, max(1, int(num_tokens * keep + 1e-9)))


def window_kept(num_tokens: int, keep: float | None, budget: int | None, window: int) -> int:
    """Attention-window methods: no compression when the prompt is not longer than the window (methods.md §0)."""
    kept = ratio_kept(num_tokens, keep, budget)
    return num_tokens if num_tokens <= window else kept


def streaming_kept(num_tokens: int, sinks: int, window: int | None, keep: float | None, budget: int | None) -> int:
    """StreamingLLM: ``sinks + window`` tokens, or a keep/budget count split as sinks + most recent (kvpress)."""
    if window is not None:
        return min(num_tokens, sinks + window)
    return ratio_kept(num_tokens, keep, budget)


def pyramid_kept(layer_idx: int, num_layers: int, num_tokens: int, keep: float | None, budget: int | None,
                 window: int, beta: int) -> int:
    """PyramidKV per-layer budget, window included.

    keep form: kvpress ``PyramidKVPress.get_layer_budget`` (linear from ``max`` to ``min = mean/beta``, mean over
    layers = ``n * keep``; falls back to SnapKV's ``round(n * keep)`` when infeasible). budget form: KVCache-Factory
    ``PyramidKVCluster`` (integer steps; no compression when ``n < budget``; uniform ``budget`` when
    ``n < 2 (budget - window)``).
    """
    n, w = num_tokens, window
    if n <= w:
        return n
    if budget is None:
        assert keep is not None
        cap = w + n * keep
        min_num = (cap - w) / beta
        max_num = (cap - w) * 2 - min_num
        if max_num >= n - w:
            max_num = n - w
            min_num = (cap - w) * 2 - max_num
        if not n >= max_num >= min_num >= w:
            return min(n, max(1, round(n * keep)))
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return min(n, round(max_num - layer_idx * steps))
    if n < budget:
        return n
    if n < 2 * (budget - w):
        return budget
    min_i = (budget - w) // beta
    max_i = (budget - w) * 2 - min_i
    if max_i >= n - w:
        max_i = n - w
        min_i = (budget - w) * 2 - max_i
    steps_i = (max_i - min_i) // (num_layers - 1) if num_layers > 1 else 0
    return min(n, max_i - layer_idx * steps_i + w)


def duo_streaming_mask(head_scores: Sequence[Sequence[float]], sparsity: float,
                       granularity: str) -> list[list[bool]]:
    """Which (layer, KV head) are streaming heads: the ``round(sparsity * count)`` lowest scores (ties: lower index).

    ``granularity="head"`` ranks single heads (DuoAttention ``sparsify_attention_heads``); ``"layer"`` ranks layers
    by their best head and makes whole layers streaming.
    """
    num_layers, num_heads = len(head_scores), len(head_scores[0])
    if granularity == "head":
        flat = sorted(range(num_layers * num_heads), key=lambda i: (head_scores[i // num_heads][i % num_heads], i))
        chosen = set(flat[: int(sparsity * num_layers * num_heads + 0.5)])
        return [[layer * num_heads + h in chosen for h in range(num_heads)] for layer in range(num_layers)]
    layers = sorted(range(num_layers), key=lambda layer: (max(head_scores[layer]), layer))
    chosen = set(layers[: int(sparsity * num_layers + 0.5)])
    return [[layer in chosen] * num_heads for layer in range(num_layers)]


def duo_kept(num_tokens: int, layer_streaming: Sequence[bool], sinks: int, window: int) -> int:
    """A layer shrinks to ``sinks + window`` only when all its KV heads stream (one token count per layer)."""
    return min(num_tokens, sinks + window) if all(layer_streaming) else num_tokens


def knorm_kept(layer_idx: int, num_tokens: int, keep: float | None, budget: int | None, skip_layers: int) -> int:
    return num_tokens if layer_idx < skip_layers else ratio_kept(num_tokens, keep, budget)


def stage_kept_tokens(stage: StageSpec, layer_idx: int, num_layers: int, num_tokens: int) -> int:
    """Tokens one layer keeps after a stage's prefill eviction (non-evicting stages keep all)."""
    p = stage.as_dict()
    if stage.name == "streaming_llm":
        return streaming_kept(num_tokens, p["sinks"], p["window"], p["keep"], p["budget"])
    if stage.name in ("snapkv", "chunkkv", "tova"):
        return window_kept(num_tokens, p["keep"], p["budget"], p.get("window", 1))
    if stage.name == "h2o":
        return window_kept(num_tokens, p["keep"], p["budget"], p["observe"])
    if stage.name == "pyramidkv":
        return pyramid_kept(layer_idx, num_layers, num_tokens, p["keep"], p["budget"], p["window"], p["beta"])
    if stage.name == "knorm":
        return knorm_kept(layer_idx, num_tokens, p["keep"], p["budget"], p["skip_layers"])
    if stage.name == "duo_attention":
        scores = read_head_scores(require_heads_path(p)).scores
        if len(scores) != num_layers:
            raise ValueError(f"kv_compression: duo_attention:heads has {len(scores)} layers, model has {num_layers}")
        mask = duo_streaming_mask(scores, p["sparsity"], p["granularity"])
        return duo_kept(num_tokens, mask[layer_idx], p["sinks"], p["window"])
    return num_tokens


def kept_tokens_per_layer(spec: str | CompressionSpec | None, num_layers: int, num_tokens: int, *,
                          layer_windows: Sequence[int | None] | None = None) -> list[int]:
    """Tokens each layer keeps after prefill eviction of a ``num_tokens`` prompt.

    ``layer_windows[l]`` is a sliding layer's window (Gemma 3 local layers) or None; sliding layers keep
    ``min(n, window)`` and are never evicted further (they are already bounded).
    """
    spec = parse_spec(spec)
    evict = spec.stage("evict")
    kept = []
    for layer in range(num_layers):
        window = layer_windows[layer] if layer_windows is not None else None
        if window is not None:
            kept.append(min(num_tokens, window))
        elif evict is None:
            kept.append(num_tokens)
        else:
            kept.append(stage_kept_tokens(evict, layer, num_layers, num_tokens))
    return kept


def decode_budgets(spec: str | CompressionSpec | None, num_layers: int, num_prompt_tokens: int, *,
                   layer_windows: Sequence[int | None] | None = None) -> list[tuple[int, int] | None]:
    """Per layer, ``(budget, trigger)`` of decode-time re-compression (an eviction stage's ``every > 0``): once the
    layer holds ``trigger`` tokens it is evicted back to ``budget``. ``budget`` is the absolute budget (``budget``,
    StreamingLLM's ``sinks + window``) or, for a ``keep`` fraction, what the prompt's eviction kept; ``trigger`` is
    ``budget + every``, or one more than the method's query window when that is larger (window methods never evict
    a layer not longer than their window). None for layers it leaves alone (sliding-window layers, layers the stage
    never evicts such as knorm's ``skip_layers``) and for every layer when ``every`` is 0."""
    evict = parse_spec(spec).stage("evict")
    params = evict.as_dict() if evict is not None else {}
    if not params.get("every"):
        return [None] * num_layers
    huge = 1 << 40
    absolute = params.get("budget") is not None or evict.name == "streaming_llm" and params["window"] is not None
    guard = {"snapkv": params.get("window"), "chunkkv": params.get("window"), "tova": 1,
             "h2o": params.get("observe")}.get(evict.name, 0)
    budgets: list[tuple[int, int] | None] = []
    for layer in range(num_layers):
        window = layer_windows[layer] if layer_windows is not None else None
        if window is not None or stage_kept_tokens(evict, layer, num_layers, huge) >= huge:
            budgets.append(None)
            continue
        budget = stage_kept_tokens(evict, layer, num_layers, huge if absolute else num_prompt_tokens)
        budgets.append((budget, max(budget + params["every"], guard + 1)))
    return budgets


def peak_decode_tokens(kept: int, generated: int, budget: tuple[int, int] | None) -> int:
    """Most tokens a layer holds while ``generated`` tokens are appended one per step to its ``kept`` ones, evicted
    back to ``budget[0]`` whenever it reaches ``budget[1]`` (``decode_budgets``; None: never)."""
    return kept + generated if budget is None else min(kept + generated, max(kept, budget[1]))
