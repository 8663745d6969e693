"""N engine instances on Ray behind one router, answering the calls `LLMEngine` makes of its core.

    LLMEngine (front end: tokenizer, detokenizer, stop strings, n > 1)    <- unchanged
        |  add_request(Request) / abort_request(id) / step() -> [SequenceUpdate]
    ClusterCore (this file: the router)
        |  Router.choose(request, views) picks an instance per new request
        |  add.remote / abort.remote / step.remote, one step in flight per busy instance
    EngineInstance actors (kvos/cluster/instance.py): an EngineCore each, in its own process

Streaming: the router keeps one `step` call in flight per instance that has
work and folds each answer's `SequenceUpdate`s into the stream of the step
it returns from `step()`. Polling the instances this way (rather than one
Ray streaming generator per request) costs one call per instance per engine
step whatever the batch size, keeps every token a client is sent passing
through one place (the router knows exactly what each client has), and makes
a dead instance show up as one failed call.

Failover: a failed `step` call means the instance's process died. Each of
its requests is re-added to a healthy instance as a new core `Request` whose
`output_token_ids` are the tokens already sent to the client; the core
recomputes their KV (like a preemption) and samples the next token, so the
stream goes on with no token repeated or missing. Ray restarts the actor
(`max_restarts`); the router sends it nothing until it answers again.

Thread safety: `LLMEngine` calls come from the engine thread; the admin calls
(`add_instance`, `drain_instance`, `instances`) from the server's event
loop. One lock guards the books; it is not held while waiting on Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import ray
from ray.exceptions import RayActorError

from kvos.cluster.config import ClusterConfig
from kvos.cluster.instance import EngineInstance, InstanceInfo, InstanceLoad, StepReport, instance_config
from kvos.cluster.migration import InstanceDied, MigrationResult, migrate, rebalance_move
from kvos.cluster.routers import InstanceView, leading_blocks, make_router
from kvos.cluster.stats import merge_stats
from kvos.config import EngineConfig
from kvos.core.engine_core import check_fits, check_logit_bias, check_request
from kvos.core.plan import SequenceUpdate
from kvos.core.request import Request, RequestStatus
from kvos.engine.stats import EngineStats
from kvos.errors import EngineUnavailableError, InvalidRequestError
from kvos.memory.block_allocator import BlockRemoved, BlockStored
from kvos.memory.block_hash import BlockHash, chain_hashes, salted_root

logger = logging.getLogger(__name__)

WAIT_S = 0.02
"""How long one `step()` waits for an instance's answer before returning (so commands are not delayed)."""

PING_RETRY_S = 0.5
"""How soon an instance that failed a health check is asked again."""

NO_INSTANCE = "no healthy engine instance could take over this request"

CLOSE_S = 60.0
"""How long stopping instances waits for them to close cleanly (writing their cached KV to a disk tier)."""

InstanceState = Literal["starting", "healthy", "restarting", "draining", "dead"]
Role = Literal["both", "prefill", "decode"]


@dataclass
class _Instance:
    instance_id: int
    handle: Any
    role: Role = "both"
    """What it serves: everything, or (disaggregated) prompts only or decoding only."""
    state: InstanceState = "starting"
    info: InstanceInfo | None = None
    load: InstanceLoad | None = None
    stats: EngineStats | None = None
    live: set[str] = field(default_factory=set)
    """Sequences this instance serves, as the router sees it."""
    cached: set[BlockHash] = field(default_factory=set)
    """Digests of the blocks in its prefix cache (from its KV events)."""
    routed_tokens: int = 0
    routed_requests: int = 0
    """Routed to it since its last report: not yet in `load`."""
    step_ref: Any = None
    ping_ref: Any = None
    ping_after: float = 0.0
    down_since: float = 0.0
    restarts: int = 0

    def view_load(self) -> InstanceLoad:
        return (self.load or InstanceLoad(0, 0, 0, 0)).plus_routed(self.routed_tokens, self.routed_requests)


