"""`kvos sim profile`: time the real worker on hand-built plans over a grid, and fit a step-time model.

For every grid point (prefill tokens T, decode batch B, context L) one plan
is built by hand: B decodes, each one new token after L computed ones, then
(if T > 0) one prompt chunk of T tokens, placed in blocks the engine's own
KV books hand out. The grid is visited in up to three rounds (forward,
backward, forward: `ROUNDS`); at each visit the real `Worker` runs the plan
once to warm up (and to compile, with `compile=True`), then times it; the
median of a point's `repeats` (or a little more) timings over its visits is
the sample. Only `Worker.execute` is timed here: the scheduler's and front
end's own time per step is measured separately, on a served run
(`benchmarks.profile_serving`), and added to the same profile.

After the grid, the first use of a row count: a step's linears run a
matmul oneDNN built for that many rows, and the first step with a new
count builds them (about 2.7 ms more here, `ONEDNN_VERBOSE=2` shows each
`create:cache_miss`). Fresh prompts of 8 to about 136 tokens, of lengths
the grid never ran, are timed four times each, in a shuffled order; the
first time less the median of the repeats is that length's first-use
cost (`Profile.first_uses`; the simulator charges their median).

With a host tier (`--kv-offload-size`), the moves are timed on the real
worker too: a prompt chunk whose first tokens come up from the host tier in
this step (`loads`, which the forward pass waits for), and one whose blocks
are first written back (`saves`), one block per op as scattered blocks
travel, at a few sizes. The copy thread reports how long each move took
(`StepOutput.copy_seconds`, per-op overhead included); the least-squares
slope of that over tokens moved is the cost per token (`CopyModel`). (The
step's own time, against the same step without the moves, says the same
within its noise, about 10 ms a step here, which at these sizes is as large
as the host tier's moves; the log shows both.) With a disk tier
(`--kv-disk-path`, `--kv-disk-size`) the same steps write those blocks to
disk, one file each, then read them back. The files are fresh, so a read
finds them in the OS's page cache, as serving does for blocks written
minutes before; the profile removes them afterwards.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from kvos.config import EngineConfig
from kvos.core.engine_core import EngineCore
from kvos.core.plan import (
    LoadFromDisk,
    LoadFromHost,
    NewRequestData,
    SaveToDisk,
    SaveToHost,
    ScheduledRequest,
    StepPlan,
)
from kvos.core.request import Request
from kvos.memory.factory import host_tier
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager
from kvos.model.loader import load_model
from kvos.sampling_params import SamplingParams
from kvos.sim.step_model import Profile, StepShape
from kvos.sim.worker import CopyModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileGrid:
    """The points measured: every prefill size x every decode batch x every context (T = B = 0 skipped)."""

    prefill_tokens: tuple[int, ...] = (0, 32, 128, 256, 512)
    decode_batch_sizes: tuple[int, ...] = (0, 1, 4, 16, 32, 64)
    contexts: tuple[int, ...] = (64, 256, 640)
    repeats: int = 5

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "decode_batch_sizes", "contexts"):
            values = getattr(self, name)
            if not values or any(v < 0 for v in values):
                raise ValueError(f"{name} must be a non-empty tuple of counts >= 0, got {values}")
        if min(self.contexts) < 1:
            raise ValueError(f"contexts must be >= 1, got {self.contexts}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    def points(self) -> list[tuple[int, int, int]]:
        points = []
        for t in self.prefill_tokens:
            for b in self.decode_batch_sizes:
                for length in self.contexts if b else self.contexts[:1]:
                    if t or b:
                        points.append((t, b, length))
        return points

    @property
    def max_tokens_held(self) -> int:
        """KV tokens the largest point holds at once."""
        return max(self.prefill_tokens) + max(self.decode_batch_sizes) * (max(self.contexts) + 1)


ROUNDS = 3
"""Visits to every point, in alternating order (forward, backward, forward), whose timings are pooled. This
VM's speed drifts by a third within minutes: timed in one visit, a point would carry the speed of its own
minute into the fit, and neighbouring points (timed together) would share it. Spread over the profile, every
point sees the same mix of spells."""

QUICK_GRID = ProfileGrid(
    prefill_tokens=(0, 64, 256, 512), decode_batch_sizes=(0, 1, 8, 32), contexts=(64, 512), repeats=3
)
"""27 points: about a fifth of the full grid's time, for a validation run that must fit in minutes."""
SMOKE_GRID = ProfileGrid(prefill_tokens=(0, 16, 48), decode_batch_sizes=(0, 1, 4), contexts=(16, 32), repeats=1)
GRIDS = {"full": ProfileGrid(), "quick": QUICK_GRID, "smoke": SMOKE_GRID}


