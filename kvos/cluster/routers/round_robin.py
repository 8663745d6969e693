"""Round-robin: each new request goes to the next instance in id order, whatever their load."""

from __future__ import annotations

from collections.abc import Sequence

from kvos.cluster.routers import InstanceView
from kvos.core.request import Request


class RoundRobinRouter:
    wants_prefix = False

    def __init__(self) -> None:
        self._last = -1

    def choose(self, request: Request, views: Sequence[InstanceView]) -> int:
        ids = sorted(v.instance_id for v in views)
        chosen = next((i for i in ids if i > self._last), ids[0])
        self._last = chosen
        return chosen

    def forget(self, instance_id: int) -> None:
        """Nothing to drop: the cursor is an id, and the next pick skips missing ones."""

    def moved(self, request: Request, instance_id: int) -> None:
        """The cursor does not care where requests run."""
