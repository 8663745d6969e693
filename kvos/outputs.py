"""What the engine hands back to callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from kvos.structured.tools import ToolCall

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One of the n sequences generated for a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    """The calls the text makes (offline `LLM.chat` with tools); empty for a text answer."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of a request after an engine step (cumulative, not a delta)."""

    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    """Set when the engine failed this request (finish_reason "abort")."""