def profile_engine(config: EngineConfig, grid: ProfileGrid) -> Profile:
    """Build the engine `config` describes and time its worker over `grid`."""
    loaded = load_model(config.model)
    core = EngineCore(config, loaded, frozenset())
    try:
        if grid.max_tokens_held > core.capacity_tokens:
            raise ValueError(
                f"the grid holds up to {grid.max_tokens_held} KV tokens at once but the engine's cache holds "
                f"{core.capacity_tokens}; raise --kv-cache-memory"
            )
        longest = max(max(grid.prefill_tokens), max(grid.contexts) + 1)
        if longest > core.max_model_len:
            raise ValueError(f"the grid needs {longest}-token sequences but the context is {core.max_model_len}")
        # The engine never runs more than max_num_seqs sequences in a step (the virtual cache has no row
        # for more): a point beyond that is timed with as many decodes as fit beside its prompt chunk.
        most = core.config.scheduler.max_num_seqs
        points = [(t, min(b, most - (t > 0)), length) for t, b, length in grid.points()]
        if points != grid.points():
            logger.info("decodes capped at %d beside a prompt chunk (--max-num-seqs %d)", most - 1, most)
        rounds = min(ROUNDS, grid.repeats)
        per_visit = -(-grid.repeats // rounds)
        timings: list[list[float]] = [[] for _ in points]
        for r in range(rounds):
            logger.info("round %d/%d: %d points, %d timed steps each", r + 1, rounds, len(points), per_visit)
            order = range(len(points)) if r % 2 == 0 else range(len(points) - 1, -1, -1)
            for n in order:
                t, b, length = points[n]
                timings[n] += _time_point(core, t, b, length, per_visit, step_id=r * len(points) + n + 1)
        samples = []
        for (t, b, length), times in zip(points, timings):
            seconds = statistics.median(times)
            samples.append((StepShape(t, t * t, b, b * (length + 1), int(t > 0)), seconds))
            logger.info("prefill %d, decodes %d x context %d: %.2f ms", t, b, length, 1000 * seconds)
        # Rows run so far: the grid's steps, and with --compile the warm-up's decode batches (at most max_num_seqs).
        rows_run = {t + b for t, b, _ in points} | {1, 2, most}
        first_uses = _profile_first_uses(core, rows_run, ROUNDS * len(points) + 1)
        host_copy = _profile_moves(core, HOST, grid.repeats) if core.worker.host_pool is not None else None
        disk_copy = _profile_moves(core, DISK, grid.repeats) if core.worker.disk_store is not None else None
    finally:
        core.close()
    engine: dict[str, Any] = {
        "model": loaded.name,
        "dtype": config.model.resolved_dtype,
        "quantization": config.model.quantization,
        "compile": config.model.compile,
        "device": config.model.device,
        "kv_bytes_per_token": core.kv_shape.bytes_per_token,
        "kv_cache": config.cache.kv_cache,
        "kv_shape": {
            "num_layers": core.kv_shape.num_layers,
            "num_kv_heads": core.kv_shape.num_kv_heads,
            "head_dim": core.kv_shape.head_dim,
            "dtype": str(core.kv_shape.dtype).removeprefix("torch."),
        },
        "kv_capacity_tokens": core.capacity_tokens,
        "block_size": config.cache.block_size,
        "max_model_len": core.max_model_len,
        "machine": _machine(config.model.device),
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "grid": {"points": len(samples), "repeats": grid.repeats},
    }
    if isinstance(core.kv_manager, VirtualKVCacheManager):
        engine["kv_page_size"] = core.kv_manager.layout.page_size
    if host_copy is not None:
        engine["host_copy"] = asdict(host_copy)
    if disk_copy is not None:
        engine["disk_copy"] = asdict(disk_copy)
    return Profile(tuple(samples), engine, first_uses=first_uses)


FIRST_USE_ROWS = range(8, 136, 4)
"""Prompt lengths timed for the first-use cost (moved past the rows the profile ran). Short ones: the extra
does not grow with the rows (2.44, 2.82 and 2.51 ms below 130, at 130-300 and at 300-600 tokens, 40 lengths,
2026-11-29), but one timing of a long prompt scatters by as much as the extra itself on this VM (-8 to +44 ms
at 300-514 tokens in one profile, whose median came out 0.9 ms), so the median needs short steps."""


def _profile_first_uses(core: EngineCore, rows_run: set[int], step_id: int) -> tuple[tuple[int, float], ...]:
    """(rows, seconds) for prompt lengths that no step of the profile has run: a prompt of that length, then
    three more (fresh requests each, so each step adopts one), the first's time less the median of the
    others'. (Less the fastest, the extra came out biased upwards by the noise of long steps: 3.9 against
    2.2 ms at 300-600 and below 130 tokens, where the median gives 2.5 and 2.4.)"""
    lengths: list[int] = []
    for n in FIRST_USE_ROWS:
        while n in rows_run or n in lengths:
            n += 1
        if n <= core.max_model_len:
            lengths.append(n)
    # In a shuffled order, as a server meets prompt lengths: in increasing order every prompt is the
    # longest yet, and its new, larger buffers cost more with the rows (2.7 ms below 130 tokens, 5.6 at
    # 300-600, against 2.4 and 2.5 shuffled; 40 lengths each, 2026-11-29).
    random.Random(0).shuffle(lengths)
    first_uses = []
    for k, n in enumerate(lengths):
        first, *again = (_time_prompt(core, n, step_id + 4 * k + j) for j in range(4))
        first_uses.append((n, first - statistics.median(again)))
        logger.info("first use of %d rows: %.2f ms more than a repeat", n, 1000 * first_uses[-1][1])
    return tuple(first_uses)


def _time_prompt(core: EngineCore, length: int, step_id: int) -> float:
    """Seconds of `Worker.execute` on a step that adopts one new request and computes its whole prompt."""
    kv, worker = core.kv_manager, core.worker
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    request = Request(f"f{step_id}", _tokens(step_id, 0, length), params)
    allocation = kv.allocate_slots(request, length)
    if allocation is None:
        raise RuntimeError("KV books ran out below the capacity checked before profiling")
    kv.end_step()
    ids = list(request.prompt_token_ids)
    plan = StepPlan(
        step_id,
        [ScheduledRequest(request.req_id, ids, 0, True, allocation.table_update)],
        [NewRequestData(request.req_id, ids, [], request.params, 0)],
    )
    start = time.perf_counter()
    worker.execute(plan)
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)
    seconds = time.perf_counter() - start
    worker.execute(StepPlan(step_id, finished_req_ids=[request.req_id]))
    kv.free(request)
    return seconds


