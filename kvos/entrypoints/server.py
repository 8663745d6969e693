"""`kvos serve`: an OpenAI-compatible HTTP server over one engine.

FastAPI handles routing; the engine runs on its own thread behind
`AsyncLLMEngine`, so every client's requests join the same running batch. The
handlers only translate: HTTP body -> validated request -> token ids and
SamplingParams -> engine -> OpenAI response or Server-Sent Events. Anything a
client can get wrong is answered with a 4xx and OpenAI's error body; a client
that goes away has its request aborted, which frees its KV memory at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvos.config import EngineConfig
from kvos.entrypoints.server_config import ServerConfig
from kvos.engine.async_engine import (
    AsyncLLMEngine,
    EngineUnavailableError,
    QueueFullError,
    RequestFailedError,
    RequestStream,
)
from kvos.engine.llm_engine import LLMEngine
from kvos.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from kvos.entrypoints.openai_protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    TopLogprob,
    UsageInfo,
    parse_request,
)
from kvos.outputs import CompletionOutput, RequestOutput, TokenLogprob
from kvos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

def _sse(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> str:
    data = payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


_SSE_DONE = "data: [DONE]\n\n"
_MIN_LOGPROB = -9999.0


def _engine_error(exc: Exception) -> ProtocolError:
    if isinstance(exc, QueueFullError):
        message = f"The server is overloaded: {exc}; retry later."
        return ProtocolError(429, message, type="rate_limit_error", code="queue_full")
    if isinstance(exc, RequestFailedError):
        return ProtocolError(503, f"The engine failed this request: {exc}", type="server_error", code="engine_error")
    if isinstance(exc, EngineUnavailableError):
        return ProtocolError(503, f"The engine is unavailable: {exc}", type="server_error", code="unavailable")
    message = f"The engine could not take this request: {type(exc).__name__}"
    return ProtocolError(503, message, type="server_error", code="engine_error")


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _until_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body has been read, so only disconnects arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Job:
    """One API call in flight: the engine requests behind it (one per prompt)."""

    request_id: str
    created: int
    prompt_token_ids: list[list[int]]
    params: SamplingParams
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
        return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total_tokens)


class _EventStream(StreamingResponse):
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


class OpenAIServer:
    """The route handlers, bound to one engine."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.model_name = config.served_model_name or engine.model_name
        self.metrics = ServerMetrics(engine.stats)
        self.created = int(time.time())

    # -- plumbing shared by the endpoints -----------------------------------------------

    async def check_api_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ProtocolError(
                401,
                "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> Any:
        """The body as JSON, refusing it (413) as soon as it exceeds the limit, declared or not."""
        limit = self.config.max_body_bytes
        too_large = ProtocolError(
            413, f"The request body exceeds the limit of {limit} bytes.", code="request_too_large"
        )
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
        self, prefix: str, prompt_token_ids: list[list[int]], params: SamplingParams, prompt_param: str
    ) -> _Job:
        """Hand every prompt to the engine; all or none of them run."""
        job = _Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), prompt_token_ids, params)
        try:
            for i, ids in enumerate(prompt_token_ids):
                job.streams.append(await self.engine.add_request(f"{job.request_id}-{i}", ids, params))
        except ValueError as exc:
            self.close_job(job)
            param = "n" if str(exc).startswith("n ") else prompt_param
            raise ProtocolError(400, f"Invalid request: {exc}.", param=param, code="invalid_value") from exc
        except (QueueFullError, EngineUnavailableError) as exc:
            self.close_job(job)
            raise _engine_error(exc) from exc
        except Exception as exc:  # an engine bug: the client gets a 503, the log the traceback
            self.close_job(job)
            logger.exception("adding %s failed", job.request_id)
            raise _engine_error(exc) from exc
        except asyncio.CancelledError:
            self.close_job(job)
            raise
        return job

    def close_job(self, job: _Job) -> None:
        """Abort what still runs (the client left, or a sibling failed); record latencies once."""
        if job.closed:
            return
        job.closed = True
        for stream in job.streams:
            if not stream.finished:
                self.engine.abort(stream.req_id)
            elif stream.output is not None and stream.output.finished and stream.output.error is None:
                self.metrics.observe(stream, max(len(c.token_ids) for c in stream.output.outputs))

    async def run_to_end(self, request: Request, job: _Job) -> list[RequestOutput] | None:
        """Final output per prompt, or None if the client disconnected first."""

        async def collect() -> None:
            async for _ in _merge(job.streams):
                pass

        work = asyncio.create_task(collect())
        watch = asyncio.create_task(_until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                return None
            exc = work.exception()
            if exc is not None:
                raise _engine_error(exc) from exc
            return [s.output for s in job.streams if s.output is not None]
        finally:
            work.cancel()
            watch.cancel()
            self.close_job(job)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @staticmethod
    def finite(logprob: float) -> float:
        """JSON has no -inf; a token the model rules out gets a very small log-probability instead."""
        return max(logprob, _MIN_LOGPROB)

    # -- endpoints -------------------------------------------------------------------------

    async def health(self) -> Response:
        if not self.engine.is_running:
            body = ProtocolError(503, "The engine is not running.", type="server_error", code="unavailable").body()
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self) -> ModelList:
        card = ModelCard(id=self.model_name, created=self.created, max_model_len=self.engine.max_model_len)
        return ModelList(data=[card])

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        params = req.to_sampling_params()
        prompts = req.prompts()
        prompt_ids = [await asyncio.to_thread(self.tokenizer.encode, p) if isinstance(p, str) else p for p in prompts]
        for ids in prompt_ids:
            self.check_context(len(ids), params.max_tokens, "prompt", "max_tokens")
        job = await self.start_job("cmpl", prompt_ids, params, "prompt")
        if req.echo:
            # Decoded only now: the engine has checked that the ids are in its vocabulary.
            job.prompt_texts = [
                p if isinstance(p, str) else self.tokenizer.decode(p, skip_special_tokens=False) for p in prompts
            ]
        if req.stream:
            return _EventStream(self._completion_events(job, req), lambda: self.close_job(job))
        finals = await self.run_to_end(request, job)
        if finals is None:
            return Response(status_code=499)
        choices = [
            CompletionChoice(
                index=job.choice_index(i, c),
                text=(job.prompt_texts[i] if req.echo else "") + c.text,
                logprobs=self._completion_logprobs(c.logprobs, 0) if c.logprobs is not None else None,
                finish_reason=_finish_reason(c),
            )
            for i, output in enumerate(finals)
            for c in output.outputs
        ]
        response = CompletionResponse(
            id=job.request_id, created=job.created, model=self.model_name, choices=choices, usage=job.usage()
        )
        return JSONResponse(response.model_dump())

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await self.read_json(request))
        self.check_model(req.model)
        try:
            text = await asyncio.to_thread(self.tokenizer.apply_chat_template, req.conversation(), True)
        except ValueError as exc:
            raise ProtocolError(400, str(exc), param="messages", code="invalid_value") from exc
        # The template already wrote the special tokens (<|im_start|>, BOS) into the text.
        ids = await asyncio.to_thread(self.tokenizer.encode, text, False)
        requested = req.requested_max_tokens()
        max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        # Like OpenAI, an unset max_tokens means "up to the end of the context".
        params = req.to_sampling_params(default_max_tokens=max(1, self.engine.max_model_len - len(ids)))
        self.check_context(len(ids), 0 if requested is None else params.max_tokens, "messages", max_tokens_param)
        job = await self.start_job("chatcmpl", [ids], params, "messages")
        if req.stream:
            return _EventStream(self._chat_events(job, req), lambda: self.close_job(job))
        finals = await self.run_to_end(request, job)
        if finals is None:
            return Response(status_code=499)
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self._chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                finish_reason=_finish_reason(c),
            )
            for c in finals[0].outputs
        ]
        response = ChatCompletionResponse(
            id=job.request_id, created=job.created, model=self.model_name, choices=choices, usage=job.usage()
        )
        return JSONResponse(response.model_dump())

    # -- streaming -------------------------------------------------------------------------

    @staticmethod
    async def _deltas(job: _Job) -> AsyncIterator[tuple[int, CompletionOutput, str, list[TokenLogprob]]]:
        """(choice index, output, new text, new logprobs) each time a choice advances or ends."""
        sent_chars: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        done: set[int] = set()
        async for i, output in _merge(job.streams):
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

    async def _completion_events(self, job: _Job, req: CompletionRequest) -> AsyncGenerator[str, None]:
        exclude = None if req.include_usage else {"usage"}
        offsets: dict[int, int] = {}
        started: set[int] = set()
        try:
            async for index, c, text, logprobs in self._deltas(job):
                if req.echo and index not in started:
                    text = job.prompt_texts[index // job.params.n] + text
                started.add(index)
                choice = CompletionChoice(index=index, text=text, finish_reason=_finish_reason(c))
                if req.logprobs is not None:
                    choice.logprobs = self._completion_logprobs(logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in choice.logprobs.tokens)
                chunk = CompletionResponse(
                    id=job.request_id, created=job.created, model=self.model_name, choices=[choice]
                )
                yield _sse(chunk, exclude)
        except (RequestFailedError, EngineUnavailableError) as exc:
            yield _sse(_engine_error(exc).body())
            return
        if req.include_usage:
            chunk = CompletionResponse(
                id=job.request_id, created=job.created, model=self.model_name, choices=[], usage=job.usage()
            )
            yield _sse(chunk)
        yield _SSE_DONE

    async def _chat_events(self, job: _Job, req: ChatCompletionRequest) -> AsyncGenerator[str, None]:
        exclude = None if req.include_usage else {"usage"}

        def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(
                id=job.request_id, created=job.created, model=self.model_name, choices=choices, usage=usage
            )
            return _sse(body, exclude)

        for index in range(job.params.n):
            yield chunk([ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})])
        try:
            async for index, c, text, logprobs in self._deltas(job):
                delta = {"content": text} if text else {}
                choice = ChatChunkChoice(index=index, delta=delta, finish_reason=_finish_reason(c))
                if req.logprobs:
                    choice.logprobs = self._chat_logprobs(logprobs)
                yield chunk([choice])
        except (RequestFailedError, EngineUnavailableError) as exc:
            yield _sse(_engine_error(exc).body())
            return
        if req.include_usage:
            yield chunk([], job.usage())
        yield _SSE_DONE

    # -- logprobs in OpenAI's two formats ------------------------------------------------

    def _completion_logprobs(self, logprobs: list[TokenLogprob], start_offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        offset = start_offset
        for lp in logprobs:
            token = self.token_text(lp.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(self.finite(lp.logprob))
            result.top_logprobs.append({self.token_text(t): self.finite(v) for t, v in lp.top.items()})
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs:
        content = []
        for lp in logprobs:
            token = self.token_text(lp.token_id)
            top = [
                TopLogprob(token=(alt := self.token_text(t)), logprob=self.finite(v), bytes=list(alt.encode()))
                for t, v in lp.top.items()
            ]
            content.append(
                ChatTokenLogprob(
                    token=token, logprob=self.finite(lp.logprob), bytes=list(token.encode()), top_logprobs=top
                )
            )
        return ChatLogprobs(content=content)


def _finish_reason(output: CompletionOutput) -> str | None:
    # "abort" never reaches a client: an aborted request either has no client left or
    # surfaces as an error.
    return output.finish_reason if output.finish_reason in ("stop", "length") else None


def build_app(engine: LLMEngine | AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    """The ASGI app; it starts the engine thread on startup and stops it on shutdown.

    An `AsyncLLMEngine` passed in keeps its own `max_waiting`.
    """
    async_engine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine, config.max_waiting)
    server = OpenAIServer(async_engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await asyncio.to_thread(async_engine.shutdown)

    app = FastAPI(title="kvos", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ProtocolError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = ProtocolError(500, "Internal server error.", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.metrics_endpoint, methods=["GET"])
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(server.check_api_key)])
    v1.add_api_route("/models", server.models, methods=["GET"])
    v1.add_api_route("/completions", server.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", server.chat_completions, methods=["POST"])
    app.include_router(v1)
    return app


class _Server(uvicorn.Server):
    """uvicorn, with a shutdown that aborts in-flight requests and exits with status 0.

    Stock uvicorn waits for open streams to finish (minutes of generation) and
    then re-raises the signal, so the process would die by SIGINT/SIGTERM
    instead of exiting cleanly.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], banner: Callable[[str], str]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._banner = banner

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(self._banner(f"http://{host}:{port}"), flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self._on_exit()


def run_server(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then return."""
    engine = LLMEngine(engine_config)
    async_engine = AsyncLLMEngine(engine, server_config.max_waiting)
    app = build_app(async_engine, server_config)
    kv = engine.kv_manager

    def banner(url: str) -> str:
        return (
            f"kvos: serving {app.state.server.model_name} at {url}/v1 "
            f"(KV cache, {engine.config.cache.kv_cache}: {kv.capacity_tokens} tokens; "
            f"max context {engine.max_model_len}; "
            f"max waiting {server_config.max_waiting}; API key {'required' if server_config.api_key else 'off'})"
        )

    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level="info",
        timeout_graceful_shutdown=5,
    )
    _Server(uv_config, async_engine.begin_shutdown, banner).run()
