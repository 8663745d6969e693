"""The multi-turn benchmark's session planning and summary (no server needed)."""

from __future__ import annotations

import pytest

from benchmarks.multi_turn import CHAT_OVERHEAD_TOKENS, TurnResult, plan_sessions, summarize
from benchmarks.sharegpt import Conversation, Turn


class WordTokenizer:
    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def conversation(cid: str, *pairs: tuple[str, str]) -> Conversation:
    turns = [t for user, answer in pairs for t in (Turn("human", user), Turn("gpt", answer))]
    return Conversation(cid, tuple(turns))


def test_sessions_keep_conversations_with_enough_turns_that_fit() -> None:
    long_turn = " ".join(["w"] * 50)
    pool = [
        conversation("short", ("a b c d", "e f g h")),  # one turn only
        conversation("fits", ("a b c d", "one two three four five six"), ("e f g h", "x y z w v")),
        conversation("too-long", (long_turn, "a b c d"), ("e f g h", "x y z w")),
    ]
    (plan,) = plan_sessions(WordTokenizer(), pool, 1, 2, max_user=10, max_output=5, seed=0)
    assert plan.user_turns == ["a b c d", "e f g h"]
    assert plan.output_tokens == [5, 5]  # the dataset answers' lengths, capped
    assert plan.final_tokens == 4 + 5 + 4 + 5 + 4 * CHAT_OVERHEAD_TOKENS
    with pytest.raises(ValueError, match="only 1 conversations"):
        plan_sessions(WordTokenizer(), pool, 2, 2, max_user=10, max_output=5, seed=0)


def test_summary_splits_first_and_later_turns_and_differences_the_counters() -> None:
    results = [
        TurnResult(0, 0, 10, ok=True, ttft_s=1.0, output_tokens=4, gaps_s=[0.1]),
        TurnResult(0, 1, 20, ok=True, ttft_s=0.25, output_tokens=4, gaps_s=[0.1]),
        TurnResult(1, 0, 10, error="HTTP 500"),
    ]
    queries = ("kvos_prefix_cache_queries_total", ())
    host_hits = ("kvos_kv_tier_hit_tokens_total", (("tier", "host"),))
    summary = summarize(results, 2.0, {queries: 100.0, host_hits: 10.0}, {queries: 200.0, host_hits: 60.0})
    assert summary["failed"] == 1 and summary["errors"] == ["HTTP 500"]
    assert summary["ttft_first_turn_ms"]["p50"] == 1000.0
    assert summary["ttft_later_turns_ms"]["p50"] == 250.0
    assert summary["output_tok_s"] == 4.0
    assert summary["hit_rate_by_tier"] == {"primary": 0.0, "host": 0.5, "disk": 0.0}
