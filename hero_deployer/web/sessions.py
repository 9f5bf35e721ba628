"""The dashboard's sessions: an HttpOnly cookie, a CSRF token each.

An operator's cookie is signed (`nonce.issued.mac`, HMAC-SHA256 under a key kept in the data
dir), so a restart of the dashboard keeps operators logged in until the session's maximum age;
a session that ends (logout, idle, evicted) has its nonce put on a revocation list, kept in the
data dir until the cookie would have expired anyway. Only operators have server-side state.
Any other browser's cookie holds a random nonce the server does not store; its CSRF token is an
HMAC of that nonce (a signed double-submit token), so anonymous requests cannot fill the store or
evict an operator's session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Final

COOKIE_NAME: Final = "hd_session"
COOKIE_VALUE: Final = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")  # what token_urlsafe(32) makes
SIGNED_VALUE: Final = re.compile(r"\A([A-Za-z0-9_-]{43})\.([0-9]{1,12})\.([A-Za-z0-9_-]{43})\Z")
KEY_FILE: Final = "web-session.key"
REVOKED_FILE: Final = "web-sessions.revoked"


@dataclass(slots=True)
class Session:
    """One browser's session: stored once it has logged in, a value of one request before."""

    id: str
    csrf: str
    created: float
    seen: float
    operator: bool = False
    flash: str = ""
    label: str = ""  # an opaque name for the audit log's actor, never the cookie
    revealed: tuple[str, str] | None = None  # (username, password) until shown once

    def check_csrf(self, token: str | None) -> bool:
        """Compares a submitted CSRF token with the session's, in constant time."""
        given = (token or "").encode("utf-8", "replace")
        return token is not None and hmac.compare_digest(given, self.csrf.encode())

    def take_revealed(self, username: str) -> str | None:
        """The password revealed for `username`, once: the slot is empty afterwards."""
        slot, self.revealed = self.revealed, None
        return slot[1] if slot is not None and slot[0] == username else None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Revocations:
    """Nonces of ended sessions with the time their cookie expires; a file when given one."""

    def __init__(self, path: Path | None, clock: Callable[[], float]) -> None:
        self._path = path
        self.clock = clock
        self._until: dict[str, float] = {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                nonce, _, until = line.partition(" ")
                if COOKIE_VALUE.fullmatch(nonce) and until.isdigit():
                    self._until[nonce] = float(until)
            self._prune(rewrite=True)

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._until

    def add(self, nonce: str, until: float) -> None:
        """Revokes `nonce` until `until` (when its cookie expires anyway)."""
        self._until[nonce] = until
        if self._path is not None:
            self._write(f"{nonce} {int(until) + 1}\n", append=True)
        if len(self._until) % 256 == 0:
            self._prune(rewrite=True)

    def _prune(self, *, rewrite: bool) -> None:
        now = self.clock()
        self._until = {n: u for n, u in self._until.items() if u > now}
        if rewrite and self._path is not None:
            self._write("".join(f"{n} {int(u) + 1}\n" for n, u in self._until.items()))

    def _write(self, text: str, *, append: bool = False) -> None:
        assert self._path is not None
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        fd = os.open(self._path, flags, 0o600)
        with os.fdopen(fd, "a" if append else "w") as f:
            f.write(text)


@dataclass(eq=False, kw_only=True)
class SessionStore:
    """Operator sessions: in memory while used (bounded, idle ones expire), signed in the cookie.

    With `state_dir`, the signing key and the revocation list live there (mode 0600), so
    sessions survive a restart; without it the key is random and they end with the process.
    """

    idle_timeout: float = 8 * 3600
    max_age: float = 24 * 3600
    capacity: int = 10_000
    clock: Callable[[], float] = time.time
    state_dir: InitVar[Path | None] = None
    # left out of repr: session ids and the signing key are secrets
    _sessions: OrderedDict[str, Session] = field(
        init=False, repr=False, default_factory=OrderedDict
    )
    _key: bytes = field(init=False, repr=False)
    _revoked: Revocations = field(init=False, repr=False)

    def __post_init__(self, state_dir: Path | None) -> None:
        self._key = _load_key(state_dir)
        self._revoked = Revocations(state_dir / REVOKED_FILE if state_dir else None, self.clock)

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of `session_id`, or None; touching it keeps it alive."""
        if not session_id:
            return None
        session = self._sessions.get(session_id) or self._restore(session_id)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle_timeout or now - session.created > self.max_age:
            self._forget(session)
            return None
        session.seen = now
        self._sessions.move_to_end(session_id)
        return session

    def anonymous(self, cookie: str | None) -> Session:
        """An unstored session for the nonce in `cookie` (a fresh nonce when it has none)."""
        nonce = cookie if cookie and COOKIE_VALUE.fullmatch(cookie) else secrets.token_urlsafe(32)
        now = self.clock()
        csrf = self._mac(b"csrf\0", nonce)
        return Session(id=nonce, csrf=csrf, created=now, seen=now, label=self._label(nonce))

    def create(self, *, operator: bool = False) -> Session:
        """A new stored session with a fresh random nonce, signed with its time of issue."""
        nonce = secrets.token_urlsafe(32)
        issued = int(self.clock())
        body = f"{nonce}.{issued}"
        mac = self._mac(b"session\0", body)
        return self._store(f"{body}.{mac}", nonce, issued, operator)

    def rotate(self, session: Session) -> Session:
        """Ends `session` and stores an operator's under a new id (at login: no fixation)."""
        self.end(session)
        return self.create(operator=True)

    def end(self, session: Session) -> Session:
        """Forgets and revokes `session`; the browser continues with a fresh anonymous nonce."""
        self._forget(session)
        return self.anonymous(None)

    def _store(self, cookie: str, nonce: str, issued: float, operator: bool) -> Session:
        now = self.clock()
        session = Session(
            id=cookie,
            csrf=self._mac(b"csrf-operator\0", cookie),
            created=issued,
            seen=now,
            operator=operator,
            label=self._label(nonce),
        )
        self._sessions[cookie] = session
        while len(self._sessions) > self.capacity:
            self._forget(next(iter(self._sessions.values())))
        return session

    def _restore(self, cookie: str) -> Session | None:
        """The session of a signed cookie this store no longer holds (after a restart)."""
        match = SIGNED_VALUE.fullmatch(cookie)
        if match is None:
            return None
        nonce, issued, mac = match.groups()
        expected = self._mac(b"session\0", f"{nonce}.{issued}")
        if not hmac.compare_digest(mac.encode(), expected.encode()) or nonce in self._revoked:
            return None
        if self.clock() - int(issued) > self.max_age:
            return None
        return self._store(cookie, nonce, int(issued), operator=True)

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        match = SIGNED_VALUE.fullmatch(session.id)
        if match is not None:
            self._revoked.add(match.group(1), int(match.group(2)) + self.max_age)

    def _mac(self, purpose: bytes, value: str) -> str:
        return _b64(hmac.new(self._key, purpose + value.encode(), hashlib.sha256).digest())

    def _label(self, nonce: str) -> str:
        return self._mac(b"label\0", nonce)[:6]


def _load_key(state_dir: Path | None) -> bytes:
    if state_dir is None:
        return secrets.token_bytes(32)
    from adapters.keyfiles import load_or_create_key

    return load_or_create_key(state_dir / KEY_FILE, None)
