"""OpenAI-compatible request bodies (pydantic, strict types) and the error shape.

Request models validate types only: ``"0.5"`` is not a number and ``1`` is not a boolean (strict mode), so a
wrong type is a 400 naming the field. Ranges are checked once, by ``SamplingParams.validate``, whose
ValueError names the field too. Unknown fields are ignored, as OpenAI and vLLM do. Responses are built as
plain dicts in ``serving.py``; their shapes follow the OpenAI API reference.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longfit.sampling_params import SamplingParams, StructuredOutput


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


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: OpenAI's ``{"name", "schema", "strict", "description"}``."""

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`` (OpenAI)."""

    type: str
    json_schema: JsonSchemaFormat | None = None


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
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def _constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """(field, StructuredOutput fields) of every field that constrains the output; APIError(400) for a bad
        response_format."""
        given: list[tuple[str, dict[str, Any]]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            if fmt.type == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif fmt.type == "json_schema":
                if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                    raise APIError(400, "response_format type 'json_schema' needs json_schema.schema",
                                   param="response_format.json_schema")
                given.append(("response_format", {"json_schema": fmt.json_schema.schema_}))
            else:
                raise APIError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema', got "
                               f"{fmt.type!r}", param="response_format.type")
        for name, kind in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                given.append((name, {kind: value}))
        return given

    def structured_param(self) -> str | None:
        """The field that carries the request's constraint (for errors the engine finds when compiling it)."""
        given = self._constraints()
        return given[0][0] if given else None

    def structured_output(self) -> StructuredOutput | None:
        """The request's constraint, or None; APIError(400) naming the field for a bad or doubled one."""
        given = self._constraints()
        if not given:
            return None
        if len(given) > 1:
            raise APIError(400, f"only one of response_format and guided_* may constrain the output, got "
                           f"{', '.join(name for name, _ in given)}", param=given[1][0])
        name, fields = given[0]
        try:
            return StructuredOutput(**fields)
        except ValueError as error:
            raise APIError(400, f"{name}: {error}", param=name) from None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's SamplingParams; raises APIError(400) naming the first bad field."""
        logit_bias = None
        if self.logit_bias is not None:
            try:
                logit_bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {list(self.logit_bias)[:3]}",
                               param="logit_bias") from None
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
                include_stop_str_in_output=self.include_stop_str_in_output,
                structured_output=self.structured_output(), logit_bias=logit_bias)
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


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
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
