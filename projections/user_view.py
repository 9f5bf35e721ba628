"""The user view: one row per user, for reading one user or all, and the process manager's start."""

from __future__ import annotations

from collections.abc import Sequence

import aiosqlite
import msgspec

from core.domain import USERS
from core.events import Event, RecordedEvent, stream_parts
from core.user_state import User, evolve
from projections.replay import Change
from projections.runner import fold_cached, timestamp_text

TABLE = """
CREATE TABLE IF NOT EXISTS users (
    username   TEXT    PRIMARY KEY,
    status     TEXT    NOT NULL,
    step       TEXT    NOT NULL,
    vm_sid     TEXT    NOT NULL,
    node_id    INTEGER,
    error      TEXT    NOT NULL,
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL,
    state      BLOB    NOT NULL
)
"""
INDEX = "CREATE INDEX IF NOT EXISTS users_by_status ON users (status)"

COLUMNS = "username, status, step, vm_sid, node_id, error, created_at, updated_at, state"
UPSERT = f"INSERT OR REPLACE INTO users ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)"  # noqa: S608
SELECT_STATE = "SELECT state FROM users"

Row = tuple[str, str, str, str, int | None, str, str, str, bytes]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(User)


class UserProjection:
    """Folds user events into rows with the core's own `evolve`; the full state rides along.

    The state column holds the whole `User` (no secret is ever part of it), so an update folds
    onto exactly what the aggregate would have. Rows written are cached in memory (bounded); the
    runner calls `rolled_back` when a batch fails, and the cache is dropped.
    """

    name = "users"
    version = 1
    stream_prefix = "user:"
    event_types = USERS.types

    def __init__(self, cache_size: int = 100_000) -> None:
        self._cache: dict[str, User] = {}
        self._cache_size = cache_size

    def rolled_back(self) -> None:
        self._cache.clear()

    async def create(self, conn: aiosqlite.Connection) -> None:
        # statement by statement: `executescript` would commit a rebuild's transaction
        await conn.execute(TABLE)
        await conn.execute(INDEX)

    async def drop(self, conn: aiosqlite.Connection) -> None:
        self._cache.clear()
        await conn.execute("DROP TABLE IF EXISTS users")

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        changes = [
            (name, e.version, USERS.registry.decode(e.type, e.data))
            for e in events
            if (name := USERS.id_of(e.stream)) is not None and e.type in USERS.registry
        ]
        await self._fold(conn, changes)

    async def replay(self, conn: aiosqlite.Connection, changes: Sequence[Change]) -> None:
        """Folds a page of a rebuild; users are few, so rows are written at once."""
        await self._fold(
            conn, [(stream_parts(stream)[1], 0, event) for _, stream, event in changes]
        )

    async def complete(self, conn: aiosqlite.Connection, streams: Sequence[str]) -> None:
        """Nothing is deferred."""

    async def flush(self, conn: aiosqlite.Connection) -> None:
        """Nothing is deferred."""

    async def _fold(
        self, conn: aiosqlite.Connection, changes: Sequence[tuple[str, int, Event]]
    ) -> None:
        """Folds `(username, version or 0 if unknown, event)` onto the rows and writes them."""

        async def load(names: set[str]) -> dict[str, User | None]:
            return await _load(conn, names)

        states = await fold_cached(changes, self._cache, self._cache_size, evolve, load)
        rows = [_row(user) for user in states.values() if user is not None]
        if rows:
            await conn.executemany(UPSERT, rows)


class UserView:
    """Queries the user view; never touches the event log."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def get(self, username: str) -> User | None:
        async with self._conn.execute(f"{SELECT_STATE} WHERE username = ?", (username,)) as cur:
            row = await cur.fetchone()
        return _decoder.decode(row[0]) if row else None

    async def all(self) -> list[User]:
        """Every user, oldest first."""
        async with self._conn.execute(f"{SELECT_STATE} ORDER BY created_at, username") as cur:
            rows = await cur.fetchall()
        return [_decoder.decode(row[0]) for row in rows]

    async def pending(self) -> list[str]:
        """The users the process manager still has work for: provisioning or decommissioning."""
        async with self._conn.execute(
            "SELECT username FROM users WHERE status IN ('provisioning', 'decommissioning')"
            " ORDER BY updated_at, username"
        ) as cur:
            rows = await cur.fetchall()
        return [str(row[0]) for row in rows]


async def _load(conn: aiosqlite.Connection, names: set[str]) -> dict[str, User | None]:
    states: dict[str, User | None] = {}
    chunked = list(names)
    for start in range(0, len(chunked), 500):
        chunk = chunked[start : start + 500]
        marks = ",".join("?" * len(chunk))
        async with conn.execute(f"{SELECT_STATE} WHERE username IN ({marks})", chunk) as cursor:
            for row in await cursor.fetchall():
                user = _decoder.decode(row[0])
                states[user.username] = user
    return states


def _row(user: User) -> Row:
    return (
        user.username,
        user.status,
        user.step,
        user.vm_sid,
        user.node_id,
        user.error,
        timestamp_text(user.created_at),
        timestamp_text(user.updated_at),
        _encoder.encode(user),
    )
