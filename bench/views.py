"""The view benchmarks: `rebuild` over a generated log, and a tenant's listing on the rebuilt view.

The log is written straight into a fresh `events.db` with the store's own schema and encoding
(msgspec JSON of the core event Structs, metadata `{}`), so generating a million events takes
seconds instead of the hours the service would need to decide them one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from adapters.event_chain import chained
from adapters.eventstore_sqlite import SqliteEventStore
from adapters.keyfiles import load_or_create_key
from adapters.sqlite_events import INSERT_EVENT, SCHEMA
from adapters.sqlite_runtime import disable_memory_statistics
from core.contract import ListVms
from core.events import Event, event_data
from core.registry import OPERATIONS
from core.secrets import Fingerprinter
from core.vm_events import (
    VmDeleted,
    VmDeleteRequested,
    VmDeployed,
    VmDeployFailed,
    VmDeployRequested,
    VmOperationFailed,
    VmRestarted,
    VmSecretMigrated,
    VmStarted,
    VmStopped,
)
from hero_deployer.app.bootstrap import PROJECTIONS
from hero_deployer.app.natsserver import NatsServer, free_port
from projections.runner import connect_views, rebuild

LIST = OPERATIONS.row(ListVms).name  # the listing a tenant's secret reads


T0 = datetime(2025, 1, 1, tzinfo=UTC)
SPAN = 90 * 24 * 3600.0
"""The log covers 90 days of activity."""

METADATA = b"{}"
IMAGES = ("ubuntu-24.04", "ubuntu-22.04", "debian-12", "alpine-3.20")

Row = tuple[int, str, int, str, bytes, bytes, str]
T = TypeVar("T")


def tenant_secret(i: int) -> str:
    """The secret of tenant `i`, as `bench.load` sends it for a listing."""
    return f"tenant-{i}"


def _history(
    rng: random.Random, sid: str, length: int, owners: list[str], owner: int
) -> Iterator[tuple[float, Event]]:
    """One VM's life of `length` events, each with its time in seconds since T0."""
    t = rng.uniform(0, SPAN)

    def at() -> datetime:
        return T0 + timedelta(seconds=t)

    yield (
        t,
        VmDeployRequested(
            sid=sid,
            name=f"vm-{sid[3:11]}",
            owner=owners[owner],
            image=rng.choice(IMAGES),
            cpu_count=rng.choice((1, 2, 4, 8, 16)),
            memory_gb=rng.choice((2, 4, 8, 16, 32)),
            disk_gb=rng.choice((50, 100, 200, 500)),
            rootfs_gb=16,
            slice_sid=f"slice-{owner}-{rng.randrange(3)}" if rng.random() < 0.3 else "",
            node_id=rng.randrange(1, 200) if rng.random() < 0.1 else None,
            at=at(),
        ),
    )
    if length == 1:
        return  # still deploying
    t += rng.uniform(20, 120)
    if length in (2, 4) and rng.random() < 0.3:
        yield t, VmDeployFailed(sid=sid, error="node 13 is out of capacity", at=at())
        if length == 4:
            t += rng.expovariate(1 / 600)
            yield t, VmDeleteRequested(sid=sid, at=at())
            t += rng.uniform(1, 30)
            yield t, VmDeleted(sid=sid, at=at())
        return
    node = rng.randrange(1, 200)
    yield t, VmDeployed(sid=sid, node_id=node, mycelium_ip=f"5a1:{node:x}::{owner:x}", at=at())
    middle = length - 2
    delete = middle >= 2 and rng.random() < 0.1
    if delete:
        middle -= 2
    running = True
    migrated = False
    for _ in range(middle):
        t += rng.expovariate(1 / 3600)
        roll = rng.random()
        if not migrated and roll < 0.02:
            owner = (owner + 1 + rng.randrange(len(owners) - 1)) % len(owners)
            migrated = True
            yield t, VmSecretMigrated(sid=sid, owner=owners[owner], at=at())
        elif roll < 0.06:
            yield (
                t,
                VmOperationFailed(
                    sid=sid, operation="stop" if running else "start", error="timeout", at=at()
                ),
            )
        elif running and roll < 0.3:
            yield t, VmRestarted(sid=sid, at=at())
        elif running:
            running = False
            yield t, VmStopped(sid=sid, at=at())
        else:
            running = True
            yield t, VmStarted(sid=sid, at=at())
    if delete:
        t += rng.expovariate(1 / 3600)
        yield t, VmDeleteRequested(sid=sid, at=at())
        t += rng.uniform(1, 30)
        yield t, VmDeleted(sid=sid, at=at())


