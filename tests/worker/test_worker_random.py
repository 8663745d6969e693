"""Random runs of the whole step loop on a model whose tokens can be checked exactly.

The real scheduler, KV books and worker (its KV buffer, paged or virtual,
the copy thread, the host tier's memory, the disk tier's files, the
sampler) run as the engine runs them; only the model is replaced, by
`ChainModel`: the KV it writes at position p is a function of the KV at
p - 1 and token p, and the two tokens it allows next are a function of
every position's KV. So each token a request samples is one of those its
own tokens allow (`first_wrong_token`) only if every KV it read, at every
step, was its own: a block overwritten while in use, a load into the wrong
block, a page released under a live row, a stale or missing copy-on-write
or a bad disk file read as good would show.

Around it, what a busy server does: arrivals with shared prefixes, n > 1
siblings, session holds, aborts, priorities, a pool small enough to preempt
(swap or recompute), host and disk tiers, disk files corrupted on disk, and
steps that raise, live migrations between two engines, a restart on the
same disk directory. Every token of every request must be one its own KV
allows; once all have ended, every tier is back to empty.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch

from kvos.attention.backend import SeqLayout
from kvos.cluster.migration import migration
from kvos.config import SchedulerConfig
from kvos.core.migration import MigrationEndpoint
from kvos.core.plan import StepPlan
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.memory.kv_manager import KVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.host import HostBlockPool
from kvos.memory.tiers.swap import PreemptionRule
from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager
from kvos.sampling_params import SamplingParams
from kvos.worker.disk_store import DiskKVStore
from kvos.worker.kv_cache import HostKVPool, make_host_pool, make_kv_buffer
from kvos.worker.worker import Worker

VOCAB = 12
EOS = 0
MAX_MODEL_LEN = 64
MODULUS = 2**24 - 3
"""KV values stay below 2**24: exact in float32."""
SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
PREFIXES = [[random.Random(k).randrange(1, VOCAB) for _ in range(40)] for k in range(3)]


def chain(previous: int, token: int) -> int:
    return (previous * 1_000_003 + token * 7919 + 1) % MODULUS


def predict(values: list[int]) -> int:
    """The next token from every position's KV (the sum) and the last one's."""
    return (sum(values) * 131 + values[-1] * 17) % VOCAB


def allowed(values: list[int]) -> tuple[int, int]:
    """The two tokens the model gives equal odds after a context (seeded sampling picks one, so n > 1
    siblings part ways, as they do with a real model)."""
    first = predict(values)
    return first, (first + 5) % VOCAB


def kv_value(stored: torch.Tensor) -> int:
    """A KV slot's value as the chain reads it. A slot no one wrote holds whatever memory held (NaN or
    infinity among it): read as garbage, as a real model would, never raised."""
    return int(torch.nan_to_num(stored, nan=0.0, posinf=0.0, neginf=0.0).item()) % MODULUS


def first_wrong_token(prompt: list[int], tokens: list[int]) -> int | None:
    """The index of the first token the model could not have sampled had every KV it read been the
    sequence's own (None: all could)."""
    values: list[int] = []
    for token in prompt:
        values.append(chain(values[-1] if values else 1, token))
    for i, token in enumerate(tokens):
        if token not in allowed(values):
            return i
        values.append(chain(values[-1], token))
    return None


class StepFailed(RuntimeError):
    """The injected failure of a whole step."""


class FlakyHostSaves:
    """The host tier's copies, some saves among them scribbling over their targets and raising, as a copy
    that dies half-way would (on the copy thread, so with an rng of their own: the jobs run in plan order)."""

    def __init__(self, pool: HostKVPool, seed: int) -> None:
        self.pool, self.move = pool, pool._move
        self.rng = random.Random(seed)
        self.fail_rate = 0.0
        self.num_failed = 0
        pool._move = self  # type: ignore[method-assign]

    def __call__(self, src: list, dst: list, runs: list[tuple[int, int, int]]) -> None:
        if dst is not self.pool.kv_caches or self.rng.random() >= self.fail_rate:
            self.move(src, dst, runs)
            return
        self.num_failed += 1
        time.sleep(0.005)  # late, so the engine thread often plans on before it hears of the failure
        bs = self.pool.block_size
        for _, target, count in runs:
            for k, v in dst:
                k[target * bs : (target + count) * bs] = float(self.rng.randrange(MODULUS))
                v[target * bs : (target + count) * bs] = float(self.rng.randrange(MODULUS))
        raise MemoryError("a host save died half-way (injected)")


