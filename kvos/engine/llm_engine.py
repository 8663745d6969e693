"""The synchronous engine: a front end (text) over an engine core (token ids).

    add_request(text | ids) -> tokenize -> OutputProcessor fans out n sequences -> EngineCore.add_request
    step()                  -> EngineCore.step() -> [SequenceUpdate] -> OutputProcessor -> [RequestOutput]

The core runs in this process (`EngineCore`) or in its own
(`EngineCoreProcess`, with `core_process=True`); both answer the same calls.

Not thread-safe: one thread drives `step()`; servers hand requests to that
thread (see `async_engine`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from kvos.config import EngineConfig
from kvos.core.core_process import EngineCoreProcess
from kvos.core.engine_core import EngineCore
from kvos.core.plan import SequenceUpdate
from kvos.core.request import Request
from kvos.core.scheduler import Scheduler
from kvos.engine.sessions import SessionBooks, SessionInfo, SessionRef
from kvos.engine.stats import EngineStats
from kvos.errors import InvalidRequestError
from kvos.frontend.output_processor import OutputProcessor
from kvos.memory.kv_manager import KVCacheManager
from kvos.model.loader import LoadedModel, load_model
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Core(Protocol):
    """The engine-core calls `LLMEngine` makes: `EngineCore`, `EngineCoreProcess` and a cluster answer them."""

    max_model_len: int
    capacity_tokens: int

    def add_request(self, request: Request) -> None: ...

    def abort_request(self, req_id: str) -> None: ...

    def release_session(self, key: str) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[SequenceUpdate]: ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...


CoreFactory = Callable[[EngineConfig, LoadedModel, frozenset[int]], Core]
"""Builds the core from the config, the loaded model and the EOS ids (a cluster of instances, say)."""


class LLMEngine:
    """Owns the tokenizer and the front end's per-request state, and drives one `EngineCore`."""

    def __init__(self, config: EngineConfig, core_factory: CoreFactory | None = None) -> None:
        """`core_factory`: build the core some other way than in this process or a child process."""
        self.config = config
        loaded = load_model(config.model)
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.arch = loaded.arch
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(loaded.arch.eos_token_ids)
        self.core: Core
        if core_factory is not None:
            self.core = core_factory(config, loaded, self.eos_token_ids)
        elif config.parallel.core_process:
            self.core = EngineCoreProcess(config, self.eos_token_ids)
        else:
            self.core = EngineCore(config, loaded, self.eos_token_ids)
        self.max_model_len = self.core.max_model_len
        self.capacity_tokens = self.core.capacity_tokens
        """Tokens the KV cache holds at once."""
        self.processor = OutputProcessor(self.tokenizer)
        self.sessions = SessionBooks(config.cache.session_ttl)

    @property
    def kv_manager(self) -> KVCacheManager:
        """The KV books (in-process core only: a core process keeps its own)."""
        return self._local_core().kv_manager

    @property
    def scheduler(self) -> Scheduler:
        return self._local_core().scheduler

    def _local_core(self) -> EngineCore:
        if not isinstance(self.core, EngineCore):
            raise AttributeError("the engine core runs in its own process; its state is not visible here")
        return self.core

    def close(self) -> None:
        """Free the KV memory and stop the core (and its process). Safe to call twice."""
        self.core.close()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests in and out ----------------------------------------------------------

    def add_request(
        self,
        req_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        tenant: str = "",
        session: SessionRef | None = None,
    ) -> None:
        """Queue a request; raises InvalidRequestError (a ValueError) on anything it could never serve.

        `priority` (lower is sooner) needs the priority policy; `tenant` is
        whose service it counts as under the fair policy; `cache_salt` keeps
        its prefix blocks apart from requests with another salt; `session`
        keeps its KV for the conversation's next call (SessionNotFoundError
        if the id is another owner's).
        """
        if req_id in self.processor:
            raise InvalidRequestError(f"request id {req_id!r} is already in use")
        if params.n > self.config.scheduler.max_num_seqs:
            raise InvalidRequestError(
                f"n ({params.n}) exceeds max_num_seqs ({self.config.scheduler.max_num_seqs})", "n"
            )
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}", "priority")
        if priority != 0 and self.config.scheduler.policy != "priority":
            raise InvalidRequestError(
                f"priority {priority} needs --scheduling-policy priority; this engine runs "
                f"{self.config.scheduler.policy!r}",
                "priority",
            )
        if session is not None:
            self._check_session(session, params)
        text, token_ids = self._tokenize(prompt)
        # The core checks lengths and token ids as each sequence arrives; a refusal unregisters the lot.
        sequences = self.processor.add_request(req_id, text, token_ids, params, priority, cache_salt, tenant)
        try:
            if session is not None:
                hold_key = self.sessions.begin(session, req_id)
                for sequence in sequences:
                    sequence.session_id = hold_key
            for sequence in sequences:
                self.core.add_request(sequence)
        except Exception:
            released = self.sessions.cancel(req_id)
            self.abort_request(req_id)
            if released is not None:
                self.core.release_session(released)
            raise

    def _check_session(self, session: SessionRef, params: SamplingParams) -> None:
        cache = self.config.cache
        if cache.kv_cache != "paged" or not cache.enable_prefix_caching:
            raise InvalidRequestError(
                "session_id needs the paged KV cache with prefix caching (its KV is found again by prefix)",
                "session_id",
            )
        if params.n != 1:
            raise InvalidRequestError(f"session_id needs n = 1 (one conversation), got n = {params.n}", "n")

    def list_sessions(self, owner: str = "") -> list[SessionInfo]:
        """The owner's live sessions, most recently used first."""
        self._expire_sessions()
        return self.sessions.list(owner)

    def delete_session(self, session_id: str, owner: str = "") -> None:
        """Forget a session and release its KV now (SessionNotFoundError if it is not the owner's)."""
        self._expire_sessions()
        self.core.release_session(self.sessions.delete(session_id, owner))

    def _expire_sessions(self) -> None:
        for key in self.sessions.expire():
            self.core.release_session(key)

    def _end_session_call(self, output: RequestOutput | None, req_id: str) -> None:
        """Book the end of a session's call; release the KV it left if its session is gone."""
        num_tokens = None
        if output is not None and output.error is None and output.outputs:
            num_tokens = len(output.prompt_token_ids) + len(output.outputs[0].token_ids)
        key = self.sessions.end(req_id, num_tokens)
        if key is not None:
            self.core.release_session(key)

    def abort_request(self, req_id: str) -> None:
        """Stop a request now and free all it holds; unknown ids are ignored."""
        for seq_id in self.processor.abort(req_id):
            self.core.abort_request(seq_id)
        self._end_session_call(None, req_id)

    def least_urgent_waiting(self, priority: int) -> str | None:
        """The waiting user request least urgent of those strictly less urgent than `priority`, if any.

        What a full queue refuses to make room for a more urgent arrival (the
        priority policy, in-process core only).
        """
        if self.config.scheduler.policy != "priority" or not isinstance(self.core, EngineCore):
            return None
        waiting = [r for r in self.core.scheduler.waiting if r.priority > priority and r.num_computed_tokens == 0]
        if not waiting:
            return None
        least = max(waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.processor.group_of(least.req_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or len(self.processor) > 0

    def stats(self) -> EngineStats:
        return self.core.stats()

    # -- the loop ---------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One iteration: returns the state of every request that progressed or ended (`final_only`: that
        ended)."""
        outputs, to_abort = self.processor.process(self.core.step(), final_only)
        for seq_id in to_abort:
            self.core.abort_request(seq_id)
        if self.sessions.active:
            for output in outputs:
                if output.finished:
                    self._end_session_call(output, output.req_id)
            self._expire_sessions()
        return outputs

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone UTF-16 surrogate, which JSON allows and UTF-8 cannot hold
                raise InvalidRequestError(
                    f"prompt is not valid Unicode text: {exc.reason} at index {exc.start}", "prompt"
                ) from exc
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(
            f"prompt must be a string or a list of token ids, got {type(prompt).__name__}", "prompt"
        )
