"""Loads aggregates from the event store, caches them, and serialises commands per stream."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from typing import Generic, TypeVar

from core.decider import Decider
from core.ports import EventStore

S = TypeVar("S")


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Held:
    """The locks of some keys, taken in sorted order so that two holders never deadlock."""

    __slots__ = ("_acquired", "_entries", "_keys", "_owner")

    def __init__(self, owner: KeyedLocks, keys: list[str]) -> None:
        self._owner = owner
        self._keys = keys
        self._entries: list[_Entry] = []
        self._acquired = 0

    async def __aenter__(self) -> None:
        entries = self._owner._entries
        for key in self._keys:
            entry = entries.get(key)
            if entry is None:
                entry = entries[key] = _Entry()
            entry.users += 1
            self._entries.append(entry)
        for entry in self._entries:
            await entry.lock.acquire()
            self._acquired += 1

    async def __aexit__(self, *exc: object) -> None:
        entries = self._owner._entries
        for index, (key, entry) in enumerate(zip(self._keys, self._entries, strict=True)):
            if index < self._acquired:
                entry.lock.release()
            entry.users -= 1
            if entry.users == 0:
                del entries[key]


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def hold(self, keys: Iterable[str]) -> _Held:
        """An async context manager holding the locks of all `keys`."""
        return _Held(self, sorted(set(keys)))

    def __len__(self) -> int:
        return len(self._entries)


class Aggregates(Generic[S]):
    """The current state and version of each stream of one Decider: cached, else folded.

    `locks` serialise commands per stream; aggregates that share one let a command hold
    streams of both.
    """

    def __init__(
        self,
        store: EventStore,
        decider: Decider[S],
        *,
        cache_size: int = 200_000,
        locks: KeyedLocks | None = None,
    ) -> None:
        self._store = store
        self.decider = decider
        self._cache: OrderedDict[str, tuple[S | None, int]] = OrderedDict()
        self._cache_size = cache_size
        self.locks = locks if locks is not None else KeyedLocks()

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
                # a follower can see a commit before the committing command caches its state
                known = self._store.known_version(stream)
                if known is None or known <= cached[1]:
                    return cached
        state: S | None = None
        version = 0
        decode, evolve = self.decider.registry.decode, self.decider.evolve
        for recorded in await self._store.read_stream(stream):
            state = evolve(state, decode(recorded.type, recorded.data))
            version = recorded.version
        # an absent stream is remembered too: naming a missing sid again costs what naming an
        # existing one does (NotFound is the same in timing); a commit makes `known` pass it
        self.remember(stream, state, version)
        return state, version

    def remember(self, stream: str, state: S | None, version: int) -> None:
        """Caches the state a committed append produced."""
        cache = self._cache
        current = cache.get(stream)
        if current is not None and current[1] > version:
            return  # a newer state was read from the log meanwhile
        cache[stream] = (state, version)
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def forget(self, stream: str) -> None:
        self._cache.pop(stream, None)
