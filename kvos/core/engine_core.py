"""The engine core: requests as token ids in, token ids out, one step at a time.

    step():  scheduler.schedule() -> StepPlan
             worker.execute(plan) -> StepOutput          (or raises: fail that plan's requests only)
             scheduler.update_from_output(plan, output)  -> [SequenceUpdate]

The core knows no text: tokenizing, detokenizing, stop strings and n > 1
fan-out happen in the front end (`kvos.frontend`). So its per-request state
is a few lists of ints, which is what a swap, a migration or a simulator
needs to move or replay.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from kvos.attention.backend import AttentionBackend, make_backend
from kvos.config import EngineConfig
from kvos.core.migration import MigrationEndpoint
from kvos.core.plan import SequenceUpdate, StepPlan
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.engine.stats import MAX_TENANTS_REPORTED, EngineStats, HistogramRecorder, TierStats
from kvos.errors import InvalidRequestError
from kvos.memory.block_allocator import KVEvent
from kvos.memory.factory import host_tier, make_kv_manager
from kvos.memory.kv_manager import HoldingKVCacheManager
from kvos.memory.paged_kv_manager import PagedKVCacheManager
from kvos.memory.shape import KVShape
from kvos.memory.tiers.disk import DiskBlockIndex
from kvos.memory.tiers.swap import PreemptionRule, SwapCost, measure_copy_bandwidth, measure_flops
from kvos.memory.virtual.virtual_kv_manager import VirtualKVCacheManager
from kvos.model.arch import ModelArch
from kvos.model.layer_kernels import can_use_layer_kernels, use_layer_kernels
from kvos.model.loader import LoadedModel
from kvos.model.prepack import can_prepack, prepack_linears
from kvos.model.quantization import quantize
from kvos.model.registry import build_model
from kvos.model.triton_layers import can_use_triton_layers, use_triton_layers
from kvos.structured.grammar import GrammarCompiler
from kvos.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from kvos.worker.disk_store import DiskKVStore
from kvos.worker.kv_cache import make_host_pool, make_kv_buffer
from kvos.worker.worker import Worker

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

STEP_FAILED = "the engine failed while computing this request"
"""What a client hears when the whole step raised (the traceback goes to the log)."""

MAX_KV_EVENTS = 65536
"""KV events kept for subscribers that have not drained them (oldest dropped first)."""


def model_identity(loaded: LoadedModel, config: EngineConfig) -> str:
    """What a KV block's digest is rooted in: the weights' identity and how they are computed."""
    model = config.model
    weights = f"dummy(seed={model.seed})" if loaded.state_dict is None else loaded.name
    arch_digest = hashlib.sha256(repr(loaded.arch).encode()).hexdigest()[:16]
    return f"{weights}|{arch_digest}|{model.resolved_dtype}|{model.quantization}"


def context_length(loaded_arch: ModelArch, configured: int | None) -> int:
    max_model_len = min(configured or loaded_arch.max_position_embeddings, loaded_arch.max_position_embeddings)
    if loaded_arch.sliding_window is not None and loaded_arch.sliding_window < max_model_len:
        # Within the window, full attention is exact; past it kvos would differ from the model.
        logger.warning("capping the context at the sliding window of %d tokens", loaded_arch.sliding_window)
        max_model_len = loaded_arch.sliding_window
    return max_model_len


def check_fits(num_tokens: int, max_tokens_per_request: int, capacity_tokens: int) -> None:
    """A request's KV (prompt + max_tokens) must fit one request's share of the cache; else ValueError."""
    if num_tokens > max_tokens_per_request:
        raise ValueError(
            f"request needs {num_tokens} tokens of KV cache (prompt + max_tokens) but at most "
            f"{max_tokens_per_request} fit (KV capacity {capacity_tokens} tokens)"
        )


def check_request(
    prompt_token_ids: list[int],
    max_tokens: int,
    vocab_size: int,
    max_model_len: int,
    check_fits: Callable[[int], None],
) -> None:
    """Raise InvalidRequestError (naming the field) for a request that could never be served."""
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty", "prompt")
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt")
    total = len(prompt_token_ids) + max_tokens
    if total > max_model_len:
        raise InvalidRequestError(
            f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({max_tokens}) = {total} tokens "
            f"exceeds the model's context length of {max_model_len}",
            "max_tokens",
        )
    try:
        check_fits(total)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), "max_tokens") from exc


def check_logit_bias(request: Request, vocab_size: int) -> None:
    bad = [t for t in (request.params.logit_bias or {}) if t >= vocab_size]
    if bad:
        raise InvalidRequestError(
            f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "logit_bias"
        )


def tenant_service(counters: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The most served tenants by name, the rest summed as "other" (bounded label cardinality)."""
    ranked = sorted(counters.items(), key=lambda item: -item[1])
    named = ranked[:MAX_TENANTS_REPORTED]
    rest = sum(value for _, value in ranked[MAX_TENANTS_REPORTED:])
    return tuple(named) + ((("other", rest),) if len(ranked) > MAX_TENANTS_REPORTED else ())


