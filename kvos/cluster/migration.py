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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

from kvos.core.engine_core import KVChunk
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


def migrate(
    call: Call,
    source: Any,
    destination: Any,
    request: Request,
    num_tokens: int,
    on_commit: Callable[[Request], bool],
    commit_guard: AbstractContextManager[Any] | None = None,
) -> MigrationResult:
    """Move `request` (now `num_tokens` long, running on `source`) to `destination`.

    `on_commit(state)` switches the router over once the destination runs it;
    False means the request was aborted meanwhile (the destination then drops it).
    `commit_guard` is held from the commit through `on_commit`, so the router
    hears nothing from the destination about the request before it owns it there.
    """
    try:
        if not call(destination, "migration_reserve", request, num_tokens + RESERVE_HEADROOM_TOKENS):
            return MigrationResult("no_room")
    except InstanceDied:
        return MigrationResult("destination_died")
    req_id = request.req_id
    copied = stages = 0

    def cancel(outcome: Outcome) -> MigrationResult:
        try:
            call(destination, "migration_cancel", req_id)
        except InstanceDied:
            pass  # its reservation died with it
        return MigrationResult(outcome, stages, copied)

    # Stages: copy what was computed since the last stage while the request keeps decoding.
    while stages < MAX_STAGES:
        try:
            chunk: KVChunk | None = call(source, "migration_snapshot", req_id, copied)
        except InstanceDied:
            return cancel("source_died")
        if chunk is None:
            return cancel("ended")
        stages += 1
        try:
            reserved = call(
                destination, "migration_reserve", request, chunk.num_computed_tokens + RESERVE_HEADROOM_TOKENS
            )
            if not reserved:
                return cancel("no_room")
            if chunk.num_blocks and not call(destination, "migration_import", req_id, chunk):
                return cancel("no_room")
        except InstanceDied:
            return cancel("destination_died")
        copied += chunk.num_blocks
        if chunk.num_blocks <= FINAL_STAGE_BLOCKS:
            break
    # Stop it, copy the rest, resume it there.
    start = time.perf_counter()
    try:
        final = call(source, "migration_suspend", req_id, copied)
    except InstanceDied:
        return cancel("source_died")
    if final is None:
        return cancel("ended")
    state, rest = final
    with commit_guard or nullcontext():
        try:
            committed = call(destination, "migration_commit", state, rest)
        except InstanceDied:
            committed = None
        owned = bool(committed) and on_commit(state)
    if not committed:
        try:
            call(source, "migration_resume_here", req_id)
        except InstanceDied:
            return cancel("source_died")
        return cancel("destination_died" if committed is None else "no_room")
    downtime = time.perf_counter() - start
    copied += rest.num_blocks
    outcome: Outcome = "migrated"
    if not owned:
        outcome = "aborted"
        try:
            call(destination, "abort", req_id)
        except InstanceDied:
            pass
    try:
        call(source, "migration_release", req_id)
    except InstanceDied:
        pass  # its copy died with it
    return MigrationResult(outcome, stages + 1, copied, downtime)
