"""The SQLite event store: one events table, group commit, optimistic concurrency per stream."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar, cast

import aiosqlite
import msgspec
import structlog

from adapters.event_chain import head
from adapters.eventstore_base import Appending, EventLogStore
from adapters.sqlite_batch import Pending, idempotency_rows, stage
from adapters.sqlite_events import (
    BulkReaders,
    Synchronous,
    connect,
    connect_writer,
    past,
    rollback,
    run_sql,
    versions_of,
    write_rows,
)
from core.errors import ConcurrencyError, Conflict, Unavailable
from core.events import IdempotencyRecord, RecordedEvent

log = structlog.get_logger(__name__)

T = TypeVar("T")


SELECT_EVENTS = "SELECT position, stream, version, type, data, metadata, recorded_at FROM events"

_metadata_encoder = msgspec.json.Encoder()


class _Metadata(msgspec.Struct, frozen=True, omit_defaults=True):
    request_id: str = ""
    idempotency_key: str = ""
    actor: str = ""  # outside the hash chain, like the rest of the metadata


_metadata_decoder = msgspec.json.Decoder(_Metadata)


class SqliteEventStore(EventLogStore[Pending]):
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
        super().__init__()
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
        self._bulk = BulkReaders(path, synchronous)
        self._versions: dict[str, int] = {}
        self._tail: list[RecordedEvent] = []

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The writer is a plain connection on a thread of its own: a commit is one hop there
        # and back, however many statements it takes.
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="eventstore-writer")
        self._writer = writer = await self._on_writer(connect_writer, self.path, self._synchronous)
        if self._on_connect is not None:
            await self._on_connect(self.path, lambda sql: self._on_writer(run_sql, writer, sql))
        self._reader = await connect(self.path, self._synchronous)
        # Point reads (one stream, one key) are indexed lookups of microseconds: they run on a
        # read-only connection in the event loop instead of paying hops to a database thread.
        self._point_reader = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        self._point_reader.execute("PRAGMA query_only = 1")
        self._point_reader.execute("PRAGMA busy_timeout = 5000")
        await self._read_head()
        self._start_writer("eventstore-writer")

    async def close(self) -> None:
        """Commits what is waiting, then closes; later appends raise Unavailable."""
        await self._stop_writer()
        if self._writer is not None:
            await self._on_writer(self._writer.close)
        if self._writer_thread is not None:
            self._writer_thread.shutdown(wait=False)
            self._writer_thread = None
        if self._reader is not None:
            await self._reader.close()
        await self._bulk.close()
        if self._point_reader is not None:
            self._point_reader.close()
            self._point_reader = None
        self._reader = self._writer = None

    # Writing ---------------------------------------------------------------------------------

    async def _append(self, call: Appending) -> list[RecordedEvent]:
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        metadata = _metadata_encoder.encode(
            _Metadata(
                request_id=call.request_id,
                idempotency_key=call.idempotency.key if call.idempotency else "",
                actor=call.actor,
            )
        )
        return await self._queued(
            Pending(call.appends, call.idempotency, call.request_id, future, call.actor, metadata)
        )

    def _take(self) -> list[Pending]:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        return batch

    def _failure(self) -> Exception:
        return Unavailable("the event store failed")

    async def _commit(self, batch: list[Pending]) -> None:
        assert self._writer is not None
        await self._load_versions(batch)
        now = datetime.now(UTC)
        accepted = stage(batch, self._versions, self._head, self._head_hash, now)
        if not accepted:
            return
        try:
            await self._write(accepted, now)
        except sqlite3.IntegrityError:
            await self._commit_one_by_one(accepted, now)
            return
        self._publish(accepted)

    async def _load_versions(self, batch: list[Pending]) -> None:
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
        self._versions.update(await self._on_writer(versions_of, self._writer, list(unknown)))

    async def _write(self, accepted: list[Pending], now: datetime) -> None:
        assert self._writer is not None
        rows = [row for pending in accepted for row in pending.rows]
        keyed = idempotency_rows(accepted, self._head, now)
        await self._on_writer(write_rows, self._writer, rows, keyed)

    async def _commit_one_by_one(self, accepted: list[Pending], now: datetime) -> None:
        """Isolates the appends that broke a constraint after another writer changed the file."""
        assert self._writer is not None
        self._versions.clear()
        for pending in accepted:
            pending.rows.clear()
            pending.recorded.clear()
            await self._read_head()
            await self._load_versions([pending])
            staged = stage([pending], self._versions, self._head, self._head_hash, now)
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

    def _publish(self, accepted: list[Pending]) -> None:
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
                self._head = pending.rows[-1][0]
                self._head_hash = pending.rows[-1][7]
            if not pending.future.done():
                pending.future.set_result(pending.recorded)
        if len(self._tail) > 2 * self._tail_size:
            del self._tail[: len(self._tail) - self._tail_size]
        self._moved()

    async def _recover(self) -> None:
        """Rolls the writer's transaction back and reads the head from the file again."""
        assert self._writer is not None
        try:
            await self._on_writer(rollback, self._writer)
        except sqlite3.Error:
            log.exception("eventstore.rollback_failed")
        self._versions.clear()
        await self._read_head()

    def known_version(self, stream: str) -> int | None:
        """The stream's version as this store last committed or read it, if it remembers."""
        return self._versions.get(stream)

    # Reading ---------------------------------------------------------------------------------

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
        if tail and tail[0].position <= after + 1 and after < self._head:
            start = after + 1 - tail[0].position
            return tail[start : start + limit]
        if after >= self._head:
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
        rows = await self._bulk.read(sql, (after, upto, prefix, past(prefix), *types))
        return str(rows[0][0]) if rows else "[]"

    async def stream_ends(self, prefix: str, upto: int) -> list[tuple[int, str]]:
        """The last position up to `upto` of every stream starting with `prefix`, in order.

        One scan of the stream index, which holds the position: the table is not read.
        """
        if not prefix:
            return []
        rows = await self._bulk.read(
            "SELECT MAX(position), stream FROM events"
            " WHERE stream >= ? AND stream < ? AND position <= ? GROUP BY stream ORDER BY 1",
            (prefix, past(prefix), upto),
        )
        return cast("list[tuple[int, str]]", rows)

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
        self._head, self._head_hash = await self._on_writer(head, self._writer)

    async def _on_writer(self, fn: Callable[..., T], *args: object) -> T:
        """Runs `fn(*args)` on the writer's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer_thread, fn, *args)


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
