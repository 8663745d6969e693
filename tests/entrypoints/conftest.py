"""One `kvos serve` subprocess per test module, stopped with SIGTERM at the module's end; a tiny in-process engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from in_process import write_tiny_model
from server_process import ServerProcess, start_server


@pytest.fixture(scope="module")
def booting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default model with default settings, launched but perhaps still loading."""
    proc = start_server(tmp_path_factory.mktemp("server") / "serve.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def server(booting_server: ServerProcess) -> ServerProcess:
    booting_server.wait_ready()
    return booting_server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model for in-process apps (see in_process.py)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))
