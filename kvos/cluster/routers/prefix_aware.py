"""Prefix-aware: the instance that already holds the longest prefix of the prompt, unless it is overloaded.

Every instance reports the KV blocks it stores and evicts (KV events, by
stable digest), so the cluster core knows which instance holds which prefix
without asking. A cached prefix saves its prefill, but sending every turn of
a popular prefix to one instance would pile them up there: an instance whose
freeness is below `overload_steps` decode steps is passed over, and the
request goes to the least-loaded instance instead. With no prefix cached
anywhere, this is least-load.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvos.cluster.routers import InstanceView, least_loaded
from kvos.core.request import Request


class PrefixAwareRouter:
    wants_prefix = True

    def __init__(self, overload_steps: float) -> None:
        self.overload_steps = overload_steps

    def choose(self, request: Request, views: Sequence[InstanceView]) -> int:
        usable = [v for v in views if v.load.freeness >= self.overload_steps]
        best = max(usable, key=lambda v: (v.cached_prefix_blocks, v.load.freeness), default=None)
        if best is None or best.cached_prefix_blocks == 0:
            return least_loaded(views).instance_id
        return best.instance_id

    def forget(self, instance_id: int) -> None:
        """Stateless: the cluster core drops a dead instance's blocks."""

    def moved(self, request: Request, instance_id: int) -> None:
        """Stateless: the moved blocks reach the cluster core as KV events."""
