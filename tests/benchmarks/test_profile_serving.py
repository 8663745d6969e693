"""The front end's delays: client and server records of the same requests are matched as they happened."""

from __future__ import annotations

import math

import pytest

from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.profile_serving import delay_tuples, engine_config, front_end_delays, hidden_tokens, served_steps
from benchmarks.serve import RequestResult


def sent(at: float, prompt_tokens: int, ttft: float) -> RequestResult:
    return RequestResult(prompt_tokens, 8, ok=True, ttft_s=ttft, sent_s=at)


def test_requests_are_matched_by_order_and_prompt_length_past_the_warm_up() -> None:
    client = [sent(10.0, 30, 0.100), sent(10.001, 50, 0.200), sent(12.0, 30, 0.050), sent(13.0, 20, 0.040)]
    server = {
        "warm-up": {"queued": 1.0, "added": 1.01, "first_token": 1.05, "prompt_tokens": 9},
        # The second request (50 tokens, +1 for a BOS) overtook the first on the way in.
        "b": {"queued": 10.0060, "added": 10.0200, "first_token": 10.1950, "prompt_tokens": 51},
        "a": {"queued": 10.0065, "added": 10.0300, "first_token": 10.0960, "prompt_tokens": 31},
        "c": {"queued": 12.0070, "added": 12.0100, "first_token": 12.0450, "prompt_tokens": 31},
        "d": {"queued": 13.0080, "added": 13.0090, "first_token": 13.0350, "prompt_tokens": 21},
    }
    delays = front_end_delays(client, server)
    assert [d["to_engine"] for d in delays] == pytest.approx([0.0065, 0.0050, 0.0070, 0.0080])
    assert [d["queued"] for d in delays] == pytest.approx([0.0235, 0.0140, 0.0030, 0.0010])
    assert [d["to_client"] for d in delays] == pytest.approx([0.0040, 0.0060, 0.0050, 0.0050])


def test_records_that_cannot_be_the_same_requests_are_refused() -> None:
    server = {"a": {"queued": 1.0, "added": 1.0, "first_token": 1.1, "prompt_tokens": 31}}
    with pytest.raises(RuntimeError, match="not the client's plus a constant"):
        front_end_delays([sent(0.9, 30, 0.3), sent(0.95, 70, 0.3)], server | {"b": {**server["a"], "queued": 1.01}})


def test_a_burst_reaching_the_engine_in_any_order_is_matched() -> None:
    client = [sent(5.0 + k * 1e-4, 10 + k, 0.5) for k in range(6)]
    order = [4, 2, 5, 0, 3, 1]  # the order the engine took them in
    server = {
        f"r{k}": {"queued": 5.01 + j * 1e-3, "added": 5.02, "first_token": 5.4, "prompt_tokens": 11 + k}
        for j, k in enumerate(order)
    }
    delays = front_end_delays(client, server)
    assert [d["to_engine"] for d in delays] == pytest.approx(
        [0.01 + order.index(k) * 1e-3 - k * 1e-4 for k in range(6)]
    )


def test_requests_the_client_saw_the_ids_of_are_matched_by_id() -> None:
    """Two prompts of the same length sent at once, queued the other way round: by length the first one
    sent would take the first one queued; by the completions' ids each finds its own record."""
    client = [sent(5.0, 9, 0.30), sent(5.0001, 9, 0.10)]
    client[0].response_id, client[1].response_id = "cmpl-a", "cmpl-b"
    server = {
        "cmpl-b-0": {"queued": 5.004, "added": 5.01, "first_token": 5.095, "prompt_tokens": 9},
        "cmpl-a-0": {"queued": 5.006, "added": 5.01, "first_token": 5.295, "prompt_tokens": 9},
    }
    delays = front_end_delays(client, server)
    assert [d["to_engine"] for d in delays] == pytest.approx([0.006, 0.0039])
    assert [d["to_client"] for d in delays] == pytest.approx([0.005, 0.0051])
    client[1].response_id = ""  # one id missing: every request is matched by length (and these two wrongly)
    assert [d["to_engine"] for d in front_end_delays(client, server)] == pytest.approx([0.004, 0.0059])


