"""Random runs of the real scheduler and KV books against a shadow of the worker's memory.

The worker is replaced by a model of what it stores (`tests.shadow_kv`):
every pool, host and disk slot holds a value that names the token sequence
whose KV it is (the KV of position p depends on tokens 0..p and nothing
else). The shadow runs each plan as the worker does: moves between tiers as FIFO jobs
of a copy thread that may lag behind the steps (a forward pass waits only
for the jobs touching its blocks), copy-on-write copies, then the forward
pass, which writes the new tokens' KV and reads every earlier position of
every scheduled request through its block table. A value that is missing
or names another sequence means the books let a block be overwritten while
someone needed it, loaded the wrong block, or marked unwritten KV as ready.

Around it, what a busy server does to the scheduler: arrivals with shared
prefixes and cache salts, n > 1 siblings, session holds, aborts at any
time, priorities and tenants, a pool small enough to preempt (swap or
recompute), host and disk tiers, and failures: a step that raises, a
request whose sampling fails, host loads, host saves (dying half-way), disk
reads and disk writes that fail. After the arrivals stop, every request must end (none hangs), each
with the tokens its sampling produced; once the holds are released, every
block of every tier is free.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from kvos.config import SchedulerConfig
from kvos.core.plan import LoadFromHost, SampledToken, SaveToHost, StepOutput, StepPlan
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.memory.block_allocator import BlockStored
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import HostBlockPool
from kvos.memory.tiers.swap import PreemptionRule
from kvos.sampling_params import SamplingParams
from tests.shadow_kv import ShadowKV

BS = 4
EOS = 0
MAX_MODEL_LEN = 64
VOCAB = 12
PREFIXES = [[random.Random(k).randrange(1, VOCAB) for _ in range(40)] for k in range(3)]
"""Shared prompt beginnings (system prompts, few-shot examples): the prefix cache's hits."""


class StepFailed(Exception):
    """The shadow worker's injected failure of a whole step."""


@dataclass
class Job:
    """One job of the worker's copy thread: the pool blocks it touches, what it does, whose step it is."""

    step_id: int
    blocks: set[int]
    run: Callable[[StepOutput], None]


def block_range(ops: Sequence[SaveToHost | LoadFromHost]) -> set[int]:
    return {b for op in ops for b in range(op.block_id, op.block_id + op.num_blocks)}


def host_targets(saves: Sequence[SaveToHost]) -> set[int]:
    return {b for op in saves for b in op.host_blocks}


