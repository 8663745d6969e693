"""Typed errors that cross layer boundaries, so callers never parse message text.

`InvalidRequestError` is a `ValueError` (Python callers catch it as one) that
also names the offending field; the server turns it into a 400 whose `param`
is that field.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """Input that can never be served; `param` names the field at fault (None: the request as a whole)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionNotFoundError(InvalidRequestError):
    """No session by that id belongs to the caller (it never existed, expired, or is someone else's).

    The three cases are one error on purpose: a caller must not learn which
    ids other callers use. The server answers it with 404.
    """

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r} (it may have expired)", "session_id")
        self.session_id = session_id


class EngineUnavailableError(RuntimeError):
    """The engine is shutting down or has stopped; retrying elsewhere may help."""


class DiskTierInUseError(RuntimeError):
    """Another engine holds the disk KV tier's directory; each engine needs its own `kv_disk_path`."""


class QueueFullError(RuntimeError):
    """More requests are waiting than `max_waiting` allows; retrying later may help."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailedError(RuntimeError):
    """The engine failed this one request; other requests keep running.

    The message is safe to show a client (it never holds internal exception
    text); the cause is logged where the failure happened.
    """
