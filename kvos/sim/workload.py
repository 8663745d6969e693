"""Simulated requests: where their lengths and arrival times come from.

Three sources of single requests, one shape (`SimRequest`):

- ShareGPT lengths (prompt and reference answer, tokenized as the serving
  benchmark does), with arrivals from a process;
- a JSONL trace, one request per line:
  `{"arrival_s": 0.5, "prompt_tokens": 120, "output_tokens": 64, "tenant": "a", "priority": 0}`
  (`tenant`, `priority` and `hidden_tokens` optional);
- a Poisson process (exponential gaps) or a gamma process (burstier for a
  coefficient of variation above 1) at a rate.

And conversations (`SimSession`): a closed loop of turns, each sent a think
time after the client has read the previous reply, its prompt the whole
history so far (earlier prompts and replies) plus the new message, as a chat
client sends it. In a trace, lines with a `session` field are its turns, in
order: the first gives `arrival_s` (and the session's `tenant`, `priority`
and `prefix_tokens`), each later one `think_s` instead
(`{"session": "s1", "think_s": 2.0, "prompt_tokens": 300, "output_tokens": 40}`).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvos.sim.repo import benchmarks

ARRIVAL_PROCESSES = ("poisson", "gamma")


@dataclass(frozen=True)
class SimRequest:
    """One request as the simulator needs it: no text, only sizes, time and scheduling keys."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    tenant: str = ""
    priority: int = 0
    hidden_tokens: int = 0
    """Leading output tokens that show a streaming client no text: a special token the server skips, such
    as the end-of-turn token that a benchmark's `ignore_eos` runs past. The client's first token, and so its
    TTFT, is the first token after them (the serving benchmark measures it so); they take their steps."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.arrival_s) and self.arrival_s >= 0):
            raise ValueError(f"arrival_s must be a finite time >= 0, got {self.arrival_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and output_tokens must be >= 1, got {self.prompt_tokens} and {self.output_tokens}"
            )
        if not 0 <= self.hidden_tokens < self.output_tokens:
            raise ValueError(
                f"hidden_tokens must be >= 0 and below output_tokens ({self.output_tokens}), got {self.hidden_tokens}"
            )


@dataclass(frozen=True)
class SimTurn:
    """One turn of a conversation."""

    prompt_tokens: int
    """The whole prompt: the history (earlier prompts and replies) and the new message."""
    output_tokens: int
    think_s: float = 0.0
    """From the client reading the previous reply to sending this turn; 0 for the first turn."""


@dataclass(frozen=True)
class SimSession:
    """A conversation: its first turn is sent at `start_s`, each later one `think_s` after the reply before it.

    A later turn's prompt begins with the earlier turn's prompt and reply, so
    the engine finds that history in its prefix cache (or a tier) if it is
    still there; it must be longer than that history by its new message.
    """

    start_s: float
    turns: tuple[SimTurn, ...]
    tenant: str = ""
    priority: int = 0
    prefix_tokens: int = 0
    """How many tokens its first prompt begins with that every session's does (a system prompt, the chat
    template's opening): a session shares the first min(its, another's) of them with another."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"start_s must be a finite time >= 0, got {self.start_s}")
        if not self.turns:
            raise ValueError("a session needs at least one turn")
        if not 0 <= self.prefix_tokens < self.turns[0].prompt_tokens:
            raise ValueError(
                f"prefix_tokens must be >= 0 and below the first prompt's {self.turns[0].prompt_tokens}, "
                f"got {self.prefix_tokens}"
            )
        history = 0
        for k, turn in enumerate(self.turns):
            if turn.output_tokens < 1:
                raise ValueError(f"turn {k}: output_tokens must be >= 1, got {turn.output_tokens}")
            if turn.prompt_tokens <= history:
                raise ValueError(
                    f"turn {k}: prompt_tokens ({turn.prompt_tokens}) must exceed the history before it "
                    f"({history} tokens: earlier prompt and reply)"
                )
            if not (math.isfinite(turn.think_s) and turn.think_s >= 0) or (k == 0 and turn.think_s):
                raise ValueError(f"turn {k}: think_s must be a finite time >= 0 (0 for the first), got {turn.think_s}")
            history = turn.prompt_tokens + turn.output_tokens