Tier = Literal["host", "disk"]
HOST: Tier = "host"
DISK: Tier = "disk"

MOVE_PREFILL = 64
"""The prompt chunk computed in each move point: the step the moves hold up."""
MOVE_TOKENS = 1024
"""The most tokens moved at a point (less where the pool, host tier or context is smaller); also a quarter and 0."""


def _profile_moves(core: EngineCore, tier: Tier, repeats: int) -> CopyModel:
    """Seconds per token that moves down to `tier` and up from it add to a step: the least-squares slope over
    3 sizes."""
    bs = core.config.cache.block_size
    if tier == HOST:
        found = host_tier(core.kv_manager)
        assert found is not None  # the caller checked the worker has a host pool
        tier_tokens, flags = found[0].num_blocks * bs, "--kv-offload-size"
    else:
        assert isinstance(core.kv_manager, PagedKVCacheManager) and core.kv_manager.disk is not None
        tier_tokens, flags = core.kv_manager.disk.num_blocks * bs, "--kv-disk-size"
    room = min(MOVE_TOKENS, core.capacity_tokens - MOVE_PREFILL, core.max_model_len - MOVE_PREFILL)
    most = min(room, tier_tokens) // (4 * bs) * 4 * bs
    if most < 4 * bs:
        raise ValueError(
            f"profiling {tier}-tier moves needs room for {4 * bs + MOVE_PREFILL} tokens in the pool and context "
            f"and {4 * bs} in the {tier} tier; raise --kv-cache-memory or {flags}"
        )
    sizes = (0, most // 4, most)
    slopes = {}
    for kind in ("save", "load"):  # disk: the loads read the files the saves wrote
        copies, added = [], []
        for moved in sizes:
            step, copy = _time_moves(core, tier, kind, moved, repeats, step_id=10_000 + moved)
            # The same step without the moves: its chunk attends to the moved prefix either way.
            without, _ = _time_moves(core, tier, "none", moved, repeats, step_id=20_000 + moved)
            copies.append(copy)
            added.append(step - without)
        slopes[kind] = max(0.0, statistics.linear_regression(sizes, copies).slope)
        logger.info(
            "%s tier %ss at %s tokens: the copy thread took %s ms, the step took %s ms more: %.1f us per token",
            tier,
            kind,
            ", ".join(map(str, sizes)),
            ", ".join(f"{1000 * t:.1f}" for t in copies),
            ", ".join(f"{1000 * t:.1f}" for t in added),
            1e6 * slopes[kind],
        )
    if tier == DISK:
        assert core.worker.disk_store is not None
        for moved in sizes:
            for i in range(moved // bs):
                core.worker.disk_store.drop(_disk_key(moved, i))
    return CopyModel(save_s_per_token=slopes["save"], load_s_per_token=slopes["load"])


def _time_moves(core: EngineCore, tier: Tier, kind: str, moved: int, repeats: int, step_id: int) -> tuple[float, float]:
    """Median seconds of a step computing MOVE_PREFILL tokens after `moved` cached ones, which the step first
    saves to `tier` or loads from it (`kind`), a block per op, or neither ("none"); and the copy thread's
    mean seconds for those moves."""
    kv, worker = core.kv_manager, core.worker
    bs = core.config.cache.block_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    request = Request(f"m{step_id}-{tier}-{kind}", _tokens(step_id, 0, moved + MOVE_PREFILL), params)
    allocation = kv.allocate_slots(request, moved + MOVE_PREFILL)
    if allocation is None:
        raise RuntimeError("KV books ran out below the capacity checked before profiling")
    kv.end_step()
    table = kv.block_table(request)
    # Loads fill the request's first blocks (its prefix, found in the tier); saves write them down.
    blocks = range(moved // bs) if kind != "none" else range(0)
    moves: dict[str, Any] = {}
    if tier == HOST and kind == "load":
        moves["loads"] = [LoadFromHost(i, table[i]) for i in blocks]
    elif tier == HOST:
        moves["saves"] = [SaveToHost(table[i], i) for i in blocks]
    elif kind == "load":
        moves["disk_loads"] = [LoadFromDisk(_disk_key(moved, i), "primary", table[i]) for i in blocks]
    else:
        moves["disk_saves"] = [SaveToDisk("primary", table[i], _disk_key(moved, i)) for i in blocks]
    ids = request.prompt_token_ids
    new = [NewRequestData(request.req_id, list(ids), [], params, 0)]
    first = ScheduledRequest(request.req_id, ids[moved:], moved, True, allocation.table_update)
    outputs = [worker.execute(StepPlan(step_id, [first], new, **moves))]  # warm-up
    again = ScheduledRequest(request.req_id, ids[moved:], moved, True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs.append(worker.execute(StepPlan(step_id, [again], **moves)))
        if worker.device.type == "cuda":
            torch.cuda.synchronize(worker.device)
        times.append(time.perf_counter() - start)
    worker.copies.drain()
    outputs.append(worker.execute(StepPlan(step_id, finished_req_ids=[request.req_id])))
    kv.free(request)
    failed = [f for o in outputs for f in (o.disk_load_failed, o.disk_save_failed) if f]
    if failed:
        raise RuntimeError(f"a disk move failed while profiling: {failed[0]}")
    direction = {"save": "to_", "load": "from_"}.get(kind)
    copied = sum(o.copy_seconds.get(f"{direction}{tier}", 0.0) for o in outputs) if direction else 0.0
    return statistics.median(times), copied / (repeats + 1)  # the warm-up moved them too


def _disk_key(moved: int, index: int) -> bytes:
    """The digest a profiling block is filed under on disk (any 32 bytes name a file)."""
    return hashlib.sha256(f"kvos-sim-profile {moved} {index}".encode()).digest()


def _time_point(core: EngineCore, prefill: int, batch: int, context: int, repeats: int, step_id: int) -> list[float]:
    """Seconds of `Worker.execute` on one hand-built step, `repeats` times after a warm-up; frees everything it
    took."""
    kv, worker = core.kv_manager, core.worker
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    requests: list[tuple[Request, int, int]] = []  # (request, computed before the step, tokens in the step)
    for i in range(batch):
        requests.append((Request(f"d{step_id}-{i}", _tokens(step_id, i, context + 1), params), context, 1))
    if prefill:
        requests.append((Request(f"p{step_id}", _tokens(step_id, batch, prefill), params), 0, prefill))
    first: list[ScheduledRequest] = []
    for request, computed, num_new in requests:
        allocation = kv.allocate_slots(request, computed + num_new)
        if allocation is None:
            raise RuntimeError("KV books ran out below the capacity checked before profiling")
        ids = request.prompt_token_ids
        first.append(ScheduledRequest(request.req_id, ids[computed:], computed, True, allocation.table_update))
    kv.end_step()
    new = [NewRequestData(r.req_id, list(r.prompt_token_ids), [], r.params, 0) for r, _, _ in requests]
    worker.execute(StepPlan(step_id, first, new))  # warm-up: adopts the requests, compiles new shapes
    again = [ScheduledRequest(s.req_id, s.new_token_ids, s.num_computed_tokens, True) for s in first]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        worker.execute(StepPlan(step_id, again))
        if core.worker.device.type == "cuda":
            torch.cuda.synchronize(core.worker.device)
        times.append(time.perf_counter() - start)
    worker.execute(StepPlan(step_id, finished_req_ids=[r.req_id for r, _, _ in requests]))
    for request, _, _ in requests:
        kv.free(request)
    return times


def _tokens(step_id: int, index: int, length: int) -> list[int]:
    """Token ids for a profiling prompt: which ids does not change a step's time, only how many."""
    return [(step_id * 131 + index * 7 + j) % 1000 + 10 for j in range(length)]


def _machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
