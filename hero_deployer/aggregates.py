"""Loads aggregates from the event store, caches them, and serialises commands per stream."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

from core.events import Event, EventRegistry
from core.ports import EventStore

S = TypeVar("S")


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    @asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Holds the locks of all `keys`, taken in sorted order so two holders never deadlock."""
        registered: list[_Entry] = []
        acquired: list[_Entry] = []
        try:
            for key in sorted(set(keys)):
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._entries[key] = _Entry()
                entry.users += 1
                registered.append(entry)
                await entry.lock.acquire()
                acquired.append(entry)
            yield
        finally:
            for entry in acquired:
                entry.lock.release()
            for entry in registered:
                entry.users -= 1
            for key in [k for k in set(keys) if k in self._entries]:
                if self._entries[key].users == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class Aggregates(Generic[S]):
    """The current state and version of each stream: from the cache, else folded from the log."""

    def __init__(
        self,
        store: EventStore,
        registry: EventRegistry,
        evolve: Callable[[S | None, Event], S | None],
        *,
        cache_size: int = 200_000,
    ) -> None:
        self._store = store
        self._registry = registry
        self._evolve = evolve
        self._cache: OrderedDict[str, tuple[S | None, int]] = OrderedDict()
        self._cache_size = cache_size
        self.locks = KeyedLocks()

    async def load(
        self, stream: str, *, fresh: bool = False, new: bool = False
    ) -> tuple[S | None, int]:
        """The stream's state and version; `new` skips the read for a stream just named.

        A `new` stream that exists after all fails its append on UNIQUE(stream, version),
        and the retry reads it for real.
        """
        if new and not fresh:
            return None, 0
        if not fresh:
            cached = self._cache.get(stream)
            if cached is not None:
                return cached
        state: S | None = None
        version = 0
        for recorded in await self._store.read_stream(stream):
            state = self._evolve(state, self._registry.decode(recorded.type, recorded.data))
            version = recorded.version
        if version:
            self.remember(stream, state, version)
        return state, version

    def remember(self, stream: str, state: S | None, version: int) -> None:
        """Caches the state a committed append produced."""
        cache = self._cache
        cache[stream] = (state, version)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def forget(self, stream: str) -> None:
        self._cache.pop(stream, None)
