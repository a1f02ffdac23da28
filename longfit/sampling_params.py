"""SamplingParams: the user-facing sampling options of one request, validated. No torch here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

_STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Constrains the generated text, as vLLM's structured outputs and OpenAI's ``response_format`` do: to a JSON
    schema (``json_schema``, JSON text or a dict), to any JSON object (``json_object``), to a regular expression
    (``regex``), to one of several strings (``choice``) or to a Lark grammar (``grammar``). Exactly one is set.
    No torch: ``runtime.structured`` turns it into per-step token masks (llguidance).
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json_schema, dict):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        set_kinds = [kind for kind in _STRUCTURED_KINDS if getattr(self, kind) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_output needs exactly one of {', '.join(_STRUCTURED_KINDS)}, "
                             f"got {set_kinds or 'none'}")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema) if isinstance(self.json_schema, str) else None
            except json.JSONDecodeError as error:
                raise ValueError(f"structured_output.json_schema is not valid JSON: {error}") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_output.json_schema must be a JSON object (a schema), "
                                 f"got {self.json_schema!r:.80}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"structured_output.json_object must be true or false, got {self.json_object!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_output.{name} must be a non-empty string, got {value!r:.80}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"structured_output.choice must be a non-empty list of non-empty strings, "
                             f"got {self.choice!r:.80}")

    @property
    def kind(self) -> str:
        return next(kind for kind in _STRUCTURED_KINDS if getattr(self, kind) not in (None, False))


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
    # Constrained decoding (a JSON schema, a regex, choices, a grammar); None generates freely.
    structured_output: StructuredOutput | None = None
    # OpenAI's logit_bias: token id → value in [-100, 100] added to its logit before sampling (-100 bans it).
    logit_bias: dict[int, float] | None = None

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
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                raise ValueError(f"structured_output must be a StructuredOutput, got {self.structured_output!r:.80}")
            if self.min_tokens:  # the grammar may allow only the end of text before min_tokens: nothing to sample
                raise ValueError("min_tokens must be 0 with structured_output")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r:.80}")
            for token, value in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
                if not -100.0 <= _finite("logit_bias", value) <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {token}")
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
