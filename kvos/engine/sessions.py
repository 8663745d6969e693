"""Sessions: a conversation's KV kept between calls, and who may use it.

A call with a `session_id` runs as usual; when it ends, the engine core keeps
the blocks it computed pinned under the session's *hold key* (see
`PagedKVCacheManager.hold`) instead of letting the LRU reuse them. The next
call of the conversation resends the history plus a new turn; its prompt
finds those blocks through the ordinary prefix lookup and computes only the
tokens after them. Nothing about the prompt is stored here: whatever prefix
the next call shares with the held KV is what it reuses.

These books live in the front end (`LLMEngine`), not the core, because they
are about callers: who owns a session, when it was last used, when it
expires. The core knows only hold keys, plain strings that travel in
`Request.session_id`, which works the same whether the core runs in this
process or its own. A hold key is fresh per session (not the client's id), so
a session deleted while a call still runs, and an id reused afterwards,
never share a hold: the late call's hold is released as soon as it ends.

The memory a session holds never starves live requests: the scheduler
releases holds, oldest first, before it preempts or keeps anyone waiting.
Released KV stays findable as ordinary prefix cache (and, with a host tier,
falls there on eviction), so a session whose hold was released may still
find its history. A session idle for `ttl_s` seconds is dropped (swept on
every engine step and every session call).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from kvos.errors import InvalidRequestError, SessionNotFoundError

MAX_SESSION_ID_LEN = 128
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def check_session_id(session_id: object) -> str:
    """`session_id` if it is a usable id, else InvalidRequestError naming what is wrong."""
    if not isinstance(session_id, str):
        raise InvalidRequestError(f"session_id must be a string, got {type(session_id).__name__}", "session_id")
    if not 1 <= len(session_id) <= MAX_SESSION_ID_LEN:
        raise InvalidRequestError(
            f"session_id must be 1 to {MAX_SESSION_ID_LEN} characters, got {len(session_id)}", "session_id"
        )
    if not _SESSION_ID.match(session_id):
        raise InvalidRequestError("session_id may hold only letters, digits and _ . : -", "session_id")
    return session_id


@dataclass(frozen=True)
class SessionRef:
    """What a call says about its session: the client's id and who is asking ("" without API keys)."""

    session_id: str
    owner: str = ""


@dataclass(frozen=True)
class SessionInfo:
    """A session as `GET /v1/sessions` lists it (times are Unix seconds)."""

    session_id: str
    created: int
    last_used_at: int
    expires_at: int
    num_calls: int
    num_tokens: int
    """Tokens of the conversation (prompt and reply) as its last finished call left it."""


@dataclass
class _Session:
    session_id: str
    owner: str
    hold_key: str
    created: float
    last_used: float
    """Monotonic time of the last call's start or end."""
    num_calls: int = 0
    num_tokens: int = 0
    running: set[str] = field(default_factory=set)
    """Request ids of its calls still running: a session in use never expires."""


class SessionBooks:
    """Sessions by id, least recently used first; the hold keys whose KV must be released are returned."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._calls: dict[str, str] = {}
        """Running request id -> its session's hold key."""
        self._live_keys: dict[str, _Session] = {}

    @property
    def active(self) -> bool:
        """Anything to book: a live session, or a call of one still running."""
        return bool(self._sessions or self._calls)

    def begin(self, ref: SessionRef, req_id: str, now: float | None = None) -> str:
        """Start a call of `ref`'s session (creating it on first use); returns its hold key.

        SessionNotFoundError when the id belongs to another owner: to the
        caller it is as if the session did not exist, except that it cannot
        be created either.
        """
        now = time.monotonic() if now is None else now
        check_session_id(ref.session_id)
        session = self._sessions.get(ref.session_id)
        if session is not None and session.owner != ref.owner:
            raise SessionNotFoundError(ref.session_id)
        if session is None:
            session = _Session(ref.session_id, ref.owner, f"session-{uuid.uuid4().hex}", time.time(), now)
            self._sessions[ref.session_id] = session
            self._live_keys[session.hold_key] = session
        session.last_used = now
        session.num_calls += 1
        session.running.add(req_id)
        self._sessions.move_to_end(ref.session_id)
        self._calls[req_id] = session.hold_key
        return session.hold_key

    def end(self, req_id: str, num_tokens: int | None, now: float | None = None) -> str | None:
        """A call ended (`num_tokens`: its conversation's length, None if it was cut short).

        Returns the hold key to release when the call's session is gone
        (deleted or expired while the call ran); None otherwise, and for
        requests that belong to no session.
        """
        key = self._calls.pop(req_id, None)
        if key is None:
            return None
        session = self._live_keys.get(key)
        if session is None:
            return key
        session.running.discard(req_id)
        session.last_used = time.monotonic() if now is None else now
        if num_tokens is not None:
            session.num_tokens = num_tokens
        self._sessions.move_to_end(session.session_id)
        return None

    def cancel(self, req_id: str) -> str | None:
        """Undo `begin` for a call the engine refused; a session it created is dropped (its key returned)."""
        key = self._calls.pop(req_id, None)
        if key is None:
            return None
        session = self._live_keys.get(key)
        if session is None:
            return key
        session.running.discard(req_id)
        session.num_calls -= 1
        return self._drop(session) if session.num_calls == 0 else None

    def expire(self, now: float | None = None) -> list[str]:
        """Drop sessions idle for longer than the TTL; returns their hold keys."""
        now = time.monotonic() if now is None else now
        expired = []
        for session in list(self._sessions.values()):  # least recently used first
            if now - session.last_used <= self.ttl_s:
                break
            if not session.running:
                expired.append(self._drop(session))
        return expired

    def list(self, owner: str, now: float | None = None) -> list[SessionInfo]:
        """The owner's sessions, most recently used first."""
        now = time.monotonic() if now is None else now
        wall = time.time()
        infos = []
        for session in reversed(self._sessions.values()):
            if session.owner != owner:
                continue
            last_used_at = wall - (now - session.last_used)
            infos.append(
                SessionInfo(
                    session.session_id,
                    int(session.created),
                    int(last_used_at),
                    int(last_used_at + self.ttl_s),
                    session.num_calls,
                    session.num_tokens,
                )
            )
        return infos

    def delete(self, session_id: str, owner: str) -> str:
        """Forget the owner's session now; returns its hold key. SessionNotFoundError if it is not theirs.

        Calls of it still running finish; the KV they leave is released as
        they end (see `end`).
        """
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFoundError(session_id)
        return self._drop(session)

    def _drop(self, session: _Session) -> str:
        del self._sessions[session.session_id]
        del self._live_keys[session.hold_key]
        return session.hold_key
