"""One engine step as plain data: what the scheduler asks, what the worker answers.

    Scheduler.schedule() --StepPlan--> Worker.execute() --StepOutput--> Scheduler.update_from_output()

Everything here is picklable (ints, lists, frozen dataclasses, SamplingParams),
so a plan can cross a process or machine boundary, be logged, or be replayed
by a simulator that swaps the worker for a step-time model.

Placement: every KV manager addresses a request's tokens through a table of
equal-sized blocks: token p lives at flat slot
`table[p // table_block_size] * table_block_size + p % table_block_size`.
The paged cache's blocks are its pages; the virtual cache gives each request
a one-entry table whose block is its whole row. The plan carries only changes
to a table (`TableUpdate`); the worker keeps the tables between steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvos.outputs import TokenLogprob
from kvos.sampling_params import SamplingParams


@dataclass(frozen=True)
class TableUpdate:
    """Overwrite the request's block table from index `start` on with `block_ids`.

    Appending blocks is `start == len(table)`; a copy-on-write replaces the
    block at `start` (and the copy itself is a `CopyKV` in the same plan).
    """

    start: int
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class CopyKV:
    """Copy `num_slots` consecutive flat slots of every layer's K and V, before the forward pass.

    Copy-on-write of a shared partial block, and the virtual cache's fork of a
    parent's row into a child's, are both one of these.
    """

    src_slot: int
    dst_slot: int
    num_slots: int


@dataclass(frozen=True)
class SaveToHost:
    """Copy `num_blocks` consecutive primary blocks into consecutive host-tier blocks, before the forward pass.

    Write-back of a cached block the primary pool is about to reuse, and a
    swap-out of a preempted request's blocks, are both one of these. Runs of
    contiguous blocks travel as one op, so the copy is one large transfer.
    """

    block_id: int
    host_block_id: int
    num_blocks: int = 1

    @property
    def host_blocks(self) -> range:
        """The host blocks it writes."""
        return range(self.host_block_id, self.host_block_id + self.num_blocks)


@dataclass(frozen=True)
class LoadFromHost:
    """Copy `num_blocks` consecutive host-tier blocks into consecutive primary blocks, before the forward pass.

    A prefix hit in the host tier and a swap-in both arrive as these; the host
    copy stays where it is (the tier keeps it).
    """

    host_block_id: int
    block_id: int
    num_blocks: int = 1

    @property
    def host_blocks(self) -> range:
        """The host blocks it reads."""
        return range(self.host_block_id, self.host_block_id + self.num_blocks)

    @property
    def blocks(self) -> range:
        """The primary blocks it fills."""
        return range(self.block_id, self.block_id + self.num_blocks)


@dataclass(frozen=True)
class LoadRequestKV:
    """Bring a resuming request's KV up from the host tier while the step computes other requests.

    The request (a swap-in, or a prefix found in the host tier) computes
    nothing until the worker reports its loads done (`StepOutput.kv_loaded`);
    the worker runs them off the step's critical path and adopts the table now.
    """

    req_id: str
    table_update: TableUpdate
    loads: tuple[LoadFromHost, ...]


TierName = Literal["primary", "host"]
"""A tier whose blocks a disk operation reads or fills (the disk tier sits below both)."""


@dataclass(frozen=True)
class SaveToDisk:
    """Write one block's KV to the disk tier, in a file named by its digest, before anything else this step.

    `tier` and `block_id` say where the KV is now: a cached block the host tier
    (or, without one, the primary pool) is about to reuse.
    """

    tier: TierName
    block_id: int
    key: bytes
    """The block's digest (`kvos.memory.block_hash`): the file's name and what it is checked against."""


@dataclass(frozen=True)
class LoadFromDisk:
    """Read the block `key` from the disk tier into block `block_id` of `tier`, checking it first.

    No request reads the block until the worker reports that the load passed
    its checks (`StepOutput.disk_loaded`, in the output of this step or a
    later one: the read runs off the step's critical path); only then does it
    become findable.
    """

    key: bytes
    tier: TierName
    block_id: int


def coalesce_saves(ops: list[SaveToHost]) -> list[SaveToHost]:
    """Merge ops whose primary and host runs both continue the previous op's (order kept)."""
    merged: list[SaveToHost] = []
    for op in ops:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.block_id + last.num_blocks == op.block_id
            and last.host_block_id + last.num_blocks == op.host_block_id
        ):
            merged[-1] = SaveToHost(last.block_id, last.host_block_id, last.num_blocks + op.num_blocks)
        else:
            merged.append(op)
    return merged


def coalesce_loads(ops: list[LoadFromHost]) -> list[LoadFromHost]:
    """Merge ops whose host and primary runs both continue the previous op's (order kept)."""
    merged: list[LoadFromHost] = []
    for op in ops:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.block_id + last.num_blocks == op.block_id
            and last.host_block_id + last.num_blocks == op.host_block_id
        ):
            merged[-1] = LoadFromHost(last.host_block_id, last.block_id, last.num_blocks + op.num_blocks)
        else:
            merged.append(op)
    return merged


