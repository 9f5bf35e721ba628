"""Rebuilds the views from the whole log: pages read ahead on database threads, folded here."""

from __future__ import annotations

import asyncio
import bisect
import collections
import functools
import gc
import itertools
import operator
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import aiosqlite
import msgspec

from core.events import Event
from projections.base import VIEWS_CHECKPOINT, EventSource, Projection, write_checkpoint


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
            await write_checkpoint(conn, VIEWS_CHECKPOINT, upto)
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
