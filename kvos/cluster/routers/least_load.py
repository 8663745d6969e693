"""Least-load: the instance with the most freeness (Llumnix), not the fewest requests.

Freeness counts what a request count misses: how long the requests already
there hold KV, and the demand of the head of the waiting queue, which gets
admitted before anything routed now (see `InstanceLoad.freeness`).
"""

from __future__ import annotations

from collections.abc import Sequence

from kvos.cluster.routers import InstanceView, least_loaded
from kvos.core.request import Request


class LeastLoadRouter:
    wants_prefix = False

    def choose(self, request: Request, views: Sequence[InstanceView]) -> int:
        return least_loaded(views).instance_id

    def forget(self, instance_id: int) -> None:
        """Stateless."""

    def moved(self, request: Request, instance_id: int) -> None:
        """Stateless."""
