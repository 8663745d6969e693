"""The front end's half of a request: n > 1 fan-out, text, stop strings, what callers see.

The core reports token ids per sequence (`SequenceUpdate`). Here they become
text (incremental detokenization), are checked against stop strings (which
only text can show), and are gathered per user request into the cumulative
`RequestOutput` that `LLM.generate` and the server hand out. A stop string
ends a sequence here; the caller then aborts it in the core, which frees its
KV.

Anything that goes wrong while processing one request's tokens ends that
request (with an error its caller sees), never its neighbours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kvos.core.plan import SequenceUpdate
from kvos.core.request import Request
from kvos.frontend.detokenizer import Decoder, IncrementalDetokenizer, find_stop
from kvos.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob
from kvos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OUTPUT_FAILED = "the engine failed while producing this request's text"


@dataclass
class _Sequence:
    req_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    text: str = ""
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@dataclass
class _Group:
    """One user request: its n sequences and what is needed to report on them."""

    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence]
    num_cached_tokens: int = 0
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    """Turns the core's per-sequence token updates into per-request outputs."""

    def __init__(self, tokenizer: Decoder) -> None:
        self.tokenizer = tokenizer
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[str, _Group] = {}
        """Sequence id -> its group."""

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._groups

    def __len__(self) -> int:
        return len(self._groups)

    def add_request(
        self,
        req_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: str = "",
    ) -> list[Request]:
        """Register a user request; returns its core sequences (one per n), first one first."""
        if req_id in self._groups:
            raise ValueError(f"request id {req_id!r} is already in use")
        now = time.monotonic()
        seq_ids = [req_id] if params.n == 1 else [f"{req_id}#{i}" for i in range(params.n)]
        sequences = [
            _Sequence(
                seq_id,
                i,
                IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
                logprobs=[] if params.logprobs is not None else None,
            )
            for i, seq_id in enumerate(seq_ids)
        ]
        group = _Group(req_id, prompt, prompt_token_ids, params, sequences, metrics={"arrival_time": now})
        self._groups[req_id] = group
        for seq in sequences:
            self._group_of[seq.req_id] = group
        return [
            Request(
                req_id=seq_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                arrival_time=now,
                priority=priority,
                tenant=tenant,
                fork_of=None if i == 0 else seq_ids[0],
                seed_offset=i,
                cache_salt=cache_salt,
            )
            for i, seq_id in enumerate(seq_ids)
        ]

    def group_of(self, seq_id: str) -> str | None:
        """The user request a core sequence belongs to."""
        group = self._group_of.get(seq_id)
        return None if group is None else group.req_id

    def sequence_ids(self, req_id: str) -> list[str]:
        group = self._groups.get(req_id)
        return [] if group is None else [s.req_id for s in group.sequences]

    def abort(self, req_id: str) -> list[str]:
        """Forget a request; returns its unfinished sequence ids for the core to abort."""
        group = self._groups.pop(req_id, None)
        if group is None:
            return []
        for seq in group.sequences:
            del self._group_of[seq.req_id]
        return [s.req_id for s in group.sequences if s.finish_reason is None]

    def process(self, updates: list[SequenceUpdate], final_only: bool = False) -> tuple[list[RequestOutput], list[str]]:
        """(outputs of every request that changed, sequence ids the core must abort).

        `final_only` leaves out the requests that have not ended, for a caller that reads final outputs
        alone (the offline `LLM`): it does not pay for copying every running request's tokens each step."""
        touched: dict[str, _Group] = {}
        to_abort: list[str] = []
        for update in updates:
            group = self._group_of.get(update.req_id)
            if group is None:
                continue
            touched[group.req_id] = group
            seq = next(s for s in group.sequences if s.req_id == update.req_id)
            try:
                stopped = self._apply(group, seq, update)
            except Exception:  # this request fails alone
                logger.exception("processing output of %s failed", update.req_id)
                group.error = OUTPUT_FAILED
                stopped = True
            if stopped and update.finish_reason is None:
                to_abort.append(update.req_id)
        outputs = []
        for group in touched.values():
            if group.error is not None:
                for seq in group.sequences:
                    if seq.finish_reason is None:
                        seq.finish_reason = "abort"
                        to_abort.append(seq.req_id)
            if not final_only or group.finished:
                outputs.append(self._output(group))
        return outputs, to_abort

    def _apply(self, group: _Group, seq: _Sequence, update: SequenceUpdate) -> bool:
        """Fold one update into the sequence; True when a stop string ended it here."""
        now = time.monotonic()
        group.num_cached_tokens = max(group.num_cached_tokens, update.num_cached_tokens)
        if update.error is not None:
            group.error = update.error
        if update.new_token_ids:
            group.metrics.setdefault("first_token_time", now)
        seq.token_ids.extend(update.new_token_ids)
        if seq.logprobs is not None:
            seq.logprobs.extend(update.new_logprobs)
        if update.finish_reason is not None:
            seq.finish_reason = update.finish_reason  # type: ignore[assignment]
            seq.stop_reason = update.stop_reason
            if update.finish_reason == "stop" and isinstance(update.stop_reason, int):
                return False  # an EOS or stop token: never part of the text
        params = group.params
        for token_id in update.new_token_ids:
            delta = seq.detokenizer.add(token_id)
            seq.text += delta
            if params.stop and delta:
                hit = find_stop(seq.text, len(delta), params.stop)
                if hit is not None:
                    seq.text = seq.text[: hit[0]]
                    seq.finish_reason = "stop"
                    seq.stop_reason = hit[1]
                    return True
        return False

    def _output(self, group: _Group) -> RequestOutput:
        finished = group.finished
        if finished:
            self._groups.pop(group.req_id, None)
            for seq in group.sequences:
                self._group_of.pop(seq.req_id, None)
            group.metrics["finish_time"] = time.monotonic()
        completions = []
        for seq in group.sequences:
            text = seq.text
            if seq.finish_reason is None and group.params.stop:
                # Hold back what could be the start of a stop string, so streamed text never shrinks.
                text = text[: max(0, len(text) - (max(len(s) for s in group.params.stop) - 1))]
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                )
            )
        return RequestOutput(
            req_id=group.req_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=group.num_cached_tokens,
            metrics=dict(group.metrics),
            error=group.error,
        )
