"""`longfit serve`: the FastAPI app (OpenAI-compatible routes, auth, body limit, metrics) and its CLI glue.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (Bearer auth when an API key is set),
GET /health, GET /metrics (never authenticated, as in vLLM). A pure-ASGI guard in front of the app checks the
API key and reads request bodies up to ``max_request_bytes`` (413 beyond it, on the Content-Length header
or while the body streams in), so no route sees an oversized body. fastapi is imported inside ``build_app``
so the CLI can list its flags without the serving extras installed.
"""

# NOTE: no `from __future__ import annotations`: FastAPI resolves the handlers' `Request` annotations at
# definition time, and `Request` is imported inside build_app.
import argparse
import dataclasses
import hmac
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from longfit.config import CacheConfig, EngineConfig, RuntimeConfig, SchedulerConfig, parse_bytes

if TYPE_CHECKING:
    from fastapi import FastAPI

    from longfit.engine.async_engine import AsyncLLMEngine

logger = logging.getLogger("longfit")
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def _error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()


class RequestGuard:
    """ASGI middleware: Bearer auth on /v1 routes, then the body read in full up to a size limit (413).

    The buffered body is replayed to the app as one message; later ``receive`` calls go to the server,
    so handlers still see ``http.disconnect`` when the client leaves.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                await _reply(send, 401, _error_body("Invalid or missing API key: send 'Authorization: Bearer <key>'",
                                                    "authentication_error", "invalid_api_key"))
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _reply(send, 400, _error_body("invalid Content-Length header", "invalid_request_error"))
                return
            if int(length) > self.max_request_bytes:
                await _reply(send, 413, self._too_large())
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:  # NOTE: also catches chunked bodies that announce no length
                await _reply(send, 413, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> bytes:
        return _error_body(f"request body is larger than {self.max_request_bytes} bytes", "invalid_request_error",
                           "request_too_large")


async def _reply(send: Callable[[Message], Awaitable[None]], status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(engine: "AsyncLLMEngine", model_name: str, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, shutdown_engine: bool = False) -> Any:
    """The ASGI app serving ``engine`` under ``model_name`` (a FastAPI app wrapped in ``RequestGuard``).

    The FastAPI app is ``guard.app``; ``guard.app.state`` holds ``engine``, ``serving`` and ``metrics``.
    With ``shutdown_engine`` the engine loop stops when the app's lifespan ends.
    """
    import time
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, Response

    from longfit.server.metrics import CONTENT_TYPE, ServerMetrics
    from longfit.server.protocol import APIError
    from longfit.server.serving import OpenAIServing

    @asynccontextmanager
    async def lifespan(app: "FastAPI"):  # type: ignore[no-untyped-def]
        yield
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="longfit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(lambda: engine.stats)
    serving = OpenAIServing(engine, model_name, metrics)
    app.state.engine, app.state.serving, app.state.metrics = engine, serving, metrics
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(error)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s", request.url.path)
        return JSONResponse(APIError(500, f"internal server error: {type(error).__name__}", type="server_error").body(),
                            status_code=500)

    async def json_body(request: Request) -> Any:
        raw = await request.body()
        try:
            body = json.loads(raw)
            # NOTE: JSON may escape a lone UTF-16 surrogate ("\\udcff"), which no text encoder accepts later.
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError/EncodeError are ValueErrors
            raise APIError(400, f"the request body is not valid JSON: {error}", param="body",
                           code="invalid_json") from None
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.create_completion(await json_body(request), request.receive)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.create_chat_completion(await json_body(request), request.receive)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "longfit", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse(APIError(503, "the engine loop is not running", type="server_error").body(),
                            status_code=503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return RequestGuard(app, api_key, max_request_bytes)


# ---------------------------------------------------------------- CLI
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags. Engine flags (--model, --kv-cache-memory, --max-num-seqs, --max-queue ...) come from
    ``cli.add_engine_arguments``, which the caller adds to the same parser."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    group.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every /v1 route (default: $LONGFIT_API_KEY)")
    group.add_argument("--served-model-name", default=None, help="model name clients send (default: --model)")
    group.add_argument("--max-request-bytes", default=str(DEFAULT_MAX_REQUEST_BYTES),
                       help="largest request body, e.g. 16MiB; larger bodies get 413")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn log level")


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the flags of ``cli.add_engine_arguments`` (unset flags keep the config defaults)."""
    names = {f.name for config in (CacheConfig, SchedulerConfig, RuntimeConfig) for f in dataclasses.fields(config)}
    options = {name: value for name, value in vars(args).items() if name in names and value is not None}
    if getattr(args, "kv_compression", None):
        options["kv_compression"] = args.kv_compression
    return EngineConfig.from_kwargs(args.model, **options)


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine loop and serve until interrupted. Returns the exit status."""
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    max_request_bytes = parse_bytes(args.max_request_bytes, "--max-request-bytes")
    try:
        import uvicorn
    except ImportError:
        print("longfit serve needs the serving extras: pip install 'longfit[serve]'", file=sys.stderr)
        return 2
    from longfit.engine.async_engine import AsyncLLMEngine

    config = _engine_config(args)
    engine = AsyncLLMEngine.from_config(config)
    name = args.served_model_name or args.model
    app = build_app(engine, name, api_key=args.api_key or os.environ.get("LONGFIT_API_KEY") or None,
                    max_request_bytes=max_request_bytes, shutdown_engine=True)
    usage = engine.stats
    print(f"longfit serve: {name} on http://{args.host}:{args.port}/v1 | context {engine.max_model_len} tokens | "
          f"KV {int(usage['kv_blocks_total'])} blocks of {engine.engine.kv_spec.block_size} tokens", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 0
