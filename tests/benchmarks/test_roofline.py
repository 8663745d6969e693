from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks import roofline
from benchmarks.roofline import SMOLLM2_135M, ArchShape, MachinePeak, Roofline, load_or_measure, percent_of_limit

# hidden 4, intermediate 8, 2 layers, 2 heads of dim 2, 1 KV head, vocab 10.
TINY = {
    "hidden_size": 4,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "vocab_size": 10,
    "tie_word_embeddings": True,
}


class HFStyleConfig:
    """Duck-typed arch with HF attribute names and no head_dim (derived from hidden/heads)."""

    hidden_size = 4
    intermediate_size = 8
    num_hidden_layers = 2
    num_attention_heads = 2
    num_key_value_heads = 1
    vocab_size = 10
    tie_word_embeddings = False


def test_counts_for_a_tiny_arch_match_hand_computation() -> None:
    arch = ArchShape.from_any(TINY)
    # q 4*4 + k 4*2 + v 4*2 + o 4*4 + gate/up/down 3*4*8
    assert arch.linear_params_per_layer == 16 + 8 + 8 + 16 + 96
    # embedding 10*4 + norms (2*2+1)*4 + 2 layers * 144
    assert arch.num_params == 40 + 20 + 288
    assert arch.params_read_per_step == 348
    assert arch.linear_flops_per_token() == 2 * 2 * 144
    assert arch.lm_head_flops() == 2 * 4 * 10
    # 4 FLOPs per key per head-dim element per head per layer: 4*2*2*2 = 32 per key
    assert arch.attention_flops(5) == 160
    # 3 tokens: 3 linear passes, one logits row, 1+2+3 key visits
    assert arch.prefill_flops(3) == 3 * 576 + 80 + 32 * 6
    assert arch.decode_flops(5) == 576 + 80 + 160
    # K and V, 2 layers, 1 KV head of dim 2, 4 bytes
    assert arch.kv_bytes_per_token(4) == 32


def test_duck_typed_arch_derives_head_dim_and_counts_an_untied_head() -> None:
    arch = ArchShape.from_any(HFStyleConfig())
    assert arch.head_dim == 2
    assert arch.num_params == 348 + 40
    assert arch.params_read_per_step == 348


def test_missing_field_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        ArchShape.from_any({k: v for k, v in TINY.items() if k != "vocab_size"})


def test_step_and_workload_bounds_match_hand_computation() -> None:
    model = Roofline(ArchShape.from_any(TINY), peak_flops=1000.0, read_bandwidth=100.0, kv_bytes_per_elem=4)
    # prefill of 3 tokens: max(2000 FLOPs / 1000, 348 weight bytes / 100)
    assert model.prefill_step_seconds([3], weight_bytes_per_param=1) == pytest.approx(3.48)
    # decode at 5 keys: max(816 / 1000, (348 + 5 * 32) / 100)
    assert model.decode_step_seconds([5], weight_bytes_per_param=1) == pytest.approx(5.08)

    # prefill gives the first token; the second needs one decode step at 4 keys: (348 + 128) / 100
    one = model.lower_bound_seconds([(3, 2)], max_batch=1, weight_bytes_per_param=1)
    assert (one.prefill_s, one.decode_s) == (pytest.approx(3.48), pytest.approx(4.76))
    assert one.total_s == pytest.approx(8.24)

    serial = model.lower_bound_seconds([(3, 2), (3, 2)], max_batch=1, weight_bytes_per_param=1)
    assert serial.total_s == pytest.approx(16.48)
    # batched: prefill max(4000 / 1000, 3.48) = 4.0, decode max(1.568, (348 + 256) / 100) = 6.04
    batched = model.lower_bound_seconds([(3, 2), (3, 2)], max_batch=2, weight_bytes_per_param=1)
    assert batched.total_s == pytest.approx(10.04)


def test_bound_is_monotone_in_tokens() -> None:
    model = Roofline(SMOLLM2_135M, peak_flops=80e9, read_bandwidth=25e9)
    base = [(10 + 37 * i % 400, 1 + 53 * i % 200) for i in range(30)]

    def total(requests: list[tuple[int, int]]) -> float:
        return model.lower_bound_seconds(requests, max_batch=8, weight_bytes_per_param=4).total_s

    reference = total(base)
    longer_prompts = [(p + 50, o) for p, o in base]
    longer_outputs = [(p, o + 20) for p, o in base]
    more_requests = base + [(100, 100)]
    assert total(longer_prompts) > reference
    assert total(longer_outputs) > reference
    assert total(more_requests) > reference
    steps = [total([(p, o) for p, o in base[:n]]) for n in range(1, len(base) + 1)]
    assert steps == sorted(steps)


def test_bad_inputs_are_value_errors() -> None:
    model = Roofline(ArchShape.from_any(TINY), peak_flops=1.0, read_bandwidth=1.0)
    with pytest.raises(ValueError, match="max_batch"):
        model.lower_bound_seconds([(3, 2)], max_batch=0, weight_bytes_per_param=1)
    with pytest.raises(ValueError, match="output_len"):
        model.lower_bound_seconds([(3, 0)], max_batch=1, weight_bytes_per_param=1)
    with pytest.raises(ValueError, match="measured_s"):
        percent_of_limit(0.0, 1.0)


def test_percent_of_limit() -> None:
    assert percent_of_limit(measured_s=4.0, bound_s=1.0) == pytest.approx(25.0)


def test_measurement_is_cached_per_device_until_remeasured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "roofline-test.json"
    measured: list[str] = []

    def fake_measure(device: str) -> MachinePeak:
        measured.append(device)
        return MachinePeak(device, "fake", "float32", 2, peak_flops=1e11, read_bandwidth=2e10, measured_on="2026-11-25")

    monkeypatch.setattr(roofline, "measure_machine", fake_measure)
    first = load_or_measure("cpu", cache_path=cache)
    again = load_or_measure("cpu", cache_path=cache)
    assert measured == ["cpu"]
    assert again == first
    assert json.loads(cache.read_text())["cpu"] == asdict(first)

    load_or_measure("cpu", remeasure=True, cache_path=cache)
    assert measured == ["cpu", "cpu"]
