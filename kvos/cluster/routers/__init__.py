"""Routers: which instance serves a new request. One file per policy, behind `Router`.

The cluster core hands a router the request (token ids, tenant, salt) and a
view of every instance that may take work (healthy, not draining): its load
as Llumnix measures it, and how many leading blocks of the request's prompt
it holds in its prefix cache (known from the instances' KV events and the
stable block identity, so no instance is asked). The router returns one
instance id. It keeps only its own policy state (a cursor, a session table).
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol

from kvos.cluster.config import ClusterConfig
from kvos.cluster.instance import InstanceLoad
from kvos.core.request import Request
from kvos.memory.block_hash import BlockHash


@dataclass(frozen=True)
class InstanceView:
    """One routable instance as the router sees it."""

    instance_id: int
    load: InstanceLoad
    """As last reported, plus what was routed to it since (not yet in a report)."""
    cached_prefix_blocks: int = 0
    """Leading full blocks of the request's prompt this instance holds (prefix-aware routing only)."""


class Router(Protocol):
    wants_prefix: bool
    """Whether `choose` reads `cached_prefix_blocks` (it costs a digest per prompt block to fill)."""

    def choose(self, request: Request, views: Sequence[InstanceView]) -> int:
        """The id of the instance to serve `request`; `views` is never empty."""
        ...

    def forget(self, instance_id: int) -> None:
        """The instance died or left: drop any state that points at it."""
        ...

    def moved(self, request: Request, instance_id: int) -> None:
        """`request` migrated to `instance_id` (its KV, and the hold it leaves when it ends, are there now)."""
        ...


def least_loaded(views: Sequence[InstanceView]) -> InstanceView:
    """The view with the most freeness (ties: fewest running, then lowest id)."""
    return max(views, key=lambda v: (v.load.freeness, -v.load.num_running - v.load.num_waiting, -v.instance_id))


def leading_blocks(digests: Sequence[BlockHash], cached: AbstractSet[BlockHash]) -> int:
    """How many of a prompt's block digests, from its first, an instance's prefix cache holds (`cached`)."""
    count = 0
    for digest in digests:
        if digest not in cached:
            break
        count += 1
    return count


def make_router(config: ClusterConfig) -> Router:
    from kvos.cluster.routers.least_load import LeastLoadRouter
    from kvos.cluster.routers.prefix_aware import PrefixAwareRouter
    from kvos.cluster.routers.round_robin import RoundRobinRouter
    from kvos.cluster.routers.session import SessionRouter

    if config.router == "round-robin":
        return RoundRobinRouter()
    if config.router == "least-load":
        return LeastLoadRouter()
    if config.router == "prefix-aware":
        return PrefixAwareRouter(config.prefix_overload_steps)
    return SessionRouter()
