"""The event log's hash chain: each event's hash covers the previous hash and the event's bytes.

    canonical(e) = u64(position) u64(version) u32(len stream) u32(len type) u32(len data)
                   u32(len recorded_at) stream type data recorded_at
    hash(e)      = SHA-256(hash(previous event) || canonical(e)),  hash before position 1 = 32 zeros

Integers are big-endian; `stream`, `type` and `recorded_at` are the UTF-8 of the stored text,
`data` the stored bytes. Positions start at 1 and have no gaps, so a deleted, edited, reordered
or re-hashed row breaks the chain at the first position it touches.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

GENESIS = bytes(32)
"""The hash before the first event."""

_HEADER = struct.Struct(">QQIIII")

Row = tuple[int, str, int, str, bytes, bytes, str]
"""position, stream, version, type, data, metadata, recorded_at: an events row as inserted."""


def link(
    previous: bytes, position: int, stream: str, version: int, type_: str, data: bytes, at: str
) -> bytes:
    """The hash of one event that follows an event hashed `previous`."""
    s, t, r = stream.encode(), type_.encode(), at.encode()
    header = _HEADER.pack(position, version, len(s), len(t), len(data), len(r))
    return hashlib.sha256(b"".join((previous, header, s, t, data, r))).digest()


def chained(rows: Iterable[Row], previous: bytes = GENESIS) -> list[tuple[object, ...]]:
    """Each row followed by its hash, chained from `previous` in the given (position) order."""
    out: list[tuple[object, ...]] = []
    for row in rows:
        previous = link(previous, row[0], row[1], row[2], row[3], row[4], row[6])
        out.append((*row, previous))
    return out


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify` found: the events read, the head, and the first break if any."""

    events: int
    head: bytes
    broken_at: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None


def verify(conn: sqlite3.Connection) -> ChainReport:
    """Walks the whole log in position order (one read transaction) and checks every link."""
    previous = GENESIS
    expected = 1
    cursor = conn.execute(
        "SELECT position, stream, version, type, data, recorded_at, hash FROM events"
        " ORDER BY position"
    )
    for position, stream, version, type_, data, at, stored in _rows(cursor):
        if position != expected:
            return ChainReport(expected - 1, previous, expected, _gap(expected, position))
        try:
            computed = link(previous, position, stream, version, type_, _bytes(data), at)
        except (AttributeError, TypeError, UnicodeError, struct.error):
            return ChainReport(expected - 1, previous, position, "a field has the wrong type")
        if stored != computed:
            why = "its hash is missing" if not stored else "its hash does not match its contents"
            return ChainReport(expected - 1, previous, position, why)
        previous = computed
        expected += 1
    return ChainReport(expected - 1, previous)


def _rows(cursor: sqlite3.Cursor) -> Iterator[tuple[int, str, int, str, object, str, bytes]]:
    while batch := cursor.fetchmany(4096):
        yield from batch


def _gap(expected: int, found: int) -> str:
    if found > expected:
        return f"position {expected} is missing (the next row has position {found})"
    return f"a row has position {found} where position {expected} belongs"


def _bytes(value: object) -> bytes:
    """The stored value as bytes: a BLOB as it is, TEXT (an edit by hand) as its UTF-8."""
    if isinstance(value, bytes):
        return value
    return str(value).encode()


def head(conn: sqlite3.Connection) -> tuple[int, bytes]:
    """The last position and its stored hash; (0, GENESIS) for an empty log."""
    row = conn.execute(
        "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return 0, GENESIS
    return int(row[0]), bytes(row[1] or b"")


def add_chain(conn: sqlite3.Connection) -> int | None:
    """Adds the `hash` column to a log written before the chain and fills it, in one transaction.

    Returns how many events were hashed, or None when the column was already there.
    """
    if _has_chain(conn):
        return None
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _has_chain(conn):  # another process added it first
            conn.execute("COMMIT")
            return None
        conn.execute("ALTER TABLE events ADD COLUMN hash BLOB NOT NULL DEFAULT x''")
        count = _fill_chain(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return count


def _has_chain(conn: sqlite3.Connection) -> bool:
    return any(row[1] == "hash" for row in conn.execute("PRAGMA table_info(events)"))


def _fill_chain(conn: sqlite3.Connection, page: int = 10_000) -> int:
    """Hashes every event in position order, a page at a time (the log may not fit in memory)."""
    previous, after, count = GENESIS, -(2**63), 0
    while rows := conn.execute(
        "SELECT position, stream, version, type, data, recorded_at FROM events"
        " WHERE position > ? ORDER BY position LIMIT ?",
        (after, page),
    ).fetchall():
        updates = []
        for position, stream, version, type_, data, at in rows:
            previous = link(previous, position, stream, version, type_, _bytes(data), at)
            updates.append((previous, position))
        conn.executemany("UPDATE events SET hash = ? WHERE position = ?", updates)
        after, count = rows[-1][0], count + len(rows)
    return count
