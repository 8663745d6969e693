"""`ClusterEngine`: the `EngineClient` the server gets when it serves a cluster.

It is the in-process `AsyncLLMEngine` (streams, back-pressure, graceful
shutdown) over an `LLMEngine` whose core is a `ClusterCore`: the front end
(tokenizer, detokenizer, stop strings) runs once, in the server's process,
and only token ids go to the instances. So the server code is the same for
one engine and for many, and a failed-over request keeps its detokenizer
state: its text goes on exactly where the client's left off.
"""

from __future__ import annotations

from typing import Any

from kvos.cluster.cluster_core import ClusterCore, cluster_core_factory
from kvos.cluster.config import ClusterConfig
from kvos.config import EngineConfig
from kvos.engine.async_engine import AsyncLLMEngine
from kvos.engine.llm_engine import LLMEngine


class ClusterEngine(AsyncLLMEngine):
    """An `EngineClient` over engine instances on Ray, with the admin calls to add and drain them."""

    def __init__(self, config: EngineConfig, cluster: ClusterConfig, max_waiting: int | None = None) -> None:
        engine = LLMEngine(config, core_factory=cluster_core_factory(cluster))
        super().__init__(engine, max_waiting)
        core = engine.core
        assert isinstance(core, ClusterCore)
        self.cluster = core

    def add_instance(self) -> int:
        """Start another instance; returns its id (it takes requests once loaded)."""
        return self.cluster.add_instance()

    def drain_instance(self, instance_id: int) -> int:
        """Move an instance's requests to the others and stop it; returns how many moved."""
        return self.cluster.drain_instance(instance_id)

    def instances(self) -> list[dict[str, Any]]:
        return self.cluster.instances()
