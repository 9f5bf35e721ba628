"""The VM view: the live view equals a rebuild, and its checkpoint moves with its rows."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import aiosqlite
import pytest
from nats.aio.client import Client

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.localgrid import LocalGrid
from core.contract import DeleteVm, DeployVm, RestartVm, StartVm, StopVm
from core.domain import VMS
from core.errors import DomainError
from core.events import EventRegistry, NewEvent, RecordedEvent, StreamAppend
from core.retry import RetryPolicy
from core.vm import (
    Context,
    RekeyVm,
    Vm,
    VmCommand,
    decide,
    evolve,
    fold,
)
from core.vm_events import (
    VM_EVENT_TYPES,
    VmDeleted,
    VmDeployed,
    VmDeployFailed,
    VmDeployRequested,
    VmOperationFailed,
)
from hero_deployer.app.bootstrap import PROJECTIONS, bootstrap
from hero_deployer.cli import main
from hero_deployer.sdk.client import HeroDeployerClient
from projections.runner import (
    Change,
    Projection,
    ProjectionRunner,
    connect_views,
    outdated,
    read_checkpoint,
    rebuild,
    timestamp_text,
)
from projections.user_view import UserProjection
from projections.vm_view import SELECT, Row, VmProjection, rows_of
from tests.conftest import TOKEN, Service, make_settings
from tests.helpers import wait_for_event

REGISTRY = EventRegistry(VM_EVENT_TYPES)


async def view_rows(conn: aiosqlite.Connection) -> list[tuple[object, ...]]:
    """Every VM row in sid order, read through the runner's own connection."""
    async with conn.execute(SELECT + " ORDER BY sid") as cursor:
        return [tuple(row) for row in await cursor.fetchall()]


def folded_rows(events: Sequence[RecordedEvent]) -> list[Row]:
    """The view as the fold of each VM stream says it must be."""
    streams: dict[str, list[object]] = defaultdict(list)
    for e in events:
        if e.stream.startswith("vm:"):
            streams[e.stream].append(REGISTRY.decode(e.type, e.data))
    vms = [fold(history) for history in streams.values()]  # type: ignore[arg-type]
    return sorted(rows_of(vm for vm in vms if vm is not None), key=lambda row: row[0])


async def rebuilt_rows(store: SqliteEventStore, path: Path) -> tuple[int, list[Row]]:
    conn = await connect_views(path)
    try:
        count = await rebuild(store, conn, PROJECTIONS())
        return count, await view_rows(conn)
    finally:
        await conn.close()


# Live traffic through the real service ------------------------------------------------------


async def exercise(client: HeroDeployerClient, grid: LocalGrid) -> int:
    """Deploys, stops, starts, restarts, deletes and re-keys a few dozen VMs; returns how many."""
    secrets = ["alice", "bob", "carol", ""]
    vms = await asyncio.gather(
        *(
            client.call(
                "deploy_vm",
                {
                    "name": f"vm-{i}",
                    "secret": secrets[i % 4],
                    "cpu_count": 1 + i % 8,
                    "memory_gb": 2 + i,
                    "slice_sid": f"slice-{i % 3}",
                },
            )
            for i in range(32)
        )
    )
    sids = [vm["sid"] for vm in vms]
    secret_of = {vm["sid"]: secrets[i % 4] for i, vm in enumerate(vms)}
    await asyncio.gather(*(wait_for_event(client, f"vm:{s}", "VmDeployed") for s in sids))

    async def act(op: str, chosen: Sequence[str]) -> None:
        await asyncio.gather(*(client.call(op, {"sid": s, "secret": secret_of[s]}) for s in chosen))

    await act("stop_vm", sids[0:12])
    await act("start_vm", sids[0:6])
    await act("restart_vm", sids[12:16])
    deleted = [*sids[6:9], *sids[16:24]]
    await act("delete_vm", deleted)

    grid.fail_next("deploy_vm", "node 13 is out of capacity")
    doomed = await client.call("deploy_vm", {"name": "doomed", "secret": "bob"})
    await wait_for_event(client, f"vm:{doomed['sid']}", "VmDeployFailed")
    await client.call("delete_vm", {"sid": doomed["sid"], "secret": "bob"})
    deleted.append(doomed["sid"])

    await client.call("migrate_secret", {"old_secret": "alice", "new_secret": "alice-2"})
    await asyncio.gather(*(wait_for_event(client, f"vm:{s}", "VmDeleted") for s in deleted))
    return len(sids) + 1


