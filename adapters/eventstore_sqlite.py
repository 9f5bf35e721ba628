"""The SQLite event store: one events table, group commit, optimistic concurrency per stream."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeVar, cast

import aiosqlite
import msgspec
import structlog

from adapters.event_chain import GENESIS, add_chain, head, link
from core.errors import ConcurrencyError, Conflict, Unavailable
from core.events import IdempotencyRecord, RecordedEvent, StreamAppend

log = structlog.get_logger(__name__)

T = TypeVar("T")

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

BULK_READERS = 3
"""Database threads serving bulk reads: two pages in flight and a stream's ends alongside."""

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
SELECT_EVENTS = "SELECT position, stream, version, type, data, metadata, recorded_at FROM events"

_metadata_encoder = msgspec.json.Encoder()


class _Metadata(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str = ""
    idempotency_key: str = ""
    actor: str = ""  # outside the hash chain, like the rest of the metadata


_metadata_decoder = msgspec.json.Decoder(_Metadata)


_Row = tuple[int, str, int, str, bytes, bytes, str, bytes]
"""An events row as inserted: position, stream, version, type, data, metadata, at, hash."""


@dataclass(slots=True)
class _Pending:
    """One caller's append, waiting for the next group commit."""

    appends: Sequence[StreamAppend]
    idempotency: IdempotencyRecord | None
    request_id: str
    future: asyncio.Future[list[RecordedEvent]]
    actor: str = ""
    rows: list[_Row] = field(default_factory=list)
    recorded: list[RecordedEvent] = field(default_factory=list)


class SqliteEventStore:
    """Appends go through one writer task that commits whatever is waiting in one transaction."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        max_batch: int = 1024,
        tail_size: int = 65536,
        version_cache_size: int = 500_000,
        on_connect: Callable[[Path, Callable[[str], Awaitable[object]]], Awaitable[None]]
        | None = None,
    ) -> None:
        """`on_connect` is told of the writer's connection, with a way to run SQL on it on the
        writer's thread (tests set `PRAGMA max_page_count` there to make the disk full)."""
        self.path = path
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._tail_size = tail_size
        self._version_cache_size = version_cache_size
        self._on_connect = on_connect
        self._writer: sqlite3.Connection | None = None
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._point_reader: sqlite3.Connection | None = None
        self._bulk_readers: asyncio.Queue[aiosqlite.Connection] | None = None
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._committed = asyncio.Event()  # set, then replaced, at every commit
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_position = 0
        self._head_hash = GENESIS
        self._versions: dict[str, int] = {}
        self._tail: list[RecordedEvent] = []

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer is a plain connection on a thread of its own: a commit is one hop there
        # and back, however many statements it takes.
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="eventstore-writer")
        self._writer = writer = await self._on_writer(_connect_writer, self.path, self._synchronous)
        if self._on_connect is not None:
            await self._on_connect(self.path, lambda sql: self._on_writer(_run_sql, writer, sql))
        self._reader = await _connect(self.path, self._synchronous)
        # Point reads (one stream, one key) are indexed lookups of microseconds: they run on a
        # read-only connection in the event loop instead of paying hops to a database thread.
        self._point_reader = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        self._point_reader.execute("PRAGMA query_only = 1")
        self._point_reader.execute("PRAGMA busy_timeout = 5000")
        await self._read_head()
        self._writer_task = asyncio.create_task(self._write_loop(), name="eventstore-writer")

    async def close(self) -> None:
        """Commits what is waiting, then closes; later appends raise Unavailable."""
        self._closing = True
        if self._writer_task is not None:
            self._wakeup.set()
            await self._writer_task
            self._writer_task = None
        if self._writer is not None:
            await self._on_writer(self._writer.close)
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=False)
            self._writer_thread = None
        conns = [self._reader]
        while self._bulk_readers is not None and not self._bulk_readers.empty():
            conns.append(self._bulk_readers.get_nowait())
        self._bulk_readers = None
        for conn in conns:
            if conn is not None:
                await conn.close()
        if self._point_reader is not None:
            self._point_reader.close()
            self._point_reader = None
        self._reader = self._writer = None

    # Writing ---------------------------------------------------------------------------------

    async def append(
        self,
        appends: Sequence[StreamAppend],
        *,
        idempotency: IdempotencyRecord | None = None,
        request_id: str = "",
        actor: str = "",
    ) -> list[RecordedEvent]:
        if self._closing:
            raise Unavailable("the event store is closing")
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(appends, idempotency, request_id, future, actor))
        self._wakeup.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await self._commit(batch)
                except Exception as error:  # the store must outlive any one bad batch
                    log.exception("eventstore.commit_failed", error=type(error).__name__)
                    await self._rollback_quietly()
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(Unavailable("the event store failed"))
            if self._closing and not self._pending:
                return

    async def _commit(self, batch: list[_Pending]) -> None:
        assert self._writer is not None
        await self._load_versions(batch)
        now = datetime.now(UTC)
        accepted = self._stage(batch, now)
        if not accepted:
            return
        try:
            await self._write(accepted, now)
        except sqlite3.IntegrityError:
            await self._commit_one_by_one(accepted, now)
            return
        self._publish(accepted)

    async def _load_versions(self, batch: list[_Pending]) -> None:
        """Reads the current version of streams this store has not seen yet, in one query.

        A stream expected to be new needs no read: version 1 of a stream that exists is taken,
        so `UNIQUE (stream, version)` refuses the append, and the batch is retried one by one.
        """
        assert self._writer is not None
        unknown = {
            a.stream
            for p in batch
            for a in p.appends
            if a.expected_version != 0 and a.stream not in self._versions
        }
        if not unknown:
            return
        if len(self._versions) + len(unknown) > self._version_cache_size:
            self._versions.clear()
        self._versions.update(await self._on_writer(_versions_of, self._writer, list(unknown)))

    def _stage(self, batch: list[_Pending], now: datetime) -> list[_Pending]:
        """Checks versions and keys in memory, assigns positions; fails the losers at once."""
        recorded_at = now.isoformat()
        versions: dict[str, int] = {}
        keys: set[str] = set()
        position = self._last_position
        chain = self._head_hash
        accepted: list[_Pending] = []
        for pending in batch:
            error = self._check(pending, versions, keys)
            if error is not None:
                pending.future.set_exception(error)
                continue
            metadata = _metadata_encoder.encode(
                _Metadata(
                    request_id=pending.request_id,
                    idempotency_key=pending.idempotency.key if pending.idempotency else "",
                    actor=pending.actor,
                )
            )
            for stream_append in pending.appends:
                version = stream_append.expected_version
                for new in stream_append.events:
                    position += 1
                    version += 1
                    stream = stream_append.stream
                    chain = link(chain, position, stream, version, new.type, new.data, recorded_at)
                    pending.rows.append(
                        (
                            position,
                            stream,
                            version,
                            new.type,
                            new.data,
                            metadata,
                            recorded_at,
                            chain,
                        )
                    )
                    pending.recorded.append(
                        RecordedEvent(
                            position=position,
                            stream=stream_append.stream,
                            version=version,
                            type=new.type,
                            data=new.data,
                            recorded_at=now,
                            request_id=pending.request_id,
                            actor=pending.actor,
                        )
                    )
                versions[stream_append.stream] = version
            if pending.idempotency is not None:
                keys.add(pending.idempotency.key)
            accepted.append(pending)
        return accepted

    def _check(
        self, pending: _Pending, versions: dict[str, int], keys: set[str]
    ) -> Exception | None:
        for stream_append in pending.appends:
            current = versions.get(stream_append.stream)
            if current is None:
                current = self._versions.get(stream_append.stream, 0)
            if current != stream_append.expected_version:
                return ConcurrencyError(
                    f"{stream_append.stream} is at version {current},"
                    f" not {stream_append.expected_version}"
                )
        if pending.idempotency is not None and pending.idempotency.key in keys:
            return Conflict("idempotency key is in use by a concurrent request")
        return None

    async def _write(self, accepted: list[_Pending], now: datetime) -> None:
        assert self._writer is not None
        rows = [row for pending in accepted for row in pending.rows]
        keyed = [
            (
                p.idempotency.key,
                p.idempotency.operation,
                p.idempotency.body_hash,
                p.idempotency.reply,
                p.rows[-1][0] if p.rows else self._last_position,
                now.isoformat(),
            )
            for p in accepted
            if p.idempotency is not None
        ]
        await self._on_writer(_write_rows, self._writer, rows, keyed)

    async def _commit_one_by_one(self, accepted: list[_Pending], now: datetime) -> None:
        """Isolates the appends that broke a constraint after another writer changed the file."""
        assert self._writer is not None
        self._versions.clear()
        for pending in accepted:
            pending.rows.clear()
            pending.recorded.clear()
            await self._read_head()
            await self._load_versions([pending])
            staged = self._stage([pending], now)
            if not staged:
                continue
            try:
                await self._write(staged, now)
            except sqlite3.IntegrityError:
                self._versions.clear()
                if pending.idempotency and await self.idempotent_reply(pending.idempotency.key):
                    pending.future.set_exception(Conflict("idempotency key already used"))
                else:
                    pending.future.set_exception(ConcurrencyError("stream changed concurrently"))
                continue
            self._publish(staged)

    def _publish(self, accepted: list[_Pending]) -> None:
        """Makes committed events visible: versions, tail, waiting callers and followers."""
        if len(self._versions) > self._version_cache_size:
            self._versions.clear()
        for pending in accepted:
            for event in pending.recorded:
                self._versions[event.stream] = event.version
            if pending.recorded and self._tail:
                if pending.recorded[0].position != self._tail[-1].position + 1:
                    self._tail.clear()  # another writer filled the gap: read it from the file
            self._tail.extend(pending.recorded)
            if pending.rows:
                self._last_position = pending.rows[-1][0]
                self._head_hash = pending.rows[-1][7]
            if not pending.future.done():
                pending.future.set_result(pending.recorded)
        if len(self._tail) > 2 * self._tail_size:
            del self._tail[: len(self._tail) - self._tail_size]
        committed, self._committed = self._committed, asyncio.Event()
        committed.set()

    async def _rollback_quietly(self) -> None:
        assert self._writer is not None
        try:
            await self._on_writer(_rollback, self._writer)
        except sqlite3.Error:
            log.exception("eventstore.rollback_failed")
        self._versions.clear()
        await self._read_head()

    def known_version(self, stream: str) -> int | None:
        """The stream's version as this store last committed or read it, if it remembers."""
        return self._versions.get(stream)

    # Reading ---------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The last committed global position."""
        return self._last_position

    @property
    def head_hash(self) -> str:
        """The hash chain's head (hex): the hash of the event at `position`."""
        return self._head_hash.hex()

    async def last_position(self) -> int:
        return self._last_position

    async def wait_for_events_after(self, position: int) -> None:
        """Returns once an event with a position above `position` is committed."""
        while self._last_position <= position:
            await self._committed.wait()

    async def read_stream(self, stream: str) -> list[RecordedEvent]:
        assert self._point_reader is not None
        rows = self._point_reader.execute(
            SELECT_EVENTS + " WHERE stream = ? ORDER BY version", (stream,)
        ).fetchall()
        events = [_recorded(row) for row in rows]
        if events and stream not in self._versions:
            # never ahead of the truth: a stale value here is caught by UNIQUE(stream, version)
            self._versions[stream] = events[-1].version
        return events

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]:
        if stream is not None:
            return await self._select(
                " WHERE stream = ? AND position > ? ORDER BY position LIMIT ?",
                (stream, after, limit),
            )
        tail = self._tail
        if tail and tail[0].position <= after + 1 and after < self._last_position:
            start = after + 1 - tail[0].position
            return tail[start : start + limit]
        if after >= self._last_position:
            return []
        return await self._select(" WHERE position > ? ORDER BY position LIMIT ?", (after, limit))

    async def read_json_page(self, after: int, upto: int, prefix: str, types: Sequence[str]) -> str:
        """A stretch of the log for bulk replay, framed as one JSON document by SQLite itself.

        The events with `after` < position <= `upto` whose stream starts with `prefix` and whose
        type is one of `types`, as ``[[position, stream, {"type": type, ...data}], ...]``.
        Building the document is one step of the engine, on a database thread without the GIL,
        so a caller can decode one stretch while the next ones are read (concatenation beat
        one `printf` per event by a quarter, with SQLite's memory statistics off). Element
        order is the engine's (SQLite 3.40 does not promise group_concat's): the caller sorts
        by position.
        """
        if not types or not prefix:
            return "[]"
        marks = ",".join("?" * len(types))
        sql = (
            "SELECT coalesce('[' || group_concat("  # noqa: S608
            "'[' || position || ',' || json_quote(stream) || ',{\"type\":\"' || type || '\"'"
            " || CASE WHEN length(data) > 2 THEN ',' || substr(data, 2) ELSE '}' END, '],')"
            " || ']]', '[]') FROM events"
            " WHERE position > ? AND position <= ? AND +stream >= ? AND +stream < ?"
            f" AND type IN ({marks})"
        )
        rows = await self._bulk_read(sql, (after, upto, prefix, _past(prefix), *types))
        return str(rows[0][0]) if rows else "[]"

    async def stream_ends(self, prefix: str, upto: int) -> list[tuple[int, str]]:
        """The last position up to `upto` of every stream starting with `prefix`, in order.

        One scan of the stream index, which holds the position: the table is not read.
        """
        if not prefix:
            return []
        rows = await self._bulk_read(
            "SELECT MAX(position), stream FROM events"
            " WHERE stream >= ? AND stream < ? AND position <= ? GROUP BY stream ORDER BY 1",
            (prefix, _past(prefix), upto),
        )
        return cast("list[tuple[int, str]]", rows)

    async def _bulk_read(self, sql: str, params: tuple[object, ...]) -> list[sqlite3.Row]:
        """Every row of `sql`, on one of the connections bulk reads take turns on (each has a
        thread of its own, so several reads run at once)."""
        if self._bulk_readers is None:
            self._bulk_readers = asyncio.Queue()
            for _ in range(BULK_READERS):
                self._bulk_readers.put_nowait(await _connect(self.path, self._synchronous))
        readers = self._bulk_readers
        conn = await readers.get()
        try:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        finally:
            readers.put_nowait(conn)

    async def idempotent_reply(self, key: str) -> IdempotencyRecord | None:
        assert self._point_reader is not None
        row = self._point_reader.execute(
            "SELECT key, operation, body_hash, reply FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return IdempotencyRecord(key=row[0], operation=row[1], body_hash=row[2], reply=row[3])

    async def _select(self, where: str, params: tuple[object, ...]) -> list[RecordedEvent]:
        assert self._reader is not None
        async with self._reader.execute(SELECT_EVENTS + where, params) as cursor:
            rows = await cursor.fetchall()
        return [_recorded(row) for row in rows]

    async def _read_head(self) -> None:
        """Takes the last position and its hash from the file (after another writer, a failure)."""
        assert self._writer is not None
        self._last_position, self._head_hash = await self._on_writer(head, self._writer)

    async def _on_writer(self, fn: Callable[..., T], *args: object) -> T:
        """Runs `fn(*args)` on the writer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_thread, fn, *args)


# On the writer's thread -----------------------------------------------------------------------


def _run_sql(conn: sqlite3.Connection, sql: str) -> list[sqlite3.Row]:
    """Runs one statement to its end: one left open would hold a snapshot of the file."""
    return conn.execute(sql).fetchall()


def _connect_writer(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(SCHEMA)
    hashed = add_chain(conn)
    if hashed is not None:
        log.info("eventstore.chain_added", events=hashed)
    return conn


def _write_rows(
    conn: sqlite3.Connection,
    rows: list[_Row],
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
        _rollback(conn)
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


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _versions_of(conn: sqlite3.Connection, streams: list[str]) -> dict[str, int]:
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


def _past(prefix: str) -> str:
    """The least string above every string starting with `prefix`: `stream < _past(prefix)`."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _recorded(row: sqlite3.Row | tuple[object, ...]) -> RecordedEvent:
    position, stream, version, type_, data, metadata, recorded_at = row
    meta = _metadata_decoder.decode(metadata)  # type: ignore[arg-type]
    return RecordedEvent(
        position=position,  # type: ignore[arg-type]
        stream=stream,  # type: ignore[arg-type]
        version=version,  # type: ignore[arg-type]
        type=type_,  # type: ignore[arg-type]
        data=data,  # type: ignore[arg-type]
        recorded_at=datetime.fromisoformat(recorded_at),  # type: ignore[arg-type]
        request_id=meta.request_id,
        actor=meta.actor,
    )


async def _connect(path: Path, synchronous: Synchronous) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute(f"PRAGMA synchronous={synchronous}")
    await conn.execute("PRAGMA busy_timeout=5000")
    return conn
