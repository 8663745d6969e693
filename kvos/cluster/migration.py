"""Live migration of one running request between two instances (Llumnix's protocol).

    destination                      source                          router
    -----------                      ------                          ------
    migration_reserve(n tokens)  <-- blocks for the request first (none: give up, nothing changed)
                                     migration_snapshot(k)  stage: full blocks [k, computed/B) while it decodes
    migration_import(chunk)      <-- copy them in; k += copied; repeat while a stage copies more than
                                     FINAL_STAGE_BLOCKS (or until MAX_STAGES)
                                     migration_suspend(k)   stop it, keep its KV; the rest (partial block too)
    migration_commit(state, rest) <- copy the rest, resume it there (fails: source resumes, nothing lost)
                                                                     switch the stream over (on_commit)
                                     migration_release      only now the source frees its copy

KV travels as `KVChunk`s: the return value of one actor call passed to the
next, so Ray moves it through its object store (shared memory between
processes of one machine, the network between machines). The downtime is
the time from `migration_suspend` to the end of `migration_commit`: one last
stage of a few blocks, whatever the context length.

Every failure path ends with both sides as before: the destination can't
reserve (nothing changed), the request ended or was aborted mid-migration
(snapshot or suspend finds it gone; the destination's reservation is
cancelled), the destination died (the source resumes it), the source died
(the destination's reservation is cancelled; failover recomputes the
request elsewhere).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from kvos.core.migration import KVChunk
from kvos.core.request import Request

logger = logging.getLogger(__name__)

MAX_STAGES = 8
"""Stages copied while the request runs, at most (it may outrun the copy on a slow link)."""

FINAL_STAGE_BLOCKS = 2
"""A stage that copied this few blocks (or fewer) ends the staging: the rest is about as few."""

RESERVE_HEADROOM_TOKENS = 64
"""Reserved beyond the request's current length, for the tokens it decodes while staged."""

Call = Callable[..., Any]
"""`call(instance, method_name, *args)`: run a method on an instance and return its result (raises if it died)."""

Outcome = Literal["migrated", "no_room", "ended", "aborted", "source_died", "destination_died"]


class InstanceDied(Exception):
    """A call failed because the instance's process is gone (the caller maps its own errors to this)."""


@dataclass(frozen=True)
class MigrationResult:
    outcome: Outcome
    stages: int = 0
    blocks_copied: int = 0
    downtime_s: float = 0.0
    """From stopping the request on the source to its resumption on the destination."""


K = TypeVar("K")
R = TypeVar("R")


def rebalance_move(
    freeness: Sequence[tuple[K, float]], movable: Callable[[K], Iterable[tuple[R, int]]], gap: float
) -> tuple[R, K, K] | None:
    """Llumnix's load balancing: (request, from, to) to move now, or None.

    `freeness` lists each instance's freeness (decode steps its KV lasts,
    `InstanceLoad.freeness`). When the freest and the fullest differ by at
    least `gap`, the shortest request of the fullest (`movable` gives each
    of its requests with its length in tokens, those already moving left
    out) goes to the freest. Ties go to the first listed.
    """
    if len(freeness) < 2:
        return None
    fullest = min(freeness, key=lambda item: item[1])
    freest = max(freeness, key=lambda item: item[1])
    if freest[1] - fullest[1] < gap:
        return None
    shortest = min(movable(fullest[0]), key=lambda item: item[1], default=None)
    if shortest is None:
        return None
    return shortest[0], fullest[0], freest[0]


Step = tuple[Any, str, tuple[Any, ...]]
"""One call of the protocol: (instance, method name, arguments)."""


