"""The dashboard's sessions: a random id in an HttpOnly cookie, a CSRF token each.

Only an operator who logged in has server-side state. Any other browser's cookie holds a random
nonce the server does not store; its CSRF token is an HMAC of that nonce under a key of this
process (a signed double-submit token), so anonymous requests cannot fill the store or evict an
operator's session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

COOKIE_NAME: Final = "hd_session"
COOKIE_VALUE: Final = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")  # what token_urlsafe(32) makes


@dataclass(slots=True)
class Session:
    """One browser's session: stored once it has logged in, a value of one request before."""

    id: str
    csrf: str
    created: float
    seen: float
    operator: bool = False
    flash: str = ""

    def check_csrf(self, token: str | None) -> bool:
        """Compares a submitted CSRF token with the session's, in constant time."""
        given = (token or "").encode("utf-8", "replace")
        return token is not None and hmac.compare_digest(given, self.csrf.encode())


class SessionStore:
    """Operator sessions in memory, bounded: idle ones expire, the oldest go first when full."""

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
        self._key = secrets.token_bytes(32)

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

    def anonymous(self, cookie: str | None) -> Session:
        """An unstored session for the nonce in `cookie` (a fresh nonce when it has none)."""
        nonce = cookie if cookie and COOKIE_VALUE.fullmatch(cookie) else secrets.token_urlsafe(32)
        mac = hmac.new(self._key, b"csrf\0" + nonce.encode(), hashlib.sha256).digest()
        now = self._clock()
        csrf = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        return Session(id=nonce, csrf=csrf, created=now, seen=now)

    def create(self, *, operator: bool = False) -> Session:
        """A new stored session with fresh random id and CSRF token."""
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

    def rotate(self, session: Session) -> Session:
        """Ends `session` and stores an operator's under a new id (at login: no fixation)."""
        self.end(session)
        return self.create(operator=True)

    def end(self, session: Session) -> Session:
        """Forgets `session`; the browser continues with a fresh anonymous nonce."""
        self._sessions.pop(session.id, None)
        return self.anonymous(None)
