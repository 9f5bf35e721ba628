"""The status stream: every committed event, on its subject, in position order, at least once."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.localgrid import LocalGrid
from bus.publisher import StatusPublisher
from core.domain import VMS
from core.events import NewEvent, RecordedEvent, StreamAppend
from core.retry import RetryPolicy
from core.vm_events import VmDeleted, VmDeleteRequested, VmDeployed, VmDeployRequested
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.app.settings import Settings
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, Service, make_settings

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
PAYLOAD_KEYS = {"position", "stream", "version", "type", "data", "recorded_at"}


@dataclass
class Received:
    """Everything published under `<prefix>.events.>`, in arrival order."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, msg: Msg) -> None:
        self.messages.append((msg.subject, msgspec.json.decode(msg.data)))
        self.changed.set()

    @property
    def positions(self) -> list[int]:
        return [payload["position"] for _, payload in self.messages]

    async def until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """Waits for messages until `done()` holds; the timeout is only a safety net."""
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def through(self, position: int) -> None:
        await self.until(lambda: position in self.positions)

    def saw(self, stream: str, event_type: str) -> bool:
        return any(p["stream"] == stream and p["type"] == event_type for _, p in self.messages)


@asynccontextmanager
async def subscribe(nc: Client, prefix: str) -> AsyncIterator[Received]:
    received = Received()
    sub = await nc.subscribe(f"{prefix}.events.>", cb=received.on_message)
    await nc.flush()  # the server knows the subscription before anything is published
    try:
        yield received
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def received(service: Service) -> AsyncIterator[Received]:
    async with subscribe(service.nc, service.settings.prefix) as r:
        yield r


def check_against_the_log(
    prefix: str, received: list[tuple[str, dict[str, Any]]], log: dict[int, RecordedEvent]
) -> None:
    """Each message is on its contract subject and carries exactly the logged event."""
    for subject, payload in received:
        assert set(payload) == PAYLOAD_KEYS
        recorded = log[payload["position"]]
        kind, _, ident = recorded.stream.partition(":")
        assert subject == f"{prefix}.events.{kind}.{ident}.{recorded.type}"
        assert payload["stream"] == recorded.stream
        assert payload["version"] == recorded.version
        assert payload["type"] == recorded.type
        assert payload["data"] == msgspec.json.decode(recorded.data)
        assert RFC3339.match(payload["recorded_at"]), payload["recorded_at"]
        assert datetime.fromisoformat(payload["recorded_at"]) == recorded.recorded_at


async def full_log(store: SqliteEventStore) -> dict[int, RecordedEvent]:
    return {e.position: e for e in await store.read_all(limit=100_000)}


# Live publishing -----------------------------------------------------------------------------


async def test_every_committed_event_is_published_in_order_with_the_contract_payload(
    service: Service, received: Received
) -> None:
    c = service.client
    vms = [await c.call("deploy_vm", {"name": f"v{i}", "secret": "s"}) for i in range(4)]
    sids = [vm["sid"] for vm in vms]
    await received.until(lambda: all(received.saw(f"vm:{s}", "VmDeployed") for s in sids))
    await c.call("stop_vm", {"sid": sids[0], "secret": "s"})
    await c.call("restart_vm", {"sid": sids[1], "secret": "s"})
    await c.call("delete_vm", {"sid": sids[2], "secret": "s"})
    await c.call("migrate_secret", {"old_secret": "s", "new_secret": "t"})
    await received.until(lambda: received.saw(f"vm:{sids[2]}", "VmDeleted"))
    last = await service.app.store.last_position()
    await received.through(last)

    assert received.positions == list(range(1, last + 1))
    check_against_the_log(
        service.settings.prefix, received.messages, await full_log(service.app.store)
    )
    types = [p["type"] for _, p in received.messages]
    for expected in ("VmDeployRequested", "VmDeployed", "VmStopped", "VmRestarted"):
        assert expected in types
    assert types.count("VmSecretMigrated") == 3  # the deleted VM is left out
    assert all("secret" not in p["data"] for _, p in received.messages)


