"""The JetStream event store: the shared contract on a real nats-server, then what only it does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiosqlite
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from adapters.event_chain import verify
from adapters.eventstore_jetstream import JetStreamEventStore
from adapters.eventstore_sqlite import SqliteEventStore
from adapters.jetstream_batch import Pending
from adapters.jetstream_idempotency import hashed
from adapters.jetstream_log import (
    EXPECTED_LAST_SEQ,
    EXPECTED_SUBJECT_SEQ,
    STREAM,
    WRONG_LAST_SEQUENCE,
    Outgoing,
    Refused,
    publish_atomic,
    stream_config,
    subject_of,
    verify_chain,
)
from adapters.lease_jetstream import (
    CHECKPOINTS,
    LEASES,
    KvCheckpoints,
    KvLease,
    LeasedSource,
    bucket,
)
from adapters.log_transfer import ChainBroken, JetStreamSide, SqliteSide, transfer
from adapters.sealing import AesGcmSealer
from adapters.vault_jetstream import JetStreamSecretVault
from adapters.vault_sqlite import SqliteSecretVault
from core.errors import ConcurrencyError, Conflict, Unavailable
from core.events import RecordedEvent
from hero_deployer.app.natsserver import NatsServer
from tests.eventstore_contract import EventStoreContract, essence, key, payload, to
from tests.jetstream_cluster import connect, jetstream_ready, jetstream_server, running_server


class TestJetStreamEventStore(EventStoreContract):
    """One nats-server with JetStream per test, kept in the folder of the path the suite gives."""

    @pytest.fixture(autouse=True)
    async def servers(self) -> AsyncIterator[None]:
        self.running: dict[Path, NatsServer] = {}
        self.connections: list[Client] = []
        async with contextlib.AsyncExitStack() as self.stack:
            try:
                yield
            finally:
                for nc in self.connections:
                    await nc.close()

    async def make_store(self, path: Path) -> JetStreamEventStore:
        server = self.running.get(path)
        if server is None:
            server = await self.stack.enter_async_context(running_server(path.parent))
            self.running[path] = server
        nc = await connect([server.url])
        self.connections.append(nc)
        await jetstream_ready(nc)
        return await JetStreamEventStore(nc, replicas=1).__aenter__()


# JetStream only ----------------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with running_server(tmp_path / "nats") as running:
        yield running


@pytest.fixture
async def connections(server: NatsServer) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    opened: list[Client] = []

    async def open_one() -> Client:
        nc = await connect([server.url])
        opened.append(nc)
        await jetstream_ready(nc)
        return nc

    yield open_one
    for nc in opened:
        await nc.close()


@pytest.fixture
async def two_writers(
    connections: Callable[[], Awaitable[Client]],
) -> AsyncIterator[tuple[JetStreamEventStore, JetStreamEventStore]]:
    """Two stores on one log, each on its own connection: two service replicas."""
    async with (
        JetStreamEventStore(await connections(), replicas=1) as first,
        JetStreamEventStore(await connections(), replicas=1) as second,
    ):
        yield first, second


async def test_the_stream_keeps_every_position(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """Deletes and purges are denied, so no position ever goes missing."""
    store, _ = two_writers
    await store.append([to("vm:a", 0, payload(1), payload(2))])
    js = store._nc.jetstream()
    config = (await js.stream_info(STREAM)).config
    assert (config.deny_delete, config.deny_purge, config.allow_atomic) == (True, True, True)
    assert config.storage == api.StorageType.FILE
    assert config.subjects == ["hero.log.>"]
    with pytest.raises(nats.js.errors.APIError):
        await js.delete_msg(STREAM, 1)
    with pytest.raises(nats.js.errors.APIError):
        await js.purge_stream(STREAM)
    assert [e.position for e in await store.read_all()] == [1, 2]


async def test_each_event_stream_is_its_own_subject(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    store, _ = two_writers
    odd = ["vm:vm_abc", "user:a.b", "user:*", "vm:", "vm", "x:y:z", "user:grüße ~2e"]
    for stream in odd:
        await store.append([to(stream, 0, payload(1))])
    subjects = [subject_of(s) for s in odd]
    assert subjects[0] == "hero.log.vm.vm_abc"
    assert len(set(subjects)) == len(odd)
    assert all("*" not in s and ">" not in s and s.count(".") in (2, 3) for s in subjects)
    for stream in odd:
        (event,) = await store.read_stream(stream)
        assert event.stream == stream
    assert [e.stream for e in await store.read_all()] == odd


async def test_every_event_carries_the_hash_chain(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    first, second = two_writers
    await first.append([to("vm:a", 0, payload(1), payload(2))])
    await second.append([to("vm:b", 0, payload(3)), to("vm:a", 2, payload(4))])
    await first.append([to("vm:b", 1, payload(5))])
    report = await verify_chain(first._nc, 5)
    assert report.ok
    assert report.events == 5
    assert report.head.hex() == first.head_hash
    assert await first.last_position() == 5


async def test_two_writers_on_one_log_contend_without_gaps_or_doubles(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """Two replicas append to the same streams at once; each retries as the service does."""
    stores = two_writers
    streams = [f"vm:s{i}" for i in range(8)]
    committed: list[RecordedEvent] = []

    async def writer(store: JetStreamEventStore, n: int) -> None:
        for round_ in range(10):
            stream = streams[(n + round_) % len(streams)]
            while True:
                version = len(await store.read_stream(stream))
                try:
                    committed.extend(
                        await store.append([to(stream, version, payload(100 * n + round_))])
                    )
                    break
                except ConcurrencyError:
                    continue

    await asyncio.gather(*(writer(stores[n % 2], n) for n in range(6)))

    everything = await stores[0].read_all(limit=1000)
    assert [e.position for e in everything] == list(range(1, 61))
    assert essence(sorted(committed, key=lambda e: e.position)) == essence(everything)
    for stream in streams:
        versions = [e.version for e in await stores[1].read_stream(stream)]
        assert versions == list(range(1, len(versions) + 1))
    assert (await verify_chain(stores[0]._nc, 5)).ok


async def test_a_writer_sees_the_other_writers_events(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    first, second = two_writers
    await first.append([to("vm:a", 0, payload(1), payload(2))])
    assert await second.last_position() == 2  # asked of the stream: no waiting for news
    await asyncio.wait_for(second.wait_for_events_after(1), 5)
    assert second.position == 2
    assert second.head_hash == first.head_hash
    assert second.known_version("vm:a") == 2
    with pytest.raises(ConcurrencyError):
        await second.append([to("vm:a", 1, payload(3))])
    assert [e.version for e in await second.read_stream("vm:a")] == [1, 2]


async def test_a_reservation_left_by_a_dead_writer_is_freed(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """A writer that reserved a key and died before appending does not hold it forever."""
    dead, alive = two_writers
    await dead.keys.reserve(key("k-orphan"))  # then it dies: no append, no release
    alive.keys.held_wait = 0  # a lookup waits for a held key to be answered: not here
    assert await alive.idempotent_reply("k-orphan") is None
    with pytest.raises(Conflict):  # still young: it may be in flight
        await alive.append([to("vm:a", 0, payload(1))], idempotency=key("k-orphan"))
    alive.keys.stale_after = 0
    recorded = await alive.append([to("vm:a", 0, payload(2))], idempotency=key("k-orphan"))
    assert await alive.idempotent_reply("k-orphan") == key("k-orphan")
    assert [e.position for e in recorded] == [1]


async def test_two_replicas_settling_one_dead_reservation_both_go_on(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """Both read the dead writer's reservation, then both settle it: the second one's delete is
    refused by the stream (nats-py passes that through as a BadRequestError, not as a wrong
    last sequence) and was answered Internal; it means another replica settled it first."""
    first, second = two_writers
    await first.keys.reserve(key("k-dead"))  # then its writer dies
    name = hashed("k-dead")
    seen = [await store.keys._get(name) for store in (first, second)]
    for store, found in zip((first, second), seen, strict=True):
        assert found is not None
        store.keys.stale_after = 0
        assert await store.keys._settle(name, *found, own=True)
    assert await second.idempotent_reply("k-dead") is None  # freed: the log holds no commit
    recorded = await second.append([to("vm:a", 0, payload(1))], idempotency=key("k-dead"))
    assert [e.position for e in recorded] == [1]


async def test_a_commit_its_writer_did_not_confirm_is_found_in_the_log(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """A writer that died between its append and the record's confirmation: the log says so."""
    dead, alive = two_writers
    record = key("k-unconfirmed", b'{"ok":true,"result":"first"}')
    held = await dead.keys.reserve(record)
    future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
    dead._pending.append(Pending([to("vm:a", 0, payload(1))], "r", held, future))
    dead._wakeup.set()
    (event,) = await future  # committed; the confirmation never happens
    alive.keys.stale_after = 0
    assert await alive.idempotent_reply("k-unconfirmed") == record
    with pytest.raises(Conflict):
        await alive.append([to("vm:b", 0, payload(2))], idempotency=key("k-unconfirmed"))
    assert await alive.last_position() == event.position == 1


