"""Per-subsystem configuration: one frozen dataclass each, validated in ``__post_init__``.

Values known only at run time (number of KV blocks, resolved dtype, measured bandwidth) live in result
objects (``kv.spec.KVCacheSpec``), never back in a config. Every field carries its help text through
``Annotated[T, "help"]`` so the CLI can build its flags from one place. No torch here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

_DTYPES = ("bfloat16", "float32")
_WEIGHT_FORMS = ("auto", "bf16", "int8", "int4")
_ARCHITECTURES = ("llama", "gemma3")
_LAYER_TYPES = ("full", "sliding")
_ACTIVATIONS = ("silu", "gelu_tanh")


def _fail(cls: str, name: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{cls}.{name} must be {expected}, got {got!r}")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face's ``rope_scaling`` describes it."""

    rope_type: Annotated[str, "'linear' or 'llama3'"] = "linear"
    factor: Annotated[float, "frequency division factor"] = 1.0
    low_freq_factor: Annotated[float, "llama3: low-frequency factor"] = 1.0
    high_freq_factor: Annotated[float, "llama3: high-frequency factor"] = 4.0
    original_max_position_embeddings: Annotated[int, "llama3: original context"] = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise _fail("RopeScaling", "rope_type", "'linear' or 'llama3'", self.rope_type)
        if self.factor <= 0:
            raise _fail("RopeScaling", "factor", "> 0", self.factor)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer, architecture-neutral.

    Built from GGUF metadata or a Hugging Face ``config.json`` by ``models/``; the planner reads it
    without weights. ``layer_types[i]`` says whether layer ``i`` attends to the whole context ("full")
    or to the last ``sliding_window`` tokens ("sliding", Gemma 3's local layers).
    """

    architecture: Annotated[str, "'llama' (Llama/Mistral/Qwen2/SmolLM2) or 'gemma3'"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: Annotated[int, "context length the model was trained for"]
    rope_theta: float = 10000.0
    rope_local_theta: Annotated[float | None, "RoPE base of sliding-window layers (Gemma 3)"] = None
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: Annotated[bool, "bias on q/k/v projections (Qwen2)"] = False
    hidden_act: Annotated[str, "'silu' (SwiGLU) or 'gelu_tanh' (GeGLU)"] = "silu"
    qk_norm: Annotated[bool, "RMSNorm on queries and keys per head (Gemma 3)"] = False
    query_pre_attn_scalar: Annotated[float | None, "attention scale is this ** -0.5; None: head_dim"] = None
    embedding_multiplier: Annotated[float, "embeddings are multiplied by this (Gemma: sqrt(hidden))"] = 1.0
    final_logit_softcapping: float | None = None
    sliding_window: Annotated[int | None, "window of 'sliding' layers, in tokens"] = None
    layer_types: Annotated[tuple[str, ...], "per layer: 'full' or 'sliding'; empty means all full"] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    name: str = "model"

    def __post_init__(self) -> None:
        cls = "ModelConfig"
        if self.architecture not in _ARCHITECTURES:
            raise _fail(cls, "architecture", f"one of {_ARCHITECTURES}", self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise _fail(cls, name, "a positive integer", value)
        if self.num_heads % self.num_kv_heads:
            raise _fail(cls, "num_kv_heads", f"a divisor of num_heads={self.num_heads}", self.num_kv_heads)
        if self.hidden_act not in _ACTIVATIONS:
            raise _fail(cls, "hidden_act", f"one of {_ACTIVATIONS}", self.hidden_act)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        if len(self.layer_types) != self.num_layers or any(t not in _LAYER_TYPES for t in self.layer_types):
            raise _fail(cls, "layer_types", f"{self.num_layers} entries of {_LAYER_TYPES}", self.layer_types)
        if "sliding" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
            raise _fail(cls, "sliding_window", "a positive integer when a layer is 'sliding'", self.sliding_window)

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer_idx: int) -> int | None:
        """Tokens a layer attends to, or None for the whole context."""
        return self.sliding_window if self.layer_types[layer_idx] == "sliding" else None

    @classmethod
    def tiny(cls, architecture: str = "llama", **overrides: Any) -> ModelConfig:
        """A random-weight test model: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256."""
        base: dict[str, Any] = dict(
            architecture=architecture, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, max_model_len=2048, rope_theta=10000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,), name=f"tiny-{architecture}",
        )
        if architecture == "gemma3":
            base.update(num_layers=4, qk_norm=True, hidden_act="gelu_tanh", rope_local_theta=10000.0,
                        rope_theta=1_000_000.0, embedding_multiplier=8.0, query_pre_attn_scalar=16,
                        sliding_window=32, layer_types=("sliding", "sliding", "sliding", "full"), add_bos_token=True)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV-cache layout and budget. The resolved block count lives in ``kv.spec.KVCacheSpec``."""

    block_size: Annotated[int, "tokens per KV block (a multiple of 8)"] = 32
    memory_bytes: Annotated[int | None, "KV bytes to reserve (e.g. 4GiB); None: memory_fraction of free memory"] = None
    memory_fraction: Annotated[float, "fraction of free host memory for the KV cache when memory_bytes is unset"] = 0.3
    kv_dtype: Annotated[str, "storage dtype of uncompressed keys and values: 'auto' (model dtype), bfloat16, float32"] = "auto"
    enable_prefix_caching: Annotated[bool, "reuse KV blocks of identical prompt prefixes"] = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size % 8:
            raise _fail("CacheConfig", "block_size", "a positive multiple of 8", self.block_size)
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise _fail("CacheConfig", "memory_bytes", "a positive number of bytes", self.memory_bytes)
        if not 0.0 < self.memory_fraction <= 0.95:
            raise _fail("CacheConfig", "memory_fraction", "in (0, 0.95]", self.memory_fraction)
        if self.kv_dtype not in ("auto",) + _DTYPES:
            raise _fail("CacheConfig", "kv_dtype", f"one of {('auto',) + _DTYPES}", self.kv_dtype)


MAX_DECODE_STEPS = 64  # SchedulerConfig.decode_steps: beyond it a step's tokens would reach a stream in long bursts


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Token-budget scheduling (Sarathi-Serve: decodes first, then prompt chunks)."""

    max_num_seqs: Annotated[int, "most requests running in one step"] = 16
    max_num_batched_tokens: Annotated[int, "most tokens (decode + prefill chunks) in one step"] = 512
    max_model_len: Annotated[int | None, "longest prompt + output; None: the model's context"] = None
    max_queue: Annotated[int | None, "most waiting requests; beyond it new requests are refused"] = None
    decode_steps: Annotated[int, "decode steps the runner may take per scheduled step when every running request "
                                 "decodes and no waiting one could start (multi-step decoding); 1: one token per "
                                 "step"] = 4

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise _fail("SchedulerConfig", "max_num_seqs", "a positive integer", self.max_num_seqs)
        if self.max_num_batched_tokens <= 0:
            raise _fail("SchedulerConfig", "max_num_batched_tokens", "a positive integer", self.max_num_batched_tokens)
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise _fail("SchedulerConfig", "max_model_len", "a positive integer", self.max_model_len)
        if self.max_queue is not None and self.max_queue < 0:
            raise _fail("SchedulerConfig", "max_queue", ">= 0", self.max_queue)
        if isinstance(self.decode_steps, bool) or not isinstance(self.decode_steps, int) \
                or not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise _fail("SchedulerConfig", "decode_steps", f"an integer in [1, {MAX_DECODE_STEPS}]", self.decode_steps)



def env_num_threads() -> int | None:
    """Torch threads asked for by ``$LONGFIT_NUM_THREADS``, or None when it is unset or empty."""
    value = os.environ.get("LONGFIT_NUM_THREADS")
    return int(value) if value else None


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How the model computes: activation dtype, weight form, threads, device.

    ``weights="auto"`` (the default) keeps a GGUF's Q4_0/Q4_1 tensors as packed int4 and Q8_0 as int8 (bf16
    activations; with float32 activations it is the file's exact dequantization); other tensors and float checkpoints
    stay dense. On SmolLM2-135M Q4_1 it decodes ~2x faster than "bf16" at batch 1 (the fused C decode step) with
    the same top-1 agreement, in a third of the weight memory (docs/PERFORMANCE.md). Threads are set once per
    process.
    """

    dtype: Annotated[str, "activation and weight dtype: bfloat16 (default on CPU) or float32"] = "bfloat16"
    weights: Annotated[str, "weight compute form: auto (keep the file's 4/8-bit: fastest decode), bf16, int8, "
                            "int4"] = "auto"
    device: Annotated[str, "'cpu' or 'cuda' (cuda only where available)"] = "cpu"
    num_threads: Annotated[int | None, "torch threads, set once; None: $LONGFIT_NUM_THREADS, else every CPU "
                                       "(use 1 on a machine other processes keep busy)"] = None
    weight_seed: Annotated[int, "seed of the random weights of tiny-* test models"] = 0
    compile: Annotated[bool, "run plain decode steps as one torch.compile graph (needs a C++ compiler; the engine "
                             "compiles at start-up: ~4 min for SmolLM2 here; docs/PERFORMANCE.md); not used where "
                             "the fused C decode step takes the model (Llama-family, packed weights: faster)"] = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise _fail("RuntimeConfig", "dtype", f"one of {_DTYPES} (float16 is ~1000x slower on CPU)", self.dtype)
        if self.weights not in _WEIGHT_FORMS:
            raise _fail("RuntimeConfig", "weights", f"one of {_WEIGHT_FORMS}", self.weights)
        if self.device not in ("cpu", "cuda"):
            raise _fail("RuntimeConfig", "device", "'cpu' or 'cuda'", self.device)
        if self.num_threads is not None and self.num_threads <= 0:
            raise _fail("RuntimeConfig", "num_threads", "a positive integer", self.num_threads)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an engine needs, one sub-config per subsystem."""

    model: Annotated[str, "GGUF path, Hugging Face directory, or short name (smollm2-135m, gemma3-270m, tiny-llama)"] = (
        "smollm2-135m"
    )
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    kv_compression: Annotated[str | None, "default KV compression spec, e.g. snapkv:keep=0.25+kivi:bits=2"] = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments (``block_size=16, max_num_seqs=4``) to their sub-config."""
        parts: dict[str, dict[str, Any]] = {"cache": {}, "scheduler": {}, "runtime": {}}
        top: dict[str, Any] = {}
        owners = {name: sub for sub, typ in (("cache", CacheConfig), ("scheduler", SchedulerConfig),
                                             ("runtime", RuntimeConfig)) for name in _field_names(typ)}
        for key, value in kwargs.items():
            if key == "kv_compression":
                top[key] = value
            elif key in owners:
                parts[owners[key]][key] = value
            else:
                raise ValueError(f"unknown engine option {key!r}; accepted: {sorted(list(owners) + ['kv_compression'])}")
        return cls(model=model, cache=CacheConfig(**parts["cache"]), scheduler=SchedulerConfig(**parts["scheduler"]),
                   runtime=RuntimeConfig(**parts["runtime"]), **top)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(text: str | int, field_name: str = "memory") -> int:
    """``"4GiB"`` → 4294967296, ``"512MB"`` → 512000000, ``123`` → 123. Raises ValueError naming the field."""
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"{field_name} must be a positive number of bytes, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{field_name} must be a size such as 512MiB, 4GiB or 1000000, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ValueError(f"{field_name} must be positive, got {text!r}")
    return value


def parse_tokens(text: str | int, field_name: str = "context") -> int:
    """``"32k"`` → 32768, ``"2048"`` → 2048 (k = 1024 tokens, as context lengths are usually powers of two)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
        if not match:
            raise ValueError(f"{field_name} must be a token count such as 2048 or 32k, got {text!r}")
        value = int(float(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{field_name} must be a positive token count, got {text!r}")
    return value