@dataclass(frozen=True)
class NewRequestData:
    """Sent the first time a request is scheduled, and again when it resumes after preemption.

    The worker keeps it (plus the tokens it samples) until the request finishes,
    so later steps carry only `ScheduledRequest` deltas.
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed_offset: int
    """Added to `params.seed`: sibling i of an n > 1 request samples with seed + i."""


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of the step.

    Not frozen, though nothing changes one once built: one is built per running request per step, and a
    frozen dataclass's `__init__` (an `object.__setattr__` per field) cost 2.4x as much, a fifth of the
    scheduler's time at 256 requests. Slotted: smaller, and its fields read faster."""

    req_id: str
    new_token_ids: list[int]
    """Tokens whose KV this step computes (a prompt chunk, or the last sampled token)."""
    num_computed_tokens: int
    """Positions already in the KV cache before this step; new tokens sit at the following positions."""
    sample: bool
    """True when the chunk reaches the request's last known token, so a new token is sampled."""
    table_update: TableUpdate | None = None
    """Placement change for this step (None: the table the worker holds already covers it)."""


@dataclass(frozen=True)
class StepPlan:
    """Everything the worker needs for one step, in execution order.

    Memory operations are issued first, in this order: `disk_drops` (files
    the disk tier evicts), `disk_saves` (host or primary -> disk), `saves`
    (primary -> host), all of which read blocks that later operations or the
    forward pass may overwrite; then `loads` (host -> primary, for requests
    scheduled in this step), `kv_loads` (host -> primary, for requests that
    wait for them), `disk_loads` (disk -> host or primary) and `copies`; then
    the forward pass over `scheduled` (in order: the flat batch is their
    `new_token_ids` concatenated), then sampling. Moves between tiers run in
    that order on the worker's copy thread, overlapping the forward pass; the
    forward pass waits only for those that touch blocks its requests use.
    `new_requests` introduce (or re-introduce) state the worker keeps;
    `finished_req_ids` tell it to drop state for requests that ended.
    """

    step_id: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    new_requests: list[NewRequestData] = field(default_factory=list)
    copies: list[CopyKV] = field(default_factory=list)
    saves: list[SaveToHost] = field(default_factory=list)
    loads: list[LoadFromHost] = field(default_factory=list)
    kv_loads: list[LoadRequestKV] = field(default_factory=list)
    disk_drops: list[bytes] = field(default_factory=list)
    disk_saves: list[SaveToDisk] = field(default_factory=list)
    disk_loads: list[LoadFromDisk] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    """Requests that lost their primary KV this step (swapped to the host tier or dropped);
    their tables are void until they resume."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.new_token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def moves_kv(self) -> bool:
        """True when the plan copies KV between tiers (host or disk)."""
        return bool(self.saves or self.loads or self.kv_loads or self.disk_drops or self.disk_saves or self.disk_loads)


@dataclass(slots=True)
class SampledToken:
    """One per sampling request per step: slotted and not frozen, as `ScheduledRequest` is."""

    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class StepOutput:
    """What the worker hands back: one token per request that sampled, or why it could not.

    A failure in one request's sampling (`failed`, req_id -> client-safe
    message) ends that request only; its neighbours' tokens are still here.
    """

    step_id: int
    sampled: dict[str, SampledToken] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    kv_loaded: list[tuple[str, int]] = field(default_factory=list)
    """(req_id, step_id) of every `LoadRequestKV` finished since the last output: the request may compute.

    Copies run on the worker's copy thread, so this and the disk reports
    below cover moves planned by this step or by earlier ones."""
    kv_load_failed: list[tuple[str, int, str]] = field(default_factory=list)
    """(req_id, step_id, error) of `LoadRequestKV`s whose copy raised: that request fails alone."""
    disk_loaded: list[bytes] = field(default_factory=list)
    """Keys of `disk_loads` whose files passed every check and were copied in."""
    disk_load_failed: dict[bytes, str] = field(default_factory=dict)
    """Keys of `disk_loads` that did not: "corrupt" (bad header, size or checksum) or "missing"."""
    disk_save_failed: dict[bytes, str] = field(default_factory=dict)
    """Keys of `disk_saves` the worker could not write (the OS error, for the log)."""
    host_save_failed: list[int] = field(default_factory=list)
    """Host blocks a `SaveToHost` could not write: they hold no usable KV, so the books forget their
    digests and the host copies that include them (a load that reads one fails instead of copying)."""
    copy_seconds: dict[str, float] = field(default_factory=dict)
    """Copy-thread time of the KV moves finished since the last output, by direction: "to_host"
    (swap-outs and write-backs), "from_host" (swap-ins and host prefix hits), "to_disk",
    "from_disk"; for the latency histograms."""


@dataclass(slots=True)
class SequenceUpdate:
    """The core's report on one sequence after a step, for the front end (token ids only). Not frozen and
    slotted, as `ScheduledRequest` is, for the same reason."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    num_cached_tokens: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    """Set when the engine failed this sequence: a client-safe message."""
