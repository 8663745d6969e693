"""A real `kvos serve` in a subprocess, as users start it (the CLI, uvicorn, the engine thread).

It listens on a free loopback port; tests talk to it over HTTP only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 240.0
SHUTDOWN_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of GET /metrics, by sample name."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).text
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }

    def wait_drained(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll /metrics until no request runs or waits and no KV block is held; return the last scrape."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            drained = (
                m["kvos_num_requests_running"] == 0
                and m["kvos_num_requests_waiting"] == 0
                and m["kvos_kv_cache_used_blocks"] == 0
            )
            if drained or time.monotonic() > deadline:
                return m
            time.sleep(0.2)

    def wait_ready(self) -> None:
        """Block until GET /health answers 200."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"kvos serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvos serve did not become healthy in {STARTUP_TIMEOUT_S}s:\n{self.log()}")
            time.sleep(0.25)

    def stop(self) -> int:
        """SIGTERM, as a process manager would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


EXACT_DTYPE = ("--dtype", "float32")
"""Servers under test compute in float32, whose greedy tokens the tests compare exactly (a later
`--dtype` in `args` wins)."""


def start_server(log_path: Path, *args: str, api_key: str | None = None) -> ServerProcess:
    """Launch `kvos serve`; call `wait_ready()` before use (loading the model takes a while)."""
    env = dict(os.environ)
    # This checkout's kvos, not whichever one is pip-installed (e.g. an editable install of another worktree).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("KVOS_API_KEY", None)
    if api_key is not None:
        env["KVOS_API_KEY"] = api_key
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kvos.entrypoints.cli", "serve", "--port", str(port), *EXACT_DTYPE, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return ServerProcess(process, f"http://127.0.0.1:{port}", log_path, api_key)