async def test_a_head_its_replica_cannot_read_yet_is_never_chained_onto(
    connections: Callable[[], Awaitable[Client]],
) -> None:
    """A direct get may be answered by a stream peer behind the leader, which answers 404 for
    the last position the leader reported (ADR-31 in nats-io/nats-architecture-and-design).
    The store took GENESIS as that head's hash and chained its next event onto it: the chain
    broke there (seen once under a node kill). Here the last message is removed, so every peer
    answers 404 for it: the store must neither open on that head nor append after it."""
    nc = await connections()
    js = nc.jetstream()
    config = stream_config(1)
    config.deny_delete = False  # only so that this test can make the head unreadable
    await js.add_stream(config)
    async with JetStreamEventStore(nc, replicas=1) as first:
        await first.append([to("vm:a", 0, payload(1), payload(2))])
    await js.delete_msg(STREAM, 2)
    assert (await js.stream_info(STREAM)).state.last_seq == 2
    with pytest.raises(Unavailable, match="position 2"):
        async with JetStreamEventStore(await connections(), replicas=1) as second:
            await second.append([to("vm:b", 0, payload(3))])
    assert (await js.stream_info(STREAM)).state.last_seq == 2  # nothing chained onto it


async def test_the_log_survives_a_server_restart(tmp_path: Path) -> None:
    server = jetstream_server(tmp_path / "nats")
    async with server:
        nc = await connect([server.url])
        await jetstream_ready(nc)
        async with JetStreamEventStore(nc, replicas=1) as store:
            await store.append([to("vm:a", 0, payload(1), payload(2))], idempotency=key("k"))
        await nc.close()
    async with server:
        nc = await connect([server.url])
        try:
            await jetstream_ready(nc)
            async with JetStreamEventStore(nc, replicas=1) as store:
                assert [e.version for e in await store.read_stream("vm:a")] == [1, 2]
                assert await store.idempotent_reply("k") == key("k")
                recorded = await store.append([to("vm:a", 2, payload(3))])
                assert [(e.position, e.version) for e in recorded] == [(3, 3)]
                assert (await verify_chain(nc, 5)).ok
        finally:
            await nc.close()


