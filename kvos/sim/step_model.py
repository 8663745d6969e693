"""How long one engine step takes: the only thing the simulator models.

A step is summarised by `StepShape`: four numbers enough for DistServe's
forms and for a roofline, and the count the serving overhead depends on:

    P  prefill tokens    tokens of requests computing more than one token (prompt chunks)
    Q  attention pairs   sum over those chunks of chunk x (computed + chunk): query-key pairs, DistServe's tokens^2
    D  decodes           requests computing one token
    C  decode context    keys those decodes attend, summed
    R  prefill chunks    requests computing more than one token (so R + D requests are in the step)

Models, one interface (`StepTimeModel.step_seconds`):

- `LinearStepModel`, fitted to profiled steps (`fit_linear`): one joint
  least-squares fit over prefill-only, decode-only and mixed steps,

      t = a_prefill + b*P + c*Q + d*C + e*D     (a step with any prefill)
      t = a_decode  + d*C + e*D                 (a decode-only step)

  so a pure prefill is DistServe's a + b*tokens + c*tokens^2, a pure decode
  its a + b*context + c*batch, and a mixed step is the two summed with one
  intercept (a step reads the weights once, not once per kind). Decode-only
  steps keep their own intercept because kvos runs them on another path
  (the compiled decode, when on).
- `RooflineStepModel`: FLOPs at peak and bytes at bandwidth from a hardware
  description and the model's shape, each divided by an efficiency that a
  profile on that hardware measures (`calibrate_roofline`).
- `ServedStepModel`: either of those plus `ServingOverhead`, the time a
  served step spends outside `Worker.execute` (scheduler, output
  processing, detokenizing, the async engine's hand-offs, HTTP/SSE work on
  the same cores), `a + b*(R + D)`, fitted by `fit_overhead` to the
  steps of a profiled `kvos serve` run (`benchmarks.profile_serving`).
  With `overlap`, the two run at once (async scheduling): a what-if.

Every model also splits a step's time into its named terms
(`StepTimeModel.terms`); `TermTotals` sums them over a run.

Beside the shape, a step pays once more the first time its process runs
its number of token rows, P + D (`StepShape.rows`): on a CPU, oneDNN builds a
matmul for every row count of every linear (about 2.7 ms a step here,
`Profile.first_use_seconds`). That depends on what the instance ran before,
not on the step, so the simulated worker keeps it (`SimWorker.first_use`).

Outside the step, `FrontEnd` is what the server's HTTP front end adds to a
request: a delay before the engine sees it and one from a token to the
client. The simulator applies them to arrivals and token times
(`InstanceConfig.front_end`).
"""

from __future__ import annotations

import json
import math
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kvos.core.plan import StepPlan

MIN_STEP_S = 1e-6
"""A fitted line may dip below zero outside its grid; no step is taken as shorter than this."""


@dataclass(frozen=True)
class StepShape:
    """What sets a step's time (see the module docstring for the letters)."""

    prefill_tokens: int = 0
    attention_pairs: int = 0
    num_decodes: int = 0
    decode_context: int = 0
    num_prefills: int = 0

    @classmethod
    def from_plan(cls, plan: StepPlan) -> StepShape:
        prefill = pairs = decodes = context = chunks = 0
        for s in plan.scheduled:
            n = len(s.new_token_ids)
            if n == 1:
                decodes += 1
                context += s.num_computed_tokens + 1
            else:
                chunks += 1
                prefill += n
                pairs += n * (s.num_computed_tokens + n)
        return cls(prefill, pairs, decodes, context, chunks)

    @property
    def rows(self) -> int:
        """Token rows the step's linears multiply: every prompt-chunk token and one per decode."""
        return self.prefill_tokens + self.num_decodes


class StepTimeModel(Protocol):
    def step_seconds(self, shape: StepShape) -> float:
        """Seconds the step takes on the modelled hardware."""
        ...

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        """`step_seconds` of each of `num_steps` pure-decode steps of `num_decodes` requests, step j (from 1)
        attending `context + j * num_decodes` keys: the simulator's decode runs ask for thousands at once."""
        ...

    def terms(self, shape: StepShape) -> dict[str, float]:
        """`step_seconds` of the step split into the model's own terms (before the floor), by name: where a
        simulated run's busy time goes (`TermTotals`)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The model's kind and parameters, for reports."""
        ...


