"""Iteration-level scheduling: plans each step, and alone turns its output into progress.

    schedule()                      -> StepPlan  (who computes which tokens, where their KV lives, what to copy)
    update_from_output(plan, out)   -> progress, finishes (EOS, stop token ids, max_tokens, context), updates

One path for everything: each step has a token budget; running requests are
served first (a decode costs one token, a prompt chunk whatever budget is
left), then waiting requests are admitted in the policy's order while
budget, KV memory and `max_num_seqs` allow. A long prompt is thereby split
across steps (chunked prefill) and never stalls running decodes. When KV
memory runs out, the policy's victim is preempted: its KV is either swapped
to the host tier (when there is one and the preemption rule says so) and
loaded back when it resumes, or freed, to be recomputed (with prefix-cache
hits) later.

KV that comes back from the host tier (a swap-in, or a prefix the host tier
holds) is loaded off the step's critical path: when other requests compute
in the step, the resuming request is admitted as LOADING, its loads travel
as a `LoadRequestKV`, and it joins the running requests once the worker
reports them done (usually in the same step's output). It computes nothing
until then, and nobody else is admitted in that step: the blocks it was
given for its first chunk are marked as about to be written (the pending
prefix entries) and must not be found before it writes them. With nobody
else to compute, waiting would gain nothing: it loads and computes in one
step, as before. Which
request waits first, which is the victim, and whether a waiting request may
take a running one's sequence slot is the policy's (`kvos.core.policies`).

Sessions' holds (KV kept for a conversation's next call) give way first:
before any request is preempted or kept waiting for memory, the oldest hold
is released, and so on until the allocation fits or nothing is held; then
what waiting requests prefetched from the disk tier. A request of a session
leaves its KV held under the session's key when it ends.

n > 1 siblings are admitted here like everyone else, under the same budget
and sequence limit: once the first sequence has computed the prompt, a
sibling forks its KV (shared copy-on-write, or copied) for all prompt tokens
but the last, and computes that last one itself, so its first token is
sampled from its own logits row like any other request's. The fork's
copies run before the step's forward pass, so a first sequence resumed in
this very step (its prompt found in blocks the step may still be writing)
is forked from in the next one.
"""

from __future__ import annotations

from kvos.config import SchedulerConfig
from kvos.core.plan import (
    LoadRequestKV,
    NewRequestData,
    SaveToHost,
    ScheduledRequest,
    SequenceUpdate,
    StepOutput,
    StepPlan,
    TableUpdate,
)
from kvos.core.policies import SchedulingPolicy, make_policy
from kvos.core.request import Request, RequestStatus
from kvos.memory.kv_manager import (
    NO_CHANGE,
    HoldingKVCacheManager,
    KVAllocation,
    KVCacheManager,
    SwappingKVCacheManager,
)
from kvos.memory.tiers.swap import PreemptionRule

KV_LOAD_FAILED = "loading this request's KV from the host tier failed"
"""What a client hears when the copy of its swapped-out KV raised (the cause goes to the log)."""