async def test_the_server_refuses_a_whole_batch_when_one_expectation_fails(
    two_writers: tuple[JetStreamEventStore, JetStreamEventStore],
) -> None:
    """What the store relies on when its cache is stale: the stream itself checks, all or none."""
    store, _ = two_writers
    await store.append([to("vm:a", 0, payload(1))])
    fresh = Outgoing(subject_of("vm:new"), {EXPECTED_SUBJECT_SEQ: "0"}, b"{}")
    stale = Outgoing(subject_of("vm:a"), {EXPECTED_SUBJECT_SEQ: "0"}, b"{}")
    with pytest.raises(Refused) as refused:
        await publish_atomic(store._nc, [fresh, stale], 5)
    assert refused.value.code in WRONG_LAST_SEQUENCE
    wrong_head = Outgoing(subject_of("vm:new"), {EXPECTED_LAST_SEQ: "0"}, b"{}")
    with pytest.raises(Refused) as refused:
        await publish_atomic(store._nc, [wrong_head, fresh], 5)
    assert refused.value.code in WRONG_LAST_SEQUENCE
    assert await store.last_position() == 1
    assert await store.read_stream("vm:new") == []


class PeerBehind:
    """The log's direct gets answered as a stream peer that has applied it up to `applied`.

    With allow_direct every peer of a replicated stream answers direct gets, one behind the leader
    from what it has applied (nats-io/nats-architecture-and-design, adr/ADR-31.md, "A note on
    read-after-write coherency"); the answer is the message with Nats-Stream, Nats-Subject and
    Nats-Sequence headers added, or a 404 status (nats-io/nats-server, server/stream.go). Its
    stream has allow_direct off, so this peer alone answers; it reads the leader's copy.
    """

    def __init__(self, nc: Client, applied: int) -> None:
        self.nc, self.js, self.applied = nc, nc.jetstream(), applied
        self.asked: list[dict[str, object]] = []

    async def start(self) -> None:
        await self.nc.subscribe(f"$JS.API.DIRECT.GET.{STREAM}", cb=self._answer)

    async def _answer(self, msg: Msg) -> None:
        request = json.loads(msg.data)
        self.asked.append(request)
        found = await self._find(request)
        if found is None:
            await self.nc.publish(msg.reply, b"", headers={"Status": "404"})
            return
        headers = {
            **(found.headers or {}),
            "Nats-Stream": STREAM,
            "Nats-Subject": str(found.subject),
            "Nats-Sequence": str(found.seq),
        }
        await self.nc.publish(msg.reply, found.data or b"", headers=headers)

    async def _find(self, request: dict[str, object]) -> api.RawStreamMsg | None:
        """The message a `seq` or `last_by_subj` request names, among those applied."""
        if "seq" in request:
            seq = int(str(request["seq"]))
            return await self.js.get_msg(STREAM, seq) if seq <= self.applied else None
        subject, seq, last = str(request["last_by_subj"]), 0, None
        while True:
            try:
                found = await self.js.get_msg(STREAM, seq + 1, subject, next=True)
            except nats.js.errors.NotFoundError:
                return last
            if found.seq is None or found.seq > self.applied:
                return last
            last, seq = found, found.seq


