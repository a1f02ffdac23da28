"""OpenAI completions and chat-completions handlers over ``AsyncLLMEngine``, streaming as Server-Sent Events.

A request is checked (model, types, ranges, context length) and admitted to the engine before any byte of
the response is sent, so every input error is a 4xx with an OpenAI error body. Each prompt of a request is
one engine request (its ``n`` completions run as engine children). A client that goes away aborts its
engine requests: streaming responses are cancelled by Starlette when the client disconnects; non-streaming
ones watch the ASGI ``receive`` channel for ``http.disconnect`` while they wait.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse

from longfit.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestError, RequestStream
from longfit.engine.scheduler import QueueFullError
from longfit.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from longfit.sampling_params import SamplingParams
from longfit.server.metrics import ServerMetrics
from longfit.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, validation_error

Receive = Callable[[], Awaitable[dict[str, Any]]]
MAX_CHOICES = 1024  # prompts x n in one request; more is almost surely a client bug
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports this floor too


class ClientDisconnected(Exception):
    """The HTTP client went away while its request was running."""


@dataclass(slots=True)
class _Prompt:
    token_ids: list[int]
    text: str | None  # the prompt as given, when it was a string


@dataclass(slots=True)
class _Choice:
    """Streaming progress of one choice: what was already sent."""

    sent_chars: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _floor(logprob: float) -> float:
    return max(_MIN_LOGPROB, logprob)  # also maps NaN and -inf to the floor


class OpenAIServing:
    """Handlers of /v1/completions and /v1/chat/completions.

    Args:
        engine: the running async engine.
        model_name: the name clients must send in ``model`` (requests without one get this model).
        metrics: where request outcomes and latencies are recorded.
    """

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model_config.vocab_size
        self.max_model_len = engine.max_model_len

    # ------------------------------------------------------------------ shared checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_length(self, num_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if num_tokens >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the {param} has "
                           f"{num_tokens} tokens (at most {limit - 1} leave room for one output token)",
                           param=param, code="context_length_exceeded")
        if max_tokens is not None and num_tokens + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the {param} has "
                           f"{num_tokens} tokens and max_tokens asks for {max_tokens} more (at most "
                           f"{limit - num_tokens})", param="max_tokens", code="context_length_exceeded")

    def _completion_prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]  # type: ignore[list-item]
        if not raw:
            raise APIError(400, "'prompt' must not be empty", param="prompt")
        if len(raw) * request.n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}, got {len(raw) * request.n}",
                           param="prompt")
        prompts = []
        for item in raw:
            if isinstance(item, str):
                prompts.append(_Prompt(self.tokenizer.encode(item), item))
                continue
            if not item or any(t < 0 or t >= self.vocab_size for t in item):
                raise APIError(400, f"'prompt' token ids must be a non-empty list of integers in "
                               f"[0, {self.vocab_size})", param="prompt")
            prompts.append(_Prompt(list(item), None))
        for prompt in prompts:
            if not prompt.token_ids:
                raise APIError(400, "'prompt' must contain at least one token", param="prompt")
            self._check_length(len(prompt.token_ids), request.max_tokens, "prompt")
        return prompts

    def _chat_prompt(self, request: ChatCompletionRequest, max_tokens: int | None) -> _Prompt:
        if not request.messages:
            raise APIError(400, "'messages' must contain at least one message", param="messages")
        if request.tools:
            raise APIError(400, "tools (function calling) are not supported", param="tools")
        if request.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice is not supported", param="tool_choice")
        messages = []
        for index, message in enumerate(request.messages):
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages[{index}].content")
                content = "\n".join(part.text or "" for part in content)
            role = "system" if message.role == "developer" else message.role
            messages.append({"role": role, "content": content or ""})
        encode_chat = getattr(self.tokenizer, "encode_chat", None)
        try:
            if encode_chat is not None:
                token_ids = encode_chat(messages, add_generation_prompt=True)
            else:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        if not token_ids:
            raise APIError(400, "'messages' rendered to an empty prompt", param="messages")
        self._check_length(len(token_ids), max_tokens, "messages")
        return _Prompt(token_ids, None)

    async def _admit(self, base_id: str, prompts: list[_Prompt], params: SamplingParams,
                     kv_compression: str | None, structured_param: str | None = None) -> list[RequestStream]:
        """Add every prompt to the engine; on any refusal, abort those already added and raise APIError."""
        streams: list[RequestStream] = []
        try:
            for index, prompt in enumerate(prompts):
                streams.append(await self.engine.add_request(f"{base_id}-{index}", prompt.token_ids, params,
                                                             kv_compression))
        except BaseException as error:
            for stream in streams:
                stream.close()
            if isinstance(error, QueueFullError):
                raise APIError(429, f"the server is busy: {error}; retry later", type="server_overloaded",
                               code="queue_full", headers={"Retry-After": "1"}) from None
            if isinstance(error, ValueError):
                message = str(error)
                param = ("kv_compression" if "kv_compression" in message else
                         structured_param if "structured_output" in message else
                         "logit_bias" if message.startswith("logit_bias") else "prompt")
                raise APIError(400, str(error), param=param) from None
            if isinstance(error, EngineDeadError):
                raise APIError(503, str(error), type="server_error", code="engine_dead") from None
            raise
        return streams

    async def _collect(self, streams: list[RequestStream], receive: Receive) -> list[RequestOutput]:
        """Wait for every stream's final output, aborting all of them if the client disconnects first."""

        async def last(stream: RequestStream) -> RequestOutput:
            output = None
            async for output in stream:
                pass
            assert output is not None
            return output

        gathered = asyncio.gather(*(last(stream) for stream in streams))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not gathered.done():
                raise ClientDisconnected
            return gathered.result()
        finally:
            watcher.cancel()
            if not gathered.done():
                gathered.cancel()
                # NOTE: retrieve the cancellation, or asyncio logs "exception was never retrieved".
                gathered.add_done_callback(lambda future: future.cancelled() or future.exception())

    async def _run(self, body: Any, receive: Receive, parse: Callable[[], Awaitable[tuple[list[RequestStream], Any]]],
                   respond_json: Callable[[list[RequestOutput], Any], dict[str, Any]],
                   respond_sse: Callable[[list[RequestStream], Any], AsyncIterator[str]]) -> Response:
        """Admit, then answer: JSON after completion, or SSE. Records the outcome in the metrics."""
        try:
            streams, context = await parse()
        except APIError as error:
            self.metrics.requests.labels(status="rejected" if error.status == 429 else "invalid").inc()
            raise
        outcome = _Outcome(self.metrics, streams)
        if isinstance(body, dict) and body.get("stream") is True:
            context["outcome"] = outcome
            return _EventStream(respond_sse(streams, context), outcome)
        status = "error"
        try:
            outputs = await self._collect(streams, receive)
            status = "success"
            return JSONResponse(respond_json(outputs, context))
        except ClientDisconnected:
            status = "aborted"
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except asyncio.CancelledError:
            status = "aborted"
            raise
        except (RequestError, EngineDeadError) as error:
            raise APIError(500, str(error), type="server_error", code="engine_error") from None
        finally:
            outcome.finish(status)

    # ------------------------------------------------------------------ /v1/completions
    async def create_completion(self, body: Any, receive: Receive) -> Response:
        created = int(time.time())
        response_id = f"cmpl-{uuid.uuid4().hex}"

        async def parse() -> tuple[list[RequestStream], Any]:
            request = _validate(CompletionRequest, body)
            self.check_model(request.model)
            if request.suffix:
                raise APIError(400, "suffix is not supported", param="suffix")
            prompts = self._completion_prompts(request)
            echo_logprobs = request.logprobs if request.echo else None
            # max_tokens=0 (echo-only scoring): the engine prefills, returns prompt logprobs and samples nothing.
            params = request.sampling_params(request.max_tokens, request.logprobs, prompt_logprobs=echo_logprobs)
            streams = await self._admit(response_id, prompts, params, request.kv_compression,
                                         request.structured_param())
            return streams, {"request": request, "prompts": prompts}

        def respond_json(outputs: list[RequestOutput], context: dict[str, Any]) -> dict[str, Any]:
            request: CompletionRequest = context["request"]
            choices = []
            for prompt_index, output in enumerate(outputs):
                prompt = context["prompts"][prompt_index]
                for completion in output.outputs:
                    text, logprobs = self._completion_choice(request, prompt, output, completion)
                    choices.append({"index": prompt_index * request.n + completion.index, "text": text,
                                    "logprobs": logprobs, "finish_reason": completion.finish_reason})
            num_prompt = sum(len(p.token_ids) for p in context["prompts"])
            num_generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
            return {"id": response_id, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": _usage(num_prompt, num_generated)}

        async def respond_sse(streams: list[RequestStream], context: dict[str, Any]) -> AsyncIterator[str]:
            request: CompletionRequest = context["request"]
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            holdback = _holdback(request.stop)
            states: dict[int, _Choice] = {}
            base = {"id": response_id, "object": "text_completion", "created": created, "model": self.model_name}
            status = "error"
            try:
                async for prompt_index, output in _merge(streams):
                    prompt = context["prompts"][prompt_index]
                    for completion in output.outputs:
                        index = prompt_index * request.n + completion.index
                        state = states.setdefault(index, _Choice())
                        choice = self._completion_delta(request, prompt, output, completion, state, holdback)
                        if choice is not None:
                            choice["index"] = index
                            yield _sse({**base, "choices": [choice]} | ({"usage": None} if include_usage else {}))
                if include_usage:
                    outputs = [s.latest for s in streams]
                    num_generated = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
                    usage = _usage(sum(len(p.token_ids) for p in context["prompts"]), num_generated)
                    yield _sse({**base, "choices": [], "usage": usage})
                status = "success"
            except (RequestError, EngineDeadError) as error:
                yield _sse(APIError(500, str(error), type="server_error", code="engine_error").body())
            except BaseException:
                status = "aborted"  # cancelled: the client disconnected
                raise
            finally:
                context["outcome"].finish(status)
            yield _sse("[DONE]")

        return await self._run(body, receive, parse, respond_json, respond_sse)

    def _completion_choice(self, request: CompletionRequest, prompt: _Prompt, output: RequestOutput,
                           completion: CompletionOutput) -> tuple[str, dict[str, Any] | None]:
        """Final text and logprobs of one non-streaming choice (echo puts the prompt first)."""
        token_ids = completion.token_ids
        entries = completion.logprobs or []
        text = completion.text
        ids: list[int] = []
        all_entries: list[PositionLogprobs | None] = []
        if request.echo:
            prompt_text = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
            text = prompt_text + text
            ids, all_entries = list(prompt.token_ids), list(output.prompt_logprobs or [None] * len(prompt.token_ids))
        if request.logprobs is None:
            return text, None
        ids += token_ids
        all_entries += entries
        return text, self._completion_logprobs(ids, all_entries, 0)

    def _completion_delta(self, request: CompletionRequest, prompt: _Prompt, output: RequestOutput,
                          completion: CompletionOutput, state: _Choice, holdback: int) -> dict[str, Any] | None:
        """The next SSE choice of one completion, or None when there is nothing new to send yet.

        While a choice runs, the last ``longest stop string - 1`` characters are held back: a stop string
        completed by a later token truncates the text there, and sent text cannot be taken back.
        """
        if state.done:
            return None
        finished = completion.finish_reason is not None
        text = completion.text
        end = len(text) if finished else max(state.sent_chars, len(text) - holdback)
        delta = text[state.sent_chars:end]
        prefix, ids, entries = "", [], []
        if request.echo and not state.started and (completion.token_ids or finished):
            prefix = prompt.text if prompt.text is not None else self.tokenizer.decode(prompt.token_ids)
            ids, entries = list(prompt.token_ids), list(output.prompt_logprobs or [None] * len(prompt.token_ids))
            state.started = True
        if not (prefix or delta or finished):
            return None
        ids += completion.token_ids[state.sent_tokens:]
        entries += (completion.logprobs or [])[state.sent_tokens:]
        state.sent_tokens = len(completion.token_ids)
        logprobs = None
        if request.logprobs is not None:
            logprobs = self._completion_logprobs(ids, entries, state.text_offset)
            state.text_offset += sum(len(token) for token in logprobs["tokens"])
        state.sent_chars = end
        state.done = finished
        return {"text": prefix + delta, "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def _completion_logprobs(self, token_ids: list[int], entries: list[PositionLogprobs | None],
                             offset: int) -> dict[str, Any]:
        """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset (chars into text)."""
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset = []
        for token_id, token, entry in zip(token_ids, tokens, entries):
            text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has no prediction
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_floor(entry[token_id].logprob) if token_id in entry else None)
            top: dict[str, float] = {}
            for top_id, logprob in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
                top.setdefault(self.tokenizer.decode([top_id], skip_special_tokens=False), _floor(logprob.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}

    # ------------------------------------------------------------------ /v1/chat/completions
    async def create_chat_completion(self, body: Any, receive: Receive) -> Response:
        created = int(time.time())
        response_id = f"chatcmpl-{uuid.uuid4().hex}"

        async def parse() -> tuple[list[RequestStream], Any]:
            request = _validate(ChatCompletionRequest, body)
            self.check_model(request.model)
            max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
                else request.max_tokens
            if max_tokens == 0:
                raise APIError(400, "max_tokens must be at least 1 for chat completions", param="max_tokens")
            if request.top_logprobs is not None and not request.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
            if request.top_logprobs is not None and not 0 <= request.top_logprobs <= 20:
                raise APIError(400, f"top_logprobs must be in [0, 20], got {request.top_logprobs}", param="top_logprobs")
            if request.n > MAX_CHOICES:
                raise APIError(400, f"n must be at most {MAX_CHOICES}", param="n")
            logprobs = (request.top_logprobs or 0) if request.logprobs else None
            params = request.sampling_params(max_tokens, logprobs)
            prompt = self._chat_prompt(request, max_tokens)
            streams = await self._admit(response_id, [prompt], params, request.kv_compression,
                                         request.structured_param())
            return streams, {"request": request, "prompt": prompt}

        def respond_json(outputs: list[RequestOutput], context: dict[str, Any]) -> dict[str, Any]:
            request: ChatCompletionRequest = context["request"]
            (output,) = outputs
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, request) if request.logprobs else None,
                        "finish_reason": c.finish_reason} for c in output.outputs]
            usage = _usage(len(context["prompt"].token_ids), sum(len(c.token_ids) for c in output.outputs))
            return {"id": response_id, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": usage}

        async def respond_sse(streams: list[RequestStream], context: dict[str, Any]) -> AsyncIterator[str]:
            request: ChatCompletionRequest = context["request"]
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            holdback = _holdback(request.stop)
            base = {"id": response_id, "object": "chat.completion.chunk", "created": created,
                    "model": self.model_name} | ({"usage": None} if include_usage else {})
            states = [_Choice() for _ in range(request.n)]
            status = "error"
            try:
                for index in range(request.n):
                    yield _sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                async for _, output in _merge(streams):
                    for completion in output.outputs:
                        for choice in self._chat_deltas(request, completion, states[completion.index], holdback):
                            yield _sse({**base, "choices": [choice]})
                if include_usage:
                    output = streams[0].latest
                    num_generated = sum(len(c.token_ids) for c in output.outputs) if output is not None else 0
                    yield _sse({**base, "choices": [], "usage": _usage(len(context["prompt"].token_ids),
                                                                       num_generated)})
                status = "success"
            except (RequestError, EngineDeadError) as error:
                yield _sse(APIError(500, str(error), type="server_error", code="engine_error").body())
            except BaseException:
                status = "aborted"
                raise
            finally:
                context["outcome"].finish(status)
            yield _sse("[DONE]")

        return await self._run(body, receive, parse, respond_json, respond_sse)

    def _chat_deltas(self, request: ChatCompletionRequest, completion: CompletionOutput, state: _Choice,
                     holdback: int) -> list[dict[str, Any]]:
        """New content of one choice (stop strings held back, as for completions), then its finish chunk."""
        if state.done:
            return []
        finished = completion.finish_reason is not None
        text = completion.text
        end = len(text) if finished else max(state.sent_chars, len(text) - holdback)
        delta = text[state.sent_chars:end]
        chunks = []
        if delta:
            logprobs = None
            if request.logprobs:
                logprobs = self._chat_logprobs(completion.token_ids[state.sent_tokens:],
                                               (completion.logprobs or [])[state.sent_tokens:], request)
                state.sent_tokens = len(completion.token_ids)
            chunks.append({"index": completion.index, "delta": {"content": delta}, "logprobs": logprobs,
                           "finish_reason": None})
            state.sent_chars = end
        if finished:
            chunks.append({"index": completion.index, "delta": {}, "logprobs": None,
                           "finish_reason": completion.finish_reason})
            state.done = True
        return chunks

    def _chat_logprobs(self, token_ids: list[int], entries: list[PositionLogprobs] | None,
                       request: ChatCompletionRequest) -> dict[str, Any]:
        """OpenAI chat logprobs: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
        num_top = request.top_logprobs or 0
        content = []
        for token_id, entry in zip(token_ids, entries or []):
            token = self.tokenizer.decode([token_id], skip_special_tokens=False)
            top = []
            for top_id, logprob in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
                if logprob.rank is not None and logprob.rank <= num_top and len(top) < num_top:
                    top_token = self.tokenizer.decode([top_id], skip_special_tokens=False)
                    top.append({"token": top_token, "logprob": _floor(logprob.logprob),
                                "bytes": list(top_token.encode("utf-8"))})
            chosen = entry.get(token_id)
            content.append({"token": token, "logprob": _floor(chosen.logprob) if chosen else _MIN_LOGPROB,
                            "bytes": list(token.encode("utf-8")), "top_logprobs": top})
        return {"content": content}


# ---------------------------------------------------------------- helpers
class _Outcome:
    """Ends one HTTP request once: closes its streams (aborting unfinished ones) and records its metrics."""

    def __init__(self, metrics: ServerMetrics, streams: list[RequestStream]) -> None:
        self.metrics = metrics
        self.streams = streams
        self.done = False

    def finish(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        for stream in self.streams:
            stream.close()
            self.metrics.observe_stream(stream)
        self.metrics.requests.labels(status=status).inc()


class _EventStream(StreamingResponse):
    """SSE response that ends its request even when the body generator never ran (the client left first:
    an async generator that was never started does not run its ``finally`` when closed)."""

    def __init__(self, content: AsyncIterator[str], outcome: _Outcome) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.outcome = outcome

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.outcome.finish("aborted")


def _validate(model: type[CompletionRequest | ChatCompletionRequest], body: Any) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from None


def _holdback(stop: str | list[str] | None) -> int:
    """Characters a running choice holds back so a stop string can still truncate them."""
    stops = [stop] if isinstance(stop, str) else stop or []
    return max((len(s) for s in stops), default=1) - 1


def _usage(num_prompt: int, num_generated: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated, "total_tokens": num_prompt + num_generated}


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index; errors propagate."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    merged: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                merged.put_nowait((index, output))
        except Exception as error:  # noqa: BLE001 - re-raised by the consumer below
            merged.put_nowait((index, error))
        merged.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await merged.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()

