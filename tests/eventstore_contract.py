"""What every EventStore must do: one suite, subclassed once per backend with its `make_store`."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import pytest

from core.errors import ConcurrencyError, Conflict
from core.events import IdempotencyRecord, NewEvent, RecordedEvent, StreamAppend
from core.ports import EventStore
from core.vm_events import VmStarted, VmStopped


class ClosableEventStore(EventStore, Protocol):
    """An opened store the suite can close (and open again on the same path)."""

    async def close(self) -> None: ...


def payload(n: int, *, stream: str = "vm:a") -> NewEvent:
    """A distinct, real event; alternates types so order mistakes show."""
    at = datetime(2025, 1, 1, tzinfo=UTC)
    sid = stream.partition(":")[2]
    event = VmStarted(sid=f"{sid}-{n}", at=at) if n % 2 else VmStopped(sid=f"{sid}-{n}", at=at)
    return NewEvent.of(event)


def to(stream: str, expected: int, *events: NewEvent) -> StreamAppend:
    return StreamAppend(stream, expected, tuple(events))


def key(name: str, reply: bytes = b'{"ok":true}') -> IdempotencyRecord:
    return IdempotencyRecord(key=name, operation="deploy_vm", body_hash="h-" + name, reply=reply)


async def race(
    *appends: Awaitable[list[RecordedEvent]],
) -> list[list[RecordedEvent] | BaseException]:
    """Runs appends at once; each outcome is what it recorded or what it raised."""
    return await asyncio.gather(*appends, return_exceptions=True)


def essence(events: list[RecordedEvent]) -> list[tuple[int, str, int, str, bytes]]:
    """What must survive any round trip through the store."""
    return [(e.position, e.stream, e.version, e.type, bytes(e.data)) for e in events]


class EventStoreContract(abc.ABC):
    """The ladder every EventStore climbs; a subclass only says how to make one."""

    @abc.abstractmethod
    async def make_store(self, path: Path) -> ClosableEventStore:
        """An opened store kept at `path` (a file or folder that may not exist yet)."""

    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        return tmp_path / "store" / "events.db"

    @pytest.fixture
    async def store(self, path: Path) -> AsyncIterator[ClosableEventStore]:
        store = await self.make_store(path)
        try:
            yield store
        finally:
            await store.close()

    # Appending ---------------------------------------------------------------------------

    async def test_a_new_store_is_empty(self, store: ClosableEventStore) -> None:
        assert await store.last_position() == 0
        assert await store.read_all() == []
        assert await store.read_stream("vm:a") == []

    async def test_append_to_a_new_stream_expects_version_zero(
        self, store: ClosableEventStore
    ) -> None:
        events = (payload(1), payload(2))
        recorded = await store.append([to("vm:a", 0, *events)], request_id="req-1")

        assert [(e.position, e.stream, e.version) for e in recorded] == [
            (1, "vm:a", 1),
            (2, "vm:a", 2),
        ]
        assert [(e.type, e.data) for e in recorded] == [(n.type, n.data) for n in events]
        assert {e.request_id for e in recorded} == {"req-1"}
        assert all(e.recorded_at.tzinfo is not None for e in recorded)
        assert await store.last_position() == 2

    async def test_recorded_events_read_back_as_returned(self, store: ClosableEventStore) -> None:
        recorded = await store.append([to("vm:a", 0, payload(1), payload(2))], request_id="r")
        assert essence(await store.read_stream("vm:a")) == essence(recorded)
        assert essence(await store.read_all()) == essence(recorded)
        again = await store.read_all()
        assert [e.recorded_at for e in again] == [e.recorded_at for e in recorded]
        assert [e.request_id for e in again] == ["r", "r"]

    async def test_data_is_kept_byte_for_byte(self, store: ClosableEventStore) -> None:
        data = '{"note":"grüße ✓ \\u0000 \\"quoted\\"","n":1.5e300}'.encode()
        event = NewEvent(type="Odd", data=data, event=payload(1).event)
        await store.append([to("vm:a", 0, event)])
        (read,) = await store.read_stream("vm:a")
        assert bytes(read.data) == data
        assert read.type == "Odd"

    async def test_versions_continue_per_stream(self, store: ClosableEventStore) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        await store.append([to("vm:b", 0, payload(2, stream="vm:b"))])
        recorded = await store.append([to("vm:a", 1, payload(3), payload(4))])
        assert [(e.position, e.version) for e in recorded] == [(3, 2), (4, 3)]
        assert [e.version for e in await store.read_stream("vm:a")] == [1, 2, 3]
        assert [e.version for e in await store.read_stream("vm:b")] == [1]

    # Reading -----------------------------------------------------------------------------

    async def test_read_stream_is_in_version_order_and_only_that_stream(
        self, store: ClosableEventStore
    ) -> None:
        for i in range(6):
            stream = "vm:a" if i % 2 == 0 else "vm:b"
            expected = i // 2
            await store.append([to(stream, expected, payload(i, stream=stream))])
        a = await store.read_stream("vm:a")
        assert [(e.version, e.position) for e in a] == [(1, 1), (2, 3), (3, 5)]
        assert {e.stream for e in a} == {"vm:a"}
        assert await store.read_stream("vm:nope") == []
        assert await store.read_stream("vm:") == []

    async def test_read_all_pages_by_global_position(self, store: ClosableEventStore) -> None:
        for i in range(10):
            stream = f"vm:{i % 3}"
            current = len(await store.read_stream(stream))
            await store.append([to(stream, current, payload(i, stream=stream))])

        assert [e.position for e in await store.read_all()] == list(range(1, 11))
        assert [e.position for e in await store.read_all(after=3, limit=4)] == [4, 5, 6, 7]
        assert [e.position for e in await store.read_all(after=8, limit=100)] == [9, 10]
        assert await store.read_all(after=10) == []
        assert await store.read_all(after=1000) == []
        assert [e.position for e in await store.read_all(limit=1)] == [1]

        pages: list[int] = []
        after = 0
        while page := await store.read_all(after=after, limit=3):
            pages.extend(e.position for e in page)
            after = page[-1].position
        assert pages == list(range(1, 11))

    async def test_read_all_filters_by_stream(self, store: ClosableEventStore) -> None:
        for i in range(9):
            stream = f"vm:{i % 3}"
            await store.append([to(stream, i // 3, payload(i, stream=stream))])
        one = await store.read_all(stream="vm:1")
        assert [(e.position, e.version) for e in one] == [(2, 1), (5, 2), (8, 3)]
        assert [e.position for e in await store.read_all(after=2, stream="vm:1")] == [5, 8]
        assert [e.position for e in await store.read_all(after=0, limit=1, stream="vm:1")] == [2]
        assert await store.read_all(stream="vm:none") == []

    async def test_last_position_follows_every_commit(self, store: ClosableEventStore) -> None:
        assert await store.last_position() == 0
        await store.append([to("vm:a", 0, payload(1))])
        assert await store.last_position() == 1
        await store.append([to("vm:a", 1, payload(2), payload(3)), to("vm:b", 0, payload(4))])
        assert await store.last_position() == 4
        with pytest.raises(ConcurrencyError):
            await store.append([to("vm:a", 0, payload(5))])
        assert await store.last_position() == 4

    # Positions under concurrency ---------------------------------------------------------

    async def test_500_concurrent_appends_get_gap_free_positions(
        self, store: ClosableEventStore
    ) -> None:
        """100 streams, each a chain of 5 appends; all chains at once: 500 appends in flight."""
        streams = [f"vm:s{i:03}" for i in range(100)]
        returned: dict[str, list[list[RecordedEvent]]] = {s: [] for s in streams}

        async def chain(stream: str) -> None:
            version = 0
            for n in range(5):
                events = [payload(n, stream=stream) for _ in range(1 + n % 2)]
                recorded = await store.append([to(stream, version, *events)])
                returned[stream].append(recorded)
                version += len(events)

        await asyncio.gather(*(chain(s) for s in streams))

        total = sum(1 + n % 2 for n in range(5)) * len(streams)
        everything = await store.read_all(limit=10 * total)
        assert [e.position for e in everything] == list(range(1, total + 1))
        assert await store.last_position() == total
        for stream in streams:
            versions = [e.version for e in await store.read_stream(stream)]
            assert versions == list(range(1, len(versions) + 1))
            appends = returned[stream]
            positions = [e.position for batch in appends for e in batch]
            assert positions == sorted(positions), "a later append must commit later"
            for batch in appends:  # one append's events are one contiguous run
                assert [e.position for e in batch] == list(
                    range(batch[0].position, batch[0].position + len(batch))
                )
        by_position = {
            e.position: e for batch_list in returned.values() for b in batch_list for e in b
        }
        assert essence([by_position[p] for p in range(1, total + 1)]) == essence(everything)

    async def test_500_concurrent_single_appends_to_distinct_streams(
        self, store: ClosableEventStore
    ) -> None:
        results = await asyncio.gather(
            *(store.append([to(f"vm:n{i}", 0, payload(i))]) for i in range(500))
        )
        positions = sorted(r[0].position for r in results)
        assert positions == list(range(1, 501))
        assert [e.position for e in await store.read_all(limit=1000)] == positions

    # Optimistic concurrency --------------------------------------------------------------

    @pytest.mark.parametrize("expected", [0, 1, 3, 7])
    async def test_a_wrong_expected_version_records_nothing(
        self, store: ClosableEventStore, expected: int
    ) -> None:
        await store.append([to("vm:a", 0, payload(1), payload(2))])  # vm:a is at 2
        before = essence(await store.read_all())
        with pytest.raises(ConcurrencyError):
            await store.append([to("vm:a", expected, payload(3), payload(4))])
        assert essence(await store.read_all()) == before
        assert await store.last_position() == 2
        after = await store.append([to("vm:a", 2, payload(5))])
        assert [(e.position, e.version) for e in after] == [(3, 3)]

    async def test_a_new_stream_must_be_expected_at_zero(self, store: ClosableEventStore) -> None:
        with pytest.raises(ConcurrencyError):
            await store.append([to("vm:new", 1, payload(1))])
        assert await store.read_all() == []
        assert await store.last_position() == 0

    async def test_an_append_spanning_streams_commits_them_together(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        recorded = await store.append(
            [to("vm:a", 1, payload(2)), to("vm:b", 0, payload(3)), to("vm:c", 0, payload(4))],
            request_id="migrate",
        )
        assert [(e.position, e.stream, e.version) for e in recorded] == [
            (2, "vm:a", 2),
            (3, "vm:b", 1),
            (4, "vm:c", 1),
        ]
        assert len({e.recorded_at for e in recorded}) == 1

    @pytest.mark.parametrize("stale", ["first", "middle", "last"])
    async def test_an_append_spanning_streams_is_all_or_nothing(
        self, store: ClosableEventStore, stale: str
    ) -> None:
        await store.append([to("vm:a", 0, payload(1)), to("vm:b", 0, payload(2))])
        await store.append([to("vm:c", 0, payload(3))])
        before = essence(await store.read_all())
        appends = [to("vm:a", 1, payload(4)), to("vm:b", 1, payload(5)), to("vm:c", 1, payload(6))]
        index = {"first": 0, "middle": 1, "last": 2}[stale]
        bad = appends[index]
        appends[index] = to(bad.stream, 0, *bad.events)  # this one stream is stale

        with pytest.raises(ConcurrencyError):
            await store.append(appends)

        assert essence(await store.read_all()) == before
        for stream in ("vm:a", "vm:b", "vm:c"):
            assert len(await store.read_stream(stream)) == 1
        assert await store.last_position() == 3

    async def test_a_failed_multi_stream_append_does_not_block_new_streams(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        with pytest.raises(ConcurrencyError):
            await store.append([to("vm:fresh", 0, payload(2)), to("vm:a", 0, payload(3))])
        assert await store.read_stream("vm:fresh") == []
        recorded = await store.append([to("vm:fresh", 0, payload(4))])
        assert [(e.position, e.version) for e in recorded] == [(2, 1)]

    async def test_two_concurrent_appends_at_one_version_exactly_one_wins(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        outcomes = await race(
            store.append([to("vm:a", 1, payload(10))], request_id="left"),
            store.append([to("vm:a", 1, payload(20))], request_id="right"),
        )
        wins = [o for o in outcomes if isinstance(o, list)]
        losses = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(wins) == 1
        assert len(losses) == 1
        assert isinstance(losses[0], ConcurrencyError)
        stream = await store.read_stream("vm:a")
        assert [e.version for e in stream] == [1, 2]
        assert stream[1].request_id == wins[0][0].request_id
        assert await store.last_position() == 2

    async def test_many_contenders_at_one_version_exactly_one_wins(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        outcomes = await race(
            *(store.append([to("vm:a", 1, payload(i), payload(i + 1))]) for i in range(50)),
        )
        assert sum(isinstance(o, list) for o in outcomes) == 1
        assert all(isinstance(o, ConcurrencyError) for o in outcomes if not isinstance(o, list))
        assert [e.version for e in await store.read_stream("vm:a")] == [1, 2, 3]
        assert await store.last_position() == 3

    # Idempotency -------------------------------------------------------------------------

    async def test_positions_stay_gap_free_around_rejected_appends(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        outcomes = await race(
            *(store.append([to("vm:a", 1, payload(i))]) for i in range(2, 6)),  # one wins
            *(store.append([to(f"vm:n{i}", 0, payload(i))]) for i in range(6, 10)),
        )
        won = [o for o in outcomes if isinstance(o, list)]
        assert len(won) == 5
        assert sum(isinstance(o, ConcurrencyError) for o in outcomes) == 3
        recorded = sorted((e for o in won for e in o), key=lambda e: e.position)
        assert [e.position for e in recorded] == [2, 3, 4, 5, 6]
        after = await store.append([to("vm:z", 0, payload(10))])
        assert after[0].position == 7
        assert essence(await store.read_all(after=1)) == essence(recorded + after)

    async def test_the_idempotency_record_is_stored_with_the_events(
        self, store: ClosableEventStore
    ) -> None:
        record = key("k-1", b'{"ok":true,"result":{"sid":"vm_1"}}')
        await store.append([to("vm:a", 0, payload(1))], idempotency=record)
        assert await store.idempotent_reply("k-1") == record
        assert await store.idempotent_reply("k-2") is None

    async def test_an_idempotency_record_may_come_without_events(
        self, store: ClosableEventStore
    ) -> None:
        """A keyed request that changed nothing still keeps its reply (delete on deleting)."""
        record = key("k-empty")
        assert await store.append([], idempotency=record) == []
        assert await store.idempotent_reply("k-empty") == record
        assert await store.last_position() == 0

    async def test_a_key_used_twice_is_a_conflict_and_appends_nothing(
        self, store: ClosableEventStore
    ) -> None:
        first = key("k-1", b"first")
        await store.append([to("vm:a", 0, payload(1))], idempotency=first)
        with pytest.raises(Conflict) as raised:
            await store.append([to("vm:b", 0, payload(2))], idempotency=key("k-1", b"second"))
        assert not isinstance(raised.value, ConcurrencyError), "retrying would not help"
        assert await store.read_stream("vm:b") == []
        assert await store.last_position() == 1
        assert await store.idempotent_reply("k-1") == first

    async def test_a_key_used_twice_concurrently_records_once(
        self, store: ClosableEventStore
    ) -> None:
        outcomes = await race(
            *(
                store.append([to(f"vm:{i}", 0, payload(i))], idempotency=key("same", b"%d" % i))
                for i in range(10)
            ),
        )
        wins = [o for o in outcomes if isinstance(o, list)]
        assert len(wins) == 1
        assert all(
            isinstance(o, Conflict) and not isinstance(o, ConcurrencyError)
            for o in outcomes
            if not isinstance(o, list)
        )
        assert await store.last_position() == 1
        (event,) = await store.read_all()
        stored = await store.idempotent_reply("same")
        assert stored is not None
        assert stored.reply == b"%d" % int(event.stream.partition(":")[2])

    async def test_a_failed_append_stores_no_idempotency_record(
        self, store: ClosableEventStore
    ) -> None:
        await store.append([to("vm:a", 0, payload(1))])
        with pytest.raises(ConcurrencyError):
            await store.append([to("vm:a", 0, payload(2))], idempotency=key("k-lost"))
        assert await store.idempotent_reply("k-lost") is None
        await store.append([to("vm:a", 1, payload(3))], idempotency=key("k-lost"))
        assert await store.idempotent_reply("k-lost") == key("k-lost")

    # Durability --------------------------------------------------------------------------

    async def test_recorded_at_request_id_and_actor_survive_close_and_reopen(
        self, path: Path
    ) -> None:
        store = await self.make_store(path)
        try:
            recorded = await store.append(
                [to("vm:a", 0, payload(1)), to("vm:b", 0, payload(2))],
                request_id="r-1",
                actor="dashboard op-3f2a",
            )
            recorded += await store.append([to("vm:a", 1, payload(3))], request_id="r-2")
        finally:
            await store.close()
        assert [e.actor for e in recorded] == ["dashboard op-3f2a", "dashboard op-3f2a", ""]

        reopened = await self.make_store(path)
        try:
            back = await reopened.read_all()
            assert [(e.position, e.recorded_at, e.request_id, e.actor) for e in back] == [
                (e.position, e.recorded_at, e.request_id, e.actor) for e in recorded
            ]
            assert all(e.recorded_at.tzinfo is not None for e in back)
        finally:
            await reopened.close()

    async def test_data_survives_close_and_reopen(self, path: Path) -> None:
        store = await self.make_store(path)
        try:
            await store.append([to("vm:a", 0, payload(1), payload(2))], request_id="r1")
            await store.append(
                [to("vm:b", 0, payload(3)), to("vm:a", 2, payload(4))], idempotency=key("k")
            )
            before = essence(await store.read_all())
        finally:
            await store.close()

        reopened = await self.make_store(path)
        try:
            assert essence(await reopened.read_all()) == before
            assert await reopened.last_position() == 4
            assert [e.version for e in await reopened.read_stream("vm:a")] == [1, 2, 3]
            assert (await reopened.read_all(limit=1))[0].request_id == "r1"
            assert await reopened.idempotent_reply("k") == key("k")
            with pytest.raises(ConcurrencyError):  # the version check still knows the streams
                await reopened.append([to("vm:a", 0, payload(5))])
            with pytest.raises(Conflict):
                await reopened.append([to("vm:c", 0, payload(6))], idempotency=key("k"))
            recorded = await reopened.append([to("vm:a", 3, payload(7))])
            assert [(e.position, e.version) for e in recorded] == [(5, 4)]
            assert [e.position for e in await reopened.read_all(after=3)] == [4, 5]
        finally:
            await reopened.close()
