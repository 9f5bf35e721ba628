"""Runs projections over the event log, committing each batch with its checkpoint."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Self, TypeVar

import aiosqlite
import msgspec
import structlog

from core.errors import Unavailable
from core.events import Event, RecordedEvent
from core.retry import RetryPolicy
from projections.base import CHECKPOINTS as CHECKPOINTS
from projections.base import FOLLOW_BATCH, VIEWS_CHECKPOINT
from projections.base import ConnectionHook as ConnectionHook
from projections.base import EventSource as EventSource
from projections.base import Projection as Projection
from projections.base import SqlRunner as SqlRunner
from projections.base import connect_views as connect_views
from projections.base import connect_views_reader as connect_views_reader
from projections.base import read_checkpoint as read_checkpoint
from projections.base import write_checkpoint as write_checkpoint
from projections.replay import REBUILD_CACHE_KIB as REBUILD_CACHE_KIB
from projections.replay import Change as Change
from projections.replay import PagedSource as PagedSource
from projections.replay import Replayable as Replayable
from projections.replay import outdated as outdated
from projections.replay import page_decoder as page_decoder
from projections.replay import rebuild as rebuild

log = structlog.get_logger(__name__)


class ProjectionRunner:
    """Follows the log, applying each batch to every projection in one transaction.

    A batch that fails (a full disk, a store that cannot be read) is rolled back and tried
    again after a growing pause; meanwhile queries that need it are told Unavailable at once.
    A query also gives up when the views make no progress for `patience` seconds (a batch
    stuck behind another process's lock on views.db), so it is answered within a second.
    """

    name = VIEWS_CHECKPOINT

    def __init__(
        self,
        source: EventSource,
        conn: aiosqlite.Connection,
        projections: Sequence[Projection],
        *,
        batch_size: int = FOLLOW_BATCH,
        retry_delay: float = 0.1,
        max_retry_delay: float = 2.0,
        patience: float = 0.9,
    ) -> None:
        self._source = source
        self._conn = conn
        self._projections = projections
        self._batch_size = batch_size
        self._retry = RetryPolicy(base_delay=retry_delay, max_delay=max_retry_delay, jitter=False)
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
                failures += 1  # back off, then retry from the committed checkpoint
                await asyncio.sleep(self._retry.delay(failures))

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