async def exercised_view(service: Service) -> tuple[int, int, list[Row]]:
    """Runs `exercise`, then returns the VMs made, the log's position and the live view there."""
    count = await exercise(service.client, service.grid)
    last = await service.app.store.last_position()
    await service.app.views.wait_for(last)
    return count, last, await service.app.deps.vm_view.all_rows()


async def test_the_live_view_equals_a_rebuild_from_scratch(
    service: Service, tmp_path: Path
) -> None:
    count, last, live = await exercised_view(service)
    store = service.app.store

    applied, rebuilt = await rebuilt_rows(store, tmp_path / "rebuilt" / "views.db")

    assert applied == last
    assert len(live) == count
    assert rebuilt == live
    assert live == folded_rows(await store.read_all(limit=100_000))
    statuses = {row[2] for row in live}
    assert statuses == {"running", "stopped", "deleted"}


@pytest.mark.parametrize(
    ("cache_size", "chunk", "page_size", "reads_ahead"),
    [
        # pages cut streams in the middle; a cache of 5 VMs makes the rebuild read rows back
        (5, 2, 7, 3),
        # rows go to the table as their streams end, chunk by chunk, while later pages fold
        (200_000, 3, 5, 2),
    ],
    ids=["small-pages-tiny-cache", "small-chunks"],
)
async def test_a_rebuild_in_small_pieces_builds_the_same_view(
    service: Service,
    tmp_path: Path,
    cache_size: int,
    chunk: int,
    page_size: int,
    reads_ahead: int,
) -> None:
    _, last, live = await exercised_view(service)

    conn = await connect_views(tmp_path / "small" / "views.db")
    try:
        projections = [VmProjection(cache_size=cache_size, chunk=chunk), UserProjection()]
        rebuilt = await rebuild(
            service.app.store, conn, projections, page_size=page_size, reads_ahead=reads_ahead
        )
        assert rebuilt == last
        assert await view_rows(conn) == live
        assert await read_checkpoint(conn, ProjectionRunner.name) == last
    finally:
        await conn.close()


async def test_a_failed_rebuild_leaves_the_view_its_layout_and_checkpoint_as_they_were(
    service: Service, tmp_path: Path
) -> None:
    """The tables are dropped and written again inside the rebuild's one transaction."""
    _, last, live = await exercised_view(service)

    class FailsLate(VmProjection):
        pages = completed = 0

        async def replay(self, conn: aiosqlite.Connection, changes: Sequence[Change]) -> None:
            await super().replay(conn, changes)
            self.pages += 1
            if self.pages == 20:
                raise Boom("the disk is full")

        async def complete(self, conn: aiosqlite.Connection, streams: Sequence[str]) -> None:
            await super().complete(conn, streams)
            self.completed += len(streams)

    conn = await connect_views(tmp_path / "failed" / "views.db")
    try:
        assert await rebuild(service.app.store, conn, PROJECTIONS()) == last
        failing = FailsLate(chunk=2)
        with pytest.raises(Boom):
            await rebuild(service.app.store, conn, [failing, UserProjection()], page_size=5)
        assert failing.pages == 20
        assert failing.completed > 2  # rows of finished streams went to SQLite, in chunks of 2
        assert await view_rows(conn) == live
        assert await read_checkpoint(conn, ProjectionRunner.name) == last
        assert await outdated(conn, PROJECTIONS()) == []
    finally:
        await conn.close()


