"""AsyncLLMEngine: runs ``LLMEngine.step()`` on one background thread and streams each request to its own queue.

Threads: ``LLMEngine`` is not thread-safe, so every engine call (add, abort, step, reads of its state) happens on
the loop thread. asyncio callers send commands through a thread-safe queue that the loop thread drains between
steps; results and outputs go back with ``loop.call_soon_threadsafe``. torch releases the GIL inside its kernels,
so the event loop keeps serving HTTP while a step runs.

Data flow: ``add_request`` → command queue → ``LLMEngine.add_request`` (loop thread) → ``step()`` →
``RequestOutput`` (cumulative) → that request's ``RequestStream`` (an asyncio queue) → the consumer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from longfit.config import EngineConfig
from longfit.engine.llm_engine import LLMEngine, configure_threads
from longfit.engine.output_processor import child_id
from longfit.outputs import RequestOutput
from longfit.sampling_params import SamplingParams

logger = logging.getLogger("longfit")
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or never started)."""


class RequestError(RuntimeError):
    """The engine failed this request (an exception inside a step); other requests keep running."""


@dataclass(slots=True)
class StreamItem:
    """What the loop thread hands to a stream: an output or an error, stamped with ``time.perf_counter()``."""

    output: RequestOutput | None
    error: BaseException | None
    time: float


@dataclass(slots=True)
class TokenEvent:
    """One delivery that added tokens: when, and the request's total generated tokens (all completions)."""

    time: float
    num_tokens: int


@dataclass(slots=True)
class _Command:
    kind: str  # "add" | "abort" | "call" | "stop"
    request_id: str = ""
    stream: RequestStream | None = None
    args: tuple[Any, ...] = ()
    fn: Callable[[LLMEngine], Any] | None = None
    future: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None