async def test_a_peer_behind_the_leader_never_takes_a_known_version_back(
    connections: Callable[[], Awaitable[Client]],
) -> None:
    """delete_vm answered Conflict after the runner's 8 retries on the cluster. A writer whose
    batch the log refused forgot its streams' versions and read them again, from any peer: one
    behind the leader gave an older version, which the watcher (past it) never corrected, so
    every append at the version the stream was read at was refused in memory, each retry."""
    nc = await connections()
    config = stream_config(1)
    config.allow_direct = False  # only so that the peer below answers every direct get
    await nc.jetstream().add_stream(config)
    peer = PeerBehind(await connections(), applied=0)
    await peer.start()
    streams = [f"vm:s{i}" for i in range(8)]
    async with (
        JetStreamEventStore(await connections(), replicas=1) as first,
        JetStreamEventStore(await connections(), replicas=1) as second,
    ):
        for version in (0, 1):
            await first.append([to(s, version, payload(version, stream=s)) for s in streams])
        peer.applied = len(streams)  # it has each stream's first event, not its second
        await asyncio.wait_for(second.wait_for_events_after(2 * len(streams) - 1), 5)
        version = 2
        while not any("last_by_subj" in asked for asked in peer.asked):  # no batch refused yet
            assert version < 12, "the two writers never contended"
            await asyncio.gather(
                *(first.append([to(s, version, payload(version, stream=s))]) for s in streams[:4]),
                *(second.append([to(s, version, payload(version, stream=s))]) for s in streams[4:]),
            )
            version += 1
        for store in (first, second):
            assert [store.known_version(s) for s in streams] == [version] * len(streams)
        info = await nc.jetstream().stream_info(STREAM)
        assert info.state.last_seq == version * len(streams)


# Moving a log ------------------------------------------------------------------------------

MASTER = b"m" * 32


async def a_sqlite_log(data_dir: Path) -> tuple[list[RecordedEvent], str]:
    """A SQLite log with several streams, a keyed request, request ids, actors and a secret."""
    data_dir.mkdir(parents=True, exist_ok=True)
    async with SqliteEventStore(data_dir / "events.db") as store:
        await store.append([to("vm:a", 0, payload(1), payload(2))], request_id="r1", actor="cli")
        await store.append(
            [to("vm:b", 0, payload(3)), to("user:ann", 0, payload(4, stream="user:ann"))],
            idempotency=key("k-1", b'{"ok":true}'),
            request_id="r2",
        )
        await store.append([to("vm:a", 2, payload(5))], actor="sdk")
        events, head = await store.read_all(), store.head_hash
    async with aiosqlite.connect(data_dir / "vault.db") as conn:
        await SqliteSecretVault(conn, AesGcmSealer(MASTER)).put("ann", "ssh_private_key", b"PRIV")
    return events, head