async def test_a_view_with_an_older_layout_is_rebuilt_when_the_service_starts(
    tmp_path: Path, nc: Client
) -> None:
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        await exercise(HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix), grid)
        last = await app.store.last_position()
        await app.views.wait_for(last)
        live = await app.deps.vm_view.all_rows()
        listed = await HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix).call(
            "list_vms", {"secret": "bob"}
        )

    with sqlite3.connect(settings.data_dir / "views.db") as db:  # as version 1 left it
        db.execute("DROP TABLE vms")
        db.execute(
            "CREATE TABLE vms (sid TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL,"
            " status TEXT NOT NULL, created_at TEXT NOT NULL, json BLOB NOT NULL)"
        )
        db.execute("INSERT INTO vms VALUES ('vm_stale', 'x', 'stale', 'running', '', x'7b7d')")
        db.execute("DELETE FROM layouts")

    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        assert await app.deps.vm_view.all_rows() == live
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        assert await client.call("list_vms", {"secret": "bob"}) == listed
        assert listed["vms"]

    with sqlite3.connect(settings.data_dir / "views.db") as db:
        assert dict(db.execute("SELECT name, version FROM layouts").fetchall()) == {
            "vms": VmProjection.version,
            "users": UserProjection.version,
        }


async def test_a_runner_with_small_batches_builds_the_same_view(
    service: Service, tmp_path: Path
) -> None:
    """Batches that cut streams in the middle must continue each VM from its stored row."""
    _, last, live = await exercised_view(service)

    conn = await connect_views(tmp_path / "small" / "views.db")
    try:
        async with ProjectionRunner(service.app.store, conn, PROJECTIONS(), batch_size=3) as run:
            await run.wait_for(last)
        assert await view_rows(conn) == live
        assert await read_checkpoint(conn, ProjectionRunner.name) == last
    finally:
        await conn.close()


