"""The engine core in its own process (`core_process=True`), as vLLM runs its engine core.

    front-end process                           core process
    -----------------                           ------------
    LLMEngine --("add", Request)----------->    EngineCore.add_request
              --("abort", req_id)---------->    EngineCore.abort_request
              --("release_session", key)--->    EngineCore.release_session
              <-("step", [SequenceUpdate], EngineStats)--  EngineCore.step(), as fast as it can

Only plain data crosses the pipe (`Request`, `SequenceUpdate`, `EngineStats`
pickle), which is the point of the step-as-data design. The core steps on
its own, so detokenizing, stop strings and HTTP work in the front end
overlap the next forward pass instead of delaying it; the cost is a pickle
and a pipe hop per step, and a second process competing for cores. Whether
that pays depends on the machine (BENCHMARKS.md has the measurement).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
from dataclasses import dataclass

from kvos.config import EngineConfig
from kvos.core.engine_core import check_fits, check_logit_bias, check_request
from kvos.core.plan import SequenceUpdate
from kvos.core.request import Request
from kvos.engine.stats import EngineStats
from kvos.errors import EngineUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreInfo:
    """What the front end needs to validate requests without asking the core."""

    max_model_len: int
    vocab_size: int
    max_tokens_per_request: int
    capacity_tokens: int
    stats: EngineStats


def _serve(config: EngineConfig, eos_token_ids: frozenset[int], conn: multiprocessing.connection.Connection) -> None:
    """The core process: load, report ready, then step whenever there is work."""
    from kvos.core.engine_core import EngineCore
    from kvos.heap import freeze_startup_heap
    from kvos.model.loader import load_model  # the child loads its own weights

    try:
        core = EngineCore(config, load_model(config.model), eos_token_ids)
    except Exception as exc:  # the front end re-raises it where the user called
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    freeze_startup_heap()
    kv = core.kv_manager
    conn.send(
        (
            "ready",
            CoreInfo(core.max_model_len, core.vocab_size, kv.max_tokens_per_request, kv.capacity_tokens, core.stats()),
        )
    )
    rejected: list[SequenceUpdate] = []
    while True:
        idle = not core.has_unfinished_requests() and not rejected
        while idle or conn.poll():
            try:
                command = conn.recv()
            except EOFError:  # the front end is gone
                return
            if command[0] == "add":
                request: Request = command[1]
                try:
                    core.add_request(request)
                except ValueError as exc:  # checked in the front end already; answer rather than die
                    rejected.append(SequenceUpdate(request.req_id, [], [], 0, "abort", None, str(exc)))
            elif command[0] == "abort":
                core.abort_request(command[1])
            elif command[0] == "release_session":
                core.release_session(command[1])
            elif command[0] == "close":
                return
            idle = False
        updates = rejected + (core.step() if core.has_unfinished_requests() else [])
        rejected = []
        conn.send(("step", updates, core.stats()))


class EngineCoreProcess:
    """The `EngineCore` methods `LLMEngine` calls, served by a core in a child process."""

    def __init__(self, config: EngineConfig, eos_token_ids: frozenset[int]) -> None:
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(config, eos_token_ids, child), name="kvos-core", daemon=True
        )
        self._process.start()
        child.close()
        message = self._recv()
        if message[0] == "error":
            self._process.join(5)
            raise RuntimeError(f"the engine core process failed to start: {message[1]}")
        info: CoreInfo = message[1]
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self._max_tokens_per_request = info.max_tokens_per_request
        self.capacity_tokens = info.capacity_tokens
        self._stats = info.stats
        self._live: set[str] = set()

    def _recv(self) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineUnavailableError("the engine core process has stopped") from exc

    def check_request(self, prompt_token_ids: list[int], max_tokens: int) -> None:
        check_request(prompt_token_ids, max_tokens, self.vocab_size, self.max_model_len, self._check_fits)

    def _check_fits(self, num_tokens: int) -> None:
        check_fits(num_tokens, self._max_tokens_per_request, self.capacity_tokens)

    def add_request(self, request: Request) -> None:
        self.check_request(request.prompt_token_ids, request.params.max_tokens)
        check_logit_bias(request, self.vocab_size)
        self._conn.send(("add", request))
        self._live.add(request.req_id)

    def abort_request(self, req_id: str) -> None:
        if req_id in self._live:
            self._live.discard(req_id)
            self._conn.send(("abort", req_id))

    def release_session(self, key: str) -> None:
        self._conn.send(("release_session", key))

    def has_unfinished_requests(self) -> bool:
        return bool(self._live)

    def step(self) -> list[SequenceUpdate]:
        """The updates of the core's next step (and of any that already arrived)."""
        if not self._live:
            return []
        updates: list[SequenceUpdate] = []
        while True:
            message = self._recv()
            updates.extend(message[1])
            self._stats = message[2]
            if not self._conn.poll():
                break
        for update in updates:
            if update.finish_reason is not None:
                self._live.discard(update.req_id)
        return updates

    def stats(self) -> EngineStats:
        return self._stats

    def close(self) -> None:
        """Stop the core process. Safe to call twice."""
        if self._process.is_alive():
            try:
                self._conn.send(("close",))
            except OSError:
                pass
            self._process.join(10)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()