def migrate(
    call: Call,
    source: Any,
    destination: Any,
    request: Request,
    num_tokens: int,
    on_commit: Callable[[Request], bool],
    commit_guard: AbstractContextManager[Any] | None = None,
) -> MigrationResult:
    """Move `request` (now `num_tokens` long, running on `source`) to `destination`, one call after another.

    `on_commit(state)` switches the router over once the destination runs it;
    False means the request was aborted meanwhile (the destination then drops it).
    `commit_guard` is held from the commit through `on_commit`, so the router
    hears nothing from the destination about the request before it owns it there.
    """
    protocol = migration(source, destination, request, num_tokens, on_commit, commit_guard)
    reply: Any = None
    died: InstanceDied | None = None
    while True:
        try:
            instance, method, args = protocol.send(reply) if died is None else protocol.throw(died)
        except StopIteration as done:
            result: MigrationResult = done.value
            return result
        try:
            reply, died = call(instance, method, *args), None
        except InstanceDied as exc:
            reply, died = None, exc


def migration(
    source: Any,
    destination: Any,
    request: Request,
    num_tokens: int,
    on_commit: Callable[[Request], bool],
    commit_guard: AbstractContextManager[Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Generator[Step, Any, MigrationResult]:
    """The protocol as a generator: it yields each call and is sent its result (or thrown `InstanceDied`).

    `migrate` runs it on Ray actors, one blocking call after another; the
    simulator (`kvos.sim`) runs the same generator on its virtual clock,
    each call landing between two steps of its instance and the KV-carrying
    ones after a modelled transfer. `clock` times the downtime.
    """
    try:
        if not (yield destination, "migration_reserve", (request, num_tokens + RESERVE_HEADROOM_TOKENS)):
            return MigrationResult("no_room")
    except InstanceDied:
        return MigrationResult("destination_died")
    req_id = request.req_id
    copied = stages = 0

    def cancel(outcome: Outcome) -> Generator[Step, Any, MigrationResult]:
        try:
            yield destination, "migration_cancel", (req_id,)
        except InstanceDied:
            pass  # its reservation died with it
        return MigrationResult(outcome, stages, copied)

    # Stages: copy what was computed since the last stage while the request keeps decoding.
    while stages < MAX_STAGES:
        try:
            chunk: KVChunk | None = yield source, "migration_snapshot", (req_id, copied)
        except InstanceDied:
            return (yield from cancel("source_died"))
        if chunk is None:
            return (yield from cancel("ended"))
        stages += 1
        try:
            reserved = yield (
                destination,
                "migration_reserve",
                (request, chunk.num_computed_tokens + RESERVE_HEADROOM_TOKENS),
            )
            if not reserved:
                return (yield from cancel("no_room"))
            if chunk.num_blocks and not (yield destination, "migration_import", (req_id, chunk)):
                return (yield from cancel("no_room"))
        except InstanceDied:
            return (yield from cancel("destination_died"))
        copied += chunk.num_blocks
        if chunk.num_blocks <= FINAL_STAGE_BLOCKS:
            break
    # Stop it, copy the rest, resume it there.
    start = clock()
    try:
        final = yield source, "migration_suspend", (req_id, copied)
    except InstanceDied:
        return (yield from cancel("source_died"))
    if final is None:
        return (yield from cancel("ended"))
    state, rest = final
    with commit_guard or nullcontext():
        try:
            committed = yield destination, "migration_commit", (state, rest)
        except InstanceDied:
            committed = None
        owned = bool(committed) and on_commit(state)
    if not committed:
        try:
            yield source, "migration_resume_here", (req_id,)
        except InstanceDied:
            return (yield from cancel("source_died"))
        return (yield from cancel("destination_died" if committed is None else "no_room"))
    downtime = clock() - start
    copied += rest.num_blocks
    outcome: Outcome = "migrated"
    if not owned:
        outcome = "aborted"
        try:
            yield destination, "abort", (req_id,)
        except InstanceDied:
            pass
    try:
        yield source, "migration_release", (req_id,)
    except InstanceDied:
        pass  # its copy died with it
    return MigrationResult(outcome, stages + 1, copied, downtime)
