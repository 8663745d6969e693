"""The worker: owns the model, the KV tensors and per-request batch state; executes plans.

    execute(plan):
        drop finished requests, adopt new ones        (state kept between steps)
        apply table updates                           (block tables / rows, cached as slot indices)
        queue moves between tiers on the copy thread  (host and disk saves, loads: off the critical path)
        wait for the moves that touch the step's blocks; copy-on-write, forks
        flat batch -> attention metadata -> forward   (the backend chosen at start-up; a decode step on a
                                                       GPU replays a CUDA graph: cuda_graphs)
        sample the rows that complete their tokens    (one row's failure is that row's alone)
        -> StepOutput

The worker never decides anything: which tokens, where their KV lives and
what to copy all come in the plan. What it remembers between steps is what
it would otherwise rebuild every step: each request's block table as a
tensor of slot indices, its sampling parameters, its seeded generator,
its tokens (for penalties) and its grammar matcher (structured output; on
resume rebuilt by replaying the tokens generated so far).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvos.attention.backend import AttentionBackend, SeqLayout
from kvos.attention.gather_sdpa import decode_batch
from kvos.attention.metadata import AttentionMetadata
from kvos.core.plan import (
    LoadFromDisk,
    LoadFromHost,
    LoadRequestKV,
    NewRequestData,
    SampledToken,
    SaveToDisk,
    SaveToHost,
    ScheduledRequest,
    StepOutput,
    StepPlan,
    TableUpdate,
)
from kvos.memory.kv_manager import TierOps
from kvos.model import compiled_decode
from kvos.model.llama import LlamaForCausalLM
from kvos.sampling_params import SamplingParams
from kvos.structured.grammar import GrammarCompiler, GrammarMatcher
from kvos.worker.copy_engine import CopyEngine, CopyReport
from kvos.worker.cuda_graphs import DecodeGraphs
from kvos.worker.disk_store import CorruptBlockError, DiskKVStore, KVCaches
from kvos.worker.kv_cache import HostKVPool, KVBuffer
from kvos.worker.sampler import SamplingRow, sample

logger = logging.getLogger(__name__)

SAMPLING_FAILED = "sampling failed for this request"
"""What a client hears when its row of the sampler raised (the cause goes to the log)."""
KV_UNREADABLE = "this request's cached KV could not be read back from the host tier"
"""What a client hears when a prefix hit it took from the host tier could not be loaded: its copy raised, or
the block had never been written (a failed save)."""


@dataclass
class _RequestState:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    block_table: list[int]
    table: torch.Tensor
    """(len(block_table),) int32: the block table as a tensor, for backends that walk it."""
    slots: torch.Tensor
    """(len(block_table) * table_block_size,) flat slot of every position the table covers."""
    grammar: GrammarMatcher | None = None
    grammar_error: Exception | None = None
    """Why the matcher could not be built; the request fails at its first sample."""


class Worker:
    """Executes `StepPlan`s on one model and one KV buffer."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_buffer: KVBuffer,
        table_block_size: int,
        device: torch.device,
        compile_decode: bool = False,
        host_pool: HostKVPool | None = None,
        grammars: GrammarCompiler | None = None,
        disk_store: DiskKVStore | None = None,
    ) -> None:
        self.model = model
        self.host_pool = host_pool
        self.disk_store = disk_store
        self.attention: AttentionBackend = model.attention
        self.kv_buffer = kv_buffer
        self.table_block_size = table_block_size
        self.device = device
        self._offsets = torch.arange(table_block_size, device=device)
        self._requests: dict[str, _RequestState] = {}
        if compile_decode and self.attention.name not in compiled_decode.COMPILED_BACKENDS:
            # The compiled step is warmed up and shape-marked on those backends' metadata.
            raise ValueError(
                f"compile=True compiles decode steps for attention_backend "
                f"{' or '.join(map(repr, compiled_decode.COMPILED_BACKENDS))}, not {self.attention.name!r}; "
                "drop compile=True or use one of those"
            )
        self.grammars = grammars
        self._decode_forward = compiled_decode.compile_decode(model) if compile_decode else model.forward
        self.copies = CopyEngine(device)
        """Moves between tiers, run off the step's critical path."""
        self.decode_graphs: DecodeGraphs | None = None
        """Decode steps replayed from CUDA graphs, where the engine captured them (`cuda_graphs`)."""

    def close(self) -> None:
        """Finish the queued moves between tiers and stop the copy thread. Safe to call twice."""
        self.copies.close()

    @property
    def num_requests(self) -> int:
        """Requests whose state the worker holds (zero once every request has ended)."""
        return len(self._requests)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        try:
            return self._execute(plan)
        except BaseException:
            # What this plan queued on the copy thread is void (the scheduler forgets it); earlier
            # plans' moves stand and are reported with the next step that succeeds.
            self.copies.drain()
            self.copies.discard(plan.step_id)
            raise

    def _execute(self, plan: StepPlan) -> StepOutput:
        for req_id in plan.finished_req_ids:
            self._requests.pop(req_id, None)
        for data in plan.new_requests:
            self._adopt(data)
        for req_id in plan.preempted_req_ids:
            state = self._requests.get(req_id)
            if state is not None:
                self._set_table(state, TableUpdate(0, ()))
        for kv_load in plan.kv_loads:
            self._set_table(self._requests[kv_load.req_id], kv_load.table_update)
        if plan.moves_kv:
            self._move_kv(plan)
        if plan.is_empty:
            self.copies.drain()  # nothing to overlap with: let the moves finish, so waiting requests may run
            return self._output(plan.step_id)
        for scheduled in plan.scheduled:
            if scheduled.table_update is not None:
                self._set_table(self._requests[scheduled.req_id], scheduled.table_update)
        if self.copies.num_pending:
            self.copies.wait_for(self._blocks_in_use(plan), self.table_block_size)
        self.kv_buffer.copy(plan.copies)

        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqLayout] = []
        sample_rows: list[int] = []
        sampling_ids: list[str] = []
        for scheduled in plan.scheduled:
            state = self._requests[scheduled.req_id]
            start, n = scheduled.num_computed_tokens, len(scheduled.new_token_ids)
            row = len(input_ids)
            input_ids.extend(scheduled.new_token_ids)
            positions.extend(range(start, start + n))
            seqs.append(SeqLayout(row, n, start, state.slots[: start + n], state.table, self.table_block_size))
            if scheduled.sample:
                sample_rows.append(row + n - 1)
                sampling_ids.append(scheduled.req_id)
        meta = self.attention.build_metadata(seqs, len(input_ids), self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        decode = _pure_decode(meta, seqs)
        hidden = self.decode_graphs.run(ids, pos, meta) if decode and self.decode_graphs is not None else None
        if hidden is None:
            forward = self._decode_forward if decode else self.model
            hidden = forward(ids, pos, self.kv_buffer.kv_caches, meta)
        if not sample_rows:
            return self._output(plan.step_id, scheduled=plan.scheduled)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        sampled, failed = self._sample(logits, sampling_ids)
        return self._output(plan.step_id, sampled, failed, plan.scheduled)

    def _blocks_in_use(self, plan: StepPlan) -> set[int]:
        """Every block the step's forward pass and copies read or write (in table blocks)."""
        blocks: set[int] = set()
        for scheduled in plan.scheduled:
            blocks.update(self._requests[scheduled.req_id].block_table)
        tbs = self.table_block_size
        for copy in plan.copies:
            for slot in (copy.src_slot, copy.dst_slot):
                blocks.update(range(slot // tbs, -(-(slot + copy.num_slots) // tbs)))
        return blocks

    def _output(
        self,
        step_id: int,
        sampled: dict[str, SampledToken] | None = None,
        failed: dict[str, str] | None = None,
        scheduled: Sequence[ScheduledRequest] = (),
    ) -> StepOutput:
        """The step's tokens, plus what the copy thread finished since the last output.

        A `scheduled` request whose blocks a skipped host load was to fill read KV
        that is not its own: it fails (alone, with whoever shared those blocks)."""
        if self.kv_buffer.copies_end_with_step:
            self.copies.drain()
        output = StepOutput(step_id, sampled or {}, failed or {})
        unfilled: set[int] = set()
        for report in self.copies.take_reports():
            output.kv_loaded.extend((req_id, report.step_id) for req_id in report.kv_loaded)
            output.kv_load_failed.extend((req_id, report.step_id, e) for req_id, e in report.kv_load_failed.items())
            output.disk_loaded.extend(report.disk_loaded)
            output.disk_load_failed.update(report.disk_load_failed)
            output.disk_save_failed.update(report.disk_save_failed)
            output.host_save_failed.extend(report.host_save_failed)
            unfilled.update(report.unfilled_blocks)
            for kind, seconds in report.seconds.items():
                output.copy_seconds[kind] = output.copy_seconds.get(kind, 0.0) + seconds
        if unfilled:
            for request in scheduled:
                if not unfilled.isdisjoint(self._requests[request.req_id].block_table):
                    output.sampled.pop(request.req_id, None)
                    output.failed[request.req_id] = KV_UNREADABLE
        return output

    def _move_kv(self, plan: StepPlan) -> None:
        """Queue the plan's moves between tiers on the copy thread, in the plan's order.

        Three kinds of job, so that a step waits for no more than it needs:
        what reads the pool before it is overwritten (disk writes, host
        saves), loads for requests this step computes, and each waiting
        request's loads on its own (its report lets it run). A disk operation
        that fails is reported, not raised: a bad or missing file costs its
        block (the scheduler recomputes it), a failed write stops the disk
        tier taking blocks; serving goes on either way.
        """
        self._check_tiers(
            bool(plan.saves or plan.loads or plan.kv_loads), bool(plan.disk_drops or plan.disk_saves or plan.disk_loads)
        )
        primary = self.kv_buffer.kv_caches
        caches = self._tier_caches()
        host_bs = self.host_pool.block_size if self.host_pool is not None else self.table_block_size
        host, disk = self.host_pool, self.disk_store
        tbs = self.table_block_size

        def host_ranges(ops: Sequence[SaveToHost | LoadFromHost]) -> list[tuple[int, int]]:
            return [(op.block_id * host_bs, (op.block_id + op.num_blocks) * host_bs) for op in ops]

        def disk_ranges(ops: Sequence[SaveToDisk | LoadFromDisk]) -> list[tuple[int, int]]:
            return [(op.block_id * tbs, (op.block_id + 1) * tbs) for op in ops if op.tier == "primary"]

        if plan.disk_drops or plan.disk_saves or plan.saves:

            def save(report: CopyReport) -> None:
                self._save_down(plan.disk_drops, plan.disk_saves, plan.saves, caches, report)

            self.copies.submit(plan.step_id, disk_ranges(plan.disk_saves) + host_ranges(plan.saves), save)
        if plan.loads:

            def load(report: CopyReport) -> None:
                assert host is not None
                start = time.perf_counter()
                skipped = [op for op in plan.loads if not host.readable(op)]
                try:
                    host.load(primary, [op for op in plan.loads if op not in skipped])
                except Exception:  # the requests that hold these blocks fail, not the whole step
                    logger.exception("loading %d host-tier prefix hits failed", len(plan.loads) - len(skipped))
                    skipped = plan.loads
                for op in skipped:
                    report.unfilled_blocks.extend(op.blocks)
                report.seconds["from_host"] = time.perf_counter() - start

            self.copies.submit(plan.step_id, host_ranges(plan.loads), load)
        for kv_load in plan.kv_loads:

            def load_request(report: CopyReport, kv_load: LoadRequestKV = kv_load) -> None:
                assert host is not None
                start = time.perf_counter()
                try:
                    host.load(primary, list(kv_load.loads))
                except Exception as exc:  # this request fails, and whoever shares its blocks; the log has the cause
                    logger.exception("loading %s's KV from the host tier failed", kv_load.req_id)
                    report.kv_load_failed[kv_load.req_id] = f"{type(exc).__name__}: {exc}"
                    # A request planned into the same step may have found these blocks by digest (the
                    # books mark a swap-in's blocks findable at once) and computed on top of them.
                    for op in kv_load.loads:
                        report.unfilled_blocks.extend(op.blocks)
                else:
                    report.kv_loaded.append(kv_load.req_id)
                report.seconds["from_host"] = time.perf_counter() - start

            self.copies.submit(plan.step_id, host_ranges(kv_load.loads), load_request)
        if plan.disk_loads:

            def load_disk(report: CopyReport) -> None:
                assert disk is not None
                start = time.perf_counter()
                for op in plan.disk_loads:
                    try:
                        disk.load(caches, op)
                        if op.tier == "host":
                            assert host is not None
                            host.mark_written(range(op.block_id, op.block_id + 1))
                    except CorruptBlockError as exc:
                        report.disk_load_failed[op.key] = exc.reason
                    except FileNotFoundError:
                        report.disk_load_failed[op.key] = "missing"
                    except Exception as exc:  # reported, so the read's request stops waiting for it
                        report.disk_load_failed[op.key] = f"{type(exc).__name__}: {exc}"
                    else:
                        report.disk_loaded.append(op.key)
                report.seconds["from_disk"] = time.perf_counter() - start

            self.copies.submit(plan.step_id, disk_ranges(plan.disk_loads), load_disk)

    def _check_tiers(self, host: bool, disk: bool) -> None:
        """Moves to or from a tier this worker lacks are a bug in the books, not a request's fault."""
        if host and self.host_pool is None:
            raise RuntimeError("the plan moves KV to or from a host tier, but this worker has none")
        if disk and self.disk_store is None:
            raise RuntimeError("the plan moves KV to or from a disk tier, but this worker has none")

    def _tier_caches(self) -> dict[str, KVCaches]:
        """Every tier's K/V tensors that a disk operation may read or fill, by `TierName`."""
        caches = {"primary": self.kv_buffer.kv_caches}
        if self.host_pool is not None:
            caches["host"] = self.host_pool.kv_caches
        return caches

    def _save_down(
        self,
        drops: Sequence[bytes],
        disk_saves: Sequence[SaveToDisk],
        saves: Sequence[SaveToHost],
        caches: dict[str, KVCaches],
        report: CopyReport,
    ) -> None:
        """Disk drops and writes, then write-backs to the host tier: a disk write may read a host block that
        a write-back is about to fill. A failed write is reported, not raised.

        Nothing here raises: the books already count on every host save of the job, so a disk
        failure must not skip them. A host block whose save failed is not written to disk (its key
        reads as missing later); the failed save's blocks are reported for the books to forget."""
        host = self.host_pool
        if drops or disk_saves:
            assert self.disk_store is not None  # the callers checked
            start = time.perf_counter()
            for key in drops:
                try:
                    self.disk_store.drop(key)
                except OSError:  # the file outlives its index entry; the host saves below must still run
                    logger.exception("removing an evicted disk KV block failed")
            for op in disk_saves:
                if op.tier == "host" and host is not None and op.block_id in host.unwritten:
                    continue
                try:
                    self.disk_store.save(caches, op)
                except Exception as exc:
                    report.disk_save_failed[op.key] = f"{type(exc).__name__}: {exc}"
            report.seconds["to_disk"] = time.perf_counter() - start
        if saves:
            assert host is not None
            start = time.perf_counter()
            try:
                host.save(caches["primary"], list(saves))
            except Exception:  # the books forget these blocks; whoever would read them recomputes or fails alone
                logger.exception("saving %d KV block runs to the host tier failed", len(saves))
                report.host_save_failed.extend(b for op in saves for b in op.host_blocks)
            report.seconds["to_host"] = time.perf_counter() - start

    def _sample(self, logits: torch.Tensor, req_ids: list[str]) -> tuple[dict[str, SampledToken], dict[str, str]]:
        states = [self._requests[r] for r in req_ids]
        rows = [SamplingRow(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, s.grammar) for s in states]
        sampled: dict[str, SampledToken] = {}
        failed: dict[str, str] = {}
        for req_id, state in zip(req_ids, states):
            if state.grammar_error is not None:
                logger.error("no grammar for %s: %s", req_id, state.grammar_error)
                failed[req_id] = SAMPLING_FAILED
        for req_id, state, result in zip(req_ids, states, sample(logits, rows)):
            if req_id in failed:
                continue
            if isinstance(result, Exception):
                logger.error("sampling failed for %s: %s: %s", req_id, type(result).__name__, result)
                failed[req_id] = SAMPLING_FAILED
            else:
                state.output_token_ids.append(result.token_id)
                sampled[req_id] = result
        return sampled, failed

    def _adopt(self, data: NewRequestData) -> None:
        """Take a new request, or one resuming after preemption (its generator carries on)."""
        old = self._requests.get(data.req_id)
        generator = old.generator if old is not None else self._generator(data.params, data.seed_offset)
        self._requests[data.req_id] = _RequestState(
            prompt_token_ids=list(data.prompt_token_ids),
            output_token_ids=list(data.output_token_ids),
            params=data.params,
            generator=generator,
            block_table=[],
            table=torch.empty(0, dtype=torch.int32, device=self.device),
            slots=torch.empty(0, dtype=torch.long, device=self.device),
        )
        if data.params.structured is not None:
            self._adopt_grammar(self._requests[data.req_id], data)

    def _adopt_grammar(self, state: _RequestState, data: NewRequestData) -> None:
        """A matcher at the start of the grammar, advanced past the tokens already generated (resume)."""
        try:
            if self.grammars is None:
                raise RuntimeError("this worker has no grammar compiler")
            assert data.params.structured is not None
            state.grammar = self.grammars.matcher(data.params.structured)
            state.grammar.advance(list(data.output_token_ids))
        except Exception as exc:  # this request fails alone, at its first sample
            state.grammar_error = exc

    def _generator(self, params: SamplingParams, seed_offset: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        # On the logits' device: a CPU generator cannot drive sampling from CUDA logits.
        return torch.Generator(device=self.device).manual_seed(params.seed + seed_offset)

    # -- KV in and out of this worker (live migration) -------------------------------------

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """A copy of the blocks' K and V: `[layers, 2, len(block_ids) * block_size, kv_heads, head_dim]`, on the CPU."""
        self.copies.drain()
        slots = self._block_slots(block_ids)
        return torch.stack([torch.stack((k[slots], v[slots])) for k, v in self.kv_buffer.kv_caches]).cpu()

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Copy what `read_blocks` returned (on another worker) into these blocks."""
        self.copies.drain()
        slots = self._block_slots(block_ids)
        for layer, (k, v) in enumerate(self.kv_buffer.kv_caches):
            k[slots] = data[layer, 0].to(k.device)
            v[slots] = data[layer, 1].to(v.device)

    def write_down(self, ops: TierOps) -> StepOutput:
        """Run moves down the tiers now, outside a step, in a step's order; the writes that failed
        (`disk_save_failed`, `host_save_failed`).

        A live migration's reservation evicts cached blocks, and the KV it
        copies in overwrites them before the next step: their write-backs and
        disk writes cannot wait for that step's plan.
        """
        if ops.disk_loads:
            raise ValueError("write_down runs saves only")
        self._check_tiers(bool(ops.saves), bool(ops.disk_drops or ops.disk_saves))
        if not (ops.saves or ops.disk_drops or ops.disk_saves):
            return StepOutput(-1)
        self.copies.drain()
        report = CopyReport(step_id=-1)
        self._save_down(ops.disk_drops, ops.disk_saves, ops.saves, self._tier_caches(), report)
        return StepOutput(-1, disk_save_failed=report.disk_save_failed, host_save_failed=report.host_save_failed)

    def _block_slots(self, block_ids: Sequence[int]) -> torch.Tensor:
        blocks = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        return (blocks[:, None] * self.table_block_size + self._offsets).flatten()

    def _set_table(self, state: _RequestState, update: TableUpdate) -> None:
        """Overwrite the table from `update.start` on, and the cached slot indices with it."""
        bs = self.table_block_size
        del state.block_table[update.start :]
        state.block_table.extend(update.block_ids)
        state.table = torch.tensor(state.block_table, dtype=torch.int32, device=self.device)
        blocks = torch.tensor(update.block_ids, dtype=torch.long, device=self.device)
        new_slots = (blocks[:, None] * bs + self._offsets).flatten()
        state.slots = torch.cat([state.slots[: update.start * bs], new_slots])

    @torch.inference_mode()
    def warm_up_decode(self, batch_sizes: Sequence[int]) -> None:
        """Run a throw-away decode step per batch size, so a compiled forward compiles now.

        Every sequence's context is cache slot 0 repeated (for the paged kernel,
        block 0 repeated). Nothing holds KV memory at start-up, so the step
        overwrites nothing in use.
        """
        start = time.monotonic()
        for batch_size in batch_sizes:
            if self.attention.name == "paged":
                # Tables of block 0, as wide as the batch plus two: equal sizes would be assumed equal forever.
                num_blocks = batch_size + 2
                context = torch.zeros(num_blocks * self.table_block_size, dtype=torch.long, device=self.device)
                table = torch.zeros(num_blocks, dtype=torch.int32, device=self.device)
                seqs = [
                    SeqLayout(b, 1, context.numel() - 1, context, table, self.table_block_size)
                    for b in range(batch_size)
                ]
                meta = self.attention.build_metadata(seqs, batch_size, self.device)
            else:
                context = torch.zeros(batch_size + 1, dtype=torch.long, device=self.device)
                seqs = [SeqLayout(b, 1, batch_size, context) for b in range(batch_size)]
                meta = AttentionMetadata(
                    slot_mapping=torch.zeros(batch_size, dtype=torch.long, device=self.device),
                    decode=decode_batch(seqs, batch_size, self.device),
                )
            ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            positions = torch.full_like(ids, batch_size)
            compiled_decode.mark_dynamic_sizes(ids, positions, meta)
            self._decode_forward(ids, positions, self.kv_buffer.kv_caches, meta)
        logger.info(
            "decode step ready for batch sizes %s in %.1fs", ", ".join(map(str, batch_sizes)), time.monotonic() - start
        )


def _pure_decode(meta: AttentionMetadata, seqs: list[SeqLayout]) -> bool:
    """A step the compiled decode graph covers: one token per request, in batch order.

    gather_sdpa's graphs assume a padded context of 2+ tokens (one-token prompts
    run eagerly); the paged kernel's tables are at least two entries wide.
    """
    if meta.paged is not None:
        return all(s.num_tokens == 1 for s in seqs)
    return meta.decode is not None and meta.decode.all_rows and meta.decode.kv_indices.shape[1] > 1
