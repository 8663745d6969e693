"""Session: every request of one conversation goes to the instance that served its first one
(or to the one its request migrated to, where its KV went).

The conversation is named by its session (the `session_id` extension,
whose held KV lives on one instance), else by the OpenAI `user` field (the
request's tenant); its KV prefix then stays on one instance across turns
without any prefix lookup. A new conversation, a request without a `user`, and a
conversation whose instance died or left go to the least-loaded instance
(and stick there from then on).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvos.cluster.routers import InstanceView, least_loaded
from kvos.core.request import Request

MAX_SESSIONS = 100_000
"""Conversations remembered; the least recently seen is forgotten first (it then routes by load)."""


class SessionRouter:
    wants_prefix = False

    def __init__(self) -> None:
        self._sessions: OrderedDict[str, int] = OrderedDict()

    def choose(self, request: Request, views: Sequence[InstanceView]) -> int:
        key = request.session_id or request.tenant
        if not key:
            return least_loaded(views).instance_id
        sticky = self._sessions.get(key)
        if sticky is not None and any(v.instance_id == sticky for v in views):
            self._sessions.move_to_end(key)
            return sticky
        chosen = least_loaded(views).instance_id
        self._sessions[key] = chosen
        self._sessions.move_to_end(key)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return chosen

    def forget(self, instance_id: int) -> None:
        for key in [k for k, v in self._sessions.items() if v == instance_id]:
            del self._sessions[key]

    def moved(self, request: Request, instance_id: int) -> None:
        """The conversation's newest KV is where its request moved: its next turns follow it there."""
        key = request.session_id or request.tenant
        if key and key in self._sessions:
            self._sessions[key] = instance_id