@dataclass
class Shadow:
    """The worker, as its memory shows it (`tests.shadow_kv`), with a copy thread that may lag behind the
    steps and failures injected at `fail_rate`."""

    rng: random.Random
    fail_rate: float
    kv: ShadowKV = field(default_factory=lambda: ShadowKV(BS))
    queue: deque[Job] = field(default_factory=deque)
    done: list[tuple[int, StepOutput]] = field(default_factory=list)
    """Reports of finished jobs not yet handed back: (step id, the report)."""
    sampled: dict[str, list[int]] = field(default_factory=dict)
    """Every token each request sampled, to compare with what the scheduler reported."""
    unwritten: set[int] = field(default_factory=set)
    """Host blocks a save died writing (`HostKVPool.unwritten`): loads from them are refused."""
    unfilled: set[int] = field(default_factory=set)
    """Pool blocks a host load skipped for that reason, in the step being run."""
    heard: set[int] = field(default_factory=set)
    """Unwritten host blocks whose failed save the scheduler has been told of: no plan may read them
    before a save queued after that fills them again."""
    queued_saves: list[set[int]] = field(default_factory=list)
    """Host blocks each queued, not yet run save job writes."""

    def fails(self) -> bool:
        return self.rng.random() < self.fail_rate

    # -- the copy thread ------------------------------------------------------------------

    def check_reads(self, plan: StepPlan) -> None:
        """The books read no host block they were told a save died writing, unless a save queued since
        (this plan's included) writes it first."""
        known_bad = (self.heard & self.unwritten) - set().union(*self.queued_saves)
        loads = [*plan.loads, *(op for kv_load in plan.kv_loads for op in kv_load.loads)]
        reads = {b for op in loads for b in op.host_blocks}
        bad = reads & (known_bad - host_targets(plan.saves))  # the plan's saves run before its loads
        assert not bad, f"step {plan.step_id} loads host blocks {bad} reported unwritten"
        to_disk = {op.block_id for op in plan.disk_saves if op.tier == "host"}  # and after its disk writes
        assert not to_disk & known_bad, f"step {plan.step_id} writes host blocks {to_disk & known_bad} to disk"

    def submit(self, plan: StepPlan) -> None:
        """Queue the plan's moves in the worker's three kinds of job, in its order."""
        step, kv = plan.step_id, self.kv
        self.check_reads(plan)
        if plan.disk_drops or plan.disk_saves or plan.saves:
            blocks = {op.block_id for op in plan.disk_saves if op.tier == "primary"} | block_range(plan.saves)
            targets = host_targets(plan.saves)
            self.queued_saves.append(targets)

            def save(report: StepOutput, targets: set[int] = targets) -> None:
                self.queued_saves.remove(targets)
                for op in plan.disk_saves:
                    if self.rng.random() < self.fail_rate / 10:  # rarer: the first one stops the tier taking blocks
                        report.disk_save_failed[op.key] = "OSError: injected"
                # The worker writes no host block a save died writing to disk; the key reads as missing later.
                skipped = {op.key for op in plan.disk_saves if op.tier == "host" and op.block_id in self.unwritten}
                kv.save_down(plan.disk_drops, plan.disk_saves, [], set(report.disk_save_failed) | skipped)
                if targets and self.fails():  # the host saves die half-way
                    for b in targets:
                        kv.scribble("host", b)
                    self.unwritten |= targets
                    report.host_save_failed.extend(sorted(targets))
                else:
                    kv.save_down([], [], plan.saves, set())
                    self.unwritten -= targets
                    self.heard -= targets

            self.queue.append(Job(step, blocks, save))
        if plan.loads:

            def load(report: StepOutput) -> None:
                readable = [op for op in plan.loads if self.readable(op)]
                kv.load_from_host(readable)
                self.unfilled |= block_range([op for op in plan.loads if op not in readable])

            self.queue.append(Job(step, block_range(plan.loads), load))
        for kv_load in plan.kv_loads:
            blocks = block_range(kv_load.loads)

            def load_request(report: StepOutput, kv_load=kv_load, blocks=blocks) -> None:
                if not all(self.readable(op) for op in kv_load.loads):
                    report.kv_load_failed.append((kv_load.req_id, step, "UnwrittenHostBlock"))
                    return
                if self.fails():
                    for b in blocks:
                        kv.scribble("primary", b)
                    report.kv_load_failed.append((kv_load.req_id, step, "OSError: injected"))
                    return
                kv.load_from_host(kv_load.loads)
                report.kv_loaded.append((kv_load.req_id, step))

            self.queue.append(Job(step, blocks, load_request))
        if plan.disk_loads:

            def load_disk(report: StepOutput) -> None:
                for op in plan.disk_loads:
                    error = kv.load_from_disk(op, corrupt=self.fails())
                    if error is None:
                        report.disk_loaded.append(op.key)
                        if op.tier == "host":
                            self.unwritten.discard(op.block_id)
                            self.heard.discard(op.block_id)
                    else:
                        report.disk_load_failed[op.key] = error

            blocks = {op.block_id for op in plan.disk_loads if op.tier == "primary"}
            self.queue.append(Job(step, blocks, load_disk))

    def readable(self, op: LoadFromHost) -> bool:
        return self.unwritten.isdisjoint(op.host_blocks)

    def run_jobs(self, count: int) -> None:
        for _ in range(min(count, len(self.queue))):
            job = self.queue.popleft()
            report = StepOutput(job.step_id)
            job.run(report)
            self.done.append((job.step_id, report))

    def wait_for(self, blocks: set[int]) -> None:
        """Run jobs until none left touches `blocks` (the worker's `CopyEngine.wait_for`)."""
        last = max((i for i, job in enumerate(self.queue) if job.blocks & blocks), default=-1)
        self.run_jobs(last + 1)

    def output(self, step_id: int, sampled: dict[str, SampledToken], failed: dict[str, str]) -> StepOutput:
        output = StepOutput(step_id, sampled, failed)
        for _, report in self.done:
            output.kv_loaded.extend(report.kv_loaded)
            output.kv_load_failed.extend(report.kv_load_failed)
            output.disk_loaded.extend(report.disk_loaded)
            output.disk_load_failed.update(report.disk_load_failed)
            output.disk_save_failed.update(report.disk_save_failed)
            output.host_save_failed.extend(report.host_save_failed)
        self.heard.update(output.host_save_failed)
        self.done = []
        return output

    # -- a step ---------------------------------------------------------------------------

    def execute(self, plan: StepPlan, fail: bool) -> StepOutput:
        try:
            return self._execute(plan, fail)
        except StepFailed:
            self.run_jobs(len(self.queue))  # drain, then forget this plan's reports
            self.done = [(step, report) for step, report in self.done if step != plan.step_id]
            self.unfilled.clear()
            raise

    def _execute(self, plan: StepPlan, fail: bool) -> StepOutput:
        kv = self.kv
        kv.begin(plan)
        self.submit(plan)
        if not (plan.scheduled or plan.copies):
            self.run_jobs(len(self.queue))
            return self.output(plan.step_id, {}, {})
        in_use = {b for s in plan.scheduled for b in kv.tables[s.req_id]}
        in_use |= {slot // BS for c in plan.copies for slot in (c.src_slot, c.dst_slot + c.num_slots - 1)}
        self.wait_for(in_use)
        self.run_jobs(self.rng.randrange(3))  # the copy thread gets ahead of the forward pass, or not
        kv.copy(plan.copies)
        if fail:  # a layer raised half-way: some of the step's KV written, some not
            for scheduled in plan.scheduled[: len(plan.scheduled) // 2]:
                kv.write(scheduled)
            raise StepFailed
        # This step's host loads are done: whoever holds a block one skipped fails (`Worker._output`).
        unread = frozenset(s.req_id for s in plan.scheduled if not self.unfilled.isdisjoint(kv.tables[s.req_id]))
        self.unfilled.clear()
        kv.forward(plan.scheduled, unread)
        sampled: dict[str, SampledToken] = {}
        failed: dict[str, str] = dict.fromkeys(unread, "KV unreadable")
        for scheduled in plan.scheduled:
            if not scheduled.sample or scheduled.req_id in unread:
                continue
            if self.rng.random() < self.fail_rate:
                failed[scheduled.req_id] = "sampling failed (injected)"
                continue
            token = EOS if self.rng.random() < 0.04 else self.rng.randrange(1, VOCAB)
            sampled[scheduled.req_id] = SampledToken(token)
            kv.append(scheduled.req_id, token)
            self.sampled.setdefault(scheduled.req_id, []).append(token)
        if self.rng.random() < 0.5:  # the CPU worker ends its copies with the step; a GPU's run on
            self.run_jobs(len(self.queue))
        return self.output(plan.step_id, sampled, failed)


@dataclass(frozen=True)
class Setup:
    pool_blocks: int
    host_blocks: int | None = None
    disk_blocks: int | None = None
    preemption: str = "recompute"
    policy: str = "fcfs"
    token_budget: int = 24
    max_num_seqs: int = 6


SETUPS = {
    "pool": Setup(pool_blocks=24),
    "pool-priority": Setup(pool_blocks=24, policy="priority"),
    "host-swap": Setup(pool_blocks=24, host_blocks=40, preemption="swap"),
    "host-recompute-fair": Setup(pool_blocks=24, host_blocks=16, policy="fair"),
    "disk": Setup(pool_blocks=24, disk_blocks=30),
    "host-disk-swap": Setup(pool_blocks=24, host_blocks=12, disk_blocks=60, preemption="swap"),
    "host-disk-priority": Setup(pool_blocks=28, host_blocks=20, disk_blocks=20, preemption="swap", policy="priority"),
}


def run(setup: Setup, seed: int, num_steps: int = 400, fail_rate: float = 0.03) -> None:
    rng = random.Random(seed)
    host = HostBlockPool(setup.host_blocks) if setup.host_blocks else None
    disk = DiskBlockIndex(setup.disk_blocks) if setup.disk_blocks else None
    kv = PagedKVCacheManager(setup.pool_blocks, BS, MAX_MODEL_LEN, host=host, disk=disk)
    config = SchedulerConfig(
        max_num_batched_tokens=setup.token_budget, max_num_seqs=setup.max_num_seqs, policy=setup.policy
    )
    preemption = PreemptionRule(setup.preemption) if host is not None else None  # type: ignore[arg-type]
    scheduler = Scheduler(config, kv, frozenset({EOS}), MAX_MODEL_LEN, preemption)
    shadow = Shadow(rng, fail_rate)
    reported: dict[str, list[int]] = {}
    ended: dict[str, str] = {}
    params_of: dict[str, SamplingParams] = {}
    sessions = [f"session-{i}" for i in range(3)]
    next_id = 0
    announced: dict[bytes, int] = {}
    """The pool's cached blocks as its KV events tell them: digest -> block id."""

    def arrive() -> None:
        nonlocal next_id
        prefix = rng.choice(PREFIXES)[: rng.randrange(0, 40)]
        prompt = prefix + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
        n = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
        stop = (11,) if rng.random() < 0.3 else ()
        params = SamplingParams(n=n, max_tokens=rng.randrange(1, 16), stop_token_ids=stop)
        if len(prompt) + params.max_tokens > MAX_MODEL_LEN:
            return  # the engine refuses it at the door
        try:
            kv.check_fits(len(prompt) + params.max_tokens)
        except ValueError:
            return
        salt = rng.choice([None, None, "tenant-b"])
        session = rng.choice(sessions) if n == 1 and rng.random() < 0.3 else None
        ids = [f"r{next_id + i}" for i in range(n)]
        next_id += n
        for i, req_id in enumerate(ids):
            params_of[req_id] = params
            scheduler.add(
                Request(
                    req_id,
                    list(prompt),
                    params,
                    arrival_time=float(next_id),
                    priority=rng.randrange(3),
                    tenant=rng.choice("ab"),
                    fork_of=None if i == 0 else ids[0],
                    seed_offset=i,
                    cache_salt=salt,
                    session_id=session,
                )
            )

    def step(fail: bool) -> None:
        plan = scheduler.schedule()
        try:
            output = shadow.execute(plan, fail)
        except StepFailed:
            updates = scheduler.fail_step(plan, "step failed (injected)")
        else:
            updates = scheduler.update_from_output(plan, output)
        for update in updates:
            assert update.req_id not in ended, f"{update.req_id} reported after it ended"
            reported.setdefault(update.req_id, []).extend(update.new_token_ids)
            if update.finish_reason is not None:
                ended[update.req_id] = update.finish_reason
        # A prefix-aware router knows the pool only from its KV events: replayed, they must give what it holds.
        for event in kv.drain_events():
            if isinstance(event, BlockStored):
                assert event.block_hash not in announced, "a block stored twice without its removal between"
                announced[event.block_hash] = event.block_id
            else:
                assert announced.pop(event.block_hash) == event.block_id, "a removal of a block never stored"
        assert announced == dict(kv.allocator.cached_blocks()), "the KV events disagree with the prefix cache"

    for _ in range(num_steps):
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            arrive()
        live = list(scheduler.requests)
        if live and rng.random() < 0.06:
            req_id = rng.choice(live)
            scheduler.abort(req_id)
            ended[req_id] = "abort"
        if rng.random() < 0.05:
            kv.release_hold(rng.choice(sessions))
        step(fail=rng.random() < fail_rate)

    for _ in range(2000):  # no more arrivals: everything must end
        if not scheduler.has_unfinished():
            break
        step(fail=False)
    assert not scheduler.has_unfinished(), f"requests never ended: {sorted(scheduler.requests)}"
    for key in sessions:
        kv.release_hold(key)
    step(fail=False)  # hands the worker the ended requests and collects the copy thread's last reports

    assert len(ended) == next_id, "every request ends exactly once"
    for req_id, reason in ended.items():
        got = reported.get(req_id, [])
        assert got == shadow.sampled.get(req_id, [])[: len(got)], f"{req_id}: reported tokens differ from sampled"
        params = params_of[req_id]
        if reason == "length":
            assert len(got) == params.max_tokens
        elif reason == "stop":
            assert got and (got[-1] == EOS or got[-1] in params.stop_token_ids)
            assert got == shadow.sampled[req_id]
        else:
            assert reason == "abort", f"{req_id} ended with {reason!r}"
    assert kv.num_used_blocks == 0, "pool blocks still referenced after every request ended"
    assert kv.num_held_blocks == 0 and kv.num_host_copies == 0
    if host is not None:
        assert host.num_held_blocks == 0, "host blocks still held after every request ended"
    assert not shadow.kv.tables and not shadow.queue, "the worker still holds state or jobs"
    assert not scheduler.running and not scheduler.loading and len(scheduler.waiting) == 0


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("seed", range(3))
def test_random_runs_keep_every_request_s_kv_intact_and_free_everything(name: str, seed: int) -> None:
    run(SETUPS[name], seed)