class Scheduler:
    """Continuous batching over a KV cache manager, in the order of a scheduling policy."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        eos_token_ids: frozenset[int],
        max_model_len: int,
        preemption: PreemptionRule | None = None,
    ) -> None:
        """`preemption`: swap or recompute per victim (None: always recompute)."""
        self.config = config
        self.kv = kv_manager
        # What the manager offers, decided once: isinstance against a runtime-checkable Protocol re-collects
        # the Protocol's members on every call (about 40 us each in Python 3.11, a few times a step).
        self._swapping = kv_manager if isinstance(kv_manager, SwappingKVCacheManager) else None
        self._holding = kv_manager if isinstance(kv_manager, HoldingKVCacheManager) else None
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.waiting: SchedulingPolicy = make_policy(config)
        """The waiting queue: the policy keeps it in its order."""
        self.running: list[Request] = []
        self.loading: dict[str, int] = {}
        """Requests whose KV is coming up from the host tier -> the step that planned the loads."""
        self.requests: dict[str, Request] = {}
        """Every unfinished request by id."""
        self.num_preemptions = 0
        self.preemptions_by_reason = {"kv_memory": 0, "displaced": 0}
        self.preemptions_by_mode = {"swap": 0, "recompute": 0}
        self.preemption = preemption
        self.num_hold_releases = 0
        """Session holds released to make room for live requests."""
        self._step_id = 0
        self._finished_ids: list[str] = []
        """Ended since the last plan: the worker drops their state."""
        self._attached: list[Request] = []
        """Migrated in since the last plan: the worker learns of them next step."""
        self._unsent_tables: set[str] = set()
        """Migrated-in requests whose whole block table the worker has not been sent: it goes with their
        first scheduled chunk, which need not be in the step that introduces them (the token budget, say)."""

    # -- requests in and out ----------------------------------------------------------

    def add(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.waiting.add(request)

    def abort(self, req_id: str) -> None:
        """End a request now and free its KV; unknown or finished ids are ignored."""
        request = self.requests.get(req_id)
        if request is not None:
            self._finish(request, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def skip_decode_steps(self, num_steps: int) -> None:
        """Count `num_steps` pure decode steps applied outside `schedule` (the simulator's decode runs).

        Step ids advance as if each had been planned (the priority policy's
        quantum is counted in steps), and requests ended before them count as
        handed to the worker, as the first of those plans would have done.
        """
        self._step_id += num_steps
        self._finished_ids = []

    # -- live migration ---------------------------------------------------------------------

    def detach(self, req_id: str) -> Request | None:
        """Stop a running request for a migration out, keeping its KV; None if it is not running.

        It stays in `requests` (an abort still finds and frees it) but is
        scheduled no more until `reattach` (the migration failed) or
        `release_detached` (the destination took over).
        """
        request = self.requests.get(req_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return None
        self.running.remove(request)
        request.status = RequestStatus.MIGRATING
        return request

    def reattach(self, req_id: str) -> None:
        """The migration failed: the detached request runs here again, where it stopped."""
        request = self.requests.get(req_id)
        if request is not None and request.status == RequestStatus.MIGRATING:
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    @property
    def has_attached(self) -> bool:
        """A request migrated in whose whole table a plan has yet to give the worker."""
        return bool(self._attached or self._unsent_tables)

    def release_detached(self, req_id: str) -> None:
        """The destination committed: free the detached request's KV and forget it here."""
        request = self.requests.get(req_id)
        if request is None or request.status != RequestStatus.MIGRATING:
            return
        self.kv.free(request)
        del self.requests[req_id]
        self._unsent_tables.discard(req_id)
        self._finished_ids.append(req_id)

    def attach(self, request: Request) -> None:
        """A request migrated in: its KV (`num_computed_tokens` of it) is already in the blocks the
        manager reserved under its id; it runs from the next step as if it had been running here."""
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        request.status = RequestStatus.RUNNING
        request.admitted_step = self._step_id
        self.requests[request.req_id] = request
        self.running.append(request)
        self._attached.append(request)

    # -- planning -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(self._step_id, finished_req_ids=self._finished_ids)
        self._finished_ids = []
        for request in self._attached:
            if request.status == RequestStatus.RUNNING:
                plan.new_requests.append(self._request_data(request))
                self._unsent_tables.add(request.req_id)
        self._attached = []
        budget = self.config.max_num_batched_tokens
        # Sequence slots first: the policy may hand a running request's slot to a more urgent one.
        while self.num_seqs >= self.config.max_num_seqs:
            displaced = self.waiting.displace(self.running, self._step_id)
            if displaced is None:
                break
            self.running.remove(displaced)
            self._preempt(plan, displaced, "displaced")
            plan.preempted_req_ids.append(displaced.req_id)
        memory_short = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            allocation = self.kv.allocate_slots(request, num_tokens)
            while allocation is None and self._make_room():
                allocation = self.kv.allocate_slots(request, num_tokens)
            while allocation is None:
                memory_short = True
                # Only requests not yet planned this step may lose their KV.
                victim = self.waiting.victim(self.running[i:])
                self.running.remove(victim)
                self._preempt(plan, victim, "kv_memory")
                plan.preempted_req_ids.append(victim.req_id)
                if victim is request:
                    break
                allocation = self.kv.allocate_slots(request, num_tokens)
            if allocation is None:
                continue
            if request.req_id in self._unsent_tables:  # the worker has never seen this table
                self._unsent_tables.remove(request.req_id)
                full = TableUpdate(0, tuple(self.kv.block_table(request)))
                allocation = KVAllocation(full, allocation.copies, allocation.saves, allocation.loads)
            self._plan_chunk(plan, request, num_tokens, allocation)
            budget -= num_tokens
            i += 1
        if not memory_short:
            self._admit_waiting(plan, budget)
        if self._swapping is not None:
            ops = self._swapping.take_tier_ops()
            plan.saves.extend(ops.saves)
            plan.disk_drops.extend(ops.disk_drops)
            plan.disk_saves.extend(ops.disk_saves)
            plan.disk_loads.extend(ops.disk_loads)
        return plan

    @property
    def num_seqs(self) -> int:
        """Sequences holding a slot: running, or loading their KV to run."""
        return len(self.running) + len(self.loading)

    def _admit_waiting(self, plan: StepPlan, budget: int) -> None:
        while budget > 0 and self.num_seqs < self.config.max_num_seqs:
            head = self.waiting.peek()
            if head is None:
                break
            admitted = self._admit_fork(plan, head) if head.fork_of is not None else None
            if admitted is False:
                break
            if admitted is None and not self._admit(plan, head, budget):
                break
            if head.status == RequestStatus.LOADING:
                break  # see the module docstring: nobody may find its first chunk's blocks this step
            budget -= len(plan.scheduled[-1].new_token_ids)

    def _admit(self, plan: StepPlan, request: Request, budget: int) -> bool:
        # A swapped-out request resumes where it stopped: the manager loads its KV back.
        num_swapped = request.num_swapped_tokens
        if not num_swapped and self._swapping is not None and self._swapping.prefetch(request):
            return False  # its prefix is coming up from disk this step; it is admitted once that is checked
        num_cached = num_swapped or self.kv.lookup_prefix(request)
        num_tokens = min(request.num_tokens - num_cached, budget)
        allocation = self.kv.allocate_slots(request, num_tokens, num_cached)
        while allocation is None and self._make_room(keep=request):
            allocation = self.kv.allocate_slots(request, num_tokens, num_cached)
        if allocation is None:
            return False
        request.num_computed_tokens = num_cached
        request.num_swapped_tokens = 0
        if not num_swapped:
            request.num_cached_tokens = max(request.num_cached_tokens, num_cached)
        if allocation.loads and plan.scheduled:
            self._start_loading(plan, request, allocation)
            return True
        self._start(plan, request)
        self._plan_chunk(plan, request, num_tokens, allocation)
        return True

    def _start_loading(self, plan: StepPlan, request: Request, allocation: KVAllocation) -> None:
        """Admit `request` to wait for its KV from the host tier while the step computes the others."""
        assert allocation.table_update is not None  # a first allocation always sets the table
        self._start(plan, request, RequestStatus.LOADING)
        plan.kv_loads.append(LoadRequestKV(request.req_id, allocation.table_update, tuple(allocation.loads)))
        plan.copies.extend(allocation.copies)
        plan.saves.extend(allocation.saves)

    def _admit_fork(self, plan: StepPlan, request: Request) -> bool | None:
        """Fork a sibling's prompt KV: True if admitted, False to wait, None to prefill as usual."""
        parent = self.requests.get(request.fork_of or "")
        if parent is None or parent.status != RequestStatus.RUNNING or request.num_computed_tokens:
            # The parent has ended or waits (preempted, perhaps queued behind us): compute the
            # prompt as usual, with prefix hits where the parent's blocks are still cached.
            return None
        if request.output_token_ids or request.num_swapped_tokens:
            return None  # this sibling ran before and was preempted: it has tokens of its own
        if parent.num_computed_tokens < parent.num_prompt_tokens:
            return False  # the parent is still computing the prompt: wait for it, it is running
        if parent.admitted_step == self._step_id:
            # Resumed in this very step, its prompt found as prefix hits, some perhaps on blocks this step
            # writes (pending): the fork's copy of the shared tail runs before the forward pass would fill it.
            return False
        num_shared = request.num_prompt_tokens - 1
        allocation = self.kv.fork(parent, request, num_shared, 1)
        while allocation is None and self._make_room(keep=request):
            allocation = self.kv.fork(parent, request, num_shared, 1)
        if allocation is None:
            return False
        request.num_computed_tokens = num_shared
        request.num_cached_tokens = num_shared
        self._start(plan, request)
        self._plan_chunk(plan, request, 1, allocation)
        return True

    def _start(self, plan: StepPlan, request: Request, status: RequestStatus = RequestStatus.RUNNING) -> None:
        """Take the queue's head into a sequence slot: running, or loading its KV to run."""
        if self.waiting.pop() is not request:
            raise RuntimeError("the policy's queue head changed during admission")
        request.status = status
        request.admitted_step = self._step_id
        if status == RequestStatus.LOADING:
            self.loading[request.req_id] = self._step_id
        else:
            self.running.append(request)
        plan.new_requests.append(self._request_data(request))

    def _request_data(self, request: Request) -> NewRequestData:
        return NewRequestData(
            request.req_id,
            list(request.prompt_token_ids),
            list(request.output_token_ids),
            request.params,
            request.seed_offset,
        )

    def _plan_chunk(self, plan: StepPlan, request: Request, num_tokens: int, allocation: KVAllocation) -> None:
        start = request.num_computed_tokens
        plan.scheduled.append(
            ScheduledRequest(
                req_id=request.req_id,
                new_token_ids=request.token_slice(start, start + num_tokens),
                num_computed_tokens=start,
                sample=start + num_tokens == request.num_tokens,
                table_update=allocation.table_update,
            )
        )
        if allocation is not NO_CHANGE:
            plan.copies.extend(allocation.copies)
            plan.saves.extend(allocation.saves)
            plan.loads.extend(allocation.loads)

    def _make_room(self, keep: Request | None = None) -> bool:
        """Free memory that no live request holds, for a live request's sake: the oldest session hold,
        else what waiting requests other than `keep` (the one being admitted) prefetched from disk.
        False when nothing of either kind is left.

        Prefetches give way as holds do: a waiting request queued behind the head (a preempted request
        goes back in front of it) could otherwise hold the very blocks the head needs while nothing runs.
        It prefetches again when it reaches the head."""
        if self._holding is not None and self._holding.release_oldest_hold():
            self.num_hold_releases += 1
            return True
        return self._swapping is not None and self._swapping.release_prefetches(keep)

    def _preempt(self, plan: StepPlan, request: Request, reason: str) -> None:
        self._unsent_tables.discard(request.req_id)  # it comes back with a fresh table
        saves = self._swap_out(request)
        if saves is None:
            self.kv.free(request)
        else:
            plan.saves.extend(saves)
            request.num_swapped_tokens = request.num_computed_tokens
        self.preemptions_by_mode["recompute" if saves is None else "swap"] += 1
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_reason[reason] += 1
        self.waiting.requeue(request)

    def _swap_out(self, request: Request) -> list[SaveToHost] | None:
        """The saves that move the victim's KV to the host tier, or None to recompute it instead."""
        if self.preemption is None or self._swapping is None:
            return None
        if not self.preemption.chooses_swap(request.num_computed_tokens):
            return None
        return self._swapping.swap_out(request)

    # -- progress -------------------------------------------------------------------------

    def update_from_output(self, plan: StepPlan, output: StepOutput) -> list[SequenceUpdate]:
        """Advance every request the plan ran; finish those that are done; report what changed."""
        self.waiting.on_step(plan, output, self.requests)
        if output.host_save_failed:
            self.lose_host_blocks(output.host_save_failed)
        updates = []
        for req_id, step_id in output.kv_loaded:
            request = self.requests.get(req_id)
            if request is not None and self.loading.get(req_id) == step_id:
                del self.loading[req_id]
                request.status = RequestStatus.RUNNING
                self.running.append(request)
        for req_id, step_id, _ in output.kv_load_failed:
            if self.loading.get(req_id) == step_id:
                request = self.requests[req_id]
                self._finish(request, "abort")
                updates.append(SequenceUpdate(req_id, [], [], request.num_cached_tokens, "abort", None, KV_LOAD_FAILED))
        for scheduled in plan.scheduled:
            request = self.requests.get(scheduled.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens = scheduled.num_computed_tokens + len(scheduled.new_token_ids)
            error = output.failed.get(request.req_id)
            if error is not None:  # its KV may be wrong (a host load it needed was skipped): never published
                self._finish(request, "abort")
                updates.append(SequenceUpdate(request.req_id, [], [], request.num_cached_tokens, "abort", None, error))
                continue
            # Only now, with the step done, may other requests find these blocks.
            self.kv.publish(request, request.num_computed_tokens)
            if not scheduled.sample:
                continue
            token = output.sampled[request.req_id]
            request.output_token_ids.append(token.token_id)
            self._check_stop(request, token.token_id)
            updates.append(
                SequenceUpdate(
                    request.req_id,
                    [token.token_id],
                    [token.logprob] if token.logprob is not None else [],
                    request.num_cached_tokens,
                    request.finish_reason,
                    request.stop_reason,
                )
            )
        if self._swapping is not None:
            self._swapping.apply_disk_report(output.disk_loaded, output.disk_load_failed, output.disk_save_failed)
        self.kv.end_step()
        return updates

    def fail_step(self, plan: StepPlan, error: str) -> list[SequenceUpdate]:
        """The worker raised: end the plan's requests (nothing they wrote is published), keep serving.

        Requests swapped out by this plan lose their host copy (its saves may not
        have run) and will recompute; the tiers below forget what this plan was
        to make findable there."""
        for req_id in plan.preempted_req_ids:
            victim = self.requests.get(req_id)
            if victim is not None and victim.num_swapped_tokens:
                self.kv.free(victim)
                victim.num_swapped_tokens = 0
        for kv_load in plan.kv_loads:  # the loads may not have run: these recompute, like the victims above
            request = self.requests.get(kv_load.req_id)
            if request is not None and self.loading.get(kv_load.req_id) == plan.step_id:
                self._recompute_loading(request)
        updates = []
        for scheduled in plan.scheduled:
            request = self.requests.get(scheduled.req_id)
            if request is None:
                continue
            self._finish(request, "abort")
            updates.append(SequenceUpdate(request.req_id, [], [], request.num_cached_tokens, "abort", None, error))
        self.kv.end_step(failed=True)
        return updates

    def _recompute_loading(self, request: Request) -> None:
        """The request's KV load will not bring what it needs: back to the queue, to compute it again.
        A load still in flight lands in blocks freed here; the worker orders whatever reuses them after it."""
        del self.loading[request.req_id]
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_swapped_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.requeue(request)

    def lose_host_blocks(self, host_block_ids: list[int]) -> None:
        """The worker could not write these host blocks: the books forget them, and requests whose
        swapped-out KV they held compute it again (those waiting on its load included)."""
        assert self._swapping is not None, "a worker without a host tier reported a failed host save"
        for req_id in self._swapping.lose_host_blocks(host_block_ids):
            request = self.requests.get(req_id)
            if request is None:
                continue
            if req_id in self.loading:
                self._recompute_loading(request)
            request.num_swapped_tokens = 0

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            self._finish(request, "stop", token_id)
        elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        was_running = request in self.running or request.req_id in self.loading
        if request.req_id in self.loading:
            del self.loading[request.req_id]
        elif was_running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.waiting.on_finish(request, was_running)
        if request.session_id is not None and self._holding is not None:
            self._holding.hold(request.session_id, request)
        self.kv.free(request)
        del self.requests[request.req_id]
        self._unsent_tables.discard(request.req_id)
        self._finished_ids.append(request.req_id)