def generate(path: Path, events: int, vms: int, owners: list[str], *, seed: int = 7) -> int:
    """Writes a log of about `events` events over `vms` VMs into a fresh `events.db`."""
    rng = random.Random(seed)
    lengths = [1] * vms
    for i in rng.choices(range(vms), k=max(0, events - vms)):
        lengths[i] += 1
    timeline: list[tuple[float, int, Event]] = []
    for i, length in enumerate(lengths):
        sid = "vm_" + rng.randbytes(8).hex()
        owner = rng.randrange(len(owners))
        timeline.extend((t, i, e) for t, e in _history(rng, sid, length, owners, owner))
    timeline.sort(key=lambda item: item[0])

    encode = event_data  # the stored form: the tag lives in the type column
    versions = [0] * vms
    rows: list[Row] = []
    for position, (t, i, event) in enumerate(timeline, start=1):
        versions[i] += 1
        recorded_at = (T0 + timedelta(seconds=t + 0.001)).isoformat()
        rows.append(
            (
                position,
                "vm:" + event.sid,  # type: ignore[attr-defined]
                versions[i],
                type(event).__name__,
                encode(event),
                METADATA,
                recorded_at,
            )
        )
    del timeline
    hashed = chained(rows)  # the store's hash chain (adapters/event_chain.py)
    del rows
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # for generating only: the store uses FULL
        db.executescript(SCHEMA)
        for start in range(0, len(hashed), 200_000):
            db.execute("BEGIN")
            db.executemany(INSERT_EVENT, hashed[start : start + 200_000])
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return len(hashed)


async def timed_rebuild(data: Path) -> tuple[int, float]:
    """Runs the `hero-deployer rebuild` path on `data`; returns events applied and seconds."""
    async with SqliteEventStore(data / "events.db") as store:
        conn = await connect_views(data / "views.db")
        try:
            started = time.perf_counter()
            applied = await rebuild(store, conn, PROJECTIONS())
            return applied, time.perf_counter() - started
        finally:
            await conn.close()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` on uvloop, as the `hero-deployer` CLI does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def mark_followers_caught_up(data: Path, position: int) -> None:
    """Sets the reactor's and the publisher's checkpoints to the end of the log.

    The service then starts as one restarted with nothing left to do, instead of re-running the
    side effects and re-publishing a million events while the listing is being measured.
    """
    with sqlite3.connect(data / "views.db") as db:
        db.executemany(
            "INSERT OR REPLACE INTO checkpoints (name, position) VALUES (?, ?)",
            [("vm-reactor", position), ("publisher", position)],
        )


def query_plan(data: Path) -> list[str]:
    with sqlite3.connect(data / "views.db") as db:
        rows = db.execute(
            "EXPLAIN QUERY PLAN SELECT json FROM vms WHERE owner = ? AND status != 'deleted'"
            " ORDER BY created_at, sid",
            ("x",),
        ).fetchall()
    return [str(row[-1]) for row in rows]


def list_figures(data: Path, owners: int, requests: int) -> None:
    from bench.run import ServiceProcess, load, show

    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    def measure() -> None:
        with ServiceProcess(url, data):
            for in_flight in (1, 64):
                figures = load(url, LIST, requests, concurrency=in_flight, tenants=owners)
                show(f"{LIST}, {in_flight} in flight", figures)

    async def serve_nats() -> None:
        async with NatsServer(port=port, data_dir=data / "nats", config=None):
            await asyncio.to_thread(measure)

    asyncio.run(serve_nats())


def rebuild_and_list(
    events: int,
    vms: int,
    *,
    do_list: bool,
    owners: int = 10_000,
    requests: int = 2000,
    keep: Path | None = None,
) -> float:
    """Generates a log, times its rebuild, and optionally the listing on the result."""
    with tempfile.TemporaryDirectory() as tmp:
        data = keep or Path(tmp)
        data.mkdir(parents=True, exist_ok=True)
        key = load_or_create_key(
            data / "fingerprint.key", os.environ.get("HERO_DEPLOYER_FINGERPRINT_KEY")
        )
        fingerprint = Fingerprinter(key)
        fingerprints = [fingerprint(tenant_secret(i)) for i in range(owners)]
        started = time.perf_counter()
        count = generate(data / "events.db", events, vms, fingerprints)
        print(
            f"    generated {count:,} events over {vms:,} VMs and {owners} owners"
            f" in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        applied, seconds = _run(timed_rebuild(data))
        per_second = applied / seconds
        print(
            f"{'rebuild':<34} {per_second:>9,.0f} events/s   {applied:,} events in {seconds:.2f} s",
            flush=True,
        )
        with sqlite3.connect(data / "views.db") as db:
            statuses = collections.Counter(
                dict(db.execute("SELECT status, COUNT(*) FROM vms GROUP BY status").fetchall())
            )
        print(f"    view: {sum(statuses.values()):,} VMs {dict(statuses)}", flush=True)
        if do_list:
            print(f"    {LIST} query plan: " + "; ".join(query_plan(data)), flush=True)
            mark_followers_caught_up(data, applied)
            list_figures(data, owners, requests)
        return per_second


def main() -> None:
    disable_memory_statistics()  # as `hero-deployer` does before it opens a database
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--vms", type=int, default=100_000)
    parser.add_argument("--owners", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2000, help="listing requests per run")
    parser.add_argument("--no-list", action="store_true", help="time the rebuild only")
    parser.add_argument("--keep", type=Path, help="a data dir to leave the log and views in")
    args = parser.parse_args()
    rebuild_and_list(
        args.events,
        args.vms,
        do_list=not args.no_list,
        owners=args.owners,
        requests=args.requests,
        keep=args.keep,
    )


if __name__ == "__main__":
    main()
