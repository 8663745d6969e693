"""Serve one `LLMEngine` to many asyncio callers.

The engine is not thread-safe and its `step()` blocks for a whole forward
pass, so it lives on one background thread that owns it completely: callers on
the event loop never touch it, they post commands (add, abort) to a queue the
thread drains between steps, and receive each request's outputs on a
per-request asyncio queue. Requests from every client thereby join the same
running batch.

    event loop                         engine thread
    ----------                         -------------
    add_request() --_Add------------>  engine.add_request()  (ValueError -> caller)
    abort()       --_Abort---------->  engine.abort_request()
    RequestStream <-RequestOutput----  engine.step()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvos.engine.stats import EngineStats
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvos.engine.llm_engine import LLMEngine
    from kvos.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineUnavailableError(RuntimeError):
    """The engine is shutting down or its thread has died; retrying elsewhere may help."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_waiting` allows."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (a step raised); other requests keep running."""


class RequestStream:
    """The outputs of one request, handed over from the engine thread.

    Outputs are cumulative, so a consumer that falls behind skips straight to
    the newest one instead of replaying every step. The timestamps feed the
    latency histograms.
    """

    def __init__(self, req_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.req_id = req_id
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.finished = False
        self.output: RequestOutput | None = None
        """The newest output handed to the consumer."""
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            while not isinstance(item, BaseException) and not item.finished and not self._queue.empty():
                item = self._queue.get_nowait()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if self.first_token_time is None and any(c.token_ids for c in item.outputs):
                self.first_token_time = time.monotonic()
            if item.finished:
                self.finished = True
                self.finish_time = time.monotonic()
                if item.error is not None:
                    raise RequestFailedError(item.error)
            self.output = item
            yield item


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int]
    params: SamplingParams
    accepted: concurrent.futures.Future[None]


@dataclass
class _Abort:
    req_id: str


@dataclass
class _AbortAll:
    reason: str


@dataclass
class _Stop:
    pass


_Command = _Add | _Abort | _AbortAll | _Stop


class AsyncLLMEngine:
    """Thread-safe front of an `LLMEngine`, for asyncio servers."""

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # Touched by the engine thread only.
        self._streams: dict[str, RequestStream] = {}
        # Adds posted but not yet handed to the engine: they count as waiting.
        self._num_pending = 0
        self._pending_lock = threading.Lock()
        self._accepting = True
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvos-engine", daemon=True)

    # -- facts about the engine, safe from any thread ------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        """Thread-safe to use for encoding and decoding alongside the engine thread."""
        return self.engine.tokenizer

    def stats(self) -> EngineStats:
        """The counters as of the engine thread's last step or command."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._accepting

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and abort the running ones.

        Safe to call from a signal handler: it only flips a flag and puts on a
        `SimpleQueue`, which is reentrant.
        """
        self._accepting = False
        self._commands.put(_AbortAll(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything and stop the engine thread."""
        self.begin_shutdown()
        self._commands.put(_Stop())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- requests (event loop side) ---------------------------------------------------

    async def add_request(self, req_id: str, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Queue a request and return the stream of its outputs.

        Raises QueueFullError (too many waiting), EngineUnavailableError
        (shutting down), or the engine's ValueError for input it cannot serve.
        """
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        with self._pending_lock:
            if self.max_waiting is not None and self._stats.num_waiting + self._num_pending >= self.max_waiting:
                raise QueueFullError(f"too many requests waiting (max_waiting={self.max_waiting})")
            self._num_pending += 1
        stream = RequestStream(req_id, asyncio.get_running_loop())
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put(_Add(stream, prompt, params, accepted))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            # The caller left before the engine took the request; make sure it does not run.
            self.abort(req_id)
            raise
        return stream

    def abort(self, req_id: str) -> None:
        """Stop a request and free its KV memory; unknown or finished ids are ignored."""
        self._commands.put(_Abort(req_id))

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block=idle):
                    return
                if self.engine.has_unfinished_requests():
                    self._step()
                self._stats = self.engine.stats()
        except Exception:  # the thread's last line of defence: log, then fail every caller
            logger.exception("engine thread died")
            self._fail_all(EngineUnavailableError("the engine stopped after an internal error"))
        finally:
            self._accepting = False
            self._reject_queued()

    def _reject_queued(self) -> None:
        """Answer adds posted after the thread stopped, so no caller waits forever."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                with self._pending_lock:
                    self._num_pending -= 1
                command.accepted.set_exception(EngineUnavailableError("the engine is not running"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply every queued command; wait for one when idle. False means stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                self._fail_all(EngineUnavailableError("the engine stopped"))
                return False
            self._apply(command)
            self._stats = self.engine.stats()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Add | _Abort | _AbortAll) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Abort):
            if self._streams.pop(command.req_id, None) is not None:
                self.engine.abort_request(command.req_id)
        else:
            self._fail_all(EngineUnavailableError(command.reason))

    def _add(self, command: _Add) -> None:
        req_id = command.stream.req_id
        try:
            if not self._accepting:
                raise EngineUnavailableError("the server is shutting down")
            if req_id in self._streams:
                raise ValueError(f"request id {req_id!r} is already in use")
            self.engine.add_request(req_id, command.prompt, command.params)
        except Exception as exc:  # ValueError is the caller's fault; anything else is reported to it too
            if not isinstance(exc, (ValueError, EngineUnavailableError)):
                logger.exception("add_request(%s) failed", req_id)
            command.accepted.set_exception(exc)
        else:
            self._streams[req_id] = command.stream
            command.accepted.set_result(None)
        finally:
            with self._pending_lock:
                self._num_pending -= 1

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # a failed step fails its requests, never the server
            logger.exception("engine step failed; failing %d requests", len(self._streams))
            self._fail_all(RequestFailedError(f"engine step failed: {type(exc).__name__}: {exc}"))
            return
        # Refresh the counts before anyone hears of this step: a client reacting to its
        # output must not be judged (max_waiting) on the queue as it was before the step.
        self._stats = self.engine.stats()
        for output in outputs:
            stream = self._streams.get(output.req_id)
            if stream is None:
                continue
            if output.finished:
                del self._streams[output.req_id]
            stream.put(output)

    def _fail_all(self, error: Exception) -> None:
        for req_id, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(req_id)
            except Exception:  # keep failing the others; the engine logs its own state
                logger.exception("abort_request(%s) failed", req_id)
            stream.put(error)
        self._streams.clear()
