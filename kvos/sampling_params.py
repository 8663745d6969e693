"""Per-request sampling parameters, validated where the user hands them in."""

from __future__ import annotations

from dataclasses import dataclass

from kvos.errors import InvalidRequestError
from kvos.structured.spec import StructuredOutput

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily, as vLLM does: dividing logits by a
tiny temperature overflows float32 to inf, and softmax of inf is NaN."""

MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 (or anything below `MIN_TEMPERATURE`) means greedy. `logit_bias`
    maps token ids to a bias in [-100, 100] added to their logits before
    sampling, as OpenAI's field does. `stop` strings are matched on the decoded text,
    across token boundaries, and are not part of the output. `logprobs=k`
    returns the k most likely tokens at each step besides the chosen one.
    `structured` constrains the output to JSON (any object, or a schema): each
    step only tokens that keep the text a prefix of valid output may be sampled,
    and EOS only once the output is complete.
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        def check_int(name: str, value: object, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidRequestError(f"{name} must be an integer, got {value!r}", name)
            if value < low:
                raise InvalidRequestError(f"{name} must be >= {low}, got {value}", name)

        def check_float(name: str, value: object, low: float, high: float) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequestError(f"{name} must be a number, got {value!r}", name)
            if not low <= value <= high:  # also refuses NaN
                raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}", name)

        check_int("n", self.n, 1)
        check_int("max_tokens", self.max_tokens, 1)
        check_float("temperature", self.temperature, 0.0, 100.0)
        check_float("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise InvalidRequestError("top_p must be in (0, 1], got 0", "top_p")
        check_int("top_k", self.top_k, 0)
        check_float("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop must hold non-empty strings, got {s!r}", "stop")
        for t in self.stop_token_ids:
            check_int("stop_token_ids", t, 0)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0)
            if self.logprobs > 20:
                raise InvalidRequestError(f"logprobs must be <= 20, got {self.logprobs}", "logprobs")
        check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        check_float("repetition_penalty", self.repetition_penalty, 0.0, 100.0)
        if self.repetition_penalty == 0.0:
            raise InvalidRequestError("repetition_penalty must be > 0, got 0", "repetition_penalty")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequestError(
                    f"logit_bias must map token ids to numbers, got {self.logit_bias!r}", "logit_bias"
                )
            for token_id, bias in self.logit_bias.items():
                check_int("logit_bias", token_id, 0)
                check_float("logit_bias", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError(f"structured must be a StructuredOutput, got {self.structured!r}", "structured")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE
