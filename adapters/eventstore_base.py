"""What the SQLite and the JetStream event store share: the writer's loop and the log's head."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import structlog

from adapters.event_chain import GENESIS
from core.errors import Unavailable
from core.events import IdempotencyRecord, RecordedEvent, StreamAppend

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Appending:
    """One call of `append`: the appends, and what the log keeps with them."""

    appends: Sequence[StreamAppend]
    idempotency: IdempotencyRecord | None
    request_id: str
    actor: str


class Waiting(Protocol):
    """One caller's append in a store's queue: the future its caller awaits."""

    future: asyncio.Future[list[RecordedEvent]]


P = TypeVar("P", bound=Waiting)


class EventLogStore(ABC, Generic[P]):
    """An event store whose one writer task commits whatever appends wait, a batch at a time."""

    def __init__(self) -> None:
        self._pending: list[P] = []
        self._wakeup = asyncio.Event()
        self._committed = asyncio.Event()  # set, then replaced, whenever the head moves
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._head = 0
        self._head_hash = GENESIS

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def open(self) -> None:
        """Makes the store ready to append and read."""

    @abstractmethod
    async def close(self) -> None:
        """Commits what is waiting, then closes; later appends raise Unavailable."""

    # Writing ---------------------------------------------------------------------------------

    async def append(
        self,
        appends: Sequence[StreamAppend],
        *,
        idempotency: IdempotencyRecord | None = None,
        request_id: str = "",
        actor: str = "",
    ) -> list[RecordedEvent]:
        """Records the appends as `core.ports.EventStore` says; refused once the store closes."""
        if self._closing:
            raise Unavailable("the event store is closing")
        return await self._append(Appending(appends, idempotency, request_id, actor))

    @abstractmethod
    async def _append(self, call: Appending) -> list[RecordedEvent]:
        """Appends as `append` does, the store being open."""

    async def _queued(self, pending: P) -> list[RecordedEvent]:
        """Hands `pending` to the writer task and waits for its outcome."""
        if self._closing:  # a store's `_append` may await before it queues; close may have run
            raise Unavailable("the event store is closing")
        self._pending.append(pending)
        self._wakeup.set()
        return await pending.future

    def _start_writer(self, name: str) -> None:
        self._writer_task = asyncio.create_task(self._write_loop(), name=name)

    async def _stop_writer(self) -> None:
        """Lets the writer task commit what is waiting, and waits until it ends."""
        self._closing = True
        if self._writer_task is not None:
            self._wakeup.set()
            await self._writer_task
            self._writer_task = None

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._take()
                try:
                    await self._commit(batch)
                except Exception as error:  # the store must outlive any one bad batch
                    log.exception("eventstore.commit_failed", error=type(error).__name__)
                    await self._recover()
                    for pending in batch:
                        if not pending.future.done():
                            pending.future.set_exception(self._failure())
            if self._closing and not self._pending:
                return

    @abstractmethod
    def _take(self) -> list[P]:
        """Takes the next batch off the queue."""

    @abstractmethod
    async def _commit(self, batch: list[P]) -> None:
        """Writes the batch and resolves the future of each of its appends."""

    async def _recover(self) -> None:
        """Puts the store right after a commit failed unexpectedly."""

    @abstractmethod
    def _failure(self) -> Exception:
        """What an append of a batch that failed unexpectedly raises."""

    # The head --------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """The last position this store has committed or seen in the log."""
        return self._head

    @property
    def head_hash(self) -> str:
        """The hash chain's head (hex): the hash of the event at `position`."""
        return self._head_hash.hex()

    async def last_position(self) -> int:
        """`position`, as the EventStore port asks for it."""
        return self._head

    async def wait_for_events_after(self, position: int) -> None:
        """Returns once an event with a position above `position` is in the log."""
        while self._head <= position:
            await self._committed.wait()

    def _moved(self) -> None:
        """Wakes whoever waits for the head to move."""
        committed, self._committed = self._committed, asyncio.Event()
        committed.set()
