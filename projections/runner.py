"""Runs projections over the event log, committing each batch with its checkpoint."""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import gc
import heapq
import itertools
import operator
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, Self, TypeVar

import aiosqlite
import msgspec
import structlog

from core.errors import Unavailable
from core.events import Event, RecordedEvent

log = structlog.get_logger(__name__)

CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS checkpoints (
    name     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS layouts (
    name    TEXT    PRIMARY KEY,
    version INTEGER NOT NULL
);
"""
# `layouts` records the version of each view's tables a rebuild wrote them with.


class EventSource(Protocol):
    """The part of the event store a follower needs."""

    @property
    def position(self) -> int: ...

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]: ...

    async def wait_for_events_after(self, position: int) -> None: ...


class Projection(Protocol):
    """A view built from events; `apply` runs inside the runner's transaction."""

    name: str

    async def create(self, conn: aiosqlite.Connection) -> None: ...

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None: ...

    def rolled_back(self) -> None:
        """Forgets in-memory state from a batch that was not committed."""
        ...


SqlRunner = Callable[[str], Awaitable[object]]
"""Runs one SQL statement to its end on a connection, on that connection's own thread."""

ConnectionHook = Callable[[Path, SqlRunner], Awaitable[None]]
"""Told of each writing connection a database file gets, with a way to run SQL on it later.

Per-connection settings such as `PRAGMA max_page_count` (how tests make a disk full) go here.
"""


async def connect_views(
    path: Path, *, synchronous: str = "NORMAL", on_connect: ConnectionHook | None = None
) -> aiosqlite.Connection:
    """Opens the views database; it is rebuildable from the log, so NORMAL sync is enough."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute(f"PRAGMA synchronous={synchronous}")
    await conn.execute("PRAGMA busy_timeout=5000")
    await conn.executescript(CHECKPOINTS)
    if on_connect is not None:

        async def run(sql: str) -> object:
            async with conn.execute(sql) as cursor:  # a statement left open holds a snapshot
                return await cursor.fetchall()

        await on_connect(path, run)
    return conn


def connect_views_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection for point queries of the views (WAL: sees committed batches)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA query_only = 1")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


async def read_checkpoint(conn: aiosqlite.Connection, name: str) -> int:
    async with conn.execute("SELECT position FROM checkpoints WHERE name = ?", (name,)) as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def write_checkpoint(conn: aiosqlite.Connection, name: str, position: int) -> None:
    await conn.execute(
        "INSERT INTO checkpoints (name, position) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (name, position),
    )


class ProjectionRunner:
    """Follows the log, applying each batch to every projection in one transaction.

    A batch that fails (a full disk, a store that cannot be read) is rolled back and tried
    again after a growing pause; meanwhile queries that need it are told Unavailable at once.
    A query also gives up when the views make no progress for `patience` seconds (a batch
    stuck behind another process's lock on views.db), so it is answered within a second.
    """

    name = "views"

    def __init__(
        self,
        source: EventSource,
        conn: aiosqlite.Connection,
        projections: Sequence[Projection],
        *,
        batch_size: int = 256,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        patience: float = 0.9,
    ) -> None:
        self._source = source
        self._conn = conn
        self._projections = projections
        self._batch_size = batch_size
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._patience = patience
        self._applied = 0  # batches committed, to tell a slow runner from a stuck one
        self._position = 0
        self._waiters: list[tuple[int, int, bool, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing = False

    @property
    def position(self) -> int:
        return self._position

    @property
    def failing(self) -> bool:
        """Whether the last try to advance the views failed (until one succeeds)."""
        return self._failing

    async def __aenter__(self) -> Self:
        for projection in self._projections:
            await projection.create(self._conn)
        self._position = await read_checkpoint(self._conn, self.name)
        self._task = asyncio.create_task(self._run(), name="projection-runner")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Applies what is committed so far, if it can, then stops following."""
        if self._task is None:
            return
        try:
            await self.catch_up()
        except Exception as error:  # the log keeps what was not applied; a restart applies it
            log.warning("projection.stopped_behind", position=self._position, error=str(error))
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def wait_for(self, position: int) -> None:
        """Returns once the views reflect every event up to `position` (what a query needs).

        Raises Unavailable as soon as the views cannot advance, so a query never waits for
        a disk to be freed.
        """
        if position <= self._position:
            return
        if self._failing:
            raise Unavailable(VIEWS_UNAVAILABLE)
        future = self._waiter(position, fails=True)
        try:
            while True:
                applied = self._applied
                await asyncio.wait({future}, timeout=self._patience)
                if future.done():
                    return future.result()  # or the Unavailable of a failed batch
                if self._applied == applied:
                    raise Unavailable(VIEWS_UNAVAILABLE)
        finally:
            future.cancel()

    async def reached(self, position: int) -> None:
        """Returns once the views reflect every event up to `position`, however long it takes."""
        if position > self._position:
            await self._waiter(position, fails=False)

    def _waiter(self, position: int, *, fails: bool) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (position, next(self._seq), fails, future))
        return future

    async def catch_up(self) -> None:
        """Applies every event committed so far."""
        async with self._lock:
            try:
                while True:
                    events = await self._source.read_all(
                        after=self._position, limit=self._batch_size
                    )
                    if not events:
                        break
                    await self._apply(events)
            except Exception:
                self._fail_queries()
                raise
            self._failing = False

    def _fail_queries(self) -> None:
        """Marks the views as not advancing and answers every waiting query Unavailable."""
        self._failing = True
        keep = []
        for waiter in self._waiters:
            _, _, fails, future = waiter
            if not fails:
                keep.append(waiter)
            elif not future.done():
                future.set_exception(Unavailable(VIEWS_UNAVAILABLE))
        heapq.heapify(keep)
        self._waiters = keep

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self.catch_up()
                failures = 0
                await self._source.wait_for_events_after(self._position)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not failures:
                    log.exception("projection.batch_failed", position=self._position)
                else:
                    log.warning(
                        "projection.batch_failed_again",
                        position=self._position,
                        failures=failures + 1,
                        error=str(error),
                    )
                delay = min(self._max_retry_delay, self._retry_delay * 2**failures)
                failures += 1
                await asyncio.sleep(delay)  # back off, then retry from the committed checkpoint

    async def _apply(self, events: Sequence[RecordedEvent]) -> None:
        conn = self._conn
        last = events[-1].position
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for projection in self._projections:
                await projection.apply(conn, events)
            await write_checkpoint(conn, self.name, last)
            await conn.commit()
        except BaseException:
            await conn.rollback()
            for projection in self._projections:
                projection.rolled_back()
            raise
        self._position = last
        self._applied += 1
        self._failing = False
        waiters = self._waiters
        while waiters and waiters[0][0] <= last:
            _, _, _, future = heapq.heappop(waiters)
            if not future.done():
                future.set_result(None)


VIEWS_UNAVAILABLE = "the views cannot take new events right now (is the disk full?); try again"


S = TypeVar("S")


def timestamp_text(value: datetime) -> str:
    """`value.isoformat()`, a quarter of its cost for the UTC times events carry.

    msgspec writes a UTC time as RFC 3339 with a `Z` (microseconds only when there are any,
    as `isoformat` does); the view keeps the `+00:00` form its rows have always had.
    """
    if value.tzinfo is UTC:
        text: str = msgspec.to_builtins(value)
        return text[:-1] + "+00:00"
    return value.isoformat()


async def fold_cached(
    changes: Sequence[tuple[str, int, Event]],
    cache: dict[str, S],
    cache_size: int,
    evolve: Callable[[S | None, Event], S | None],
    load: Callable[[set[str]], Awaitable[dict[str, S | None]]],
) -> dict[str, S | None]:
    """The new state of every row `(key, version or 0 if unknown, event)` touches.

    A row is taken from `cache`, else `load`ed (all misses in one call), unless its change is
    version 1, which starts it. `cache` holds the new states afterwards, cleared first when
    they would not fit in `cache_size`.
    """
    states: dict[str, S | None] = {}
    if not changes:
        return states
    missing: set[str] = set()
    for key, version, _ in changes:
        if version != 1 and key not in states:
            cached = cache.get(key)
            if cached is None:
                missing.add(key)
            else:
                states[key] = cached
    if missing:
        states.update(await load(missing))
    get = states.get
    for key, _, event in changes:
        states[key] = evolve(get(key), event)
    if len(cache) + len(states) > cache_size:
        cache.clear()
    for key, state in states.items():
        if state is not None:
            cache[key] = state
    return states


class PagedSource(EventSource, Protocol):
    """The part of the event store a rebuild needs: the log in pages framed as JSON."""

    async def read_json_page(
        self, after: int, upto: int, prefix: str, types: Sequence[str]
    ) -> str: ...

    async def stream_ends(self, prefix: str, upto: int) -> list[tuple[int, str]]:
        """The last position up to `upto` of every stream starting with `prefix`, in order."""
        ...


Change = tuple[int, str, Event]
"""An event to fold during a rebuild: its position, its stream and the decoded event."""


class Replayable(Projection, Protocol):
    """A projection that a rebuild replays from the log, one kind of stream at a time.

    A row is folded from the events of one stream alone, so once a stream's last event has
    been replayed, its row is final.
    """

    version: int
    """The layout of the projection's tables; a view written with another is rebuilt."""

    stream_prefix: str
    """Only streams whose id starts with this feed the projection."""

    event_types: tuple[type[Event], ...]
    """The events the projection folds; others of its streams leave it unchanged."""

    async def drop(self, conn: aiosqlite.Connection) -> None:
        """Drops the projection's tables (a rebuild creates them again) and forgets its rows."""
        ...

    async def replay(self, conn: aiosqlite.Connection, changes: Sequence[Change]) -> None:
        """Takes the next page of the log, in position order; may defer writes."""
        ...

    async def complete(self, conn: aiosqlite.Connection, streams: Sequence[str]) -> None:
        """These streams have nothing left to replay: their rows may be written now."""
        ...

    async def flush(self, conn: aiosqlite.Connection) -> None:
        """Writes whatever `replay` deferred."""
        ...


@functools.cache
def page_decoder(types: tuple[type[Event], ...]) -> Callable[[str], list[Change]]:
    """Decodes a `read_json_page` page of `types` in one msgspec call (one decoder per types).

    The events are a tagged union (tag `type`, the class name) and the page gives each event's
    `type` column as its tag, so the page is one typed document of that union.
    """
    union = functools.reduce(operator.or_, types)
    decode = msgspec.json.Decoder(list[tuple[int, str, union]]).decode  # type: ignore[valid-type]

    def decode_page(page: str) -> list[Change]:
        changes: list[Change] = decode(page)
        changes.sort(key=_position)  # SQLite 3.40 does not promise group_concat's order
        return changes

    return decode_page


_position = operator.itemgetter(0)


async def outdated(conn: aiosqlite.Connection, projections: Sequence[Replayable]) -> list[str]:
    """The projections whose tables were not written by a rebuild with their current layout.

    `conn` is one `connect_views` opened, which made the `layouts` table.
    """
    async with conn.execute("SELECT name, version FROM layouts") as cur:
        recorded = {str(name): int(version) for name, version in await cur.fetchall()}
    return [p.name for p in projections if recorded.get(p.name) != p.version]


async def rebuild(
    source: PagedSource,
    conn: aiosqlite.Connection,
    projections: Sequence[Replayable],
    *,
    page_size: int = 20000,
    reads_ahead: int = 2,
) -> int:
    """Drops every view and replays the whole log into it; returns the position it reflects.

    It is one transaction: readers see the old view until the new one is complete, and a
    rebuild that fails leaves the old view and its checkpoint as they were. Each projection
    reads only its own streams, in stretches of `page_size` positions; the next
    `reads_ahead` stretches are read on database threads, outside the GIL, while this one is
    decoded and folded. Where each stream ends is read alongside, so a stream's row is
    written as soon as the stretch holding its last event has been folded.
    """
    upto = source.position
    async with _rebuilding(conn):
        try:
            for projection in projections:
                await projection.drop(conn)
                await projection.create(conn)
            # where each projection's streams end, read while the ones before it replay
            ends = [
                asyncio.ensure_future(source.stream_ends(p.stream_prefix, upto))
                for p in projections
            ]
            try:
                for projection, its_ends in zip(projections, ends, strict=True):
                    await _replay(source, conn, projection, its_ends, upto, page_size, reads_ahead)
            finally:
                for pending in ends:
                    pending.cancel()
                await asyncio.gather(*ends, return_exceptions=True)
            await conn.executemany(
                "INSERT OR REPLACE INTO layouts (name, version) VALUES (?, ?)",
                [(p.name, p.version) for p in projections],
            )
            await write_checkpoint(conn, ProjectionRunner.name, upto)
            await conn.commit()
        except BaseException:
            await conn.rollback()
            for projection in projections:
                projection.rolled_back()
            raise
    return upto


async def _replay(
    source: PagedSource,
    conn: aiosqlite.Connection,
    projection: Replayable,
    ends: asyncio.Future[list[tuple[int, str]]],
    upto: int,
    page_size: int,
    reads_ahead: int,
) -> None:
    """Replays the projection's pages, completing streams as their last events go by.

    Until `ends` is known, rows wait; once it is, a projection without streams reads no page.
    """
    if ends.done() and not ends.result():
        return
    decode = page_decoder(projection.event_types)
    done = 0  # how many of the ends have been completed
    async with _pages(source, projection, upto, page_size, reads_ahead) as pages:
        async for stop, page in pages:
            await projection.replay(conn, decode(page))
            if ends.done():
                last = ends.result()
                end = bisect.bisect_right(last, stop, lo=done, key=_position)
                await projection.complete(conn, [stream for _, stream in last[done:end]])
                done = end
    await projection.flush(conn)


@asynccontextmanager
async def _pages(
    source: PagedSource, projection: Replayable, upto: int, page_size: int, reads_ahead: int
) -> AsyncIterator[AsyncIterator[tuple[int, str]]]:
    """The projection's pages of the log up to `upto` with the position each one ends at,
    `reads_ahead` of them in flight."""
    types = [t.__name__ for t in projection.event_types]
    starts = iter(range(0, upto, page_size))
    reading: collections.deque[tuple[int, asyncio.Future[str]]] = collections.deque()

    def read_ahead() -> None:
        for start in itertools.islice(starts, reads_ahead - len(reading)):
            stop = min(start + page_size, upto)
            read = source.read_json_page(start, stop, projection.stream_prefix, types)
            reading.append((stop, asyncio.ensure_future(read)))

    async def pages() -> AsyncIterator[tuple[int, str]]:
        read_ahead()
        while reading:
            await asyncio.sleep(0)  # lets the reads reach their threads before we fold
            stop, read = reading.popleft()
            page = await read
            read_ahead()
            yield stop, page

    try:
        yield pages()
    finally:
        for _, read in reading:
            read.cancel()


@asynccontextmanager
async def _rebuilding(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    """A write transaction with the page cache a whole view fits in and no cyclic GC.

    The rebuild allocates millions of short-lived objects while it keeps every folded state
    alive; the collector would rescan those states again and again and find nothing to free.
    A cache smaller than the view would spill half-written pages to the WAL and read them back.
    """
    async with conn.execute("PRAGMA cache_size") as cur:
        row = await cur.fetchone()
    cache_size = int(row[0]) if row else -2000
    await conn.execute(f"PRAGMA cache_size = {-REBUILD_CACHE_KIB}")
    collecting = gc.isenabled()
    gc.disable()
    try:
        await conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        if collecting:
            gc.enable()
        await conn.execute(f"PRAGMA cache_size = {cache_size}")


REBUILD_CACHE_KIB = 512 * 1024
"""The page cache of a rebuild: an upper bound, taken only as the view grows."""


class ProjectedEvents:
    """The log as far as the views reflect it: whoever sees an event here can query its effect."""

    def __init__(self, source: EventSource, runner: ProjectionRunner) -> None:
        self._source = source
        self._runner = runner

    @property
    def position(self) -> int:
        return self._runner.position

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]:
        ceiling = self._runner.position
        if after >= ceiling:
            return []
        events = await self._source.read_all(after, min(limit, ceiling - after), stream)
        return [e for e in events if e.position <= ceiling]

    async def wait_for_events_after(self, position: int) -> None:
        await self._runner.reached(position + 1)