@dataclass
class _Sequence:
    request: Request
    """As the front end handed it over; never mutated here."""
    instance_id: int
    delivered: list[int] = field(default_factory=list)
    """Tokens already returned from `step()` (what the client has, or will have)."""
    orphaned_at: float | None = None
    """When it lost its instance and started waiting for another (None: placed)."""
    migrating: bool = False
    handed_off: bool = False
    """Disaggregation: its move to a decode instance was tried (it is not tried twice)."""


def connect(cluster: ClusterConfig) -> bool:
    """Join `ray_address`, or start a local Ray runtime in this process; True if this call connected."""
    if ray.is_initialized():
        return False
    if cluster.ray_address is not None:
        ray.init(address=cluster.ray_address, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, cluster.instances * cluster.num_threads)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


class ClusterCore:
    """Routes requests over engine instances and keeps each request alive across instance failures."""

    def __init__(self, config: EngineConfig, cluster: ClusterConfig, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        self.cluster = cluster
        self._eos_token_ids = eos_token_ids
        self._owns_ray = connect(cluster)
        self._actor: Any = ray.remote(EngineInstance)
        self.router = make_router(cluster)
        self._lock = threading.RLock()
        self._instances: dict[int, _Instance] = {}
        self._sequences: dict[str, _Sequence] = {}
        self._next_id = 0
        self._closed = False
        self.num_resumed = 0
        """Requests re-added elsewhere (recomputed) after their instance died or was drained."""
        self.migrations: list[MigrationResult] = []
        """Every live migration tried, in order (the benchmark and tests read them)."""
        self._pending_updates: list[SequenceUpdate] = []
        """Tokens a migration's commit found the router had not yet heard of: returned by the next `step()`."""
        self._next_rebalance = 0.0
        self._rebalancer: threading.Thread | None = None
        try:
            prefill: list[Role] = ["prefill"]
            decode: list[Role] = ["decode"]
            both: list[Role] = ["both"]
            roles = (
                prefill * cluster.prefill_instances + decode * cluster.decode_instances
                if cluster.disaggregated
                else both * cluster.instances
            )
            for role in roles:
                self._spawn(role)
            infos = ray.get([inst.ping_ref for inst in self._instances.values()])
        except Exception:
            self.close()
            raise
        for inst, info in zip(self._instances.values(), infos):
            self._mark_healthy(inst, info)
        first: InstanceInfo = infos[0]
        self.max_model_len = first.max_model_len
        self.vocab_size = first.vocab_size
        self._max_tokens_per_request = first.max_tokens_per_request
        self.capacity_tokens = first.capacity_tokens
        """Tokens one instance's KV cache holds (requests never span instances)."""
        self._block_size = first.block_size
        self._kv_root = first.kv_root

    # -- instances ----------------------------------------------------------------------

    def _spawn(self, role: Role) -> _Instance:
        instance_id = self._next_id
        self._next_id += 1
        threads = self.cluster.num_threads
        handle: Any = self._actor.options(max_restarts=self.cluster.max_restarts, num_cpus=threads).remote(
            instance_config(self.config, instance_id), self._eos_token_ids, threads
        )
        inst = _Instance(instance_id, handle, role)
        inst.ping_ref = handle.info.remote()
        self._instances[instance_id] = inst
        return inst

    def _mark_healthy(self, inst: _Instance, info: InstanceInfo) -> None:
        inst.info = info
        inst.load = info.load
        inst.stats = info.stats
        inst.cached.clear()
        inst.routed_tokens = inst.routed_requests = 0
        inst.ping_ref = None
        if inst.state in ("starting", "restarting"):
            inst.state = "healthy"
            logger.info("engine instance %d is healthy", inst.instance_id)

    def add_instance(self) -> int:
        """Start one more instance (disaggregated: a decode instance); it serves once loaded (see `instances()`)."""
        with self._lock:
            if self._closed:
                raise EngineUnavailableError("the cluster is shut down")
            return self._spawn("decode" if self.cluster.disaggregated else "both").instance_id

    def drain_instance(self, instance_id: int) -> int:
        """Take an instance out: its requests move to the others, then it stops. Returns how many moved.

        Each request migrates live (its KV copied, see `migration.py`); one
        that cannot (no room anywhere, it ended meanwhile) is recomputed on
        another instance from the tokens already sent. Raises ValueError for
        an unknown id or the last instance that can serve.
        """
        with self._lock:
            inst = self._instances.get(instance_id)
            if inst is None or inst.state == "draining":
                raise InvalidRequestError(f"no engine instance {instance_id}", "instance_id")
            others = [i for i in self._instances.values() if i is not inst and i.state in ("healthy", "starting")]
            if not others:
                raise InvalidRequestError(
                    f"engine instance {instance_id} is the last one; add another before draining it", "instance_id"
                )
            was_healthy = inst.state == "healthy"
            inst.state = "draining"
            moving = sorted(inst.live)
        if was_healthy:
            for seq_id in moving:
                self.migrate(seq_id)
        with self._lock:
            for seq_id in sorted(inst.live):
                inst.handle.abort.remote(seq_id)
                self._orphan(self._sequences[seq_id])
            inst.live.clear()
            self._remove(inst)
            self._place_orphans()
        _stop([inst])  # outside the lock: a clean close may write its cached KV to disk for a while
        logger.info("engine instance %d removed", inst.instance_id)
        return len(moving)

    # -- live migration -------------------------------------------------------------------

    def migrate(self, req_id: str, destination_id: int | None = None) -> MigrationResult | None:
        """Move a running request to `destination_id` (default: the instance with the most freeness).

        Blocks until done; None when there is nothing to do (unknown or
        already migrating request, no other healthy instance).
        """
        with self._lock:
            seq = self._sequences.get(req_id)
            if seq is None or seq.migrating or seq.orphaned_at is not None:
                return None
            source = self._instances[seq.instance_id]
            # Disaggregated: requests decode on decode instances; otherwise any instance serves.
            roles: tuple[Role, ...] = ("decode",) if source.role != "both" else ("both",)
            candidates = [i for i in self._routable(roles) if i is not source]
            if destination_id is not None:
                candidates = [i for i in candidates if i.instance_id == destination_id]
            if not candidates:
                return None
            destination = max(candidates, key=lambda i: i.view_load().freeness)
            seq.migrating = True
            request = replace(seq.request, output_token_ids=list(seq.delivered), fork_of=None)

        def on_commit(state: Request) -> bool:
            """Switch the stream to the destination (called with the lock held)."""
            current = self._sequences.get(req_id)
            if current is not seq or seq.instance_id != source.instance_id or seq.orphaned_at is not None:
                return False
            new = state.output_token_ids[len(seq.delivered) :]
            if new:
                seq.delivered.extend(new)
                self._pending_updates.append(SequenceUpdate(req_id, list(new), [], state.num_cached_tokens))
            source.live.discard(req_id)
            destination.live.add(req_id)
            seq.instance_id = destination.instance_id
            if destination.role != "decode":  # a hand-off's decode instance takes no new requests to route
                self.router.moved(state, destination.instance_id)
            return True

        try:
            result = migrate(
                self._call, source.handle, destination.handle, request, request.num_tokens, on_commit, self._lock
            )
        finally:
            with self._lock:
                seq.migrating = False
        logger.info(
            "migration of %s from instance %d to %d: %s (%d stages, %d blocks, %.1f ms stopped)",
            req_id,
            source.instance_id,
            destination.instance_id,
            result.outcome,
            result.stages,
            result.blocks_copied,
            result.downtime_s * 1e3,
        )
        with self._lock:
            self.migrations.append(result)
        return result

    def _hand_off(self, seq: _Sequence) -> None:
        """Disaggregation: the prompt is computed; move the request's KV to a decode instance.

        In the background (the router keeps stepping); if no decode instance
        takes it, it decodes where it is.
        """
        seq.handed_off = True
        threading.Thread(target=self.migrate, args=(seq.request.req_id,), name="kvos-handoff", daemon=True).start()

    @staticmethod
    def _call(handle: Any, method: str, *args: Any) -> Any:
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except RayActorError as exc:
            raise InstanceDied(str(exc)) from exc

    def _maybe_rebalance(self) -> None:
        """Llumnix's load balancing: past a freeness gap, move the shortest request off the fullest instance."""
        gap = self.cluster.migration_freeness_gap
        now = time.monotonic()
        if gap is None or now < self._next_rebalance:
            return
        self._next_rebalance = now + self.cluster.migration_interval_s
        if self._rebalancer is not None and self._rebalancer.is_alive():
            return
        roles: tuple[Role, ...] = ("decode",) if self.cluster.disaggregated else ("both",)
        routable = [i for i in self._routable(roles) if i.load is not None]

        def movable(inst: _Instance) -> list[tuple[_Sequence, int]]:
            seqs = [self._sequences[s] for s in inst.live if not self._sequences[s].migrating]
            return [(s, s.request.num_prompt_tokens + len(s.delivered)) for s in seqs]

        move = rebalance_move([(i, i.view_load().freeness) for i in routable], movable, gap)
        if move is None:
            return
        shortest, _, freest = move
        self._rebalancer = threading.Thread(
            target=self.migrate,
            args=(shortest.request.req_id, freest.instance_id),
            name="kvos-rebalance",
            daemon=True,
        )
        self._rebalancer.start()

    def _remove(self, inst: _Instance) -> None:
        """Route to the instance no more (the caller then stops it)."""
        self._instances.pop(inst.instance_id, None)
        self.router.forget(inst.instance_id)

    def instances(self) -> list[dict[str, Any]]:
        """Each instance's id, state, requests and load, for the admin route."""
        with self._lock:
            self._check_health()
            return [
                {
                    "id": inst.instance_id,
                    "role": inst.role,
                    "state": inst.state,
                    "requests": len(inst.live),
                    "freeness": inst.view_load().freeness if inst.load is not None else None,
                    "restarts": inst.restarts,
                }
                for inst in self._instances.values()
            ]

    def _routable(self, roles: tuple[Role, ...] = ("both", "prefill")) -> list[_Instance]:
        """Healthy instances of these roles (by default: those that take new requests)."""
        return [inst for inst in self._instances.values() if inst.state == "healthy" and inst.role in roles]

    def _check_health(self) -> None:
        """Collect answered health checks; ask again where one failed (no waiting)."""
        now = time.monotonic()
        for inst in list(self._instances.values()):
            if inst.state not in ("starting", "restarting"):
                continue
            if inst.ping_ref is None:
                if now >= inst.ping_after:
                    inst.ping_ref = inst.handle.info.remote()
                continue
            ready, _ = ray.wait([inst.ping_ref], timeout=0)
            if not ready:
                continue
            try:
                info = ray.get(inst.ping_ref)
            except RayActorError:
                # Restarting (Ray reloads it) or dead for good (restarts used up): the same error
                # until it answers, so give it as long as a request may wait for an instance.
                inst.ping_ref = None
                inst.ping_after = now + PING_RETRY_S
                if now - inst.down_since > self.cluster.failover_timeout_s:
                    inst.state = "dead"
                    logger.error("engine instance %d is dead for good", inst.instance_id)
                continue
            self._mark_healthy(inst, info)

    # -- requests -------------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        check_request(prompt_token_ids, max_tokens, self.vocab_size, self.max_model_len, self._check_fits)

    def _check_fits(self, num_tokens: int) -> None:
        check_fits(num_tokens, self._max_tokens_per_request, self.capacity_tokens)

    def add_request(self, request: Request) -> None:
        self.check_request(request.prompt_token_ids, request.params.max_tokens)
        check_logit_bias(request, self.vocab_size)
        with self._lock:
            if self._closed:
                raise EngineUnavailableError("the cluster is shut down")
            self._check_health()
            parent = self._sequences.get(request.fork_of or "")
            if parent is not None and parent.orphaned_at is None:
                target: _Instance | None = self._instances[parent.instance_id]
            else:
                request = replace(request, fork_of=None) if request.fork_of is not None else request
                target = self._choose(request)
            if target is None:
                raise EngineUnavailableError("no engine instance is healthy")
            self._send(_Sequence(request, target.instance_id), target)

    def _choose(self, request: Request) -> _Instance | None:
        routable = self._routable()
        if not routable:
            return None
        digests = self._prompt_digests(request) if self.router.wants_prefix else []
        views = [
            InstanceView(inst.instance_id, inst.view_load(), leading_blocks(digests, inst.cached)) for inst in routable
        ]
        return self._instances[self.router.choose(request, views)]

    def _prompt_digests(self, request: Request) -> list[BlockHash]:
        if self._kv_root is None:
            return []
        return chain_hashes(salted_root(self._kv_root, request.cache_salt), request.all_token_ids, self._block_size)

    def _send(self, seq: _Sequence, inst: _Instance) -> None:
        request = seq.request
        if seq.delivered:
            # Resume from what the client has: the core recomputes this KV and samples the next token.
            request = replace(
                request,
                output_token_ids=list(seq.delivered),
                fork_of=None,
                num_computed_tokens=0,
                num_cached_tokens=0,
                num_swapped_tokens=0,
                status=RequestStatus.WAITING,
            )
        seq.instance_id = inst.instance_id
        seq.orphaned_at = None
        self._sequences[request.req_id] = seq
        inst.live.add(request.req_id)
        inst.routed_tokens += request.num_tokens
        inst.routed_requests += 1
        inst.handle.add.remote(request)

    def abort_request(self, req_id: str) -> None:
        with self._lock:
            seq = self._sequences.pop(req_id, None)
            if seq is None or seq.orphaned_at is not None:
                return
            inst = self._instances.get(seq.instance_id)
            if inst is not None and req_id in inst.live:
                inst.live.discard(req_id)
                if inst.state in ("healthy", "draining"):
                    inst.handle.abort.remote(req_id)

    def release_session(self, key: str) -> None:
        """A session's hold lives on the instances that ran its calls: tell every live one (unknown keys: no-op)."""
        with self._lock:
            for inst in self._instances.values():
                if inst.state in ("healthy", "draining"):
                    inst.handle.release_session.remote(key)

    def has_unfinished_requests(self) -> bool:
        return bool(self._sequences)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        """The updates of every instance step that ended since the last call (waits up to `WAIT_S`)."""
        with self._lock:
            self._check_health()
            updates, self._pending_updates = self._pending_updates, []
            updates += self._place_orphans()
            self._maybe_rebalance()
            in_flight: dict[Any, _Instance] = {}
            for inst in self._instances.values():
                if inst.state not in ("healthy", "draining"):
                    continue
                if inst.step_ref is None and inst.live:
                    inst.step_ref = inst.handle.step.remote()
                if inst.step_ref is not None:
                    in_flight[inst.step_ref] = inst
        if not in_flight:
            if not updates:
                time.sleep(WAIT_S)  # only orphans waiting for an instance
            return updates
        refs = list(in_flight)
        ready, rest = ray.wait(refs, num_returns=1, timeout=WAIT_S)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        with self._lock:
            for ref in ready:
                inst = in_flight[ref]
                if self._instances.get(inst.instance_id) is not inst or inst.step_ref is not ref:
                    continue  # drained while we waited
                inst.step_ref = None
                try:
                    report: StepReport = ray.get(ref)
                except RayActorError:
                    self._fail_over(inst)
                    continue
                updates += self._apply(inst, report)
            updates += self._place_orphans()
        return updates

    def _apply(self, inst: _Instance, report: StepReport) -> list[SequenceUpdate]:
        inst.load = report.load
        inst.stats = report.stats
        inst.routed_tokens = inst.routed_requests = 0
        for event in report.kv_events:
            if isinstance(event, BlockStored):
                inst.cached.add(event.block_hash)
            elif isinstance(event, BlockRemoved):
                inst.cached.discard(event.block_hash)
        updates = []
        for update in report.updates:
            seq = self._sequences.get(update.req_id)
            if seq is None or seq.instance_id != inst.instance_id or seq.orphaned_at is not None:
                continue  # aborted, or moved elsewhere while this step ran
            seq.delivered.extend(update.new_token_ids)
            if update.finish_reason is not None:
                del self._sequences[update.req_id]
                inst.live.discard(update.req_id)
            elif inst.role == "prefill" and seq.delivered and not seq.handed_off and not seq.migrating:
                self._hand_off(seq)
            updates.append(update)
        for req_id in report.running:
            if req_id not in inst.live:
                inst.handle.abort.remote(req_id)  # not ours there (any more): free it
        return updates

    def _fail_over(self, inst: _Instance) -> None:
        """The instance's process died: resume its requests elsewhere and wait for Ray to restart it."""
        logger.warning("engine instance %d died; resuming its %d requests elsewhere", inst.instance_id, len(inst.live))
        inst.state = "restarting"
        inst.restarts += 1
        inst.step_ref = None
        inst.cached.clear()
        inst.ping_ref = None
        inst.ping_after = 0.0
        inst.down_since = time.monotonic()
        self.router.forget(inst.instance_id)
        for seq_id in sorted(inst.live):
            self._orphan(self._sequences[seq_id])
        inst.live.clear()

    def _orphan(self, seq: _Sequence) -> None:
        seq.orphaned_at = time.monotonic()
        self.num_resumed += 1
        if seq.request.fork_of is not None:  # its parent may land elsewhere: compute the prompt itself
            seq.request = replace(seq.request, fork_of=None)

    def _place_orphans(self) -> list[SequenceUpdate]:
        """Re-add requests that lost their instance; fail those that waited too long for one."""
        updates = []
        now = time.monotonic()
        # One still migrating waits for its migration to give up (it cancels the destination's reservation).
        for seq in [s for s in self._sequences.values() if s.orphaned_at is not None and not s.migrating]:
            target = self._choose(seq.request)
            if target is not None:
                self._send(seq, target)
            elif now - (seq.orphaned_at or now) > self.cluster.failover_timeout_s:
                req_id = seq.request.req_id
                del self._sequences[req_id]
                updates.append(SequenceUpdate(req_id, [], [], 0, "abort", None, NO_INSTANCE))
        return updates

    # -- observation ---------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            return merge_stats([inst.stats for inst in self._instances.values() if inst.stats is not None])

    def instance_stats(self) -> dict[int, EngineStats]:
        """Each instance's counters as of its last report (tests assert every one frees its KV)."""
        with self._lock:
            return {i: inst.stats for i, inst in self._instances.items() if inst.stats is not None}

    def refresh(self, timeout: float = 10.0) -> None:
        """Ask every healthy instance for its state now (idle instances send no reports)."""
        with self._lock:
            healthy = [inst for inst in self._instances.values() if inst.state == "healthy"]
            refs = [inst.handle.info.remote() for inst in healthy]
        infos = ray.get(refs, timeout=timeout)
        with self._lock:
            for inst, info in zip(healthy, infos):
                inst.stats = info.stats
                inst.load = info.load

    def close(self) -> None:
        """Stop every instance (and the Ray runtime this process started). Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _stop(list(self._instances.values()))
            self._instances.clear()
        if self._owns_ray:
            ray.shutdown()


def _stop(instances: list[_Instance]) -> None:
    """Close the instances cleanly, together (a dead or stuck one is waited for `CLOSE_S` at most), then end
    their processes."""
    refs = []
    for inst in instances:
        try:
            refs.append(inst.handle.close.remote())
        except Exception:  # already gone: nothing to close
            logger.debug("engine instance %d was already gone", inst.instance_id)
    if refs:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=CLOSE_S)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # it died or failed to close: its cached KV stays unwritten, the rest goes on
                logger.warning("an engine instance did not close cleanly", exc_info=True)
    for inst in instances:
        try:
            ray.kill(inst.handle, no_restart=True)
        except Exception:  # already gone: nothing to stop
            logger.debug("engine instance %d was already gone", inst.instance_id)


def cluster_core_factory(cluster: ClusterConfig) -> Callable[[EngineConfig, Any, frozenset[int]], ClusterCore]:
    """What `LLMEngine(core_factory=...)` takes: build the cluster in place of a local core."""

    def build(config: EngineConfig, loaded: Any, eos_token_ids: frozenset[int]) -> ClusterCore:
        return ClusterCore(config, cluster, eos_token_ids)

    return build