@dataclass
class _Meta:
    """The step as `ChainModel` needs it: the worker's own per-request layouts (and no backend's batches,
    which is what the worker's `_pure_decode` asks)."""

    seqs: list[SeqLayout]
    paged: None = None
    decode: None = None


class ChainModel:
    """Reads and writes KV as a model does, through the slots the worker hands it; see the module docstring."""

    name = "chain"

    def __init__(self, fail_rate: float, rng: random.Random) -> None:
        self.attention = self
        self.fail_rate = fail_rate
        self.rng = rng

    def build_metadata(self, seqs: list[SeqLayout], num_tokens: int, device: torch.device) -> _Meta:
        return _Meta(seqs)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: _Meta) -> torch.Tensor:
        return self.forward(ids, positions, kv_caches, meta)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: _Meta) -> torch.Tensor:
        if self.rng.random() < self.fail_rate:
            raise StepFailed("a layer raised (injected)")
        k = kv_caches[0][0]
        tokens = ids.tolist()
        hidden = torch.zeros(len(tokens), dtype=torch.long)
        # Every layer writes the whole batch's KV before any request reads (a request admitted in this step may
        # read blocks another one fills in it): write all first, then read.
        for seq in meta.seqs:
            slots = seq.context_slots.tolist()
            value = kv_value(k[slots[seq.num_computed - 1], 0, 0]) if seq.num_computed else 1
            for i in range(seq.num_tokens):
                value = chain(value, tokens[seq.token_start + i])
                k[slots[seq.num_computed + i], 0, :] = float(value)
        for seq in meta.seqs:
            context = k[seq.context_slots, 0, 0]
            hidden[seq.token_start + seq.num_tokens - 1] = predict([kv_value(v) for v in context])
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((len(hidden), VOCAB), -1e9)
        rows = torch.arange(len(hidden))
        logits[rows, hidden] = 0.0
        logits[rows, (hidden + 5) % VOCAB] = 0.0
        return logits


@dataclass(frozen=True)
class Setup:
    cache: str = "paged"
    host_blocks: int = 0
    disk_blocks: int = 0
    preemption: str = "recompute"
    policy: str = "fcfs"
    pool_tokens: int = 96


SETUPS = {
    "paged": Setup(),
    "paged-host-swap": Setup(host_blocks=40, preemption="swap", policy="priority"),
    "paged-host-disk": Setup(host_blocks=12, disk_blocks=40, preemption="swap"),
    "paged-disk-fair": Setup(disk_blocks=30, policy="fair"),
    "virtual": Setup(cache="virtual", pool_tokens=160),
    "virtual-host-swap": Setup(cache="virtual", host_blocks=40, preemption="swap", pool_tokens=160),
}


@dataclass
class Engine:
    kv: KVCacheManager
    scheduler: Scheduler
    worker: Worker
    disk_dir: Path | None
    host_saves: FlakyHostSaves | None
    reported: dict[str, list[int]] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)


def build(setup: Setup, rng: random.Random, tmp_path: Path) -> Engine:
    bs = 4
    host = HostBlockPool(setup.host_blocks) if setup.host_blocks and setup.cache == "paged" else None
    store = None
    if setup.disk_blocks:
        probe = DiskKVStore(str(tmp_path / "probe"), 1 << 20, bs, SHAPE)
        probe.close()
        store = DiskKVStore(str(tmp_path / "disk"), setup.disk_blocks * probe.file_bytes, bs, SHAPE)
    kv: KVCacheManager
    if setup.cache == "paged":
        disk = DiskBlockIndex(store.num_blocks, store.opened.present) if store is not None else None
        kv = PagedKVCacheManager(setup.pool_tokens // bs, bs, MAX_MODEL_LEN, host=host, disk=disk)
    else:
        host_bytes = setup.host_blocks * bs * SHAPE.bytes_per_token if setup.host_blocks else None
        budget = setup.pool_tokens * SHAPE.bytes_per_token
        kv = VirtualKVCacheManager(budget, SHAPE, 6, MAX_MODEL_LEN, host_bytes=host_bytes, host_block_size=bs)
    preemption = PreemptionRule(setup.preemption) if setup.host_blocks else None  # type: ignore[arg-type]
    config = SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=6, policy=setup.policy)  # type: ignore[arg-type]
    scheduler = Scheduler(config, kv, frozenset({EOS}), MAX_MODEL_LEN, preemption)
    model = ChainModel(0.03, rng)
    worker = Worker(
        model,  # type: ignore[arg-type]
        make_kv_buffer(kv, SHAPE),
        kv.table_block_size,
        SHAPE.device,
        host_pool=make_host_pool(kv, SHAPE),
        disk_store=store,
    )
    host_saves = FlakyHostSaves(worker.host_pool, rng.randrange(1 << 30)) if worker.host_pool is not None else None
    return Engine(kv, scheduler, worker, tmp_path / "disk" if store is not None else None, host_saves)