async def test_a_subscriber_sees_gap_free_positions_under_concurrent_load(
    service: Service, received: Received
) -> None:
    c = service.client
    vms = await asyncio.gather(
        *(c.call("deploy_vm", {"name": f"v{i}", "secret": f"s{i % 5}"}) for i in range(120))
    )
    sids = {vm["sid"] for vm in vms}
    await received.until(
        lambda: {p["stream"][3:] for _, p in received.messages if p["type"] == "VmDeployed"} == sids
    )
    last = await service.app.store.last_position()
    await received.through(last)

    assert received.positions == list(range(1, last + 1))
    per_stream: dict[str, list[int]] = {}
    for _, payload in received.messages:
        per_stream.setdefault(payload["stream"], []).append(payload["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in per_stream.values())
    check_against_the_log(
        service.settings.prefix, received.messages, await full_log(service.app.store)
    )


# Catching up after a crash -------------------------------------------------------------------

T0 = datetime(2025, 1, 1, tzinfo=UTC)


async def append_quiet_history(
    store: SqliteEventStore, sid: str, name: str, i: int, *, deleted: bool = False
) -> None:
    """A VM that ended up running (or deleted): a complete history that asks the reactor nothing."""
    at = T0 + timedelta(seconds=i)
    events: list[Any] = [
        VmDeployRequested(
            sid=sid,
            name=name,
            owner="fp",
            image="ubuntu-24.04",
            cpu_count=1,
            memory_gb=1,
            disk_gb=10,
            rootfs_gb=2,
            at=at,
        ),
        VmDeployed(sid=sid, node_id=1 + i % 3, mycelium_ip=f"5a1::{i:x}", at=at),
    ]
    if deleted:
        events += [VmDeleteRequested(sid=sid, at=at), VmDeleted(sid=sid, at=at)]
    await store.append([StreamAppend(VMS.stream(sid), 0, tuple(NewEvent.of(e) for e in events))])


async def append_quiet_histories(store: SqliteEventStore, count: int, *, tag: str) -> None:
    """VMs that ended up running or deleted, one in three deleted."""
    for i in range(count):
        await append_quiet_history(store, f"vm_{tag}{i:03}", f"{tag}-{i}", i, deleted=i % 3 == 0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


def publisher_checkpoint(settings: Settings) -> int | None:
    with sqlite3.connect(settings.data_dir / "views.db") as db:
        row = db.execute("SELECT position FROM checkpoints WHERE name = 'publisher'").fetchone()
    return None if row is None else int(row[0])


async def test_events_committed_while_no_publisher_ran_are_published_at_start(
    settings: Settings, grid: LocalGrid, nc: Client
) -> None:
    """A crash right after commit: the events are in the log, nothing was ever published."""
    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        await append_quiet_histories(store, 20, tag="a")
        missed = await store.last_position()
        log = await full_log(store)

    async with subscribe(nc, settings.prefix) as received:
        async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            await received.through(missed)

        assert received.positions[:missed] == list(range(1, missed + 1))
        check_against_the_log(settings.prefix, received.messages[:missed], log)
    assert publisher_checkpoint(settings) == missed


async def test_a_publisher_whose_checkpoint_is_behind_catches_up_in_order(
    settings: Settings, grid: LocalGrid, nc: Client
) -> None:
    """Published up to N, checkpoint saved only up to K, more committed before the crash."""
    async with subscribe(nc, settings.prefix) as received:
        async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app:
            client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
            sids = [
                (await client.call("deploy_vm", {"name": f"live-{i}", "secret": "s"}))["sid"]
                for i in range(5)
            ]
            await received.until(lambda: all(received.saw(f"vm:{s}", "VmDeployed") for s in sids))
            published = await app.store.last_position()
            await received.through(published)
        assert received.positions == list(range(1, published + 1))
    assert publisher_checkpoint(settings) == published

    behind = 3
    with sqlite3.connect(settings.data_dir / "views.db") as db:
        db.execute("UPDATE checkpoints SET position = ? WHERE name = 'publisher'", (behind,))
    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        await append_quiet_histories(store, 10, tag="late")
        last = await store.last_position()
        log = await full_log(store)
    assert last > published

    async with subscribe(nc, settings.prefix) as received:
        async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            await received.through(last)

        expected = list(range(behind + 1, last + 1))
        assert received.positions[: len(expected)] == expected
        check_against_the_log(settings.prefix, received.messages, log)
    assert publisher_checkpoint(settings) == last


# Events no retry can publish ------------------------------------------------------------------

# stream ids an older version could have written: none is one NATS subject token
POISON_SIDS = ["evil\n", "cr\rlf", "tab\there", "sp ace", "dot.ted", "*", ">", "nul\x00", ""]


async def test_events_no_retry_can_publish_are_set_aside_and_the_events_after_them_flow(
    settings: Settings, grid: LocalGrid, nc: Client
) -> None:
    """Invalid subjects and a payload over max_payload, straight in the log: counted, skipped."""
    huge = "x" * (nc.max_payload + 1)
    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        await append_quiet_histories(store, 2, tag="before")
        for i, sid in enumerate(POISON_SIDS):
            await append_quiet_history(store, sid, f"poison-{i}", i)
        await append_quiet_history(store, "vm_huge", huge, 0)
        await append_quiet_histories(store, 4, tag="after")
        last = await store.last_position()
        log = await full_log(store)
    poison_streams = {VMS.stream(sid) for sid in POISON_SIDS}
    huge_position = next(p for p, e in log.items() if huge.encode() in e.data)
    poison = sorted([*(p for p, e in log.items() if e.stream in poison_streams), huge_position])
    assert len(poison) == 2 * len(POISON_SIDS) + 1

    with capture_logs() as logs:
        async with subscribe(nc, settings.prefix) as received:
            async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
                await received.through(last)
                client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
                health = await client.call("health")
                typed = await client.health()

    assert received.positions == [p for p in range(1, last + 1) if p not in poison]
    check_against_the_log(settings.prefix, received.messages, log)
    assert health["position"] == last
    assert health["events_set_aside"] == len(poison)
    assert health["last_set_aside_position"] == max(poison)
    assert (typed.events_set_aside, typed.last_set_aside_position) == (len(poison), max(poison))
    set_aside = [e for e in logs if e["event"] == "publisher.event_set_aside"]
    assert [e["position"] for e in set_aside] == sorted(poison)
    assert all(e["log_level"] == "error" for e in set_aside)
    # why and where, never the event's data
    assert all(
        set(e) == {"event", "log_level", "position", "stream", "type", "reason"} for e in set_aside
    )
    assert publisher_checkpoint(settings) == last


async def test_the_set_aside_count_survives_a_retried_batch_and_transient_failures_raise(
    nats_url: str,
) -> None:
    """A closed connection is not the event's fault: it raises (the follower retries), uncounted."""
    poison = RecordedEvent(
        position=7, stream="vm:a.b", version=1, type="VmDeployed", data=b"{}", recorded_at=T0
    )
    good = msgspec.structs.replace(poison, position=8, stream="vm:vm_ok")
    client = await nats.connect(nats_url)
    publisher = StatusPublisher(client, "t.v1")
    await publisher.handle([poison, good])
    await publisher.handle([poison, good])  # the follower re-sends a batch after a failure
    assert (publisher.set_aside.count, publisher.set_aside.last_position) == (1, 7)
    await client.close()

    with pytest.raises(nats.errors.ConnectionClosedError):
        await publisher.handle([good])
    assert (publisher.set_aside.count, publisher.set_aside.last_position) == (1, 7)


async def test_a_subscriber_gets_the_events_set_aside_live_from_events(service: Service) -> None:
    """The SDK's subscription fills the gap a set-aside event leaves, in order, exactly once."""
    store = service.app.store
    await append_quiet_history(store, "vm_first", "first", 0)
    seen: list[int] = []
    async with asyncio.timeout(10), service.client.subscribe() as events:
        async for event in events:
            seen.append(event.position)
            if event.position == 2:
                break
        await append_quiet_history(store, "dot.ted", "poison", 1)  # positions 3 and 4
        await append_quiet_history(store, "vm_after", "after", 2)
        last = await store.last_position()
        async for event in events:
            seen.append(event.position)
            if event.position == last:
                break
    assert seen == list(range(1, last + 1))
    health = await service.client.health()
    assert (health.events_set_aside, health.last_set_aside_position) == (2, 4)
