from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sharegpt import BenchRequest, Conversation, load_sharegpt, sample_requests


class WordTokenizer:
    """One token per whitespace-separated word: cheap, deterministic, no model needed."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    return load_sharegpt()


def test_parses_the_truncated_dataset_up_to_the_cut(conversations: list[Conversation]) -> None:
    assert len(conversations) > 17_000
    assert conversations[0].conversation_id == "QWJhYvA_0"
    assert conversations[0].turns[0].role == "human"
    assert conversations[0].turns[1].role == "gpt"


def test_stops_cleanly_at_a_cut_and_honours_limit(tmp_path: Path) -> None:
    entries = [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(3)
    ]
    text = json.dumps(entries, indent=2)
    cut = text.index('"c2"') + 10  # inside the third entry
    path = tmp_path / "cut.json"
    path.write_text(text[:cut], encoding="utf-8")

    assert [c.conversation_id for c in load_sharegpt(path)] == ["c0", "c1"]
    assert [c.conversation_id for c in load_sharegpt(path, limit=1)] == ["c0"]

    whole = tmp_path / "whole.json"
    whole.write_text(text, encoding="utf-8")
    assert [c.first_exchange() for c in load_sharegpt(whole)] == [(f"q{i}", f"a{i}") for i in range(3)]


def test_sample_is_deterministic_and_within_bounds(conversations: list[Conversation]) -> None:
    tokenizer = WordTokenizer()
    first = sample_requests(
        tokenizer, 50, max_prompt_tokens=64, max_output_tokens=32, seed=7, conversations=conversations
    )
    again = sample_requests(
        tokenizer, 50, max_prompt_tokens=64, max_output_tokens=32, seed=7, conversations=conversations
    )
    other = sample_requests(
        tokenizer, 50, max_prompt_tokens=64, max_output_tokens=32, seed=8, conversations=conversations
    )

    assert first == again
    assert first != other
    assert len(first) == 50
    for request in first:
        assert isinstance(request, BenchRequest)
        assert request.prompt_token_ids == tokenizer.encode(request.prompt)
        assert 4 <= len(request.prompt_token_ids) <= 64
        assert 4 <= request.max_tokens <= 32
    answer_lengths: dict[str, set[int]] = {}
    for conversation in conversations:
        exchange = conversation.first_exchange()
        if exchange is not None:
            answer_lengths.setdefault(exchange[0], set()).add(len(tokenizer.encode(exchange[1])))
    assert all(r.max_tokens in answer_lengths[r.prompt] for r in first)


def test_asking_for_more_requests_than_fit_is_an_error(conversations: list[Conversation]) -> None:
    with pytest.raises(ValueError, match="num_requests"):
        sample_requests(
            WordTokenizer(), 100, max_prompt_tokens=4, max_output_tokens=4, conversations=conversations[:200]
        )