def step(engine: Engine, owns: Callable[[str], bool] | None = None) -> None:
    """One engine step; its reports go to the client, unless `owns` says another engine serves that request
    now (a router's view: a request committed elsewhere, or aborted while its migration committed)."""
    plan = engine.scheduler.schedule()
    try:
        output = engine.worker.execute(plan)
    except StepFailed:
        updates = engine.scheduler.fail_step(plan, "step failed")
    else:
        updates = engine.scheduler.update_from_output(plan, output)
    for update in updates:
        if owns is not None and not owns(update.req_id):
            continue
        assert update.req_id not in engine.ended, f"{update.req_id} reported after it ended"
        engine.reported.setdefault(update.req_id, []).extend(update.new_token_ids)
        if update.finish_reason is not None:
            engine.ended[update.req_id] = update.finish_reason


def corrupt_a_file(engine: Engine, rng: random.Random) -> None:
    """Flip a byte in one block file, as a bad disk would: its checksum must catch it."""
    assert engine.disk_dir is not None
    files = [f for f in engine.disk_dir.iterdir() if f.suffix == ".kv"]
    if files:
        path = rng.choice(files)
        data = bytearray(path.read_bytes())
        data[-1 - rng.randrange(64)] ^= 0xFF
        path.write_bytes(bytes(data))


def serve(engine: Engine, rng: random.Random, num_steps: int, first_id: int) -> int:
    """Random traffic for `num_steps` steps, then none until every request has ended and every hold is
    released; checks each request's tokens and that every tier is empty. Returns the next free id."""
    scheduler, kv = engine.scheduler, engine.kv
    prompts: dict[str, list[int]] = {}
    sessions = [f"session-{i}" for i in range(3)]
    next_id = first_id
    engine.worker.attention.fail_rate = 0.03  # type: ignore[attr-defined]
    if engine.host_saves is not None:
        engine.host_saves.fail_rate = 0.03
    for _ in range(num_steps):
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            prompt = rng.choice(PREFIXES)[: rng.randrange(0, 40)] + [rng.randrange(1, VOCAB)]
            prompt += [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 10))]
            n = 1 if rng.random() < 0.8 else rng.randrange(2, 4)
            params = SamplingParams(n=n, max_tokens=rng.randrange(1, 14), seed=rng.randrange(1000))
            if len(prompt) + params.max_tokens > min(MAX_MODEL_LEN, kv.max_tokens_per_request):
                continue
            ids = [f"r{next_id + i}" for i in range(n)]
            next_id += n
            session = rng.choice(sessions) if n == 1 and rng.random() < 0.3 else None
            for i, req_id in enumerate(ids):
                prompts[req_id] = prompt
                fork_of = None if i == 0 else ids[0]
                request = Request(req_id, list(prompt), params, priority=rng.randrange(3), tenant=rng.choice("ab"))
                request.fork_of, request.seed_offset, request.session_id = fork_of, i, session
                scheduler.add(request)
        if scheduler.requests and rng.random() < 0.05:
            req_id = rng.choice(list(scheduler.requests))
            scheduler.abort(req_id)
            engine.ended[req_id] = "abort"
        if rng.random() < 0.05 and isinstance(kv, PagedKVCacheManager):
            kv.release_hold(rng.choice(sessions))
        if engine.disk_dir is not None and rng.random() < 0.05:
            corrupt_a_file(engine, rng)
        step(engine)
    engine.worker.attention.fail_rate = 0.0  # type: ignore[attr-defined]
    if engine.host_saves is not None:
        engine.host_saves.fail_rate = 0.0
    for _ in range(1000):
        if not scheduler.has_unfinished():
            break
        step(engine)
    assert not scheduler.has_unfinished(), f"requests never ended: {sorted(scheduler.requests)}"
    if isinstance(kv, PagedKVCacheManager):
        for key in sessions:
            kv.release_hold(key)
    step(engine)

    assert len(engine.ended) == next_id
    for req_id, prompt in prompts.items():
        got = engine.reported.get(req_id, [])
        wrong = first_wrong_token(prompt, got)
        reason = engine.ended[req_id]
        assert wrong is None, f"{req_id} ({reason}) generated {got}: token {wrong} came from KV not its own"
    assert kv.num_used_blocks == 0, "KV memory still in use after every request ended"
    host = getattr(kv, "host", None)
    assert host is None or host.num_held_blocks == 0, "host blocks still held after every request ended"
    assert engine.worker.num_requests == 0
    return next_id


