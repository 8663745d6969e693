"""Serve one `LLMEngine` to many asyncio callers: the in-process `EngineClient`.

The engine is not thread-safe and its `step()` blocks for a whole forward
pass, so it lives on one background thread that owns it completely: callers on
the event loop never touch it, they post commands (add, abort, drain) to a
queue the thread drains between steps, and receive each request's outputs on a
per-request asyncio queue. Requests from every client thereby join the same
running batch.

    event loop                         engine thread
    ----------                         -------------
    add_request() --_Add------------>  engine.add_request()  (InvalidRequestError -> caller)
    abort()       --_Abort---------->  engine.abort_request()
    begin_shutdown() --_Drain------->  no new requests; running ones get a grace period, then are cut
    list_sessions(), delete_session() --_Call-->  the engine's session books (answered on a future)
    RequestStream <-RequestOutput----  engine.step()

`AsyncLLMEngine.build` also loads the engine on that thread, which must be the first to run
torch's parallel (OpenMP) regions: once another thread has a team of OpenMP workers (the main
thread, from loading the model there), GNU OpenMP counts more threads than the machine has cores
and its workers stop spinning between regions, so each of a step's few hundred parallel ops waits
to wake a sleeping worker. On the 2-core machine of BENCHMARKS.md a batch-1 decode step took
38-43 ms on a second thread against 27 ms on the first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kvos.engine.client import RequestStream
from kvos.engine.sessions import SessionInfo, SessionRef
from kvos.engine.stats import EngineStats
from kvos.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, RequestFailedError
from kvos.outputs import CompletionOutput, RequestOutput
from kvos.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvos.config import EngineConfig
    from kvos.engine.llm_engine import LLMEngine
    from kvos.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ENGINE_FAILED = "the engine failed while serving this request"


@dataclass
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    tenant: str
    cache_salt: str | None
    accepted: concurrent.futures.Future[None]
    displace: bool
    """The queue looked full: admit only by refusing a less urgent waiting request."""
    session: SessionRef | None = None


@dataclass
class _Call:
    """Run `fn` on the engine thread (it touches the engine's books); its result or error goes to `done`."""

    fn: Callable[[], Any]
    done: concurrent.futures.Future[Any]


@dataclass
class _Abort:
    req_id: str


@dataclass
class _Drain:
    grace_s: float


@dataclass
class _Stop:
    pass


_Command = _Add | _Abort | _Drain | _Stop | _Call


@dataclass
class _Live:
    """A request the engine thread is serving: its stream and what a cut needs to say."""

    stream: RequestStream
    params: SamplingParams
    last: RequestOutput | None = field(default=None)


class AsyncLLMEngine:
    """Thread-safe front of an `LLMEngine`, for asyncio servers (implements `EngineClient`).

    `max_waiting` bounds requests queued beyond what the engine admits at its
    next step: a burst that free running slots (`max_num_seqs`) will take at
    once is never refused. Under the priority policy a full queue makes room
    for an arrival by refusing the least urgent waiting request, if one is
    less urgent than the arrival, instead of refusing the arrival.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # Touched by the engine thread only.
        self._live: dict[str, _Live] = {}
        self._drain_deadline: float | None = None
        # Adds posted but not yet handed to the engine: they count as waiting.
        self._num_pending = 0
        self._pending_lock = threading.Lock()
        self._accepting = True
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="kvos-engine", daemon=True)
        # Set by `build`: the engine thread already runs and waits for `start`.
        self._started: threading.Event | None = None

    @classmethod
    def build(cls, config: EngineConfig, max_waiting: int | None = None) -> AsyncLLMEngine:
        """Load the engine on the thread that will step it (see the module's docstring for why)."""
        from kvos.engine.llm_engine import LLMEngine

        built: concurrent.futures.Future[AsyncLLMEngine] = concurrent.futures.Future()
        started = threading.Event()

        def engine_thread() -> None:
            try:
                async_engine = cls(LLMEngine(config), max_waiting)
            except BaseException as exc:  # noqa: BLE001 (re-raised where build was called)
                built.set_exception(exc)
                return
            async_engine._thread = threading.current_thread()
            async_engine._started = started
            built.set_result(async_engine)
            started.wait()
            async_engine._run()

        threading.Thread(target=engine_thread, name="kvos-engine", daemon=True).start()
        return built.result()

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
        if self._started is not None:
            self._started.set()
        else:
            self._thread.start()

    def begin_shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; let running ones finish for up to `grace_s` seconds, then cut them.

        A cut request ends normally (no error) with finish_reason "abort". Safe
        to call from a signal handler: it only flips a flag and puts on a
        `SimpleQueue`, which is reentrant.
        """
        self._accepting = False
        self._commands.put(_Drain(grace_s))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cut everything still running, stop the engine thread, and free the engine's memory."""
        self.begin_shutdown(0.0)
        self._commands.put(_Stop())
        if self._started is not None:  # built but never started: let the thread run to the stop
            self._started.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():  # never free memory under a step still running
            self.engine.close()

    # -- requests (event loop side) ---------------------------------------------------

    async def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        tenant: str = "",
        cache_salt: str | None = None,
        session: SessionRef | None = None,
    ) -> RequestStream:
        """Queue a request and return the stream of its outputs.

        Raises QueueFullError (too many waiting), EngineUnavailableError
        (shutting down), or the engine's InvalidRequestError for input it cannot serve.
        """
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        with self._pending_lock:
            stats = self._stats
            queued = stats.num_waiting + self._num_pending - stats.num_free_seq_slots
            full = self.max_waiting is not None and queued >= self.max_waiting
            if full and self.engine.config.scheduler.policy != "priority":
                raise QueueFullError(f"too many requests waiting (max_waiting={self.max_waiting})")
            self._num_pending += 1
        stream = RequestStream(req_id, asyncio.get_running_loop())
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._commands.put(
            _Add(stream, prompt_token_ids, params, priority, tenant, cache_salt, accepted, full, session)
        )
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

    async def list_sessions(self, owner: str = "") -> list[SessionInfo]:
        """The owner's live sessions, most recently used first."""
        result: list[SessionInfo] = await self._call(lambda: self.engine.list_sessions(owner))
        return result

    async def delete_session(self, session_id: str, owner: str = "") -> None:
        """Forget the owner's session and free its KV now; SessionNotFoundError if it is not theirs."""
        await self._call(lambda: self.engine.delete_session(session_id, owner))

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if not self.is_running:
            raise EngineUnavailableError("the engine is not running")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._commands.put(_Call(fn, done))
        return await asyncio.wrap_future(done)

    # -- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_commands(block=idle):
                    return
                if self._drain_deadline is not None and (not self._live or time.monotonic() >= self._drain_deadline):
                    self._cut_all()
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
            elif isinstance(command, _Call):
                command.done.set_exception(EngineUnavailableError("the engine is not running"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply every queued command; wait for one when idle. False means stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                self._cut_all()
                return False
            self._apply(command)
            self._stats = self.engine.stats()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: _Add | _Abort | _Drain | _Call) -> None:
        if isinstance(command, _Add):
            self._add(command)
        elif isinstance(command, _Call):
            try:
                command.done.set_result(command.fn())
            except Exception as exc:  # noqa: BLE001 (the caller decides what its client sees)
                command.done.set_exception(exc)
        elif isinstance(command, _Abort):
            if self._live.pop(command.req_id, None) is not None:
                self.engine.abort_request(command.req_id)
        else:
            deadline = time.monotonic() + max(0.0, command.grace_s)
            self._drain_deadline = min(deadline, self._drain_deadline or deadline)

    def _add(self, command: _Add) -> None:
        req_id = command.stream.req_id
        try:
            if not self._accepting or self._drain_deadline is not None:
                raise EngineUnavailableError("the server is shutting down")
            if req_id in self._live:
                raise InvalidRequestError(f"request id {req_id!r} is already in use")
            if command.displace:
                self._make_room(command.priority)
            self.engine.add_request(
                req_id,
                command.prompt_token_ids,
                command.params,
                command.priority,
                cache_salt=command.cache_salt,
                tenant=command.tenant,
                session=command.session,
            )
        except Exception as exc:  # the caller's fault or a full queue; anything else is reported to it too
            if not isinstance(exc, (ValueError, EngineUnavailableError, QueueFullError)):
                logger.exception("add_request(%s) failed", req_id)
                exc = RequestFailedError(ENGINE_FAILED)
            command.accepted.set_exception(exc)
        else:
            self._live[req_id] = _Live(command.stream, command.params)
            command.accepted.set_result(None)
        finally:
            with self._pending_lock:
                self._num_pending -= 1

    def _make_room(self, priority: int) -> None:
        """Refuse the least urgent waiting request for an arrival of `priority`, or the arrival itself."""
        victim = self.engine.least_urgent_waiting(priority)
        live = self._live.pop(victim, None) if victim is not None else None
        if victim is None or live is None:
            raise QueueFullError(f"too many requests waiting (max_waiting={self.max_waiting})")
        self.engine.abort_request(victim)
        live.stream.put(QueueFullError("refused to make room for a more urgent request; retry later"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a failed step fails its requests, never the server
            logger.exception("engine step failed; failing %d requests", len(self._live))
            self._fail_all(RequestFailedError(ENGINE_FAILED))
            return
        # Refresh the counts before anyone hears of this step: a client reacting to its
        # output must not be judged (max_waiting) on the queue as it was before the step.
        self._stats = self.engine.stats()
        for output in outputs:
            live = self._live.get(output.req_id)
            if live is None:
                continue
            if output.finished:
                del self._live[output.req_id]
            else:
                live.last = output
            live.stream.put(output)

    def _cut_all(self) -> None:
        """End every running request now, normally, with finish_reason "abort"."""
        self._drain_deadline = None
        for req_id, live in list(self._live.items()):
            self.engine.abort_request(req_id)
            live.stream.put(_cut(req_id, live))
        self._live.clear()

    def _fail_all(self, error: Exception) -> None:
        for req_id, live in list(self._live.items()):
            try:
                self.engine.abort_request(req_id)
            except Exception:  # keep failing the others; the engine logs its own state
                logger.exception("abort_request(%s) failed", req_id)
            live.stream.put(error)
        self._live.clear()


def _cut(req_id: str, live: _Live) -> RequestOutput:
    """The final output of a request cut short: what it had, every unfinished choice ended "abort"."""
    if live.last is None:
        outputs = [
            CompletionOutput(index=i, text="", token_ids=[], finish_reason="abort") for i in range(live.params.n)
        ]
        return RequestOutput(req_id=req_id, prompt=None, prompt_token_ids=[], outputs=outputs, finished=True)
    outputs = [c if c.finished else replace(c, finish_reason="abort") for c in live.last.outputs]
    return replace(live.last, outputs=outputs, finished=True)