async def test_the_rebuild_command_leaves_the_view_equal_to_the_live_one(
    tmp_path: Path, nc: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        await exercise(client, grid)
        last = await app.store.last_position()
        await app.views.wait_for(last)
        live = await app.deps.vm_view.all_rows()

    views_db = settings.data_dir / "views.db"
    with sqlite3.connect(views_db) as db:  # damage the view: rebuild must not trust it
        db.execute("DELETE FROM vms WHERE rowid % 2 = 0")
        db.execute("UPDATE vms SET status = 'running', json = '{}'")
        db.execute(
            "INSERT INTO vms SELECT 'vm_ghost', owner, status, created_at, json FROM vms LIMIT 1"
        )
        db.execute("UPDATE checkpoints SET position = 3 WHERE name = 'views'")

    code = await asyncio.to_thread(main, ["rebuild", "--data-dir", str(settings.data_dir)])

    assert code == 0
    assert f"rebuilt views from {last} events" in capsys.readouterr().out
    conn = await connect_views(views_db)
    try:
        assert await view_rows(conn) == live
        assert await read_checkpoint(conn, ProjectionRunner.name) == last
    finally:
        await conn.close()


# Checkpoints, without NATS: a store, a views database, and synthetic histories -------------

T0 = datetime(2025, 1, 1, tzinfo=UTC)
OWNERS = ["fp-a", "fp-b", "fp-c"]


async def drive(store: SqliteEventStore, steps: int, *, seed: int) -> None:
    """Appends a valid, interleaved history: random commands on random VMs, decided by the core."""
    rng = random.Random(seed)
    states: dict[str, tuple[Vm | None, int]] = {}
    clock = await store.last_position()
    while steps > 0:
        clock += 1
        now = T0 + timedelta(seconds=clock)
        if not states or rng.random() < 0.15:
            sid = f"vm_{seed}_{len(states):04}"
            command: VmCommand = DeployVm(name=f"n{len(states)}", secret="", cpu_count=2)
            ctx = Context(now=now, owner=rng.choice(OWNERS), new_sid=sid)
            vm, version = None, 0
        else:
            sid = rng.choice(sorted(states))
            vm, version = states[sid]
            assert vm is not None
            commands: list[tuple[VmCommand, int]] = [
                (StartVm(sid=sid, secret=""), 6),
                (StopVm(sid=sid, secret=""), 6),
                (RestartVm(sid=sid, secret=""), 3),
                (DeleteVm(sid=sid, secret=""), 1),
                (VmDeployed(sid=sid, node_id=rng.randint(1, 50), mycelium_ip="5a1::1", at=now), 6),
                (VmDeployFailed(sid=sid, error="full", at=now), 1),
                (VmDeleted(sid=sid, at=now), 2),
                (VmOperationFailed(sid=sid, operation="stop", error="timeout", at=now), 1),
                (RekeyVm(sid=sid, new_owner=rng.choice(OWNERS)), 1),
            ]
            (command,) = rng.choices([c for c, _ in commands], [w for _, w in commands])
            ctx = Context(now=now, owner=vm.owner)
        try:
            events = decide(vm, command, ctx)
        except DomainError:
            continue
        if not events:
            continue
        await store.append(
            [StreamAppend(VMS.stream(sid), version, tuple(NewEvent.of(e) for e in events))]
        )
        for event in events:
            vm = evolve(vm, event)
        states[sid] = (vm, version + len(events))
        steps -= len(events)


class Seen:
    """A projection that stores every position it is given, inside the runner's transaction."""

    name = "seen"

    async def create(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("CREATE TABLE IF NOT EXISTS seen (position INTEGER NOT NULL)")

    def rolled_back(self) -> None:
        pass

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        await conn.executemany("INSERT INTO seen VALUES (?)", [(e.position,) for e in events])

    @staticmethod
    async def positions(conn: aiosqlite.Connection) -> list[int]:
        async with conn.execute("SELECT position FROM seen ORDER BY position") as cursor:
            return [row[0] for row in await cursor.fetchall()]


class Boom(Exception):
    pass


class FailOnce:
    """Fails the first batch that holds `position`, as a crash in the middle of a batch would."""

    name = "fail-once"

    def __init__(self, position: int) -> None:
        self.position = position
        self.failed = False

    async def create(self, conn: aiosqlite.Connection) -> None:
        pass

    def rolled_back(self) -> None:
        pass

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        if not self.failed and events[0].position <= self.position <= events[-1].position:
            self.failed = True
            raise Boom(f"crashed while applying position {self.position}")


class Recorder:
    """Remembers, in memory, every position it was asked to apply."""

    name = "recorder"

    def __init__(self) -> None:
        self.positions: list[int] = []

    async def create(self, conn: aiosqlite.Connection) -> None:
        pass

    def rolled_back(self) -> None:
        pass

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        self.positions.extend(e.position for e in events)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    async with SqliteEventStore(tmp_path / "events.db") as store:
        yield store


async def test_drive_makes_a_rich_history(store: SqliteEventStore) -> None:
    await drive(store, 300, seed=1)
    log = await store.read_all(limit=10_000)
    assert {e.type for e in log} == {t.__name__ for t in VM_EVENT_TYPES}
    rows = folded_rows(log)
    assert {row[2] for row in rows} >= {"running", "stopped", "deleted"}
    assert len({row[1] for row in rows}) == len(OWNERS)


async def test_a_failed_batch_rolls_back_its_rows_and_its_checkpoint(
    store: SqliteEventStore, tmp_path: Path
) -> None:
    await drive(store, 100, seed=2)
    last = await store.last_position()
    log = await store.read_all(limit=10_000)
    conn = await connect_views(tmp_path / "views.db")
    try:
        projections: list[Projection] = [VmProjection(), Seen(), FailOnce(position=55)]
        for projection in projections:
            await projection.create(conn)
        runner = ProjectionRunner(store, conn, projections, batch_size=10)

        with pytest.raises(Boom):
            await runner.catch_up()

        assert runner.position == 50
        assert await read_checkpoint(conn, ProjectionRunner.name) == 50
        assert await Seen.positions(conn) == list(range(1, 51))
        assert await view_rows(conn) == folded_rows(log[:50])

        await runner.catch_up()  # the retry applies the failed batch once, from the checkpoint
        await runner.catch_up()  # and running again finds nothing to do

        assert runner.position == last
        assert await read_checkpoint(conn, ProjectionRunner.name) == last
        assert await Seen.positions(conn) == list(range(1, last + 1))
        assert await view_rows(conn) == folded_rows(log)
    finally:
        await conn.close()


async def test_reopening_applies_only_events_after_the_checkpoint(
    store: SqliteEventStore, tmp_path: Path
) -> None:
    views = tmp_path / "views.db"
    await drive(store, 300, seed=3)
    first = await store.last_position()

    conn = await connect_views(views)
    async with ProjectionRunner(store, conn, [VmProjection(), Seen()], batch_size=64) as runner:
        await runner.wait_for(first)
    await conn.close()

    await drive(store, 200, seed=4)
    last = await store.last_position()

    recorder = Recorder()
    conn = await connect_views(views)
    try:
        async with ProjectionRunner(
            store, conn, [VmProjection(), Seen(), recorder], batch_size=64
        ) as runner:
            assert runner.position == first
            await runner.wait_for(last)
        assert recorder.positions == list(range(first + 1, last + 1))
        assert await Seen.positions(conn) == list(range(1, last + 1))
        assert await view_rows(conn) == folded_rows(await store.read_all(limit=10_000))
    finally:
        await conn.close()

    idle = Recorder()
    conn = await connect_views(views)
    try:
        async with ProjectionRunner(store, conn, [VmProjection(), Seen(), idle]) as runner:
            await runner.catch_up()
            assert runner.position == last
        assert idle.positions == []
        assert await Seen.positions(conn) == list(range(1, last + 1))
    finally:
        await conn.close()

    _, rebuilt = await rebuilt_rows(store, tmp_path / "rebuilt.db")
    conn = await connect_views(views)
    try:
        assert await view_rows(conn) == rebuilt
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 25, 18, 4, 5, tzinfo=UTC),
        datetime(2026, 11, 25, 18, 4, 5, 120000, tzinfo=UTC),
        datetime(2026, 11, 25, 18, 4, 5, 7, tzinfo=UTC),
        datetime(1999, 1, 2, 3, 4, 5, 999999, tzinfo=UTC),
        datetime(2026, 11, 25, 18, 4, 5, 120, tzinfo=timezone(timedelta(hours=-5))),
        datetime(2026, 11, 25, 18, 4, 5),
    ],
)
def test_timestamp_text_is_isoformat(value: datetime) -> None:
    """The view's time columns keep their form (and so their order) whichever path wrote them."""
    assert timestamp_text(value) == value.isoformat()