def shut_down(engine: Engine) -> None:
    """As `EngineCore.close` does: write the cached KV the disk tier lacks, then let go of the files."""
    kv, worker = engine.kv, engine.worker
    if worker.disk_store is not None:
        assert isinstance(kv, PagedKVCacheManager)
        ops = kv.flush_to_disk()
        output = worker.execute(StepPlan(-1, disk_drops=ops.disk_drops, disk_saves=ops.disk_saves))
        kv.apply_disk_report(output.disk_loaded, output.disk_load_failed, output.disk_save_failed)
        kv.end_step()
        worker.disk_store.close()
    worker.close()


def run(setup: Setup, seed: int, tmp_path: Path, num_steps: int = 250) -> None:
    """Random traffic; with a disk tier, then a restart on the same directory and more traffic, whose
    prefixes come back from the first run's files."""
    rng = random.Random(seed)
    engine = build(setup, rng, tmp_path)
    next_id = serve(engine, rng, num_steps, 0)
    shut_down(engine)
    if setup.disk_blocks:
        engine = build(setup, rng, tmp_path)
        assert isinstance(engine.kv, PagedKVCacheManager) and engine.kv.disk is not None
        assert engine.kv.disk.num_stored_blocks > 0, "the restart should find the first run's files"
        engine.ended.update(dict.fromkeys((f"r{i}" for i in range(next_id)), "earlier run"))
        serve(engine, rng, num_steps // 2, next_id)
        assert engine.kv.counters.disk_hit_tokens > 0, "the second run should read the first run's KV"
        shut_down(engine)


@pytest.mark.parametrize("name", list(SETUPS))
@pytest.mark.parametrize("seed", range(2))
def test_random_runs_generate_the_tokens_of_each_request_s_own_kv(name: str, seed: int, tmp_path: Path) -> None:
    run(SETUPS[name], seed, tmp_path)


def test_the_chain_model_is_sensitive_to_every_position() -> None:
    """Changing any one KV value of a context changes the predicted token for most values: the check bites."""
    prompt = PREFIXES[0][:20]
    values = []
    for token in prompt:
        values.append(chain(values[-1] if values else 1, token))
    changed = 0
    for p in range(len(values)):
        wrong = list(values)
        wrong[p] = chain(wrong[p], 3)
        changed += allowed(wrong)[0] not in allowed(values)
    assert changed >= 0.75 * len(values)


class Endpoint(MigrationEndpoint):
    """One engine's half of a live migration, as `EngineCore` has it: the calls land between its steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler
        self.kv_manager = engine.kv
        self._incoming: dict[str, Request] = {}

    @property
    def mover(self) -> Worker:
        return self.engine.worker

    def _flush_if_idle(self) -> None:
        """The test steps every engine every round: ended requests reach the worker with the next plan."""

    def abort(self, req_id: str) -> None:
        self.scheduler.abort(req_id)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("host_blocks", [0, 40])
def test_random_runs_with_live_migrations_keep_each_request_s_own_kv(
    seed: int, host_blocks: int, tmp_path: Path
) -> None:
    """Two engines; running requests move between them by the cluster's migration protocol (its staged copies
    run while the request decodes on), at random times, beside everything else. Each call lands between two
    steps of the engine it goes to, as on a Ray actor."""
    rng = random.Random(seed)
    setup = Setup(host_blocks=host_blocks, preemption="swap", pool_tokens=200)
    engines = [build(setup, rng, tmp_path / "a"), build(setup, rng, tmp_path / "b")]
    endpoints = [Endpoint(engine) for engine in engines]
    reported: dict[str, list[int]] = {}
    ended: dict[str, str] = {}
    for engine in engines:
        engine.reported, engine.ended = reported, ended
        if engine.host_saves is not None:  # a reservation's write-backs run between steps, and may die too
            engine.host_saves.fail_rate = 0.03
    owner: dict[str, int] = {}
    prompts: dict[str, list[int]] = {}
    moves: list[tuple[Generator, list]] = []
    outcomes: list[str] = []
    next_id = 0

    def on_commit(destination: int) -> object:
        def commit(state: Request) -> bool:
            if state.req_id in ended:
                return False
            owner[state.req_id] = destination
            return True

        return commit

    def advance(move: tuple[Generator, list]) -> bool:
        """One call of a migration (a commit with the router's switch and the call after it, as the cluster
        holds the router's lock across them); False once it is over."""
        protocol, reply = move
        while True:
            try:
                instance, method, args = protocol.send(reply[0])
            except StopIteration as done:
                outcomes.append(done.value.outcome)
                return False
            reply[0] = getattr(instance, method)(*args)
            if method != "migration_commit":
                return True

    for round_index in range(400):
        if round_index < 250:
            for _ in range(rng.choice([0, 1, 1, 2])):
                prompt = rng.choice(PREFIXES)[: rng.randrange(0, 40)] + [rng.randrange(1, VOCAB)]
                params = SamplingParams(max_tokens=rng.randrange(1, 20), seed=rng.randrange(1000))
                if len(prompt) + params.max_tokens > MAX_MODEL_LEN:
                    continue
                req_id, where = f"r{next_id}", rng.randrange(2)
                next_id += 1
                prompts[req_id], owner[req_id] = prompt, where
                engines[where].scheduler.add(Request(req_id, list(prompt), params))
            live = [r for e in engines for r in e.scheduler.requests]
            if live and rng.random() < 0.04:
                req_id = rng.choice(live)
                engines[owner[req_id]].scheduler.abort(req_id)
                ended[req_id] = "abort"
            if rng.random() < 0.15:
                source = rng.randrange(2)
                running = [r for r in engines[source].scheduler.running if r.req_id not in ended]
                if running:
                    request = rng.choice(running)
                    state = replace(request, output_token_ids=list(request.output_token_ids))
                    protocol = migration(
                        endpoints[source], endpoints[1 - source], state, request.num_tokens, on_commit(1 - source)
                    )
                    moves.append((protocol, [None]))
        moves = [move for move in moves if advance(move)]
        if round_index == 250:
            for engine in engines:
                engine.worker.attention.fail_rate = 0.0  # type: ignore[attr-defined]
                if engine.host_saves is not None:
                    engine.host_saves.fail_rate = 0.0
        for index, engine in enumerate(engines):
            step(engine, lambda req_id, index=index: owner[req_id] == index and req_id not in ended)
        if round_index > 250 and not moves and not any(e.scheduler.has_unfinished() for e in engines):
            break
    assert not moves and not any(e.scheduler.has_unfinished() for e in engines), "requests never ended"
    assert "migrated" in outcomes, "the run should move some requests"
    for index, engine in enumerate(engines):
        step(engine, lambda req_id, index=index: owner[req_id] == index and req_id not in ended)
        engine.worker.close()
    assert len(ended) == next_id
    for req_id, reason in ended.items():
        got = reported.get(req_id, [])
        wrong = first_wrong_token(prompts[req_id], got)
        assert wrong is None, f"{req_id} ({reason}) generated {got}: token {wrong} came from KV not its own"
        if reason == "length":
            assert len(got) > 0
    for engine, endpoint in zip(engines, endpoints):
        assert engine.kv.num_used_blocks == 0 and not endpoint._incoming
        host = getattr(engine.kv, "host", None)
        assert host is None or host.num_held_blocks == 0
