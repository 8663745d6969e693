"""What every endpoint shares: who may call, reading the body, engine errors, one API call's engine requests.

An API call can stand for several engine requests (one per prompt of a
completions call), which must all run or none, and must all be aborted the
moment the client leaves so their KV memory returns at once. `Job` is that
group; `Serving` starts, watches and closes jobs for the endpoint modules.

Engine failures reach clients only as stable messages and codes: the typed
errors of `kvos.errors` are mapped here, anything else is logged with its
traceback and answered without its text, which may hold internal details.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from kvos.engine.client import EngineClient, RequestStream
from kvos.engine.sessions import SessionRef
from kvos.entrypoints.metrics import ServerMetrics
from kvos.entrypoints.openai_protocol import PromptTokensDetails, ProtocolError, UsageInfo
from kvos.entrypoints.server_config import ServerConfig
from kvos.errors import (
    EngineUnavailableError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    SessionNotFoundError,
)
from kvos.outputs import CompletionOutput, RequestOutput
from kvos.sampling_params import SamplingParams
from kvos.structured.grammar import GrammarCompiler

logger = logging.getLogger(__name__)

GRAMMAR_COMPILE_TIMEOUT_S = 10.0
"""A schema that takes longer to compile is refused (400) rather than waited for."""

MIN_LOGPROB = -9999.0
"""JSON has no -inf: a token the model rules out is reported with this log-probability instead."""


def key_owner(key: str) -> str:
    """The name a key's sessions are booked under: a digest, so the key itself is never stored or shown."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def api_key_check(api_keys: tuple[str, ...]) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that refuses (401) requests without `Authorization: Bearer <one of api_keys>`.

    The caller's identity (`key_owner` of the key, "" without keys) is left in
    `request.state.owner`: sessions belong to it.
    """

    async def check(request: Request) -> None:
        request.state.owner = ""
        if not api_keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode()
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        # Every key is compared, so the time does not tell which key came closest either.
        matches = [hmac.compare_digest(sent, key.encode()) for key in api_keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise ProtocolError(
                401,
                "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        request.state.owner = key_owner(token.strip())

    return check


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing it (413) as soon as it exceeds `limit` bytes, declared or not."""
    too_large = ProtocolError(413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad syntax or encoding, over-long integers, deep nesting
        raise ProtocolError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from exc


def session_not_found(exc: SessionNotFoundError) -> ProtocolError:
    """404 whether the session never existed, expired or is another key's: ids cannot be probed."""
    return ProtocolError(
        404, f"No session '{exc.session_id}' (it may have expired).", param="session_id", code="session_not_found"
    )


def engine_error(exc: BaseException, req_id: str) -> ProtocolError:
    """The error a client sees when the engine refuses or fails `req_id`.

    Only the typed errors' messages are shown (they are written for clients);
    anything else is an engine bug: its traceback goes to the log, its text
    nowhere near the response.
    """
    if isinstance(exc, QueueFullError):
        retry_after = max(1, math.ceil(exc.retry_after_s))
        return ProtocolError(
            429,
            f"The server is overloaded ({exc}); retry after {retry_after} s.",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, RequestFailedError):
        return ProtocolError(503, f"The engine failed this request: {exc}", type="server_error", code="engine_error")
    if isinstance(exc, EngineUnavailableError):
        message = "The engine is not taking requests: the server is shutting down or its engine stopped."
        return ProtocolError(503, message, type="server_error", code="unavailable")
    logger.error("request %s failed", req_id, exc_info=exc)
    return ProtocolError(503, "The engine could not serve this request.", type="server_error", code="engine_error")


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests (one per prompt) as they come, tagged with the prompt index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as exc:  # noqa: BLE001 (re-raised by the consumer, which decides what the client sees)
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def until_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Job:
    """One API call in flight: the engine requests behind it (one per prompt)."""

    request_id: str
    created: int
    prompt_token_ids: list[list[int]]
    params: SamplingParams
    tenant: str = ""
    streams: list[RequestStream] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)
    """Filled for echo only."""
    closed: bool = False

    def choice_index(self, prompt_index: int, output: CompletionOutput) -> int:
        return prompt_index * self.params.n + output.index

    def usage(self) -> UsageInfo:
        prompt_tokens = sum(len(ids) for ids in self.prompt_token_ids)
        completion_tokens = sum(
            len(c.token_ids) for s in self.streams if s.output is not None for c in s.output.outputs
        )
        total_tokens = prompt_tokens + completion_tokens
        cached = sum(s.output.num_cached_tokens for s in self.streams if s.output is not None)
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class Serving:
    """The engine, the config and the checks the endpoint modules share."""

    def __init__(self, engine: EngineClient, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.model_name = config.served_model_name or engine.model_name
        self.created = int(time.time())
        self._grammars: GrammarCompiler | None = None

    async def check_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar off the event loop and the engine step, or refuse it (400).

        The engine compiles again when it adopts the request (its own cache, a
        hit from the second request on); compiling here first means a schema
        that is invalid, unsupported or too slow is the client's 400 and never
        reaches the engine. A compile that runs past the limit finishes in the
        background, bounded by llguidance's own limits, and is cached.
        """
        spec = params.structured
        if spec is None:
            return
        if self._grammars is None:
            self._grammars = GrammarCompiler.shared(self.tokenizer, self.tokenizer.vocab_size)
        try:
            await asyncio.wait_for(asyncio.to_thread(self._grammars.compile, spec), GRAMMAR_COMPILE_TIMEOUT_S)
        except TimeoutError as exc:
            raise ProtocolError(
                400,
                f"{spec.what[0].upper()}{spec.what[1:]} did not compile within {GRAMMAR_COMPILE_TIMEOUT_S:g} s; "
                "simplify it.",
                param=spec.param,
                code="invalid_value",
            ) from exc
        except InvalidRequestError as exc:
            raise ProtocolError(400, f"Invalid value for '{spec.param}': {exc}.", param=spec.param) from exc

    async def read_json(self, request: Request) -> Any:
        return await read_json(request, self.config.max_body_bytes)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ProtocolError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    def check_context(self, num_prompt_tokens: int, max_tokens: int, prompt_param: str, max_tokens_param: str) -> None:
        limit = self.engine.max_model_len
        if num_prompt_tokens >= limit or num_prompt_tokens + max_tokens > limit:
            param = prompt_param if num_prompt_tokens >= limit else max_tokens_param
            raise ProtocolError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {prompt_param}, "
                f"{max_tokens} in the completion). Please reduce the length of the {prompt_param} "
                f"or {max_tokens_param}.",
                param=param,
                code="context_length_exceeded",
            )

    async def start_job(
        self,
        prefix: str,
        prompt_token_ids: list[list[int]],
        params: SamplingParams,
        prompt_param: str,
        priority: int = 0,
        tenant: str = "",
        cache_salt: str | None = None,
        session: SessionRef | None = None,
    ) -> Job:
        """Hand every prompt to the engine; all or none of them run."""
        job = Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), prompt_token_ids, params, tenant)
        if session is not None and len(prompt_token_ids) != 1:
            message = "session_id needs a single prompt (one conversation)"
            raise ProtocolError(400, message, param="session_id", code="invalid_value")
        try:
            for i, ids in enumerate(prompt_token_ids):
                stream = await self.engine.add_request(
                    f"{job.request_id}-{i}", ids, params, priority, tenant, cache_salt, session
                )
                job.streams.append(stream)
        except SessionNotFoundError as exc:
            self.close_job(job)
            raise session_not_found(exc) from exc
        except InvalidRequestError as exc:
            self.close_job(job)
            # The engine speaks of the prompt's token ids; the request's field for them is
            # `prompt` (completions) or `messages` (chat).
            param = prompt_param if exc.param in ("prompt", "prompt_token_ids") else exc.param
            raise ProtocolError(400, f"Invalid request: {exc}.", param=param, code="invalid_value") from exc
        except asyncio.CancelledError:
            self.close_job(job)
            raise
        except Exception as exc:
            self.close_job(job)
            raise engine_error(exc, job.request_id) from exc
        return job

    def session(self, request: Request, session_id: str | None, user: str | None) -> tuple[SessionRef | None, str]:
        """The call's session (None without `session_id`) and the tenant it counts against.

        A session's calls count against its owner (the API key) under the
        fair policy; without API keys, against `user` as any call does.
        """
        owner: str = request.state.owner
        if session_id is None:
            return None, user or ""
        return SessionRef(session_id, owner), owner or user or ""

    def close_job(self, job: Job) -> None:
        """Abort what still runs (the client left, or a sibling failed); record latencies once."""
        if job.closed:
            return
        job.closed = True
        for stream in job.streams:
            if not stream.finished:
                self.engine.abort(stream.req_id)
            elif stream.output is not None and _ran_to_end(stream.output):
                self.metrics.observe(stream, max(len(c.token_ids) for c in stream.output.outputs), job.tenant)

    async def run_to_end(self, request: Request, job: Job) -> list[RequestOutput] | None:
        """Final output per prompt, or None if the client disconnected first."""

        async def collect() -> None:
            async for _ in merge(job.streams):
                pass

        work = asyncio.create_task(collect())
        watch = asyncio.create_task(until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                return None
            exc = work.exception()
            if exc is not None:
                raise engine_error(exc, job.request_id) from exc
            return [s.output for s in job.streams if s.output is not None]
        finally:
            work.cancel()
            watch.cancel()
            self.close_job(job)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def finite(logprob: float) -> float:
    """A log-probability JSON can carry (no -inf)."""
    return max(logprob, MIN_LOGPROB)


def _ran_to_end(output: RequestOutput) -> bool:
    """Only such requests enter the latency histograms: cut ones would skew them."""
    ended = all(c.finish_reason in ("stop", "length") for c in output.outputs)
    return output.finished and output.error is None and ended
