"""Followers of the log that keep their own checkpoint: the publisher and the reactors."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol, Self

import aiosqlite
import structlog

from core.events import RecordedEvent
from projections.base import FOLLOW_BATCH, EventSource, read_checkpoint, write_checkpoint

log = structlog.get_logger(__name__)


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels `tasks` until each is really done.

    Python 3.11's wait_for (nats-py's flush uses it) can swallow a cancellation; a task that
    lost one is cancelled again instead of being waited for forever.
    """
    for task in tasks:
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)


class Checkpoints:
    """Named positions in the views database, saved with their own small transactions."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def load(self, name: str) -> int:
        return await read_checkpoint(self._conn, name)

    async def save(self, name: str, position: int) -> None:
        await write_checkpoint(self._conn, name, position)
        await self._conn.commit()


class Handler(Protocol):
    name: str

    async def handle(self, events: Sequence[RecordedEvent]) -> None:
        """Takes one batch, in position order; called again only after it returns."""
        ...

    def safe_position(self, read_position: int) -> int:
        """The position below which every event's work is done (what a restart may skip)."""
        ...


@dataclass(eq=False)
class Follower:
    """Feeds a handler every committed event from its checkpoint on; saves the checkpoint."""

    source: EventSource
    checkpoints: Checkpoints
    handler: Handler
    _: KW_ONLY
    batch_size: int = FOLLOW_BATCH
    save_every: float = 0.5
    position: int = field(init=False, default=0)
    _saved: int = field(init=False, default=0)
    _save_failures: int = field(init=False, default=0)
    _tasks: list[asyncio.Task[None]] = field(init=False, default_factory=list)

    async def __aenter__(self) -> Self:
        self.position = self._saved = await self.checkpoints.load(self.handler.name)
        self._tasks = [
            asyncio.create_task(self._run(), name=f"{self.handler.name}-follow"),
            asyncio.create_task(self._save_periodically(), name=f"{self.handler.name}-save"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_tasks(self._tasks)
        await self.save()

    async def save(self) -> None:
        position = self.handler.safe_position(self.position)
        if position != self._saved:
            await self.checkpoints.save(self.handler.name, position)
            self._saved = position

    async def catch_up(self) -> None:
        while events := await self.source.read_all(after=self.position, limit=self.batch_size):
            await self.handler.handle(events)
            self.position = events[-1].position

    async def _run(self) -> None:
        while True:
            try:
                await self.catch_up()
                await self.source.wait_for_events_after(self.position)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("follower.failed", follower=self.handler.name)
                await asyncio.sleep(1.0)

    async def _save_periodically(self) -> None:
        """Saves the checkpoint every `save_every` seconds; a failing streak is logged once."""
        while True:
            await asyncio.sleep(self.save_every)
            try:
                await self.save()
            except Exception:
                self._save_failures += 1
                if self._save_failures == 1:  # e.g. a full disk: the next save tries again
                    log.exception("follower.checkpoint_failed", follower=self.handler.name)
                continue
            if self._save_failures:
                log.info(
                    "follower.checkpoint_saved",
                    follower=self.handler.name,
                    failures=self._save_failures,
                )
                self._save_failures = 0
