"""The ASGI app and the process around it: routes, error bodies, start-up and a graceful shutdown.

`build_app` wires the endpoint modules to one `EngineClient` and turns every
refusal into OpenAI's error body (with Retry-After on 429 and
WWW-Authenticate on 401). `run_server` is the composition root: it builds the
in-process engine, then runs uvicorn until SIGINT/SIGTERM. On the signal the
engine stops taking requests and gives running ones `shutdown_timeout`
seconds; uvicorn waits that long (and a little more) for their responses,
which end normally, with finish_reason "abort" where they were cut.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvos.cluster.config import ClusterConfig
from kvos.config import EngineConfig
from kvos.engine.client import EngineClient
from kvos.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from kvos.entrypoints.openai_protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ProtocolError,
    SessionDeleted,
    SessionList,
    SessionObject,
)
from kvos.entrypoints.server.chat import Chat
from kvos.entrypoints.server.completions import Completions
from kvos.entrypoints.server.openapi import error_responses, openapi_schema, request_body, streamed_or_whole
from kvos.entrypoints.server.plumbing import Serving, api_key_check, session_not_found
from kvos.entrypoints.server_config import ServerConfig
from kvos.errors import InvalidRequestError, SessionNotFoundError

logger = logging.getLogger(__name__)

_SHUTDOWN_MARGIN_S = 2.0
"""uvicorn's wait beyond the engine's grace (rounded up to whole seconds, as uvicorn takes it):
time for cut requests to send their last chunk and [DONE]."""


class HealthStatus(BaseModel):
    status: Literal["ok"] = "ok"


def build_app(engine: EngineClient, config: ServerConfig) -> FastAPI:
    """The ASGI app; it starts the engine on startup and shuts it down on shutdown."""
    serving = Serving(engine, config, ServerMetrics(engine.stats))
    completions = Completions(serving)
    chat = Chat(serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(
        title="kvos",
        description="An OpenAI-compatible server for one model.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.serving = serving

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ProtocolError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        error = ProtocolError(500, "Internal server error.", type="server_error", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    async def health() -> Response:
        if not engine.is_running:
            body = ProtocolError(503, "The engine is not running.", type="server_error", code="unavailable").body()
            return JSONResponse(body, status_code=503)
        return JSONResponse(HealthStatus().model_dump())

    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE)

    async def models() -> ModelList:
        card = ModelCard(id=serving.model_name, created=serving.created, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    async def sessions(request: Request) -> SessionList:
        infos = await engine.list_sessions(request.state.owner)
        return SessionList(data=[SessionObject.of(info) for info in infos])

    async def delete_session(request: Request, session_id: str) -> SessionDeleted:
        try:
            await engine.delete_session(session_id, request.state.owner)
        except SessionNotFoundError as exc:
            raise session_not_found(exc) from exc
        except InvalidRequestError as exc:
            raise ProtocolError(400, f"Invalid session id: {exc}.", param="session_id", code="invalid_value") from exc
        return SessionDeleted(id=session_id)

    require_key = [Depends(api_key_check(config.api_keys))]
    secured_paths = (
        ["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/sessions", "/v1/sessions/{session_id}"]
        if config.api_keys
        else []
    )
    metrics_secured = config.metrics_require_key and bool(config.api_keys)
    if metrics_secured:
        secured_paths.append("/metrics")

    app.add_api_route("/health", health, methods=["GET"], response_model=HealthStatus, responses=error_responses(503))
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        dependencies=require_key if metrics_secured else None,
        responses=error_responses(401) if metrics_secured else None,
        description="Prometheus text format.",
    )
    v1 = APIRouter(prefix="/v1", dependencies=require_key)
    v1.add_api_route("/models", models, methods=["GET"], responses=error_responses(401))
    post_errors = error_responses(400, 401, 404, 413, 429, 503)
    v1.add_api_route(
        "/completions",
        completions.create,
        methods=["POST"],
        response_model=CompletionResponse,
        responses={**streamed_or_whole("A completion, or its chunks as events", CompletionResponse), **post_errors},
        openapi_extra=request_body(CompletionRequest),
    )
    v1.add_api_route(
        "/chat/completions",
        chat.create,
        methods=["POST"],
        response_model=ChatCompletionResponse,
        responses={
            **streamed_or_whole("A chat completion, or its chunks as events", ChatCompletionChunk),
            **post_errors,
        },
        openapi_extra=request_body(ChatCompletionRequest),
    )
    v1.add_api_route(
        "/sessions",
        sessions,
        methods=["GET"],
        response_model=SessionList,
        responses=error_responses(401),
        description="The caller's sessions (kvos extension; see `session_id`), most recently used first.",
    )
    v1.add_api_route(
        "/sessions/{session_id}",
        delete_session,
        methods=["DELETE"],
        response_model=SessionDeleted,
        responses=error_responses(400, 401, 404),
        description="Forget a session and free the KV it holds now (404 if it is not the caller's).",
    )
    app.include_router(v1)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app, serving.model_name, secured_paths)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _Server(uvicorn.Server):
    """uvicorn, with a shutdown that lets the engine wind down and exits with status 0.

    Stock uvicorn re-raises the signal once it has stopped, so the process
    would die by SIGINT/SIGTERM instead of exiting cleanly. A second SIGINT
    forces the exit, as in stock uvicorn.
    """

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None], banner: Callable[[str], str]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._banner = banner

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            from kvos.heap import freeze_startup_heap

            freeze_startup_heap()  # everything is loaded: what is alive now lives as long as the server
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(self._banner(f"http://{host}:{port}"), flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        self._on_exit()


def run_server(
    engine_config: EngineConfig, server_config: ServerConfig, cluster_config: ClusterConfig | None = None
) -> None:
    """Load the model (or start a cluster of instances), serve until SIGINT/SIGTERM, then return."""
    # Imported here: the app itself depends on the EngineClient protocol only.
    from kvos.engine.async_engine import AsyncLLMEngine

    if cluster_config is not None and cluster_config.enabled:
        from kvos.cluster.admin import add_admin_routes
        from kvos.cluster.client import ClusterEngine

        cluster_engine = ClusterEngine(engine_config, cluster_config, server_config.max_waiting)
        async_engine: AsyncLLMEngine = cluster_engine
        app = build_app(async_engine, server_config)
        add_admin_routes(app, cluster_engine, server_config.api_keys)
        placement = f"{cluster_config.instances} instances on Ray, router {cluster_config.router}"
        if cluster_config.disaggregated:
            placement += f" ({cluster_config.prefill_instances} prefill, {cluster_config.decode_instances} decode)"
    else:
        async_engine = AsyncLLMEngine.build(engine_config, server_config.max_waiting)
        app = build_app(async_engine, server_config)
        placement = "in its own process" if engine_config.parallel.core_process else "in process"
    engine = async_engine.engine
    grace_s = server_config.shutdown_timeout

    def banner(url: str) -> str:
        return (
            f"kvos: serving {app.state.serving.model_name} at {url}/v1 "
            f"(KV cache, {engine.config.cache.kv_cache}: {engine.capacity_tokens} tokens; "
            f"max context {engine.max_model_len}; scheduling {engine.config.scheduler.policy}; "
            f"engine core {placement}; "
            f"max waiting {server_config.max_waiting}; API key {'required' if server_config.api_keys else 'off'})"
        )

    uv_config = uvicorn.Config(
        app,
        host=server_config.host,
        port=server_config.port,
        log_level="info",
        timeout_graceful_shutdown=math.ceil(grace_s + _SHUTDOWN_MARGIN_S),
    )
    _Server(uv_config, lambda: async_engine.begin_shutdown(grace_s), banner).run()
