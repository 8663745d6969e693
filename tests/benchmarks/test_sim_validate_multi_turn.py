"""The multi-turn validation simulates the sessions the server was sent: its prompt lengths, the same pauses."""

from __future__ import annotations

import pytest

from benchmarks.multi_turn import SessionPlan, TurnResult
from benchmarks.peers import load_tokenizer, resolve_gguf
from benchmarks.sim_validate_multi_turn import Slowed, sim_sessions, summarize_sessions, template_prefix_tokens
from kvos.sim.simulator import FleetConfig, Simulator
from kvos.sim.step_model import LinearStepModel
from kvos.sim.workload import SimSession, SimTurn

PLANS = [SessionPlan(["a", "b"], [4, 3], 0), SessionPlan(["c"], [5], 0)]
DELAYS = [[0.5, 2.0], [0.1]]


def served(session: int, turn: int, prompt_tokens: int, ok: bool = True) -> TurnResult:
    return TurnResult(session, turn, 0, ok=ok, prompt_tokens=prompt_tokens)


def test_sessions_take_the_servers_prompt_counts_and_the_same_pauses() -> None:
    results = [served(1, 0, 30), served(0, 0, 20), served(0, 1, 40)]
    assert sim_sessions(PLANS, DELAYS, results) == [
        SimSession(0.5, (SimTurn(20, 4), SimTurn(40, 3, think_s=2.0)), tenant="session-0"),
        SimSession(0.1, (SimTurn(30, 5),), tenant="session-1"),
    ]
    shared = sim_sessions(PLANS, DELAYS, results, prefix_tokens=10)
    assert [s.prefix_tokens for s in shared] == [10, 10]
    with pytest.raises(RuntimeError, match="session 0 turn 1 failed"):
        sim_sessions(PLANS, DELAYS, [served(1, 0, 30), served(0, 0, 20), served(0, 1, 40, ok=False)])


def test_first_and_later_turns_are_told_apart() -> None:
    # By hand: prefill steps 100 ms, decode steps 10 ms. Session 1's only turn prefills alone at 0.1-0.2 s;
    # session 0's first turn arrives at 0.5 s (0.5-0.6, then 3 decodes to 0.63), its second 2 s after that.
    steps = LinearStepModel(0.100, 0.010, 0.0, 0.0, 0.0, 0.0)
    sessions = sim_sessions(PLANS, DELAYS, [served(1, 0, 30), served(0, 0, 20), served(0, 1, 40)])
    summary = summarize_sessions(Simulator(FleetConfig(), steps).run([], sessions), sessions)
    assert summary["ttft_first_turn_ms"]["p50"] == pytest.approx(100.0)
    assert summary["ttft_first_turn_ms"]["p99"] == pytest.approx(100.0)
    assert summary["ttft_later_turns_ms"]["p50"] == pytest.approx(100.0)
    # The last token: 2.63 + 0.1 + 2 decodes = 2.75 s; 12 tokens in all.
    assert summary["output_tok_s"] == pytest.approx(12 / 2.75)
    assert summary["hit_rate_by_tier"]["primary"] == pytest.approx(16 / (20 + 40 + 30))


def test_slowed_steps_take_that_much_longer_one_by_one_and_in_decode_runs() -> None:
    # The case above with every step twice as long: session 1 prefills 0.1-0.3 s; session 0's first turn
    # prefills 0.5-0.7 and decodes to 0.76 (a decode run of 3), its second turn is sent at 2.76, prefills to
    # 2.96 and decodes to 3.0.
    steps = LinearStepModel(0.100, 0.010, 0.0, 0.0, 0.0, 0.0)
    sessions = sim_sessions(PLANS, DELAYS, [served(1, 0, 30), served(0, 0, 20), served(0, 1, 40)])
    result = Simulator(FleetConfig(), Slowed(steps, 2.0)).run([], sessions)
    summary = summarize_sessions(result, sessions)
    assert summary["ttft_first_turn_ms"]["p50"] == pytest.approx(200.0)
    assert summary["output_tok_s"] == pytest.approx(12 / 3.0)
    assert sum(i.num_runs for i in result.instances) > 0, "the decode run path should be taken"


def test_the_shared_prefix_is_the_templates_opening() -> None:
    tokenizer = load_tokenizer(resolve_gguf(None))
    n = template_prefix_tokens(tokenizer)
    opening = tokenizer.decode(
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False)[
            :n
        ]
    )
    assert opening.endswith("user\n") and "system" in opening
