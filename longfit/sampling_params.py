"""SamplingParams: the user-facing sampling options of one request, validated. No torch here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """Sampling options, named and ranged as in vLLM.

    ``temperature == 0`` is greedy. ``logprobs=k`` returns the top-k log-probabilities of every generated
    token (plus the chosen one); ``prompt_logprobs=k`` does the same for prompt tokens. ``kv_compression``
    overrides the engine's default KV-compression spec for this request.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    kv_compression: str | None = None
    # Compress after this many prompt tokens (the context) and prefill the rest (the question) uncompressed,
    # as kvpress does; None compresses the whole prompt.
    kv_compression_boundary: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first out-of-range field and its accepted range."""
        _int_range("n", self.n, 1, 128)
        if self.max_tokens is not None:
            _int_range("max_tokens", self.max_tokens, 0, None)
        _int_range("min_tokens", self.min_tokens, 0, self.max_tokens)
        _float_range("temperature", self.temperature, 0.0, 100.0)
        _int_range("top_k", self.top_k, -1, None)
        if not (0.0 < _finite("top_p", self.top_p) <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _float_range("min_p", self.min_p, 0.0, 1.0)
        if not (0.0 < _finite("repetition_penalty", self.repetition_penalty) <= 10.0):
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        _float_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _float_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _int_range("seed", self.seed, 0, 2**63 - 1)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None:
            _int_range("logprobs", self.logprobs, 0, 20)
        if self.prompt_logprobs is not None:
            _int_range("prompt_logprobs", self.prompt_logprobs, 0, 20)
        if self.kv_compression_boundary is not None:
            _int_range("kv_compression_boundary", self.kv_compression_boundary, 1, None)
        if self.kv_compression is not None and not isinstance(self.kv_compression, str):
            raise ValueError(f"kv_compression must be a spec string such as 'snapkv:keep=0.25', got {self.kv_compression!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _float_range(name: str, value: object, low: float, high: float) -> None:
    if not low <= _finite(name, value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _int_range(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        accepted = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {accepted}, got {value}")
