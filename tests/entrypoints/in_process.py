"""The server's ASGI app in the test process, over a tiny random-weight engine.

For tests that send many requests and need no real model: fuzzing, the
OpenAPI schema, auth and headers. The engine (2 layers, width 64, the default
model's tokenizer) answers in milliseconds, and its context is short, so any
max_tokens a fuzzer picks is over quickly. Each app gets an engine of its own
(a quarter of a second to build), so apps never share an engine thread's state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.testclient import TestClient

from kvos.config import EngineConfig
from kvos.engine.async_engine import AsyncLLMEngine
from kvos.engine.llm_engine import LLMEngine
from kvos.entrypoints.server import build_app
from kvos.entrypoints.server_config import ServerConfig

TINY_MAX_MODEL_LEN = 96
TINY_MAX_NUM_SEQS = 8

_TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_tiny_model(folder: Path) -> Path:
    """A random-weight Llama's config.json in `folder`; the model's name is the folder's name."""
    (folder / "config.json").write_text(json.dumps(_TINY_LLAMA))
    return folder


def tiny_config(folder: Path, **options: Any) -> EngineConfig:
    """The tiny model's engine: random weights, float32, a small context and KV pool."""
    return EngineConfig.from_kwargs(
        **options,
        model=str(folder),
        load_format="dummy",
        max_model_len=TINY_MAX_MODEL_LEN,
        max_num_seqs=TINY_MAX_NUM_SEQS,
        kv_cache_memory_bytes=16 * 2**20,
        dtype="float32",
    )


def tiny_engine(folder: Path, **options: Any) -> LLMEngine:
    return LLMEngine(tiny_config(folder, **options))


@contextmanager
def serve_in_process(
    model_dir: Path, config: ServerConfig | None = None, **engine_options: Any
) -> Iterator[tuple[TestClient, FastAPI]]:
    """A started app (lifespan run) over a fresh tiny engine, and a client that returns 5xx instead of raising."""
    config = config or ServerConfig()
    app = build_app(AsyncLLMEngine(tiny_engine(model_dir, **engine_options), config.max_waiting), config)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app


def post_raw(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST `body` as JSON text that may hold what httpx refuses to write: NaN, Infinity, lone surrogates."""
    text = json.dumps(body, allow_nan=True, ensure_ascii=True)
    return client.post(path, content=text.encode(), headers={"content-type": "application/json", **(headers or {})})


def wait_until_idle(app: FastAPI, timeout: float = 30.0) -> Any:
    """The engine's stats once nothing runs or waits and no KV block is held (or at the deadline)."""
    engine = app.state.serving.engine
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats.num_running, stats.num_waiting, stats.num_used_blocks) == (0, 0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)
