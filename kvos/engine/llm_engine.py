"""The engine loop: schedule -> execute -> update, one iteration per `step()`.

Not thread-safe: one thread drives `step()`; servers hand requests to that
thread (see `async_engine`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kvos.config import EngineConfig
from kvos.engine.detokenizer import IncrementalDetokenizer, find_stop
from kvos.engine.request import Request, RequestStatus
from kvos.engine.scheduler import Scheduler
from kvos.engine.stats import EngineStats
from kvos.memory.factory import KVShape, make_kv_manager
from kvos.model.loader import load_model
from kvos.model.quantization import quantize
from kvos.model.registry import build_model
from kvos.model.runner import ModelRunner
from kvos.model.sampler import SampledToken, SamplingRow, sample
from kvos.outputs import CompletionOutput, FinishReason, RequestOutput
from kvos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Group:
    """A user request: its n sequences and what is needed to report on them."""

    req_id: str
    prompt: str | None
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    generators: list[torch.Generator | None]
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


class LLMEngine:
    """Owns the model, the KV cache manager and the scheduler."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        start = time.monotonic()
        loaded = load_model(config.model)
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        arch = loaded.arch
        self.arch = arch
        self.max_model_len = min(config.model.max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
        if arch.sliding_window is not None and arch.sliding_window < self.max_model_len:
            # Within the window, full attention is exact; past it kvos would differ from the model.
            logger.warning("capping the context at the sliding window of %d tokens", arch.sliding_window)
            self.max_model_len = arch.sliding_window
        self.device = torch.device(config.model.device)
        dtype = _DTYPES[config.model.dtype]
        with torch.device("meta"):
            model = build_model(arch, self.max_model_len)
        if loaded.state_dict is None:
            model.init_dummy_weights(self.device, config.model.seed)
        else:
            model.load_weights(loaded.state_dict)
        model = model.to(device=self.device, dtype=dtype).eval()
        if config.model.quantization is not None:
            quantize(model, config.model.quantization)
        shape = KVShape(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim, dtype, self.device)
        self.kv_manager = make_kv_manager(
            config.cache, shape, config.scheduler.max_num_seqs, self.max_model_len
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        self.runner = ModelRunner(model, self.kv_manager, self.device, compile_decode=config.model.compile)
        if config.model.compile:
            self.runner.warm_up_decode(sorted({1, 2, config.scheduler.max_num_seqs}))
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(arch.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        logger.info(
            "kvos: %s loaded in %.1fs; KV cache (%s) holds %d tokens (%.1f MiB, %d B/token); max context %d",
            self.model_name,
            time.monotonic() - start,
            config.cache.kv_cache,
            self.kv_manager.capacity_tokens,
            self.kv_manager.capacity_tokens * shape.bytes_per_token / 2**20,
            shape.bytes_per_token,
            self.max_model_len,
        )

    # -- requests in and out ----------------------------------------------------------

    def add_request(self, req_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError on anything it could never serve."""
        if req_id in self._groups:
            raise ValueError(f"request id {req_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} tokens "
                f"exceeds the model's context length of {self.max_model_len}"
            )
        self.kv_manager.check_fits(total)
        if params.n > self.config.scheduler.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.config.scheduler.max_num_seqs})")
        sequences = [
            Request(
                req_id=req_id if params.n == 1 else f"{req_id}#{i}",
                prompt_token_ids=list(token_ids),
                params=params,
                prompt=text,
                group_id=req_id,
                index=i,
            )
            for i in range(params.n)
        ]
        group = _Group(
            req_id=req_id,
            prompt=text,
            sequences=sequences,
            detokenizers=[
                IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens) for _ in sequences
            ],
            generators=[self._generator(params, i) for i in range(params.n)],
        )
        group.metrics["arrival_time"] = sequences[0].arrival_time
        self._groups[req_id] = group
        self._num_prompt_tokens += len(token_ids)
        self.scheduler.add(sequences[0])
        for sibling in sequences[1:]:
            # Siblings share the prompt: they fork the first sequence's KV once it is prefilled.
            sibling.status = RequestStatus.WAITING_FOR_FORK

    def abort_request(self, req_id: str) -> None:
        """Stop a request now and free all it holds; unknown ids are ignored."""
        group = self._groups.pop(req_id, None)
        if group is None:
            return
        for seq in group.sequences:
            if not seq.is_finished:
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def stats(self) -> EngineStats:
        queries, hits = self.kv_manager.prefix_cache_stats()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_used_blocks=self.kv_manager.num_used_blocks,
            num_free_blocks=self.kv_manager.num_free_blocks,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
        )

    # -- the loop -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: returns the state of every request that progressed or ended."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        sampled = [c.request for c in plan.chunks if c.completes_known_tokens]
        try:
            logits = self.runner.execute(plan.chunks)
        except Exception as exc:  # a failed step fails its requests, never the engine
            logger.exception("model step failed; failing %d requests", len(plan.chunks))
            return self._fail({c.request.group_id or c.request.req_id for c in plan.chunks}, exc)
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
        row_of: list[int] = []
        seqs: list[Request] = []
        for row, request in enumerate(sampled):
            for seq in [request, *self._fork_siblings(request)]:
                row_of.append(row)
                seqs.append(seq)
        tokens = sample(logits[row_of], [self._sampling_row(s) for s in seqs])
        touched: dict[str, _Group] = {}
        for seq, token in zip(seqs, tokens):
            group = self._groups[seq.group_id or seq.req_id]
            self._append_token(group, seq, token)
            touched[group.req_id] = group
        return [self._output(g) for g in touched.values()]

    # -- helpers --------------------------------------------------------------------

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        return text, token_ids

    @staticmethod
    def _generator(params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        return torch.Generator().manual_seed(params.seed + index)

    def _sampling_row(self, seq: Request) -> SamplingRow:
        group = self._groups[seq.group_id or seq.req_id]
        return SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, group.generators[seq.index])

    def _fork_siblings(self, parent: Request) -> list[Request]:
        """On the first sequence's first sample, siblings take its prompt KV copy-on-write."""
        if parent.index != 0 or parent.output_token_ids:
            return []
        group = self._groups[parent.group_id or parent.req_id]
        forked = []
        for sibling in group.sequences[1:]:
            if sibling.status != RequestStatus.WAITING_FOR_FORK:
                continue
            if self.kv_manager.fork(parent, sibling):
                sibling.num_computed_tokens = parent.num_computed_tokens
                sibling.num_cached_tokens = parent.num_cached_tokens
                self.scheduler.admit_forked(sibling)
                forked.append(sibling)
            else:
                self.scheduler.add(sibling)
        return forked

    def _append_token(self, group: _Group, seq: Request, token: SampledToken) -> None:
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
            group.metrics.setdefault("first_token_time", now)
        seq.output_token_ids.append(token.token_id)
        if seq.logprobs is not None and token.logprob is not None:
            seq.logprobs.append(token.logprob)
        self._num_generation_tokens += 1
        params = seq.params
        if token.token_id in params.stop_token_ids or (
            not params.ignore_eos and token.token_id in self.eos_token_ids
        ):
            self._finish(seq, "stop", token.token_id)
            return
        delta = group.detokenizers[seq.index].add(token.token_id)
        seq.output_text += delta
        if params.stop and delta:
            hit = find_stop(seq.output_text, len(delta), params.stop)
            if hit is not None:
                seq.output_text = seq.output_text[: hit[0]]
                self._finish(seq, "stop", hit[1])
                return
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        seq.status = RequestStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.finish_time = time.monotonic()
        self.scheduler.remove(seq)

    def _fail(self, group_ids: set[str], exc: Exception) -> list[RequestOutput]:
        outputs = []
        for group_id in group_ids:
            group = self._groups.get(group_id)
            if group is None:
                continue
            group.error = f"{type(exc).__name__}: {exc}"
            for seq in group.sequences:
                if not seq.is_finished:
                    self._finish(seq, "abort")
            outputs.append(self._output(group))
        return outputs

    def _output(self, group: _Group) -> RequestOutput:
        finished = group.finished
        if finished:
            self._groups.pop(group.req_id, None)
            group.metrics["finish_time"] = max(s.finish_time or 0.0 for s in group.sequences)
        completions = []
        for seq in group.sequences:
            text = seq.output_text
            if not seq.is_finished and seq.params.stop:
                # Hold back what could be the start of a stop string, so streamed text never shrinks.
                text = text[: max(0, len(text) - (max(len(s) for s in seq.params.stop) - 1))]
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                )
            )
        first = group.sequences[0]
        return RequestOutput(
            req_id=group.req_id,
            prompt=group.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=dict(group.metrics),
            error=group.error,
        )
