"""A request as the engine core tracks it: one sequence of token ids being extended.

Small, plain and picklable on purpose: token ids, parameters and progress,
nothing about text, streams or KV placement (the KV managers keep placement
in their own tables, keyed by `req_id`). A user request with n > 1 becomes n
of these: sibling i has `fork_of` set to the first sequence's id and, once
that sequence has computed the prompt, takes a copy-on-write fork of its KV
instead of recomputing it (see `Scheduler`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvos.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    LOADING = "loading"
    """Admitted, its KV coming up from the host tier on the worker's copy thread; runs once it is loaded."""
    PREEMPTED = "preempted"
    MIGRATING = "migrating"
    """Stopped for a live migration out: KV kept, not scheduled (see `Scheduler.detach`)."""
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One sequence: prompt tokens, generated tokens, and how far KV is computed.

    `num_computed_tokens` counts tokens whose KV is in the cache. The tokens
    still to compute are `all_token_ids[num_computed_tokens:]`: the rest of the
    prompt while prefilling, then the one newly sampled token per decode step.
    """

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    """Lower is served sooner (the priority policy)."""
    tenant: str = ""
    """Whose service this counts as (the fair policy): the OpenAI `user` field."""
    fork_of: str | None = None
    """The sibling whose prompt KV this one forks (n > 1), if any."""
    seed_offset: int = 0
    cache_salt: str | None = None
    """Mixed into the first KV block's identity: only requests with the same salt share prefixes."""
    session_id: str | None = None
    """The hold key of the session this call belongs to: its KV stays held under it when it ends."""

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_swapped_tokens: int = 0
    """Computed tokens whose KV waits in the host tier since a swap-out; restored, not recomputed, on resume."""
    num_preemptions: int = 0
    admitted_step: int = 0
    """The step at which it last started running (the priority policy's minimum quantum)."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without building the whole list (the scheduler asks every step)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens this sequence may hold in the KV cache at its longest."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