def full(events: list[RecordedEvent]) -> list[tuple[object, ...]]:
    return [(*essence([e])[0], e.recorded_at, e.request_id, e.actor) for e in events]


async def test_a_sqlite_log_moves_to_jetstream_and_back_intact(
    tmp_path: Path, connections: Callable[[], Awaitable[Client]]
) -> None:
    events, head = await a_sqlite_log(tmp_path / "sqlite")
    nc = await connections()

    moved = await transfer(SqliteSide(tmp_path / "sqlite"), JetStreamSide(nc, replicas=1))

    assert (moved.events, moved.head, moved.records, moved.secrets) == (5, head, 1, 1)
    async with JetStreamEventStore(nc, replicas=1) as store:
        assert full(await store.read_all()) == full(events)
        assert store.head_hash == head
        assert await store.idempotent_reply("k-1") == key("k-1", b'{"ok":true}')
        vault = await JetStreamSecretVault.open(nc.jetstream(), AesGcmSealer(MASTER), replicas=1)
        assert await vault.get("ann", "ssh_private_key") == b"PRIV"
        more = await store.append([to("vm:a", 3, payload(6))])
        assert [(e.position, e.version) for e in more] == [(6, 4)]
    report = await verify_chain(nc, 5)
    assert (report.ok, report.events) == (True, 6)

    back = tmp_path / "back"
    moved = await transfer(JetStreamSide(nc, replicas=1), SqliteSide(back))

    assert (moved.events, moved.records, moved.secrets) == (6, 1, 1)
    async with SqliteEventStore(back / "events.db") as store:
        assert full((await store.read_all())[:5]) == full(events)
        assert store.head_hash == report.head.hex()
        assert await store.idempotent_reply("k-1") == key("k-1", b'{"ok":true}')
    with sqlite3.connect(back / "events.db") as db:
        assert verify(db).ok
    async with aiosqlite.connect(back / "vault.db") as conn:
        vault_back = SqliteSecretVault(conn, AesGcmSealer(MASTER))
        assert await vault_back.get("ann", "ssh_private_key") == b"PRIV"


async def test_a_move_refuses_a_target_with_events_and_a_broken_source(
    tmp_path: Path, connections: Callable[[], Awaitable[Client]]
) -> None:
    await a_sqlite_log(tmp_path / "sqlite")
    with sqlite3.connect(tmp_path / "sqlite" / "events.db") as db:  # an edit by hand
        db.execute('UPDATE events SET data = \'{"sid":"edited"}\' WHERE position = 4')
    nc = await connections()
    with pytest.raises(ChainBroken, match="position 4"):
        await transfer(SqliteSide(tmp_path / "sqlite"), JetStreamSide(nc, replicas=1))
    assert await JetStreamSide(nc, replicas=1).is_empty()

    await a_sqlite_log(tmp_path / "good")
    await transfer(SqliteSide(tmp_path / "good"), JetStreamSide(nc, replicas=1))
    with pytest.raises(ValueError, match="already holds events"):
        await transfer(SqliteSide(tmp_path / "good"), JetStreamSide(nc, replicas=1))


async def test_a_leased_source_reads_the_one_stream_it_is_asked_for(
    connections: Callable[[], Awaitable[Client]],
) -> None:
    """The side-effect followers' view of the log passes a stream filter on, as the port says;
    it used to drop it and hand back every stream's events."""
    nc = await connections()
    js = nc.jetstream()
    async with JetStreamEventStore(nc, replicas=1) as store:
        await store.append([to("vm:a", 0, payload(1)), to("vm:b", 0, payload(2))])
        await store.append([to("vm:a", 1, payload(3))])
        leases = await bucket(js, LEASES, replicas=1, ttl=5)
        async with KvLease(leases, "side-effects", ttl=5) as lease:
            await asyncio.wait_for(lease.until_held(), 30)
            shared = KvCheckpoints(await bucket(js, CHECKPOINTS, replicas=1), lease)
            source = LeasedSource(store, lease, shared, "vm-reactor")
            one = await source.read_all(stream="vm:a")
            every = await source.read_all()
    assert [(e.stream, e.version) for e in one] == [("vm:a", 1), ("vm:a", 2)]
    assert [e.stream for e in every] == ["vm:a", "vm:b", "vm:a"]
