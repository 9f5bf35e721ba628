"""The events database of the SQLite store: its schema, and the SQL run on the writer's thread."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import aiosqlite
import structlog

from adapters.event_chain import add_chain

log = structlog.get_logger(__name__)

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    position    INTEGER PRIMARY KEY,
    stream      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    type        TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    metadata    BLOB    NOT NULL,
    recorded_at TEXT    NOT NULL,
    hash        BLOB    NOT NULL,  -- adapters/event_chain.py
    UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT    PRIMARY KEY,
    operation   TEXT    NOT NULL,
    body_hash   TEXT    NOT NULL,
    reply       BLOB    NOT NULL,
    position    INTEGER NOT NULL,
    recorded_at TEXT    NOT NULL
);
"""

INSERT_EVENT = (
    "INSERT INTO events (position, stream, version, type, data, metadata, recorded_at, hash)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_IDEMPOTENCY = (
    "INSERT INTO idempotency (key, operation, body_hash, reply, position, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)

BULK_READERS = 3
"""Database threads serving bulk reads: two pages in flight and a stream's ends alongside."""

Row = tuple[int, str, int, str, bytes, bytes, str, bytes]
"""An events row as inserted: position, stream, version, type, data, metadata, at, hash."""


def run_sql(conn: sqlite3.Connection, sql: str) -> list[sqlite3.Row]:
    """Runs one statement to its end: one left open would hold a snapshot of the file."""
    return conn.execute(sql).fetchall()


def connect_writer(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    hashed = add_chain(conn)
    if hashed is not None:
        log.info("eventstore.chain_added", events=hashed)
    return conn


def write_rows(
    conn: sqlite3.Connection,
    rows: list[Row],
    keyed: list[tuple[str, str, str, bytes, int, str]],
) -> None:
    """One transaction: the events, then the idempotency records; nothing if anything fails.

    A commit with no idempotency records that fits one statement is that statement alone (in
    autocommit mode a statement is its own transaction, as durable): each of BEGIN and COMMIT
    would release the GIL and wait to retake it from the busy event loop.
    """
    if not keyed and len(rows) <= _ROWS_PER_STATEMENT:
        _insert_many(conn, INSERT_EVENT, rows)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        _insert_many(conn, INSERT_EVENT, rows)
        if keyed:
            _insert_many(conn, INSERT_IDEMPOTENCY, keyed)
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def _insert_many(conn: sqlite3.Connection, insert: str, rows: Sequence[tuple[object, ...]]) -> None:
    """Inserts rows with one statement per chunk rather than one per row.

    Each statement releases and retakes the GIL, and under load retaking it waits for the
    event loop's thread; one statement for a commit's forty rows is also about a third cheaper
    than `executemany` when nothing else runs.
    """
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        params = [value for row in chunk for value in row]
        conn.execute(_multi_row(insert, len(chunk), len(chunk[0])), params)


_ROWS_PER_STATEMENT = 1000


@functools.lru_cache(maxsize=256)
def _multi_row(insert: str, rows: int, columns: int) -> str:
    """`insert` (one row of placeholders) widened to `rows` rows."""
    head, _, _ = insert.partition(" VALUES ")
    row = "(" + ",".join("?" * columns) + ")"
    return f"{head} VALUES {','.join([row] * rows)}"


def rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def versions_of(conn: sqlite3.Connection, streams: list[str]) -> dict[str, int]:
    """The latest version of each stream; 0 for a stream with no events."""
    versions = dict.fromkeys(streams, 0)
    for start in range(0, len(streams), 500):
        chunk = streams[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = conn.execute(
            f"SELECT stream, MAX(version) FROM events WHERE stream IN ({marks})"  # noqa: S608
            " GROUP BY stream",
            chunk,
        )
        versions.update(rows.fetchall())
    return versions


def past(prefix: str) -> str:
    """The least string above every string starting with `prefix`: `stream < past(prefix)`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


async def connect(path: Path, synchronous: Synchronous) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute(f"PRAGMA synchronous={synchronous}")
    await conn.execute("PRAGMA busy_timeout=5000")
    return conn


class BulkReaders:
    """The connections bulk reads take turns on, opened at the first; each has a thread of its
    own, so several reads run at once."""

    def __init__(self, path: Path, synchronous: Synchronous) -> None:
        self._path = path
        self._synchronous = synchronous
        self._idle: asyncio.Queue[aiosqlite.Connection] | None = None

    async def read(self, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        """Every row of `sql`, on the next free connection."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(BULK_READERS):
                self._idle.put_nowait(await connect(self._path, self._synchronous))
        idle = self._idle
        conn = await idle.get()
        try:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        finally:
            idle.put_nowait(conn)

    async def close(self) -> None:
        """Closes the connections; a read after this opens new ones."""
        idle, self._idle = self._idle, None
        while idle is not None and not idle.empty():
            await idle.get_nowait().close()
