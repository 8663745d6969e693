"""A request as the engine tracks it: one sequence of tokens being extended.

A user request with n > 1 becomes n `Request`s that share a `group_id`; the
siblings wait until the first has prefilled the prompt, then fork its KV blocks
(copy-on-write) instead of recomputing them.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kvos.outputs import FinishReason, TokenLogprob
from kvos.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_FORK = "waiting_for_fork"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
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
    prompt: str | None = None
    group_id: str | None = None
    index: int = 0
    priority: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    output_text: str = ""
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

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
