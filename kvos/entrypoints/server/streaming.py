"""Server-Sent Events as OpenAI streams them, and the deltas they carry.

The engine hands out cumulative outputs (the whole text so far, and it may
skip steps when a consumer falls behind); OpenAI streams carry only what is
new. `deltas` turns one into the other. A stream ends with `data: [DONE]`, or
with an error event when the engine fails mid-way (the status line, 200, has
long been sent by then).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from kvos.entrypoints.server.plumbing import Job, engine_error, merge
from kvos.outputs import CompletionOutput, TokenLogprob

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    """One event: `data: <json>` and a blank line."""
    data = payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def deltas(job: Job) -> AsyncIterator[tuple[int, CompletionOutput, str, list[TokenLogprob]]]:
    """(choice index, output, new text, new logprobs) each time a choice advances or ends."""
    sent_chars: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    async for i, output in merge(job.streams):
        for c in output.outputs:
            index = job.choice_index(i, c)
            if index in done:
                continue
            logprobs = c.logprobs or []
            new_text = c.text[sent_chars.get(index, 0) :]
            new_logprobs = logprobs[sent_tokens.get(index, 0) :]
            if not new_text and not new_logprobs and not c.finished:
                continue
            sent_chars[index] = len(c.text)
            sent_tokens[index] = len(logprobs)
            if c.finished:
                done.add(index)
            yield index, c, new_text, new_logprobs


class EventStream(StreamingResponse):
    """Server-Sent Events that end their job however the response ends.

    Starlette cancels the response when the client disconnects; closing the job
    here (not in a generator's `finally`, which runs only when the generator is
    collected) aborts the requests at once.
    """

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self._events.aclose()


async def guarded(events: AsyncIterator[str], job: Job) -> AsyncGenerator[str, None]:
    """`events`, ended by an error event (OpenAI's error shape) instead of a torn connection on failure."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # typed engine errors get their message, anything else a stable one (and a log line)
        yield sse(engine_error(exc, job.request_id).body())
