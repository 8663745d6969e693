"""How `kvos serve` listens: a frozen config and its command-line flags.

Kept apart from the server module so the CLI can build its parser without
importing FastAPI and the engine.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

_API_KEY_ENV = "KVOS_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it lets clients do.

    `max_waiting` bounds the requests queued beyond those the engine admits at
    its next step (its free running slots); past it a request gets 429 with
    Retry-After, so an overload shows up as fast refusals rather than
    ever-growing latency, while a burst that fits the free slots is never refused.
    `shutdown_timeout` is how long running requests may go on after SIGTERM
    before they are cut (finish_reason "abort"). `metrics_require_key` puts
    /metrics behind the API key too, for servers whose queue sizes and
    latencies are nobody else's business. Each of `api_keys` is a caller of
    its own: sessions (`session_id`) belong to the key that created them.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_waiting: int = 256
    max_body_bytes: int = 8 * 2**20
    served_model_name: str | None = None
    shutdown_timeout: float = 5.0
    metrics_require_key: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        if not 0.0 <= self.shutdown_timeout < float("inf"):
            raise ValueError(f"shutdown_timeout must be a finite number of seconds >= 0, got {self.shutdown_timeout}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """From `kvos serve` flags; without --api-key, one key may come from KVOS_API_KEY."""
        env_key = os.environ.get(_API_KEY_ENV)
        return cls(
            host=args.host,
            port=args.port,
            api_keys=tuple(args.api_key or ()) or ((env_key,) if env_key else ()),
            max_waiting=args.max_waiting,
            max_body_bytes=args.max_body_bytes,
            served_model_name=args.served_model_name,
            shutdown_timeout=args.shutdown_timeout,
            metrics_require_key=args.metrics_require_key,
        )


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """`kvos serve` flags; defaults come from `ServerConfig` so the two cannot disagree."""
    defaults = ServerConfig()
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument(
        "--api-key",
        action="append",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (or set {_API_KEY_ENV}); repeat for several callers",
    )
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=defaults.max_waiting,
        help="requests queued beyond the free running slots before answering 429",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=defaults.max_body_bytes, help="request body limit (413 beyond)"
    )
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: the model's name)")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=defaults.shutdown_timeout,
        help="seconds running requests may finish after SIGTERM before they are cut",
    )
    parser.add_argument(
        "--metrics-require-key", action="store_true", help="with an API key, require it on /metrics too"
    )