async def test_rows_a_rebuild_writes_are_byte_for_byte_the_rows_the_live_view_writes(
    tmp_path: Path,
) -> None:
    """The rebuild hands SQLite its rows as JSON; quotes, escapes, non-ASCII text and times
    with and without microseconds or a UTC offset come out as the live path stores them."""
    at = datetime(2026, 11, 25, 18, 4, 5, tzinfo=UTC)
    history = [
        VmDeployRequested(
            sid=f"vm_{i}",
            name=f"vm-{i}",
            owner="ab" * 32,
            image="ubuntu-24.04",
            cpu_count=2,
            memory_gb=4,
            disk_gb=50,
            rootfs_gb=16,
            node_id=i or None,
            at=when,
        )
        for i, when in enumerate(
            [
                at,
                at.replace(microsecond=120000),
                at.replace(microsecond=7, tzinfo=timezone(timedelta(hours=-5))),
            ]
        )
    ] + [VmDeployFailed(sid="vm_1", error='node "13" \\ out of capacity: é漢😀\n\t\x01', at=at)]
    recorded = [
        RecordedEvent(
            position=position,
            stream=f"vm:{event.sid}",
            version=1 if isinstance(event, VmDeployRequested) else 2,
            type=type(event).__name__,
            data=NewEvent.of(event).data,
            recorded_at=at,
            request_id="r",
        )
        for position, event in enumerate(history, start=1)
    ]

    live_conn = await connect_views(tmp_path / "live.db")
    rebuilt_conn = await connect_views(tmp_path / "rebuilt.db")
    try:
        live, rebuilt = VmProjection(), VmProjection(chunk=1)
        await live.create(live_conn)
        await live.apply(live_conn, recorded)
        await rebuilt.create(rebuilt_conn)
        await rebuilt.replay(
            rebuilt_conn,
            [(e.position, e.stream, ev) for e, ev in zip(recorded, history, strict=True)],
        )
        await rebuilt.complete(rebuilt_conn, ["vm:vm_0", "vm:vm_2"])
        await rebuilt.flush(rebuilt_conn)
        assert await view_rows(rebuilt_conn) == await view_rows(live_conn)
        assert len(await view_rows(live_conn)) == 3
    finally:
        await live_conn.close()
        await rebuilt_conn.close()
