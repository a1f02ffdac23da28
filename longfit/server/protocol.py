"""OpenAI-compatible request bodies (pydantic, strict types) and the error shape.

Request models validate types only: ``"0.5"`` is not a number and ``1`` is not a boolean (strict mode), so a
wrong type is a 400 naming the field. Ranges are checked once, by ``SamplingParams.validate``, whose
ValueError names the field too. Unknown fields are ignored, as OpenAI and vLLM do. Responses are built as
plain dicts in ``serving.py``; their shapes follow the OpenAI API reference.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from longfit.sampling_params import SamplingParams


class APIError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Sampling fields shared by both endpoints (OpenAI names plus vLLM's extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    user: str | None = None
    kv_compression: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's SamplingParams; raises APIError(400) naming the first bad field."""
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, f"best_of must equal n ({self.n}) or be omitted; best-of sampling is not supported",
                           param="best_of")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        try:
            return SamplingParams(
                n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                # OpenAI clients send top_k=-1 for "off" (vLLM's convention); longfit's off is 0.
                top_k=0 if self.top_k in (None, -1) else self.top_k,
                min_p=0.0 if self.min_p is None else self.min_p,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output)
        except ValueError as error:
            raise APIError(400, str(error), param=_param_from_message(str(error))) from None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions. ``prompt``: a string, strings, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(_Strict):
    type: str


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


# ---------------------------------------------------------------- validation errors → field names
_TYPE_WORDS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function", "union"})
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")


def _param_path(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content", "str")`` → ``"messages[0].content"``; union-member tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _FIELD.match(part) and part not in _TYPE_WORDS:
            path += f".{part}" if path else part
    return path or "body"


def validation_error(error: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as a 400 naming its field."""
    first = error.errors()[0]
    param = _param_path(tuple(first["loc"]))
    if first["type"] == "missing":
        return APIError(400, f"'{param}' is a required field", param=param)
    expected = {"prompt": "a string, a list of strings, a list of token ids or a list of token id lists",
                "stop": "a string or a list of strings"}.get(param)
    if expected is not None:
        return APIError(400, f"'{param}' must be {expected}", param=param)
    return APIError(400, f"'{param}': {first['msg']} (got {first.get('input')!r:.80})", param=param)


def _param_from_message(message: str) -> str | None:
    """SamplingParams messages start with the field name (``"top_p must be in (0, 1], got 2"``)."""
    word = message.split(" ", 1)[0]
    return word if word in SamplingParams.__dataclass_fields__ else None