def arrival_times(num: int, rate: float, process: str = "poisson", cv: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival times (seconds from 0) of `num` requests at `rate` per second; all 0 for rate=inf.

    The Poisson case draws exactly the gaps `benchmarks.serve.poisson_delays`
    draws for the same seed, so a simulated run and a measured one see the
    same arrivals. The gamma process has mean gap 1/rate and the given
    coefficient of variation (cv=1 is Poisson's).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (inf: all at once), got {rate}")
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(f"process must be one of {', '.join(ARRIVAL_PROCESSES)}, got {process!r}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    shape = 1.0 / cv**2
    times, now = [], 0.0
    for _ in range(num):
        times.append(now)
        now += rng.expovariate(rate) if process == "poisson" else rng.gammavariate(shape, 1.0 / (shape * rate))
    return times


def with_arrivals(
    lengths: Sequence[tuple[int, int]], times: Sequence[float], hidden: Sequence[int] | None = None
) -> list[SimRequest]:
    """Pair (prompt, output) lengths with arrival times (and `hidden` leading tokens, see `SimRequest`), in order."""
    if len(lengths) != len(times):
        raise ValueError(f"got {len(lengths)} request lengths but {len(times)} arrival times")
    if hidden is None:
        return [SimRequest(t, p, o) for (p, o), t in zip(lengths, times)]
    if len(hidden) != len(lengths):
        raise ValueError(f"got {len(lengths)} request lengths but {len(hidden)} hidden token counts")
    return [SimRequest(t, p, o, hidden_tokens=h) for (p, o), t, h in zip(lengths, times, hidden)]


SHAREGPT_POOL = 1000
"""Distinct ShareGPT requests tokenized at most; longer runs cycle through them (the distribution is what counts)."""


def sharegpt_lengths(
    num: int, max_prompt_tokens: int = 512, max_output_tokens: int = 128, seed: int = 0
) -> list[tuple[int, int]]:
    """(prompt, output) token counts of ShareGPT requests, drawn as `benchmarks.serve` draws them.

    The same seed and bounds give the serving benchmark's requests in its
    order, so simulated and measured runs serve the same work. Past
    `SHAREGPT_POOL` requests the lengths repeat, which keeps a million-request
    fleet run from tokenizing a million conversations.
    """
    peers = benchmarks("peers")
    tokenizer = peers.load_tokenizer(peers.resolve_gguf(None))
    sample = benchmarks("sharegpt").sample_requests(
        tokenizer, min(num, SHAREGPT_POOL), max_prompt_tokens, max_output_tokens, seed
    )
    pairs = [(len(r.prompt_token_ids), r.max_tokens) for r in sample]
    return [pairs[i % len(pairs)] for i in range(num)]


@dataclass(frozen=True)
class Workload:
    """What a simulation serves: single requests (sorted by arrival) and conversations."""

    requests: list[SimRequest]
    sessions: list[SimSession]


def load_trace(path: str | Path) -> Workload:
    """A JSONL trace: its requests sorted by arrival, and its sessions (lines with a `session` field, in order).

    ValueError names the line and the field that is wrong.
    """
    requests: list[SimRequest] = []
    turns: dict[str, list[tuple[int, dict]]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if "session" in entry:
                    session = turns.setdefault(str(entry["session"]), [])
                    first = not session
                    if first and "think_s" in entry:
                        raise ValueError("a session's first line gives arrival_s, not think_s")
                    if not first and "arrival_s" in entry:
                        raise ValueError("a session's later lines give think_s (after the reply), not arrival_s")
                    float(entry["arrival_s"] if first else entry.get("think_s", 0.0))  # named with its line
                    session.append((number, entry))
                    continue
                requests.append(
                    SimRequest(
                        arrival_s=float(entry["arrival_s"]),
                        prompt_tokens=int(entry["prompt_tokens"]),
                        output_tokens=int(entry["output_tokens"]),
                        tenant=str(entry.get("tenant", "")),
                        priority=int(entry.get("priority", 0)),
                        hidden_tokens=int(entry.get("hidden_tokens", 0)),
                    )
                )
            except KeyError as exc:
                raise ValueError(f"{path}:{number}: missing field {exc.args[0]!r}") from exc
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
    requests.sort(key=lambda r: r.arrival_s)
    sessions = []
    for lines in turns.values():
        number, opening = lines[0]
        try:
            sessions.append(
                SimSession(
                    start_s=float(opening["arrival_s"]),
                    turns=tuple(
                        SimTurn(int(e["prompt_tokens"]), int(e["output_tokens"]), float(e.get("think_s", 0.0)))
                        for _, e in lines
                    ),
                    tenant=str(opening.get("tenant", "")),
                    priority=int(opening.get("priority", 0)),
                    prefix_tokens=int(opening.get("prefix_tokens", 0)),
                )
            )
        except KeyError as exc:
            raise ValueError(f"{path}: session from line {number}: missing field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: session from line {number}: {exc}") from exc
    return Workload(requests, sessions)


def write_trace(path: str | Path, requests: Sequence[SimRequest], sessions: Sequence[SimSession] = ()) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            fields = {"arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens}
            hidden = {"hidden_tokens": r.hidden_tokens} if r.hidden_tokens else {}
            f.write(json.dumps({**fields, "tenant": r.tenant, "priority": r.priority, **hidden}) + "\n")
        for j, session in enumerate(sessions):
            for k, turn in enumerate(session.turns):
                when = {"arrival_s": session.start_s} if k == 0 else {"think_s": turn.think_s}
                sizes = {"prompt_tokens": turn.prompt_tokens, "output_tokens": turn.output_tokens}
                keys = (
                    {"tenant": session.tenant, "priority": session.priority, "prefix_tokens": session.prefix_tokens}
                    if k == 0
                    else {}
                )
                f.write(json.dumps({"session": str(j), **when, **sizes, **keys}) + "\n")
