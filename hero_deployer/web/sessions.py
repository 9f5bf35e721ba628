"""Server-side sessions of the dashboard: a random id in an HttpOnly cookie, a CSRF token each."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

COOKIE_NAME: Final = "hd_session"


@dataclass(slots=True)
class Session:
    """One browser's session; `operator` once it has logged in with the bearer token."""

    id: str
    csrf: str
    created: float
    seen: float
    operator: bool = False
    flash: str = ""
    watched: set[str] = field(default_factory=set)
    """The VM sids the tenant page of this browser showed: its live updates are limited to them."""

    def check_csrf(self, token: str | None) -> bool:
        """Compares a submitted CSRF token with the session's, in constant time."""
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class SessionStore:
    """Sessions in memory, bounded: idle ones expire, the oldest go first when it is full."""

    def __init__(
        self,
        *,
        idle_timeout: float = 8 * 3600,
        max_age: float = 24 * 3600,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_timeout = idle_timeout
        self._max_age = max_age
        self._capacity = capacity
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of `session_id`, or None; touching it keeps it alive."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > self._idle_timeout or now - session.created > self._max_age:
            del self._sessions[session_id]
            return None
        session.seen = now
        self._sessions.move_to_end(session_id)
        return session

    def create(self, *, operator: bool = False) -> Session:
        """A new session with fresh random id and CSRF token."""
        now = self._clock()
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
            operator=operator,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self._capacity:
            self._sessions.popitem(last=False)
        return session

    def rotate(self, session: Session, *, operator: bool) -> Session:
        """Ends `session` and starts another (on login and logout: no fixation)."""
        self.end(session)
        fresh = self.create(operator=operator)
        fresh.watched = set(session.watched) if not operator else set()
        return fresh

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