def test_the_way_out_of_a_request_whose_first_tokens_show_no_text_is_left_out() -> None:
    client = [sent(10.0, 30, 0.100), sent(11.0, 40, 0.090)]
    server = {
        "a": {"queued": 10.005, "added": 10.01, "first_token": 10.096, "prompt_tokens": 30},
        "b": {"queued": 11.004, "added": 11.01, "first_token": 11.070, "prompt_tokens": 40},
    }
    delays = front_end_delays(client, server)
    assert [d["request"] for d in delays] == [0, 1]
    # The second one's first token showed no text: the client's first chunk came a step (about 17 ms) later.
    rows = delay_tuples(2.0, delays, [0, 1])
    assert rows[0] == pytest.approx((2.0, 0.005, 0.004))
    assert rows[1][:2] == pytest.approx((2.0, 0.004)) and math.isnan(rows[1][2])


def test_hidden_tokens_are_the_replys_leading_tokens_without_text() -> None:
    """A short question the chat model answers with its end-of-turn token first (which ignore_eos runs
    past), and a prompt it continues with text at once, against the tokenizer decoding the same greedy
    tokens one at a time."""
    from kvos import LLM, SamplingParams

    prompts = ["How many words was that?", "I started a dnd campaign. It takes place in the material plane"]
    gguf = resolve_gguf(None)
    hidden = hidden_tokens(engine_config("", gguf), prompts, [16, 16])
    with LLM(str(gguf)) as llm:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    tokenizer = load_tokenizer(gguf)
    expected = [
        next(i for i, t in enumerate(o.outputs[0].token_ids) if tokenizer.decode([t], skip_special_tokens=True))
        for o in outputs
    ]
    assert hidden == expected == [1, 0]


def step_record(start: float, prefill: int, decodes: int, busy_after: bool = True) -> dict:
    shape = {"prefill_tokens": prefill, "attention_pairs": prefill * prefill, "num_decodes": decodes}
    shape |= {"decode_context": 10 * decodes, "num_prefills": int(prefill > 0)}
    return {
        "start": start,
        "end": start + 0.008,
        "worker_s": 0.006,
        "engine_s": 0.007,
        "core_s": 0.0065,
        "shape": shape,
        "busy_after": busy_after,
    }


def test_served_steps_mark_the_first_step_of_each_row_count_the_warm_up_included() -> None:
    """Rows are prompt tokens plus decodes. The warm-up request's steps (up to the first idle one) are not
    served steps, but the row counts they ran are built: a later step with the same count is not new."""
    records = [
        step_record(0.00, 9, 0),  # warm-up: 9 rows
        step_record(0.01, 0, 1, busy_after=False),  # 1 row; then idle
        step_record(1.00, 30, 0),  # the first served request's prompt: 30 rows, new
        step_record(1.03, 0, 1),  # 1 row: the warm-up ran it
        step_record(1.04, 8, 1),  # 9 rows: the warm-up ran it
        step_record(1.06, 29, 1),  # 30 rows again
        step_record(1.09, 0, 2),  # 2 rows: new
        step_record(1.10, 0, 2),  # the last record: no next start, so no served time
    ]
    steps = served_steps(records)
    assert [s["new_rows"] for s in steps] == [True, False, False, False, True]
    assert [s["seconds"] for s in steps] == pytest.approx([0.03, 0.01, 0.02, 0.03, 0.01])


def test_first_uses_are_reported_as_the_worker_time_over_the_model_by_kind_and_novelty() -> None:
    from benchmarks.profile_serving import format_first_uses
    from kvos.sim.step_model import LinearStepModel

    model = LinearStepModel(0.010, 0.005, 0.0, 0.0, 0.0, 0.0)  # 10 ms a prompt step, 5 ms a decode-only one
    records = [step_record(0.0, 9, 0, busy_after=False)] + [step_record(0.1 * k, 20 + k, 0) for k in range(4)]
    records += [step_record(1.0, 20, 0), step_record(1.1, 0, 3), step_record(1.2, 0, 3), step_record(1.3, 0, 3)]
    steps = served_steps(records)
    for s in steps:
        s["worker"] = 0.0125 if s["new_rows"] and s["shape"]["prefill_tokens"] else 0.0051
    text = format_first_uses(steps, model, 0.0028)
    assert text.splitlines() == [
        "first use of a row count, as the profile measured it: 2.80 ms",
        "  prompt steps, new row count: 4, worker time +2.50 ms over the model (median), ratio 1.250",
        "  prompt steps, run before row count: 1, worker time -4.90 ms over the model (median), ratio 0.510",
        "  decode-only steps, new row count: 1, worker time +0.10 ms over the model (median), ratio 1.020",
        "  decode-only steps, run before row count: 1, worker time +0.10 ms over the model (median), ratio 1.020",
    ]