# -- fitted (DistServe's form) ---------------------------------------------------------

FEATURES = (
    "prefill_intercept",
    "decode_intercept",
    "per_prefill_token",
    "per_attention_pair",
    "per_context_token",
    "per_decode",
)


def features(shape: StepShape) -> list[float]:
    """The design-matrix row of one step: which intercept applies, then P, Q, C, D."""
    has_prefill = shape.prefill_tokens > 0
    return [
        float(has_prefill),
        float(not has_prefill),
        float(shape.prefill_tokens),
        float(shape.attention_pairs),
        float(shape.decode_context),
        float(shape.num_decodes),
    ]


@dataclass(frozen=True)
class LinearStepModel:
    """t = intercept + b*P + c*Q + d*C + e*D, seconds; coefficients in `FEATURES` order."""

    prefill_intercept: float
    decode_intercept: float
    per_prefill_token: float
    per_attention_pair: float
    per_context_token: float
    per_decode: float

    def step_seconds(self, shape: StepShape) -> float:
        # Written out rather than a dot product: this runs once per simulated step.
        t = (
            (self.prefill_intercept if shape.prefill_tokens else self.decode_intercept)
            + self.per_prefill_token * shape.prefill_tokens
            + self.per_attention_pair * shape.attention_pairs
            + self.per_context_token * shape.decode_context
            + self.per_decode * shape.num_decodes
        )
        return max(t, MIN_STEP_S)

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        # The same floating-point operations as `step_seconds`, with the terms that do not change from step
        # to step computed once: the times are bit for bit the one-step-at-a-time ones (the loop runs in C,
        # and an addition's operands commute exactly). With a context term >= 0 the times never fall, so
        # once the first clears the floor every one does.
        base = self.decode_intercept + self.per_prefill_token * 0 + self.per_attention_pair * 0
        per_context, per_decodes = self.per_context_token, self.per_decode * num_decodes
        contexts = (
            range(context + num_decodes, context + num_steps * num_decodes + 1, num_decodes)
            if num_decodes
            else repeat(context, num_steps)
        )
        seconds = list(
            map(
                operator.add,
                map(operator.add, repeat(base), map(operator.mul, repeat(per_context), contexts)),
                repeat(per_decodes),
            )
        )
        if seconds and not (per_context >= 0 and seconds[0] >= MIN_STEP_S):
            seconds = [max(t, MIN_STEP_S) for t in seconds]
        return seconds

    def terms(self, shape: StepShape) -> dict[str, float]:
        intercept = "prompt_step_intercept" if shape.prefill_tokens else "decode_step_intercept"
        return {
            intercept: self.prefill_intercept if shape.prefill_tokens else self.decode_intercept,
            "prompt_tokens": self.per_prefill_token * shape.prefill_tokens,
            "attention_pairs": self.per_attention_pair * shape.attention_pairs,
            "decode_context": self.per_context_token * shape.decode_context,
            "decodes": self.per_decode * shape.num_decodes,
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": "linear", **asdict(self)}


@dataclass(frozen=True)
class FitError:
    """How far the fitted model is from the steps it was fitted on."""

    num_samples: int
    rmse_s: float
    mean_abs_pct: float
    p90_abs_pct: float
    max_abs_pct: float


def fit_error(model: StepTimeModel, samples: Sequence[tuple[StepShape, float]]) -> FitError:
    predicted = np.array([model.step_seconds(shape) for shape, _ in samples])
    measured = np.array([t for _, t in samples])
    pct = np.abs(predicted - measured) / measured * 100
    return FitError(
        num_samples=len(samples),
        rmse_s=float(np.sqrt(np.mean((predicted - measured) ** 2))),
        mean_abs_pct=float(np.mean(pct)),
        p90_abs_pct=float(np.percentile(pct, 90)),
        max_abs_pct=float(np.max(pct)),
    )


def _lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(a, y, rcond=None)[0]


IRLS_ROUNDS = 20
"""At most this many reweightings of a relative-error fit (`_relative_lstsq`); a few usually converge."""


def _relative_lstsq(
    design: np.ndarray,
    times: np.ndarray,
    offset: np.ndarray,
    solve: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Coefficients c minimising the squared relative error of `offset + design @ c` against `times`,
    with each sample's weight 1 / (its predicted time), not 1 / (its measured time).

    Weighting by the measured time gives every slow sample less say: on a
    noisy machine the slow ones are the noise's upper tail, so the fit lands
    below the mean. On this VM's served steps (`benchmarks.sim_validate
    --fit-on-runs`) that put the fitted steps' sum 5-11% under the measured
    one, and every simulated TPOT as much too short. The predictions carry no
    noise, so iterating from the unweighted fit (iteratively reweighted least
    squares) keeps short steps counting as much as long ones with no bias.
    `solve(a, y)` solves one weighted problem (default: unconstrained least squares).
    """
    if solve is None:
        solve = _lstsq
    coefficients = solve(design, times - offset)
    for _ in range(IRLS_ROUNDS):
        weights = 1.0 / np.maximum(offset + design @ coefficients, MIN_STEP_S)
        updated = solve(design * weights[:, None], (times - offset) * weights)
        done = np.allclose(updated, coefficients, rtol=1e-10, atol=1e-15)
        coefficients = updated
        if done:
            break
    return coefficients


def fit_linear(samples: Sequence[tuple[StepShape, float]]) -> tuple[LinearStepModel, FitError]:
    """Least squares over measured steps, in relative error, so short decode steps count as much as long prefills.

    Minimising relative rather than absolute error matters because step
    times span two orders of magnitude and TPOT depends on the short ones.
    """
    if len(samples) < len(FEATURES):
        raise ValueError(f"samples must hold at least {len(FEATURES)} measured steps to fit, got {len(samples)}")
    if any(not t > 0 for _, t in samples):
        raise ValueError("samples must have measured times > 0")
    design = np.array([features(shape) for shape, _ in samples])
    times = np.array([t for _, t in samples])
    coefficients = _relative_lstsq(design, times, np.zeros(len(times)))
    model = LinearStepModel(*(float(c) for c in coefficients))
    return model, fit_error(model, samples)


# -- serving overhead -------------------------------------------------------------------


@dataclass(frozen=True)
class ServingOverhead:
    """Seconds a served step spends outside the worker: per step and per request in it.

    Per request rather than per streamed token: nearly every scheduled
    request samples (all but the non-final chunks of a long prompt), so the
    two counts are too collinear to fit apart.
    """

    per_step: float
    per_sequence: float

    def seconds(self, shape: StepShape) -> float:
        return self.per_step + self.per_sequence * (shape.num_prefills + shape.num_decodes)


@dataclass(frozen=True)
class ServedStepModel:
    """A worker step-time model plus the serving overhead: what one iteration of `kvos serve`'s engine loop takes."""

    worker: StepTimeModel
    overhead: ServingOverhead
    overlap: bool = False
    """A what-if: the engine's own work for a step runs while the device computes the one before, as vLLM's
    async scheduling and SGLang's overlap scheduler arrange, so a step takes the longer of the two instead of
    their sum. kvos's loop runs them one after the other (`kvos sim run --overlap-host` asks what overlapping
    them would buy)."""

    def step_seconds(self, shape: StepShape) -> float:
        worker, overhead = self.worker.step_seconds(shape), self.overhead.seconds(shape)
        return max(max(worker, overhead) if self.overlap else worker + overhead, MIN_STEP_S)

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        overhead = self.overhead.seconds(StepShape(num_decodes=num_decodes))
        worker = self.worker.decode_steps_seconds(num_decodes, context, num_steps)
        if self.overlap:
            seconds = [max(t, overhead) for t in worker]
        else:
            seconds = list(map(operator.add, worker, repeat(overhead)))
        if seconds and min(seconds) < MIN_STEP_S:
            seconds = [max(t, MIN_STEP_S) for t in seconds]
        return seconds

    def terms(self, shape: StepShape) -> dict[str, float]:
        terms = self.worker.terms(shape)
        overhead = self.overhead.seconds(shape)
        if self.overlap:  # only what the device's time does not cover
            terms["engine_overhead"] = max(0.0, overhead - self.worker.step_seconds(shape))
        else:
            terms["engine_overhead"] = overhead
        return terms

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "served",
            "worker": self.worker.describe(),
            "overhead": asdict(self.overhead),
            "overlap": self.overlap,
        }


def fit_overhead(worker: StepTimeModel, served: Sequence[tuple[StepShape, float]]) -> tuple[ServedStepModel, FitError]:
    """Fit `ServingOverhead` to served steps (shape, seconds from one step's start to the next).

    The target is what the worker model does not explain: served seconds
    minus `worker`'s prediction. That residual holds the scheduler and front
    end's own time and also the worker's slowdown from sharing the cores with
    them, which is what the simulator must add. In relative error, as
    `fit_linear` is. Both terms are kept >= 0: serving adds work to a step,
    and a negative intercept (seen on the Intel VM, fitted at rates 2 and
    inf) makes a lone request's served step faster than the worker alone.
    When the free fit has a negative term, the better of the two fits with
    one term at 0 is taken. The error reported is the whole served model's
    against the served steps.
    """
    if len(served) < 3:
        raise ValueError(f"served must hold at least 3 steps to fit the overhead, got {len(served)}")
    if any(not t > 0 for _, t in served):
        raise ValueError("served steps must have measured times > 0")
    design = np.array([[1.0, float(s.num_prefills + s.num_decodes)] for s, _ in served])
    times = np.array([t for _, t in served])
    worker_times = np.array([worker.step_seconds(s) for s, _ in served])

    def solve(a: np.ndarray, y: np.ndarray) -> np.ndarray:
        coefficients = _lstsq(a, y)
        if coefficients.min() >= 0:
            return coefficients
        # One term at 0, the other fitted alone (and at 0 too if it still comes out negative); the better of two.
        fits = []
        for free in (0, 1):
            c = np.zeros(2)
            c[free] = max(0.0, float(a[:, free] @ y) / float(a[:, free] @ a[:, free]))
            fits.append((float(np.sum((a @ c - y) ** 2)), c))
        return min(fits, key=lambda fit: fit[0])[1]

    coefficients = _relative_lstsq(design, times, worker_times, solve)
    model = ServedStepModel(worker, ServingOverhead(*(float(c) for c in coefficients)))
    return model, fit_error(model, served)


@dataclass(frozen=True)
class FrontEnd:
    """Seconds `kvos serve`'s front end adds to a request outside the engine loop.

    `to_engine_s`: from the client sending the request to the HTTP handler
    handing it to the engine (HTTP, validation, tokenizing, thread hand-overs).
    `to_client_s`: from the engine handing out a token to the client reading
    it (SSE framing, JSON, the hand-over back). Both are delays, not a queue:
    measured, 40 requests sent at once reached the engine within 53 ms of
    their send (p50), not 40 times a lone request's 7 ms, so the front end's
    own work is a small part of a lone request's delay. The zero front end is
    a bare engine: requests reach the scheduler when they arrive.
    """

    to_engine_s: float = 0.0
    to_client_s: float = 0.0

    def __post_init__(self) -> None:
        check_seconds(self, "to_engine_s", "to_client_s")


def check_seconds(config: object, *names: str) -> None:
    """ValueError naming the first of `config`'s fields `names` that is not a finite number of seconds >= 0."""
    for name in names:
        value = getattr(config, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")


def fit_front_end(delays: Sequence[tuple[float, float, float]]) -> FrontEnd:
    """The front end from per-request measurements: (rate, seconds to the engine, seconds to the client).

    Means over the finite rates. When everything is sent at once the later
    arrivals also wait for the earlier ones' parsing, a burst's cost that a
    constant delay does not describe, so those are left out. Means, not
    medians: the delays vary from request to request (on this VM's 1-4
    req/s runs, medians of 2-3 ms each against p90s of 7 and 17 ms), and that
    spread moves every percentile of TTFT up by more than the median delay
    does. Re-simulated with each run's own step times (session 17), the
    medians left TTFT p50 and p90 4-16% short at 1-4 req/s; the means brought
    them within 2-9% (drawing each request's delays from the measured ones
    did no better).

    A NaN to the client leaves that request out of that mean only: its
    first tokens showed no text, so the client's first token came steps
    later, steps the simulator times itself (`SimRequest.hidden_tokens`).
    """
    timed = [(to_engine, to_client) for rate, to_engine, to_client in delays if math.isfinite(rate)]
    if not timed:
        raise ValueError("delays must hold at least one request measured at a finite rate")
    seen = [c for _, c in timed if not math.isnan(c)]
    to_client = statistics.fmean(seen) if seen else 0.0
    return FrontEnd(max(0.0, statistics.fmean(t for t, _ in timed)), max(0.0, to_client))


# -- roofline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareSpec:
    """A device as the roofline sees it: peak FLOP/s per dtype and memory bandwidth (bytes/s)."""

    name: str
    peak_flops: tuple[tuple[str, float], ...]
    memory_bandwidth: float

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise ValueError("peak_flops must name at least one dtype's FLOP/s")
        for dtype, flops in self.peak_flops:
            if not flops > 0:
                raise ValueError(f"peak_flops[{dtype!r}] must be > 0, got {flops}")
        if not self.memory_bandwidth > 0:
            raise ValueError(f"memory_bandwidth must be > 0 bytes/s, got {self.memory_bandwidth}")

    def flops_for(self, dtype: str) -> float:
        table = dict(self.peak_flops)
        if dtype not in table:
            raise ValueError(f"hardware {self.name!r} gives no peak FLOP/s for dtype {dtype!r}; it has {sorted(table)}")
        return table[dtype]

    @classmethod
    def from_json(cls, path: str | Path) -> HardwareSpec:
        """`{"name": "h100", "peak_flops": {"bfloat16": 989e12}, "memory_bandwidth": 3.35e12}`."""
        data = json.loads(Path(path).read_text())
        try:
            return cls(str(data["name"]), tuple(sorted(data["peak_flops"].items())), float(data["memory_bandwidth"]))
        except KeyError as exc:
            raise ValueError(f"{path}: hardware description is missing {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class RooflineStepModel:
    """max(FLOPs / (peak x compute_efficiency), bytes / (bandwidth x memory_efficiency)) per step.

    Bytes are every weight once plus the KV that decodes read and that
    every new token writes. FLOPs are the linear layers
    per token, one LM-head row per request and attention per query-key pair
    (`benchmarks.roofline.ArchShape`'s counts).
    """

    arch: Any
    """A `benchmarks.roofline.ArchShape`."""
    peak_flops: float
    memory_bandwidth: float
    weight_bytes_per_param: float
    kv_bytes_per_elem: int
    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not 0 < value <= 1.5:
                raise ValueError(f"{name} must be in (0, 1.5], got {value}")

    def bounds(self, shape: StepShape) -> tuple[float, float]:
        """(compute seconds at peak, memory seconds at full bandwidth) of the step."""
        arch = self.arch
        tokens = shape.prefill_tokens + shape.num_decodes
        # A prefill chunk's pairs count its causal triangle as a square: the difference is small next to the linears.
        flops = (
            tokens * arch.linear_flops_per_token()
            + shape.num_decodes * arch.lm_head_flops()
            + arch.attention_flops(shape.attention_pairs + shape.decode_context)
        )
        # Decodes read their whole context; every new token's KV is written. Later prompt chunks also read
        # the earlier ones, left out: next to the weights and the linears' FLOPs it is small.
        kv_bytes = (shape.decode_context + tokens) * arch.kv_bytes_per_token(self.kv_bytes_per_elem)
        memory = arch.params_read_per_step * self.weight_bytes_per_param + kv_bytes
        return flops / self.peak_flops, memory / self.memory_bandwidth

    def step_seconds(self, shape: StepShape) -> float:
        compute, memory = self.bounds(shape)
        return max(compute / self.compute_efficiency, memory / self.memory_efficiency, MIN_STEP_S)

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        return [
            self.step_seconds(StepShape(0, 0, num_decodes, context + j * num_decodes, 0))
            for j in range(1, num_steps + 1)
        ]

    def terms(self, shape: StepShape) -> dict[str, float]:
        """The step's time under whichever bound sets it."""
        compute, memory = self.bounds(shape)
        compute, memory = compute / self.compute_efficiency, memory / self.memory_efficiency
        return {"compute_bound_steps": compute} if compute >= memory else {"memory_bound_steps": memory}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "roofline",
            "peak_flops": self.peak_flops,
            "memory_bandwidth": self.memory_bandwidth,
            "weight_bytes_per_param": self.weight_bytes_per_param,
            "kv_bytes_per_elem": self.kv_bytes_per_elem,
            "compute_efficiency": self.compute_efficiency,
            "memory_efficiency": self.memory_efficiency,
        }


def calibrate_roofline(
    model: RooflineStepModel, samples: Sequence[tuple[StepShape, float]]
) -> tuple[RooflineStepModel, FitError]:
    """Set each efficiency so that the steps that bound limits take, on average, their measured time
    relative to the bound: 1 / mean(measured / bound).

    The same relative least squares as `fit_linear` (for one scale, its
    solution is that mean). It was the median of bound / measured, which on
    this project's noisy machines runs short for the same reason the linear
    fits weighted by the measured time did (session 17): the noise is
    skewed towards slow steps, and a median leaves that tail out of every
    simulated time. With no step limited by one side, that efficiency stays
    at 1.

    Which side limits a step depends on the efficiencies: a step whose raw
    memory bound is the larger can be compute-limited once compute runs at
    40% of its peak and memory at 70%, and a mean (unlike the median)
    counts it on the wrong side. So the steps are sorted by the calibrated
    model again until no step changes side.
    """
    if not samples:
        raise ValueError("samples must hold at least one measured step to calibrate")
    bounds = [(model.bounds(shape), measured) for shape, measured in samples]
    calibrated = model
    sides: list[bool] | None = None
    for _ in range(IRLS_ROUNDS):
        by_compute = [
            compute / calibrated.compute_efficiency >= memory / calibrated.memory_efficiency
            for (compute, memory), _ in bounds
        ]
        if by_compute == sides:
            break
        sides = by_compute
        compute_ratios = [m / c for ((c, _), m), side in zip(bounds, sides) if side]
        memory_ratios = [m / b for ((_, b), m), side in zip(bounds, sides) if not side]
        calibrated = replace(
            model,
            compute_efficiency=min(1 / statistics.fmean(compute_ratios), 1.5) if compute_ratios else 1.0,
            memory_efficiency=min(1 / statistics.fmean(memory_ratios), 1.5) if memory_ratios else 1.0,
        )
    return calibrated, fit_error(calibrated, samples)


# -- profiles on disk ----------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Measured steps of one engine configuration on one machine, and what the engine reported about itself."""

    samples: tuple[tuple[StepShape, float], ...]
    engine: dict[str, Any]
    """model, dtype, quantization, compile, kv bytes per token, KV capacity, max context, machine."""
    served: tuple[tuple[StepShape, float], ...] = ()
    """Steps of a profiled `kvos serve` run (start to next start), for the serving overhead; empty: none taken."""
    serving: dict[str, Any] | None = None
    """How the served steps were taken (rates, requests) and where their time went, for reports."""
    front_end_delays: tuple[tuple[float, float, float], ...] = ()
    """Per request of the profiled serving runs: (rate, seconds to the engine, seconds to the client)."""
    first_uses: tuple[tuple[int, float], ...] = ()
    """(rows, seconds): how much longer a prompt step of `rows` tokens took the first time the process ran
    that many rows than the next time (`kvos.sim.profile`); empty: not measured."""

    def to_json(self) -> dict[str, Any]:
        model, error = fit_linear(self.samples)
        data: dict[str, Any] = {
            "engine": self.engine,
            "fit": {"form": "joint linear (see kvos.sim.step_model)", **asdict(model)},
            "fit_error": asdict(error),
            "samples": [_sample_json(shape, t) for shape, t in self.samples],
        }
        if self.first_uses:
            data["first_use"] = {
                "seconds": self.first_use_seconds(),
                "steps": [{"rows": rows, "extra_s": extra} for rows, extra in self.first_uses],
            }
        if self.served:
            served, served_error = fit_overhead(model, self.served)
            data["serving"] = {
                **(self.serving or {}),
                "overhead_fit": {"form": "a + b*(R + D) (see kvos.sim.step_model)", **asdict(served.overhead)},
                "fit_error": asdict(served_error),
                "steps": [_sample_json(shape, t) for shape, t in self.served],
            }
        if self.front_end_delays:
            data.setdefault("serving", {})["front_end"] = {
                "fit": asdict(self.front_end()),
                "requests": [
                    {
                        "rate": rate if math.isfinite(rate) else "inf",
                        "to_engine_s": into,
                        "to_client_s": None if math.isnan(out) else out,
                    }
                    for rate, into, out in self.front_end_delays
                ],
            }
        return data

    def front_end(self) -> FrontEnd:
        """The fitted front end; the zero one (a bare engine) when no serving run was profiled."""
        return fit_front_end(self.front_end_delays) if self.front_end_delays else FrontEnd()

    def first_use_seconds(self) -> float:
        """What a step pays the first time its row count runs: the measured extras' median (they scatter by
        a few ms either way around it, with no trend over 8 to 600 rows here), 0 if none were measured."""
        return max(0.0, statistics.median(extra for _, extra in self.first_uses)) if self.first_uses else 0.0

    def step_model(self) -> StepTimeModel:
        """The fitted worker model, plus the serving overhead when served steps were profiled."""
        model, _ = fit_linear(self.samples)
        return fit_overhead(model, self.served)[0] if self.served else model

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        try:
            samples = tuple(_sample_from_json(s) for s in data["samples"])
            serving = data.get("serving")
            served = tuple(_sample_from_json(s) for s in (serving or {}).get("steps", ()))
            derived = ("steps", "overhead_fit", "fit_error", "front_end")
            info = {k: v for k, v in serving.items() if k not in derived} if serving else None
            front = (serving or {}).get("front_end", {}).get("requests", [])
            delays = tuple(
                (
                    float(r["rate"]),
                    float(r["to_engine_s"]),
                    math.nan if r["to_client_s"] is None else float(r["to_client_s"]),
                )
                for r in front
            )
            first = tuple((int(r["rows"]), float(r["extra_s"])) for r in data.get("first_use", {}).get("steps", ()))
            return cls(samples, dict(data["engine"]), served, info, delays, first)
        except KeyError as exc:
            raise ValueError(f"{path}: profile is missing {exc.args[0]!r}") from exc


def _sample_json(shape: StepShape, seconds: float) -> dict[str, Any]:
    return {**asdict(shape), "seconds": seconds}


def _sample_from_json(s: dict[str, Any]) -> tuple[StepShape, float]:
    shape = StepShape(
        s["prefill_tokens"],
        s["attention_pairs"],
        s["num_decodes"],
        s["decode_context"],
        s.get("num_prefills", 0),
    )
    return shape, float(s["seconds"])


class TermTotals:
    """`model`, summing the time each of its terms takes over every step it is asked for.

    Where a simulated fleet's busy time goes (`kvos sim run --breakdown`):
    for a fitted model, the intercepts of prompt and decode steps, the prompt
    tokens, attention pairs, decode context and decodes, and the engine's own
    time when served steps were profiled. The times it returns are the
    model's, untouched, so a run with it simulates exactly what a run
    without it does; a decode run's terms are taken step by step, which
    costs a Python call per simulated step, so it is asked for, not always on.
    """

    def __init__(self, model: StepTimeModel) -> None:
        self.model = model
        self.seconds: dict[str, float] = {}

    def _add(self, shape: StepShape) -> None:
        totals = self.seconds
        for name, seconds in self.model.terms(shape).items():
            totals[name] = totals.get(name, 0.0) + seconds

    def step_seconds(self, shape: StepShape) -> float:
        self._add(shape)
        return self.model.step_seconds(shape)

    def decode_steps_seconds(self, num_decodes: int, context: int, num_steps: int) -> list[float]:
        for j in range(1, num_steps + 1):
            self._add(StepShape(0, 0, num_decodes, context + j * num_decodes, 0))
        return self.model.decode_steps_seconds(num_decodes, context, num_steps)

    def terms(self, shape: StepShape) -> dict[str, float]:
        return self.model.terms(shape)

    def describe(self) -> dict[str, Any]:
        return self.model.describe()


def model_from_profile(path: str | Path) -> StepTimeModel:
    """The profile's fitted model, refitted from its samples (so an edited fit cannot drift from the data).

    With served steps in the profile, the serving overhead is added: the
    simulator then times what `kvos serve` does per step, not the worker alone.
    """
    return Profile.load(path).step_model()


def roofline_for(
    arch: Any, hardware: HardwareSpec, dtype: str, weight_bytes_per_param: float, kv_bytes_per_elem: int
) -> RooflineStepModel:
    return RooflineStepModel(
        arch, hardware.flops_for(dtype), hardware.memory_bandwidth, weight_bytes_per_param, kv_bytes_per_elem
    )
