"""Live migration between simulated instances: the cluster's trigger and protocol on the virtual clock.

What runs unchanged: the trigger (`kvos.cluster.migration.rebalance_move`,
Llumnix's freeness gap, checked every `interval_s` as `ClusterCore` does),
the protocol (`kvos.cluster.migration.migration`, the generator that
`ClusterCore` drives over Ray), and every call's effect on the books
(`kvos.core.migration.MigrationEndpoint`, mixed into `SimInstance` as into
`EngineCore`). What the simulator supplies is time:

    protocol yields (instance, call)  --> due now, or after the link for a call that carries KV
    due: the instance is idle           --> the call runs at once
         it is in a step or a decode run --> it runs at the step boundary (a run is cut there),
                                            as a Ray actor takes a call between two steps
    the call's result goes back into the protocol, which yields the next call

A stage's blocks cross the link (`LinkModel`) between the source's
snapshot and the destination's import, so the request decodes on the
source meanwhile, and the next stage copies what it computed; the
downtime is the source's suspend to the destination's commit (the last,
short copy). The router hears of the move at the commit (`on_commit`).

Two triggers, as in the cluster: load balancing (`check`, every interval)
and disaggregation's hand-off (`hand_off`, when a prefill instance's
request has its first token).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kvos.cluster.config import ClusterConfig
from kvos.cluster.migration import MigrationResult, Step, migration, rebalance_move
from kvos.core.migration import KVChunk
from kvos.core.request import Request, RequestStatus
from kvos.sim.worker import SIM_TOKEN_ID, LinkModel

if TYPE_CHECKING:
    from kvos.sim.simulator import SimInstance

REBALANCE = -1
"""The index of a rebalance check's entry in the simulator's event heap (instances are 0 and up)."""
CALL = -2
"""The index of a migration call's entry; its third field is the migration's id."""

Entry = tuple[float, int, int]
"""An entry of the simulator's event heap: (when, instance index or REBALANCE or CALL, version or move id)."""

_CARRIES_KV = {"migration_import": 1, "migration_commit": 1}
"""Calls whose argument at this position is a `KVChunk`: they land after the link has carried it."""


@dataclass(frozen=True)
class MigrationConfig:
    """Llumnix's load balancing between instances (`kvos serve --migrate-on-imbalance GAP`)."""

    freeness_gap: float
    """Move a request when the freest and the fullest instance's freeness differ by this many decode steps."""
    interval_s: float = ClusterConfig.migration_interval_s
    """How often the gap is checked (`--migration-interval`)."""

    def __post_init__(self) -> None:
        if not self.freeness_gap > 0:
            raise ValueError(f"freeness_gap must be > 0, got {self.freeness_gap}")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")


@dataclass
class _Move:
    req_id: str
    protocol: Generator[Step, Any, MigrationResult]
    target: int
    method: str
    args: tuple[Any, ...]
    """The call the protocol waits on: to instance `target`."""


class Migrations:
    """The migrations of one simulated run: checks for imbalance, moves in flight, and their results.

    The simulator pushes the heap entries these methods return and calls
    back: `check` at a REBALANCE entry, `deliver` at a CALL entry, and
    `run_calls` at every step boundary of an instance, before its next step.
    """

    def __init__(
        self,
        config: MigrationConfig | None,
        link: LinkModel,
        instances: Sequence[SimInstance],
        balanced: range,
        block_size: int,
        on_commit: Callable[[Request, int, int], None],
    ) -> None:
        """`config`: load balancing among the instances in `balanced` (None: only hand-offs migrate).
        `on_commit(state, source, destination)`: the request now runs on the destination."""
        self.config = config
        self.link = link
        self.instances = instances
        self.balanced = balanced
        self.block_size = block_size
        self.on_commit = on_commit
        self.results: list[MigrationResult] = []
        self.moving: set[str] = set()
        """Requests in migration: not chosen again until it ends."""
        self._moves: dict[int, _Move] = {}
        self._ids = itertools.count()
        self._rebalancing: int | None = None
        """The rebalancing move in flight: one at a time, as the cluster runs one rebalancer thread."""
        self._index = {id(instance): j for j, instance in enumerate(instances)}
        self._now = 0.0

    @property
    def active(self) -> bool:
        return bool(self._moves)

    def check(self, now: float) -> list[Entry]:
        """`ClusterCore._maybe_rebalance` at `now`: maybe start a move; the entries to push (its first call)."""
        assert self.config is not None
        if self._rebalancing is not None:
            return []
        freeness = [(j, self.instances[j].view(j, [], now).load.freeness) for j in self.balanced]
        move = rebalance_move(freeness, lambda j: self._movable(j, now), self.config.freeness_gap)
        if move is None:
            return []
        (request, length), source, destination = move
        self._rebalancing = self.start(request, length, source, destination, now)
        return [(now, CALL, self._rebalancing)]

    def hand_off(self, request: Request, source: int, decode: range, now: float) -> list[Entry]:
        """Disaggregation: `request` has its first token on prefill instance `source`; move it to the decode
        instance with the most freeness (`ClusterCore._hand_off`). If none takes it, it decodes where it is."""
        freeness = [(j, self.instances[j].view(j, [], now).load.freeness) for j in decode]
        destination = max(freeness, key=lambda item: item[1])[0]
        length = request.num_prompt_tokens + len(request.output_token_ids)
        return [(now, CALL, self.start(request, length, source, destination, now))]

    def _movable(self, index: int, now: float) -> list[tuple[tuple[Request, int], int]]:
        """What the router knows to be on the instance at `now` (its queue and batch, arrivals not yet taken
        in), each with its length as last reported."""
        instance = self.instances[index]
        live = [r for r in instance.scheduler.requests.values() if r.status != RequestStatus.MIGRATING]
        live += instance.inbox
        lengths = ((r, r.num_prompt_tokens + instance.reported_outputs(r, now)) for r in live)
        return [((r, length), length) for r, length in lengths if r.req_id not in self.moving]

    def start(self, request: Request, num_tokens: int, source: int, destination: int, now: float) -> int:
        """Begin moving `request` (on `source`, `num_tokens` long as last reported); its first call is due
        at `now`. Returns the move's id."""
        move_id = next(self._ids)
        src, dst = self.instances[source], self.instances[destination]

        def committed(state: Request) -> bool:
            self.on_commit(state, source, destination)
            return True  # a simulated request is never aborted mid-move

        # The cluster core's copy: the request as the router knows it (the tokens it has heard of).
        outputs = num_tokens - request.num_prompt_tokens
        known = replace(request, output_token_ids=request.output_token_ids[:outputs], fork_of=None)
        known.output_token_ids += [SIM_TOKEN_ID] * (outputs - len(known.output_token_ids))
        protocol = migration(src, dst, known, num_tokens, committed, clock=lambda: self._now)
        self.moving.add(request.req_id)
        target, method, args = next(protocol)
        self._moves[move_id] = _Move(request.req_id, protocol, self._index[id(target)], method, args)
        return move_id

    def deliver(self, move_id: int, now: float) -> list[Entry]:
        """The move's call is due at `now`: run it if its instance is idle, else queue it for the step boundary."""
        index = self._moves[move_id].target
        instance = self.instances[index]
        entries: list[Entry] = []
        if instance.busy:
            instance.calls.append(move_id)
        else:
            entries = self._run(move_id, now)
            if len(instance.scheduler.requests) == instance.num_detached:
                return entries  # the call gave it nothing to step (no request attached or resumed)
        when = instance.take_work(now)
        return entries if when is None else [*entries, (when, index, instance.version)]

    def run_calls(self, index: int, now: float) -> list[Entry]:
        """The calls queued on instance `index`, between its step that ended at `now` and its next one."""
        entries: list[Entry] = []
        calls, self.instances[index].calls = self.instances[index].calls, []
        for move_id in calls:
            entries += self._run(move_id, now)
        return entries

    def _run(self, move_id: int, now: float) -> list[Entry]:
        """Run the move's call on its instance at `now` and hand the protocol the result."""
        move = self._moves[move_id]
        result = getattr(self.instances[move.target], move.method)(*move.args)
        self._now = now
        try:
            target, method, args = move.protocol.send(result)
        except StopIteration as done:
            self._finish(move_id, done.value)
            return []
        move.target, move.method, move.args = self._index[id(target)], method, args
        due = now
        position = _CARRIES_KV.get(method)
        if position is not None:
            chunk: KVChunk = args[position]
            due += self.link.seconds(chunk.num_blocks * self.block_size)
        return [(due, CALL, move_id)]

    def _finish(self, move_id: int, result: MigrationResult) -> None:
        self.moving.discard(self._moves.pop(move_id).req_id)
        self.results.append(result)
        if move_id == self._rebalancing:
            self._rebalancing = None
