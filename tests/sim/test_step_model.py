"""Step-time models: the joint fit recovers known coefficients; the roofline calibrates its efficiencies."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from benchmarks.roofline import SMOLLM2_135M
from benchmarks.serve import percentiles_ms
from kvos.core.plan import ScheduledRequest, StepPlan
from kvos.sim.metrics import nearest_rank_ms
from kvos.sim.step_model import (
    MIN_STEP_S,
    FrontEnd,
    LinearStepModel,
    Profile,
    RooflineStepModel,
    ServedStepModel,
    ServingOverhead,
    StepShape,
    StepTimeModel,
    calibrate_roofline,
    fit_front_end,
    fit_linear,
    fit_overhead,
)

TRUE = LinearStepModel(
    prefill_intercept=0.030,
    decode_intercept=0.012,
    per_prefill_token=2.0e-4,
    per_attention_pair=3.0e-8,
    per_context_token=4.0e-7,
    per_decode=5.0e-4,
)


def synthetic_steps(model: LinearStepModel, noise: float, seed: int = 0) -> list[tuple[StepShape, float]]:
    """A profile-like grid (prefill x batch x context), times from `model` with relative noise."""
    rng = random.Random(seed)
    samples = []
    for t in (0, 32, 128, 256, 512):
        for b in (0, 1, 4, 16, 64):
            for length in (64, 256, 1024) if b else (64,):
                if t or b:
                    shape = StepShape(t, t * t, b, b * (length + 1))
                    samples.append((shape, model.step_seconds(shape) * (1 + rng.gauss(0, noise))))
    return samples


def test_fit_recovers_known_coefficients_exactly_without_noise() -> None:
    model, error = fit_linear(synthetic_steps(TRUE, noise=0.0))
    for name, value in TRUE.__dict__.items():
        assert getattr(model, name) == pytest.approx(value, rel=1e-6), name
    assert error.max_abs_pct < 1e-6


def test_fit_recovers_known_coefficients_within_noise() -> None:
    model, error = fit_linear(synthetic_steps(TRUE, noise=0.02))
    for name in ("prefill_intercept", "decode_intercept", "per_prefill_token", "per_decode"):
        assert getattr(model, name) == pytest.approx(getattr(TRUE, name), rel=0.1), name
    assert error.mean_abs_pct < 3.0


def test_fit_is_not_biased_low_by_slow_outliers() -> None:
    """A noisy machine's steps: most a little under the model, every fifth 30% over (the mean factor is 1).
    The fitted steps must add up to the measured ones: a fit weighted by each step's measured time gives the
    slow ones less say and came out 3.6% short here (every simulated TPOT as much too short)."""
    factors = (0.85, 0.9, 0.95, 1.0, 1.3)
    samples = [(shape, t * factors[i % 5]) for i, (shape, t) in enumerate(synthetic_steps(TRUE, noise=0.0))]
    model, _ = fit_linear(samples)
    predicted = sum(model.step_seconds(shape) for shape, _ in samples)
    assert predicted == pytest.approx(sum(t for _, t in samples), rel=0.01)


def test_fit_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match="at least 6"):
        fit_linear(synthetic_steps(TRUE, 0.0)[:3])


def test_shape_from_plan_counts_prefill_pairs_and_decode_context() -> None:
    plan = StepPlan(
        1,
        scheduled=[
            ScheduledRequest("a", [0], num_computed_tokens=99, sample=True),
            ScheduledRequest("b", [0] * 10, num_computed_tokens=20, sample=False),
        ],
    )
    assert StepShape.from_plan(plan) == StepShape(
        prefill_tokens=10, attention_pairs=10 * 30, num_decodes=1, decode_context=100, num_prefills=1
    )


def test_roofline_calibration_recovers_efficiencies() -> None:
    ideal = RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4)
    truth = RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4, compute_efficiency=0.4, memory_efficiency=0.7)
    samples = [(shape, truth.step_seconds(shape)) for shape, _ in synthetic_steps(TRUE, 0.0)]
    calibrated, error = calibrate_roofline(ideal, samples)
    assert calibrated.compute_efficiency == pytest.approx(0.4)
    assert calibrated.memory_efficiency == pytest.approx(0.7)
    assert error.max_abs_pct < 1e-6


def test_roofline_calibration_is_not_biased_low_by_slow_outliers() -> None:
    """Every fifth step of each kind 1.5x slow, as a noisy machine's are: the calibrated model's steps must
    add up to the measured ones (a median of bound / measured left the slow fifth out: 9% short)."""
    ideal = RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4)
    truth = RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4, compute_efficiency=0.4, memory_efficiency=0.7)
    samples = [
        (shape, truth.step_seconds(shape) * (1.5 if k % 5 == 0 else 1.0))
        for k, (shape, _) in enumerate(synthetic_steps(TRUE, 0.0))
    ]
    calibrated, _ = calibrate_roofline(ideal, samples)
    measured = sum(t for _, t in samples)
    predicted = sum(calibrated.step_seconds(shape) for shape, _ in samples)
    assert predicted == pytest.approx(measured, rel=0.01)


def test_itl_percentiles_match_the_serving_benchmark() -> None:
    values = [random.Random(1).expovariate(10) for _ in range(1001)]
    assert nearest_rank_ms(values) == pytest.approx(percentiles_ms(values))


def test_overhead_fit_recovers_the_serving_overhead_on_top_of_the_worker_model() -> None:
    overhead = ServingOverhead(per_step=0.015, per_sequence=0.0012)
    rng = random.Random(2)
    served = []
    for _ in range(200):
        decodes, chunks = rng.randint(0, 40), rng.randint(0, 2)
        prefill = chunks * rng.randint(16, 256)
        shape = StepShape(prefill, prefill * prefill, decodes, decodes * rng.randint(20, 600), chunks)
        if chunks + decodes:
            served.append((shape, TRUE.step_seconds(shape) + overhead.seconds(shape)))
    model, error = fit_overhead(TRUE, served)
    assert model.overhead.per_step == pytest.approx(overhead.per_step, rel=1e-6)
    assert model.overhead.per_sequence == pytest.approx(overhead.per_sequence, rel=1e-6)
    assert error.max_abs_pct < 1e-6
    shape = served[0][0]
    assert model.step_seconds(shape) == pytest.approx(TRUE.step_seconds(shape) + overhead.seconds(shape))


def test_overhead_fit_keeps_a_negative_intercept_at_zero() -> None:
    """Served steps a constant 2 ms faster than the worker model, plus 1 ms a request: the free fit's
    intercept would be -2 ms; kept at 0, the per-request term is the least-squares slope through the
    origin in relative error, each step weighted by its predicted time (the fit's fixed point), computed
    here by its formula."""
    rng = random.Random(3)
    served = []
    for _ in range(100):
        decodes = rng.randint(1, 40)
        shape = StepShape(0, 0, decodes, decodes * rng.randint(20, 600), 0)
        served.append((shape, TRUE.step_seconds(shape) - 0.002 + 0.001 * decodes))
    model, _ = fit_overhead(TRUE, served)
    assert model.overhead.per_step == 0.0
    predicted = [model.step_seconds(s) for s, _ in served]
    x = [s.num_decodes / p for (s, _), p in zip(served, predicted)]
    y = [(t - TRUE.step_seconds(s)) / p for (s, t), p in zip(served, predicted)]
    slope = sum(a * b for a, b in zip(x, y)) / sum(a * a for a in x)
    assert model.overhead.per_sequence == pytest.approx(slope, rel=1e-9)
    assert 0 < slope < 0.001


@pytest.mark.parametrize(
    "model",
    [
        TRUE,
        # A fitted line can go negative: the floor applies per step.
        LinearStepModel(0.03, 1e-4, 2e-4, 3e-8, -4e-7, 1e-5),
        # Below the floor at first, above it once the context has grown.
        LinearStepModel(0.03, -0.002, 2e-4, 3e-8, 2e-7, 1e-5),
        ServedStepModel(TRUE, ServingOverhead(per_step=0.0031, per_sequence=0.00017)),
        RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4, compute_efficiency=0.4, memory_efficiency=0.7),
    ],
    ids=["linear", "linear-floor", "linear-rising", "served", "roofline"],
)
def test_decode_steps_seconds_are_bit_for_bit_the_step_times(model: StepTimeModel) -> None:
    for num_decodes, context in ((1, 17), (7, 3001), (40, 25_000)):
        times = model.decode_steps_seconds(num_decodes, context, 300)
        # Exact equality: a decode run's token times must equal the one-step-at-a-time ones.
        assert times == [
            model.step_seconds(StepShape(0, 0, num_decodes, context + j * num_decodes, 0)) for j in range(1, 301)
        ]
    floored = LinearStepModel(0.03, 1e-4, 2e-4, 3e-8, -4e-7, 1e-5).decode_steps_seconds(1, 10_000, 3)
    assert floored == [MIN_STEP_S] * 3


def test_front_end_fit_takes_means_of_the_finite_rates(tmp_path: Path) -> None:
    inf = float("inf")
    delays = [(2.0, 0.006, 0.004), (2.0, 0.007, 0.002), (1.0, 0.050, 0.090), (inf, 0.400, 0.300)]
    front = fit_front_end(delays)
    assert front.to_engine_s == pytest.approx(0.021)  # mean of 6, 7, 50 ms: the burst's 400 ms is left out
    assert front.to_client_s == pytest.approx(0.032)  # mean of 4, 2, 90 ms
    with pytest.raises(ValueError, match="finite rate"):
        fit_front_end([(inf, 0.4, 0.003)])
    # A request whose first tokens showed no text: its way in counts, its way out (steps later) does not.
    hidden = fit_front_end([*delays, (2.0, 0.009, math.nan)])
    assert hidden.to_engine_s == pytest.approx(0.018)  # mean of 6, 7, 50, 9 ms
    assert hidden.to_client_s == pytest.approx(0.032)
    with pytest.raises(ValueError, match="to_engine_s"):
        FrontEnd(to_engine_s=-0.001)

    profile = Profile(
        tuple(synthetic_steps(TRUE, 0.0)), {"model": "m"}, front_end_delays=(*delays, (2.0, 0.009, math.nan))
    )
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_json(), allow_nan=False))  # strict JSON: the hidden one's way out is null
    assert Profile.load(path).front_end() == hidden
    assert Profile(profile.samples, profile.engine).front_end() == FrontEnd()  # no serving run: a bare engine


def test_the_first_use_cost_is_the_median_extra_and_survives_the_json(tmp_path: Path) -> None:
    extras = ((8, 0.0021), (40, 0.0030), (200, -0.0040), (333, 0.0250), (500, 0.0027))
    profile = Profile(tuple(synthetic_steps(TRUE, 0.0)), {"model": "m"}, first_uses=extras)
    assert profile.first_use_seconds() == 0.0027  # the one slow and the one negative timing do not pull it
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_json(), allow_nan=False))
    loaded = Profile.load(path)
    assert loaded.first_uses == extras and loaded.first_use_seconds() == 0.0027
    assert Profile(profile.samples, profile.engine).first_use_seconds() == 0.0  # not measured: none charged
    noise = Profile(profile.samples, profile.engine, first_uses=((8, -0.001), (9, 0.0005), (10, -0.002)))
    assert noise.first_use_seconds() == 0.0  # a median below zero is noise, not a step that got faster


def test_the_command_line_takes_the_profiles_first_use_unless_told_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvos.entrypoints.cli import build_parser, main
    from kvos.sim.cli import make_fleet

    path = tmp_path / "profile.json"
    profile = Profile(
        tuple(synthetic_steps(TRUE, 0.0)), {"model": "m"}, first_uses=((8, 0.002), (9, 0.004), (10, 0.003))
    )
    path.write_text(json.dumps(profile.to_json()))

    def first_use(*flags: str) -> float:
        return make_fleet(
            build_parser().parse_args(["sim", "run", "--profile", str(path), *flags])
        ).instance.first_use_s

    assert first_use() == 0.003
    assert first_use("--first-use-ms", "0") == 0.0  # an engine that builds its kernels before the first request
    assert first_use("--first-use-ms", "2.5") == 0.0025
    assert make_fleet(build_parser().parse_args(["sim", "run"])).instance.first_use_s == 0.0  # no profile: none
    assert main(["sim", "run", "--profile", str(path), "--first-use-ms", "-1", "--num-requests", "2"]) == 2
    assert "--first-use-ms must be >= 0, got -1.0" in capsys.readouterr().err