class EngineCore(MigrationEndpoint):
    """Owns the scheduler (with the KV books) and the worker (with the model and KV tensors)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, eos_token_ids: frozenset[int]) -> None:
        self.config = config
        start = time.monotonic()
        arch = loaded.arch
        self.vocab_size = arch.vocab_size
        self.max_model_len = context_length(arch, config.model.max_model_len)
        device = torch.device(config.model.device)
        dtype = _DTYPES[config.model.resolved_dtype]
        attention = config.model.resolved_attention_backend(config.cache.kv_cache)
        backend = self._attention_backend(config, attention)
        attention = backend.name
        with torch.device("meta"):
            model = build_model(arch, self.max_model_len, backend)
        if loaded.state_dict is None:
            model.init_dummy_weights(device, config.model.seed)
        else:
            # Converted before load_weights fuses q|k|v and gate|up, so the fusing copies move the
            # compute dtype's bytes (half of float32's for bfloat16: 0.06 s of SmolLM2's start-up).
            model.load_weights({n: t.to(dtype) if t.is_floating_point() else t for n, t in loaded.state_dict.items()})
        model = model.to(device=device, dtype=dtype).eval()
        if config.model.quantization is not None:
            quantize(model, config.model.quantization)
        shape = KVShape(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, dtype, device)
        self.kv_shape = shape
        cache = config.cache
        # The worker's files, opened (and locked) first: the disk tier's books start from what is there.
        disk_store = None
        disk = None
        if cache.kv_disk_path is not None and cache.kv_disk_bytes is not None:
            disk_store = DiskKVStore(cache.kv_disk_path, cache.kv_disk_bytes, cache.block_size, shape)
            disk = DiskBlockIndex(disk_store.num_blocks, disk_store.opened.present)
        self.kv_manager = make_kv_manager(
            cache, shape, config.scheduler.max_num_seqs, self.max_model_len, model_identity(loaded, config), disk
        )
        if disk_store is not None:
            assert isinstance(self.kv_manager, PagedKVCacheManager)
            self.kv_manager.counters.disk_corrupted += disk_store.opened.num_torn
        self.capacity_tokens = self.kv_manager.capacity_tokens
        self.scheduler = Scheduler(
            config.scheduler,
            self.kv_manager,
            eos_token_ids,
            self.max_model_len,
            preemption=self._preemption_rule(model, arch, shape),
        )
        if not config.model.compile and config.model.quantization is None and can_prepack(device, dtype):
            # After the preemption rule above counted the parameters (packed weights are not parameters).
            prepack_linears(model, config.scheduler.max_num_seqs)
        if not config.model.compile:  # a compiled model's norms, SwiGLU and rotary are Inductor's to fuse
            if can_use_layer_kernels(device, dtype):
                use_layer_kernels(model)
            elif can_use_triton_layers(device, dtype):
                use_triton_layers(model)
        self.worker = Worker(
            model,
            make_kv_buffer(self.kv_manager, shape),
            self.kv_manager.table_block_size,
            device,
            compile_decode=config.model.compile,
            host_pool=make_host_pool(self.kv_manager, shape),
            grammars=GrammarCompiler.shared(loaded.tokenizer, arch.vocab_size),
            disk_store=disk_store,
        )
        if config.model.compile:
            self.worker.warm_up_decode(sorted({1, 2, config.scheduler.max_num_seqs}))
        if (
            device.type == "cuda"
            and not config.model.enforce_eager
            and attention == "paged_triton"
            and cache.kv_cache == "paged"
        ):
            graphs = DecodeGraphs(
                model,
                self.worker.kv_buffer.kv_caches,
                self.kv_manager.table_block_size,
                self.max_model_len,
                graph_batch_sizes(config.scheduler.max_num_seqs),
                device,
            )
            try:
                graphs.capture_all()
            except RuntimeError:
                # A capture the driver or a kernel refuses costs speed, not service.
                logger.exception("capturing decode steps as CUDA graphs failed; decode steps run eagerly")
            else:
                self.worker.decode_graphs = graphs
        self._kv_events: deque[KVEvent] = deque(maxlen=MAX_KV_EVENTS)
        self._incoming: dict[str, Request] = {}
        """Requests migrating in: blocks reserved under their id, not yet scheduled."""
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._copy_seconds = {
            kind: HistogramRecorder(kind) for kind in ("to_host", "from_host", "to_disk", "from_disk")
        }
        logger.info(
            "kvos: %s ready in %.1fs, computing in %s; KV cache (%s, attention %s) holds %d tokens "
            "(%.1f MiB, %d B/token); max context %d",
            loaded.name,
            time.monotonic() - start,
            config.model.resolved_dtype,
            config.cache.kv_cache,
            attention,
            self.kv_manager.capacity_tokens,
            self.kv_manager.capacity_tokens * shape.bytes_per_token / 2**20,
            shape.bytes_per_token,
            self.max_model_len,
        )
        host = host_tier(self.kv_manager)
        if host is not None:
            host_books, host_block_tokens = host
            logger.info(
                "host KV tier holds %d tokens (%.1f MiB, blocks of %d tokens); preemption %s",
                host_books.num_blocks * host_block_tokens,
                host_books.num_blocks * host_block_tokens * shape.bytes_per_token / 2**20,
                host_block_tokens,
                config.cache.preemption_mode,
            )
        if disk_store is not None:
            logger.info(
                "disk KV tier at %s holds %d tokens (%.1f MiB in %d block files); %d blocks found there",
                disk_store.path,
                disk_store.num_blocks * cache.block_size,
                disk_store.num_blocks * disk_store.file_bytes / 2**20,
                disk_store.num_blocks,
                len(disk_store.opened.present),
            )

    def _preemption_rule(self, model: torch.nn.Module, arch: ModelArch, shape: KVShape) -> PreemptionRule | None:
        """Swap or recompute per victim; None (recompute) without a host tier. `auto` measures its rates now."""
        mode = self.config.cache.preemption_mode
        if self.config.cache.kv_offload_bytes is None or mode == "recompute":
            return None
        if mode == "swap":
            return PreemptionRule("swap")
        cost = SwapCost(
            copy_bytes_per_s=measure_copy_bandwidth(shape.device),
            flops_per_s=measure_flops(shape.device, shape.dtype),
            bytes_per_token=shape.bytes_per_token,
            num_parameters=sum(p.numel() for p in model.parameters()),
            num_layers=arch.num_hidden_layers,
            q_dim=arch.num_attention_heads * arch.head_dim,
        )
        logger.info(
            "preemption auto: copy %.1f GB/s, compute %.1f GFLOP/s; a 1024-token victim swaps in %.2f ms "
            "or recomputes in %.1f ms",
            cost.copy_bytes_per_s / 1e9,
            cost.flops_per_s / 1e9,
            cost.swap_seconds(1024) * 1e3,
            cost.recompute_seconds(1024) * 1e3,
        )
        return PreemptionRule("auto", cost)

    @staticmethod
    def _attention_backend(config: EngineConfig, name: str) -> AttentionBackend:
        """The backend by name; "auto" falls back to the reference when the kernel cannot be built here."""
        try:
            return make_backend(name)
        except ValueError as exc:
            if config.model.attention_backend != "auto":
                raise
            logger.warning("attention backend %r is unavailable (%s); using gather_sdpa", name, exc)
            return make_backend("gather_sdpa")

    # -- requests ---------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        """Raise InvalidRequestError for a request this engine could never serve."""
        check_request(prompt_token_ids, max_tokens, self.vocab_size, self.max_model_len, self.kv_manager.check_fits)

    def add_request(self, request: Request) -> None:
        self.check_request(request.prompt_token_ids, request.params.max_tokens)
        check_logit_bias(request, self.vocab_size)
        self.scheduler.add(request)
        if request.fork_of is None:  # n > 1 siblings share the first sequence's prompt
            self._num_prompt_tokens += request.num_prompt_tokens

    def abort_request(self, req_id: str) -> None:
        self.scheduler.abort(req_id)
        self._flush_if_idle()

    def release_session(self, key: str) -> None:
        """Unpin the KV a session holds under `key` (its blocks stay as prefix cache); unknown keys are ignored."""
        if isinstance(self.kv_manager, HoldingKVCacheManager):
            self.kv_manager.release_hold(key)

    def _flush_if_idle(self) -> None:
        """With nothing left to run, hand the worker the ended requests now, so it holds no state for them."""
        if not self.scheduler.has_unfinished():
            plan = self.scheduler.schedule()
            try:
                output = self.worker.execute(plan)
            except Exception:  # no request is left to fail; the next plan repeats nothing, so say so
                logger.exception("worker failed to drop %d ended requests", len(plan.finished_req_ids))
                self.scheduler.fail_step(plan, STEP_FAILED)
            else:  # the copy thread's last reports (disk reads of requests that ended) settle the books
                self.scheduler.update_from_output(plan, output)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- live migration: `MigrationEndpoint`'s calls, whose blocks this engine's worker copies --

    @property
    def mover(self) -> Worker:
        return self.worker

    # -- the loop ---------------------------------------------------------------------

    def step(self) -> list[SequenceUpdate]:
        """One iteration: what happened to every sequence that progressed or ended."""
        plan = self.scheduler.schedule()
        try:
            output = self.worker.execute(plan)
        except Exception:  # a failed step fails its requests, never the engine
            logger.exception("step %d failed; failing its %d requests", plan.step_id, len(plan.scheduled))
            updates = self.scheduler.fail_step(plan, STEP_FAILED)
        else:
            updates = self.scheduler.update_from_output(plan, output)
            for kind, seconds in output.copy_seconds.items():
                self._copy_seconds[kind].observe(seconds)
        self._flush_if_idle()
        self._kv_events.extend(self.kv_manager.drain_events())
        self._num_generation_tokens += sum(len(u.new_token_ids) for u in updates)
        return updates

    # -- observation ------------------------------------------------------------------

    def close(self) -> None:
        """Give back the KV memory and stop background threads. Safe to call twice.

        The worker's views go first; the virtual cache's region (held by its
        manager, which maps the pages) is freed once no view of it is left.
        With a disk tier, the KV still cached in the tiers above is written
        there first, so the next start finds it.
        """
        if self.worker.disk_store is not None and self.worker.kv_buffer.kv_caches:
            self._flush_to_disk()
            self.worker.disk_store.close()
        self.worker.close()
        self.worker.kv_buffer.close()
        close_books = getattr(self.kv_manager, "close", None)  # only the virtual cache's books hold memory
        if close_books is not None:
            try:
                close_books()
            except Exception:  # a driver call failed while freeing: say so, the caller is shutting down anyway
                logger.exception("closing the KV cache failed; a second close() retries")

    def _flush_to_disk(self) -> None:
        kv = self.kv_manager
        assert isinstance(kv, PagedKVCacheManager)
        ops = kv.flush_to_disk()
        plan = StepPlan(-1, disk_drops=ops.disk_drops, disk_saves=ops.disk_saves)
        try:
            output = self.worker.execute(plan)
        except Exception:  # shutting down: what was not written is recomputed after the restart
            logger.exception("writing the cached KV to the disk tier at shutdown failed")
            kv.end_step(failed=True)
            return
        kv.apply_disk_report(output.disk_loaded, output.disk_load_failed, output.disk_save_failed)
        kv.end_step()
        logger.info("wrote %d cached KV blocks to the disk tier", len(ops.disk_saves) - len(output.disk_save_failed))

    def take_kv_events(self) -> list[KVEvent]:
        """KV blocks stored and removed since the last call (what a router or a tier subscribes to)."""
        events = list(self._kv_events)
        self._kv_events.clear()
        return events

    def stats(self) -> EngineStats:
        queries, hits = self.kv_manager.prefix_cache_stats()
        scheduler = self.scheduler
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_free_seq_slots=max(0, scheduler.config.max_num_seqs - scheduler.num_seqs),
            num_used_blocks=self.kv_manager.num_used_blocks,
            num_free_blocks=self.kv_manager.num_free_blocks,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            preemptions_by_reason=tuple(scheduler.preemptions_by_reason.items()),
            tenant_service=tenant_service(getattr(scheduler.waiting, "counters", {})),
            preemptions_by_mode=tuple(scheduler.preemptions_by_mode.items()),
            **self._tier_stats(),
        )

    def _tier_stats(self) -> dict[str, Any]:
        """Per-tier occupancy and traffic, in bytes: the paged cache's tiers, and the virtual cache's
        when it has a host tier (without one it has a single tier, described by the block counts)."""
        kv = self.kv_manager
        host = host_tier(kv)
        if isinstance(kv, PagedKVCacheManager):
            block_bytes = kv.block_size * self.kv_shape.bytes_per_token
            allocator = kv.allocator
            primary = TierStats(
                "primary",
                allocator.num_used_blocks * block_bytes,
                allocator.num_idle_cached_blocks * block_bytes,
                allocator.num_blocks * block_bytes,
                kv.counters.primary_hit_tokens,
            )
        elif isinstance(kv, VirtualKVCacheManager) and host is not None:
            # Pages under live rows are used; pages kept under idle rows are no prefix cache (nothing is findable).
            page = kv.layout.page_size
            primary = TierStats("primary", kv.num_used_blocks * page, 0, kv.table.budget_pages * page, 0)
            block_bytes = host[1] * self.kv_shape.bytes_per_token
        else:
            return {}
        counters = kv.counters
        tiers = [primary]
        if host is not None:
            tiers.append(
                TierStats(
                    "host",
                    host[0].num_held_blocks * block_bytes,
                    host[0].num_idle_cached_blocks * block_bytes,
                    host[0].num_blocks * block_bytes,
                    counters.host_hit_tokens,
                )
            )
        disk = kv.disk if isinstance(kv, PagedKVCacheManager) else None
        disk_store = self.worker.disk_store
        if disk is not None and disk_store is not None:
            tiers.append(
                TierStats(
                    "disk",
                    0,  # nothing on disk is held: every block there is cache
                    disk.num_stored_blocks * disk_store.file_bytes,
                    disk.num_blocks * disk_store.file_bytes,
                    counters.disk_hit_tokens,
                )
            )
        return dict(
            tiers=tuple(tiers),
            swap_out_bytes=counters.blocks_swapped_out * block_bytes,
            swap_in_bytes=counters.blocks_swapped_in * block_bytes,
            demoted_bytes=counters.blocks_demoted * block_bytes,
            promoted_bytes=counters.blocks_promoted * block_bytes,
            disk_write_bytes=counters.blocks_to_disk * block_bytes,
            disk_read_bytes=counters.blocks_from_disk * block_bytes,
            disk_corrupted_blocks=counters.disk_corrupted,
            disk_missing_blocks=counters.disk_missing,
            disk_write_failures=counters.disk_write_failures,
            disk_accepting=disk.accepting if disk is not None else True,
            copy_seconds=tuple(h.snapshot() for h in self._copy_seconds.values()),
        )
