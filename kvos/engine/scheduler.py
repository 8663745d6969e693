"""Iteration-level scheduling: which requests compute how many tokens this step.

One path for everything: each step has a token budget; running requests are
served first (a decode costs one token, a prompt chunk whatever budget is
left), then waiting requests are admitted in arrival order while budget, KV
memory and the sequence limit allow. A long prompt is thereby split across
steps (chunked prefill) and never stalls running decodes. When KV memory runs
out, the most recently admitted request is preempted: its blocks are freed and
it waits again, to be recomputed (with prefix-cache hits) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvos.config import SchedulerConfig
from kvos.engine.request import Request, RequestStatus
from kvos.memory.kv_manager import KVCacheManager


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int

    @property
    def completes_known_tokens(self) -> bool:
        """True when this chunk reaches the last known token, so a new one is sampled."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """FCFS continuous batching over a KV cache manager."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_tokens):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.chunks.append(ScheduledChunk(request, num_tokens))
                budget -= num_tokens
                i += 1
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_cached = self.kv.lookup_prefix(request)
            num_tokens = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_tokens, num_cached):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = max(request.num_cached_tokens, num_cached)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
        return out

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def admit_forked(self, request: Request) -> None:
        """A sibling that took a copy-on-write fork of its parent's prompt KV."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request and free its KV."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
