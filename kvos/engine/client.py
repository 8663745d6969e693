"""`EngineClient`: everything the server knows about an engine.

The OpenAI server (and later a router over many instances) talks to this
protocol only: requests go in as token ids with their sampling parameters and
priority, outputs come back as a `RequestStream` of cumulative
`RequestOutput`s (text already detokenized, stop strings already applied).
The in-process `AsyncLLMEngine` is one implementation; an engine core in its
own process, or a router over several, are others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from kvos.errors import RequestFailedError
from kvos.outputs import RequestOutput

if TYPE_CHECKING:
    from kvos.engine.sessions import SessionInfo, SessionRef
    from kvos.engine.stats import EngineStats
    from kvos.model.tokenizer import Tokenizer
    from kvos.sampling_params import SamplingParams


class RequestStream:
    """The outputs of one request, handed over from the engine's thread.

    Outputs are cumulative, so a consumer that falls behind skips straight to
    the newest one instead of replaying every step. The timestamps feed the
    latency histograms. A request the engine failed raises
    `RequestFailedError` (its message is safe to show a client).
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
        """Called from the engine's thread."""
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


class EngineClient(Protocol):
    """What a server needs from an engine, wherever the engine runs."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer:
        """Safe to use for encoding and decoding from any thread."""
        ...

    @property
    def is_running(self) -> bool:
        """False once shutdown began or the engine died: new requests are refused."""
        ...

    def stats(self) -> EngineStats: ...

    def start(self) -> None: ...

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

        `priority`: lower is served sooner (the priority policy); `tenant`:
        whose fair share it counts against (the fair policy; OpenAI's `user`);
        `cache_salt`: only requests with the same salt share prefix-cache blocks;
        `session`: keep the conversation's KV for its next call (`kvos.engine.sessions`).

        Raises `InvalidRequestError` (a ValueError naming the field) for input
        it could never serve, `QueueFullError` when too many wait,
        `EngineUnavailableError` when shutting down.
        """
        ...

    def abort(self, req_id: str) -> None:
        """Stop a request and free all its memory; unknown or finished ids are ignored."""
        ...

    async def list_sessions(self, owner: str = "") -> list[SessionInfo]:
        """The owner's live sessions, most recently used first."""
        ...

    async def delete_session(self, session_id: str, owner: str = "") -> None:
        """Forget the owner's session and free the KV it holds now.

        Raises `SessionNotFoundError` when no such session is the owner's.
        """
        ...

    def begin_shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse new requests; give running ones `grace_s` seconds, then cut them.

        A cut request ends normally (no error) with finish_reason "abort".
        Safe to call from a signal handler.
        """
        ...

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cut everything still running and stop; returns within about `timeout` seconds."""
        ...