class RequestStream:
    """One request's outputs as an async iterator of cumulative ``RequestOutput``s (vLLM shape).

    A consumer that falls behind gets the newest output only (outputs are cumulative, so nothing is lost);
    every delivery that added tokens is still recorded in ``events`` for latency metrics. Closing the
    stream before the request finished aborts it, which frees its KV blocks at once.
    """

    def __init__(self, request_id: str, engine: AsyncLLMEngine, num_completions: int) -> None:
        self.request_id = request_id
        self.num_completions = num_completions
        self.arrival_time = time.perf_counter()
        self.finish_time: float | None = None
        self.events: list[TokenEvent] = []
        self.finished = False  # the engine finished the request (or failed it)
        self.latest: RequestOutput | None = None
        self._engine = engine
        self._queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._closed = False

    def _push(self, item: StreamItem) -> None:  # event-loop thread only
        self._queue.put_nowait(item)

    def _record(self, item: StreamItem) -> None:
        output = item.output
        assert output is not None
        num_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        previous = self.events[-1].num_tokens if self.events else 0
        if num_tokens > previous:
            self.events.append(TokenEvent(item.time, num_tokens))
        self.latest = output
        if output.finished:
            self.finished = True
            self.finish_time = item.time

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        items = [await self._queue.get()]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        for item in items:
            if item.error is not None:
                self.finished = True
                self.finish_time = item.time
                raise item.error
            self._record(item)
        assert self.latest is not None
        return self.latest

    def close(self) -> None:
        """Stop consuming; abort the request if the engine has not finished it. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.finished:
            self._engine.abort(self.request_id)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _Tracked:
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    num_completions: int


class AsyncLLMEngine:
    """Serves an ``LLMEngine`` to asyncio code; the step loop runs on a daemon thread started here.

    Args:
        engine: the synchronous engine; from now on only the loop thread may touch it.
        idle_poll_s: how often an idle loop wakes up to refresh ``stats`` (it wakes at once on a command).
    """

    def __init__(self, engine: LLMEngine, idle_poll_s: float = 1.0) -> None:
        self.engine = engine
        # Read-only facts, safe to share with the event loop (set before the loop thread starts).
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self._idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}
        self._stopped = threading.Event()
        # NOTE: commands are put and "stopped" is set under one lock, so no command can slip in after the
        # loop drained the queue for the last time (its caller would wait forever).
        self._submit_lock = threading.Lock()
        self.stats: dict[str, float] = {}
        self.num_step_errors = 0
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="longfit-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    # ------------------------------------------------------------------ asyncio side
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          kv_compression: str | None = None) -> RequestStream:
        """Queue a request and wait until the engine accepted it.

        Raises:
            ValueError: input the engine could never serve (prompt too long, bad params, bad kv_compression).
            QueueFullError: ``max_queue`` requests are already waiting.
            EngineDeadError: the loop is not running.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        stream = RequestStream(request_id, self, params.n)
        self._submit(_Command("add", request_id, stream, (prompt, params, kv_compression), future=future, loop=loop))
        try:
            await future
        except asyncio.CancelledError:
            self.abort(request_id)  # NOTE: queued after the add, so it removes the request if it was admitted
            raise
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       kv_compression: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output after each step that changed it; the last one is finished.

        Cancelling the consumer (or closing this generator) aborts the request and frees its KV blocks.
        """
        stream = await self.add_request(request_id, prompt, params, kv_compression)
        try:
            async for output in stream:
                yield output
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread; its blocks are freed before the next step."""
        with self._submit_lock:
            if not self._stopped.is_set():
                self._commands.put(_Command("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the loop thread between steps and return its result (tests, introspection)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._submit(_Command("call", fn=fn, future=future, loop=loop))
        return await future

    def _submit(self, command: _Command) -> None:
        with self._submit_lock:
            if self._stopped.is_set():
                raise EngineDeadError("the engine loop is not running")
            self._commands.put(command)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop: unfinished requests are aborted and their streams get EngineDeadError."""
        with self._submit_lock:
            if not self._stopped.is_set():
                self._commands.put(_Command("stop"))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        configure_threads(self.engine.config.runtime.num_threads)  # NOTE: OpenMP thread counts are per thread
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
        except BaseException:
            logger.exception("longfit engine loop crashed")
        finally:
            with self._submit_lock:
                self._stopped.set()
            self._fail_all(EngineDeadError("the engine loop stopped"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued commands; with ``block``, wait for the first one. Returns False on "stop"."""
        try:
            command = self._commands.get(timeout=self._idle_poll_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command.kind == "stop":
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Command) -> None:
        if command.kind == "add":
            assert command.stream is not None and command.loop is not None
            prompt, params, kv_compression = command.args
            try:
                self.engine.add_request(command.request_id, prompt, params, kv_compression)
            except Exception as error:  # noqa: BLE001 - handed to the caller, who maps it to an HTTP status
                _resolve(command.loop, command.future, error=error)
                return
            self._tracked[command.request_id] = _Tracked(command.stream, command.loop, params.n)
            _resolve(command.loop, command.future, None)
        elif command.kind == "abort":
            self._abort(command.request_id)
            self._publish_stats()  # /metrics shows the freed blocks at once, not after the next loop turn
        elif command.kind == "call":
            assert command.fn is not None and command.loop is not None
            self._publish_stats()  # whatever the caller observes, a scrape after it observes too
            try:
                result = command.fn(self.engine)
            except Exception as error:  # noqa: BLE001
                _resolve(command.loop, command.future, error=error)
            else:
                _resolve(command.loop, command.future, result)

    def _abort(self, request_id: str) -> None:
        tracked = self._tracked.pop(request_id, None)
        self.engine.abort_request(request_id)
        if tracked is not None:
            # NOTE: also abort the engine-level children directly: after a failed step the engine may have
            # dropped the parent's output state while siblings of the failed child were still scheduled.
            self.engine.scheduler.abort_requests([child_id(request_id, i) for i in range(tracked.num_completions)])

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            self.num_step_errors += 1
            logger.exception("longfit engine step failed")
            self._fail_after_step_error(error)
            return
        now = time.perf_counter()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, StreamItem]]] = {}
        for output in outputs:
            tracked = self._tracked.get(output.request_id)
            if tracked is None:
                continue
            if output.finished:
                del self._tracked[output.request_id]
            by_loop.setdefault(tracked.loop, []).append((tracked.stream, StreamItem(output, None, now)))
        for loop, batch in by_loop.items():
            if not _deliver(loop, batch):  # the consumer's event loop is gone: nobody will read these
                for stream, _ in batch:
                    self._abort(stream.request_id)

    def _fail_after_step_error(self, error: BaseException) -> None:
        """The engine finished the requests of the failed step (its outputs are gone); fail their streams.

        If none was marked (the error came from outside the model runner), fail the running requests so
        one bad request cannot wedge the loop forever.
        """
        parents = self.engine.outputs.parents
        failed = [request_id for request_id in self._tracked if request_id not in parents]
        if not failed:
            running = {r.request_id.rpartition("#")[0] for r in self.engine.scheduler.running}
            failed = [request_id for request_id in self._tracked if request_id in running] or list(self._tracked)
        message = f"the engine failed while running this request: {type(error).__name__}: {error}"
        now = time.perf_counter()
        for request_id in failed:
            tracked = self._tracked[request_id]
            self._abort(request_id)
            _deliver(tracked.loop, [(tracked.stream, StreamItem(None, RequestError(message), now))])

    def _fail_all(self, error: BaseException) -> None:
        now = time.perf_counter()
        for request_id in list(self._tracked):
            tracked = self._tracked[request_id]
            try:
                self._abort(request_id)
            except Exception:
                logger.exception("abort during shutdown failed")
            _deliver(tracked.loop, [(tracked.stream, StreamItem(None, error, now))])
        self._tracked.clear()
        while True:  # callers still waiting for an admission or a call
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command.loop is not None:
                _resolve(command.loop, command.future, error=error)

    def _publish_stats(self) -> None:
        """Snapshot of engine state for metrics; replaced whole, so readers on other threads see one step."""
        engine = self.engine
        kv = engine.kv_manager
        num_blocks = engine.kv_spec.num_blocks - 1
        self.stats = {
            "num_running": engine.scheduler.num_running,
            "num_waiting": engine.scheduler.num_waiting,
            "num_preemptions": engine.scheduler.num_preemptions,
            "kv_blocks_used": kv.pool.num_used_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_total": num_blocks,
            "kv_usage": kv.pool.num_used_blocks / max(1, num_blocks),
            "prefix_hit_rate": kv.prefix_hit_rate,
            "prefix_queries": kv.num_prefix_queries,
            "prefix_hits": kv.num_prefix_hits,
            "num_step_errors": self.num_step_errors,
        }


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any] | None, result: Any = None,
             error: BaseException | None = None) -> None:
    """Complete an asyncio future from the loop thread (skipped if the caller gave up or its loop closed)."""
    if future is None:
        return

    def apply() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        pass


def _push_all(batch: list[tuple[RequestStream, StreamItem]]) -> None:
    for stream, item in batch:
        stream._push(item)


def _deliver(loop: asyncio.AbstractEventLoop, batch: list[tuple[RequestStream, StreamItem]]) -> bool:
    """Hand outputs to their streams on their event loop; False if that loop is closed."""
    # NOTE: one call_soon_threadsafe per step and event loop, not per request: each call wakes the loop.
    try:
        loop.call_soon_threadsafe(_push_all, batch)
    except RuntimeError:
        return False
    return True
