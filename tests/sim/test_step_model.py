"""Step-time models: the joint fit recovers known coefficients; the roofline calibrates its efficiencies."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.roofline import SMOLLM2_135M
from benchmarks.serve import percentiles_ms
from kvos.core.plan import ScheduledRequest, StepPlan
from kvos.sim.metrics import busy_by_term, nearest_rank_ms
from kvos.sim.simulator import FleetConfig, InstanceConfig, SimResult, Simulator
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
    TermTotals,
    calibrate_roofline,
    fit_front_end,
    fit_linear,
    fit_overhead,
)
from kvos.sim.workload import SimRequest

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
        # Overlapped: the engine's time wins at small batches and long contexts' steps overtake it.
        ServedStepModel(TRUE, ServingOverhead(per_step=0.0131, per_sequence=0.00017), overlap=True),
        RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4, compute_efficiency=0.4, memory_efficiency=0.7),
    ],
    ids=["linear", "linear-floor", "linear-rising", "served", "served-overlap", "roofline"],
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


def test_terms_are_each_coefficient_times_its_count() -> None:
    mixed = StepShape(prefill_tokens=100, attention_pairs=7000, num_decodes=3, decode_context=900, num_prefills=1)
    assert TRUE.terms(mixed) == pytest.approx(
        {
            "prompt_step_intercept": 0.030,
            "prompt_tokens": 100 * 2.0e-4,
            "attention_pairs": 7000 * 3.0e-8,
            "decode_context": 900 * 4.0e-7,
            "decodes": 3 * 5.0e-4,
        }
    )
    decode = StepShape(num_decodes=4, decode_context=400)
    assert TRUE.terms(decode) == pytest.approx(
        {
            "decode_step_intercept": 0.012,
            "prompt_tokens": 0.0,
            "attention_pairs": 0.0,
            "decode_context": 400 * 4.0e-7,
            "decodes": 4 * 5.0e-4,
        }
    )
    for shape in (mixed, decode):
        assert sum(TRUE.terms(shape).values()) == pytest.approx(TRUE.step_seconds(shape))
    # The same decode step (14.16 ms on the device) with 20 ms + 1 ms a request of the engine's own work.
    overhead = ServingOverhead(per_step=0.020, per_sequence=0.001)
    serial = ServedStepModel(TRUE, overhead)
    overlapped = ServedStepModel(TRUE, overhead, overlap=True)
    assert serial.step_seconds(decode) == pytest.approx(0.01416 + 0.024)
    assert overlapped.step_seconds(decode) == pytest.approx(0.024)  # the engine's 24 ms hide the device's 14.16
    assert serial.terms(decode)["engine_overhead"] == pytest.approx(0.024)
    assert overlapped.terms(decode)["engine_overhead"] == pytest.approx(0.024 - 0.01416)  # what shows past the device
    long = StepShape(num_decodes=4, decode_context=400_000)  # 172 ms on the device: the engine's time is hidden
    assert overlapped.step_seconds(long) == pytest.approx(TRUE.step_seconds(long))
    assert overlapped.terms(long)["engine_overhead"] == 0.0
    assert overlapped.describe()["overlap"] is True and serial.describe()["overlap"] is False
    roofline = RooflineStepModel(SMOLLM2_135M, 1e12, 1e10, 4.0, 4, compute_efficiency=0.4, memory_efficiency=0.7)
    compute, memory = roofline.bounds(decode)
    assert roofline.terms(decode) == {"memory_bound_steps": memory / 0.7}  # one decode: the weights' read
    prompt = StepShape(prefill_tokens=4096, attention_pairs=4096 * 4096, num_prefills=1)
    compute, memory = roofline.bounds(prompt)
    assert roofline.terms(prompt) == {"compute_bound_steps": compute / 0.4}


def _one_instance(requests: list[SimRequest], model: StepTimeModel, decode_runs: bool = True) -> SimResult:
    return Simulator(FleetConfig(InstanceConfig(block_size=16)), model, decode_runs=decode_runs).run(requests)


def test_term_totals_of_a_run_are_the_hand_counted_steps_and_change_no_time() -> None:
    # One request: a prompt step of 40 tokens (it samples the first token), then 4 decodes attending 41 to 44 keys.
    totals = TermTotals(TRUE)
    result = _one_instance([SimRequest(0.0, 40, 5)], totals)
    assert totals.seconds == pytest.approx(
        {
            "prompt_step_intercept": 0.030,
            "prompt_tokens": 40 * 2.0e-4,
            "attention_pairs": 40 * 40 * 3.0e-8,
            "decode_step_intercept": 4 * 0.012,
            "decode_context": (41 + 42 + 43 + 44) * 4.0e-7,
            "decodes": 4 * 5.0e-4,
        }
    )
    split = busy_by_term(totals.seconds, result)
    assert split["busy"] == pytest.approx(sum(totals.seconds.values()))
    assert split["other"] == pytest.approx(0.0, abs=1e-12)
    # Many requests, decode runs on and off: the same totals, and the same token times as the bare model's.
    rng = random.Random(3)
    requests = [SimRequest(0.01 * i, rng.randint(8, 300), rng.randint(1, 90)) for i in range(40)]
    by_runs, by_steps = TermTotals(TRUE), TermTotals(TRUE)
    runs = _one_instance(requests, by_runs)
    _one_instance(requests, by_steps, decode_runs=False)
    bare = _one_instance(requests, TRUE)
    assert runs.times.first_token_s == bare.times.first_token_s
    assert runs.times.last_token_s == bare.times.last_token_s
    assert by_runs.seconds.keys() == by_steps.seconds.keys()
    for name, seconds in by_steps.seconds.items():
        assert by_runs.seconds[name] == pytest.approx(seconds, rel=1e-9)
    assert busy_by_term(by_runs.seconds, runs)["other"] == pytest.approx(0.0, abs=1e-9)


def test_the_command_line_overlaps_the_engines_time_and_breaks_busy_time_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvos.entrypoints.cli import main

    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(Profile(tuple(synthetic_steps(TRUE, 0.0)), {"model": "m"}).to_json()))
    rng = random.Random(5)
    served = []
    for _ in range(40):
        shape = StepShape(0, 0, rng.randint(1, 32), rng.randint(1, 32) * rng.randint(20, 600), 0)
        served.append((shape, TRUE.step_seconds(shape) + 0.004 + 0.0002 * shape.num_decodes))
    path = tmp_path / "served.json"
    path.write_text(
        json.dumps(Profile(tuple(synthetic_steps(TRUE, 0.0)), {"model": "m"}, served=tuple(served)).to_json())
    )
    common = ["sim", "run", "--fixed-lengths", "64,32", "--num-requests", "30", "--rates", "inf", "--jobs", "1"]

    assert main([*common, "--profile", str(bare), "--overlap-host"]) == 2
    assert "--overlap-host needs the engine's own time per step" in capsys.readouterr().err

    def report(*flags: str) -> dict[str, Any]:
        assert main([*common, "--profile", str(path), *flags]) == 0
        return json.loads(capsys.readouterr().out)

    serial, overlapped = report("--breakdown"), report("--breakdown", "--overlap-host")
    assert serial["step_model"]["overlap"] is False and overlapped["step_model"]["overlap"] is True
    serial_split, overlapped_split = serial["runs"][0]["busy_by_term_s"], overlapped["runs"][0]["busy_by_term_s"]
    # The same steps on the device either way; the engine's time shows only past the device's in the overlap.
    for name in ("prompt_step_intercept", "decode_step_intercept", "decode_context", "decodes"):
        assert overlapped_split[name] == pytest.approx(serial_split[name])
    assert 0 <= overlapped_split["engine_overhead"] < serial_split["engine_overhead"]
    for split in (serial_split, overlapped_split):
        assert split["busy"] == pytest.approx(sum(v for k, v in split.items() if k != "busy"))
    assert overlapped["runs"][0]["output_throughput"] > serial["runs"][0]["output_throughput"]
    assert "busy_by_term_s" not in report()["runs"][0]  # asked for, not always on


def test_the_kept_h200_profile_still_loads_and_answers_the_overlap_question(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/simulator.md and BENCHMARKS.md run these files; a change to the profile's format must keep them."""
    from kvos.entrypoints.cli import main

    data = Path(__file__).resolve().parents[2] / "docs" / "data"
    model = Profile.load(data / "h200-llama3-8b-profile.json").step_model()
    assert isinstance(model, ServedStepModel) and model.overhead.per_step > 0
    flags = ["--fixed-lengths", "200,40", "--num-requests", "64", "--rates", "inf", "--jobs", "1", "--breakdown"]
    runs = {}
    for extra in ([], ["--overlap-host"]):
        assert main(["sim", "run", "--profile", str(data / "h200-llama3-8b-profile.json"), *flags, *extra]) == 0
        runs[bool(extra)] = json.loads(capsys.readouterr().out)["runs"][0]
    assert runs[True]["busy_by_term_s"]["engine_overhead"] < runs[False]["busy_by_term_s"]["engine_overhead"]
    assert runs[True]["output_throughput"] > runs[False]["output_throughput"]
    roofline = [
        "--hardware", str(data / "h200-measured.json"), "--arch", str(data / "llama3-8b.config.json"),
        "--dtype", "bfloat16", "--kv-capacity-tokens", "327680",
    ]  # fmt: skip
    assert main(["sim", "run", *roofline, *flags]) == 0
    split = json.loads(capsys.readouterr().out)["runs"][0]["busy_by_term_s"]
    assert set(split) <= {"compute_bound_steps", "memory_bound_steps", "other", "busy"}
