"""The event store alone: append throughput (group commit, synchronous=FULL) and the chain's cost.

In-process, without NATS. `--appenders` tasks each append one deploy-sized event at a time to
new streams, as concurrent VM deploy requests do; then one appender writes `--events` events
in appends of 100. Also prints the cost of hashing one event and of `audit verify` per event.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.sqlite_runtime import disable_memory_statistics
from core.events import NewEvent, StreamAppend
from core.vm_events import VmDeployRequested


def deploy_event(i: int) -> NewEvent:
    """A `VmDeployRequested` the size the service writes."""
    return NewEvent.of(
        VmDeployRequested(
            sid=f"vm_{i:016x}",
            name=f"bench-{i}",
            owner=f"{i % 1000:064x}",
            image="ubuntu-24.04",
            cpu_count=16,
            memory_gb=8,
            disk_gb=200,
            rootfs_gb=16,
            at=datetime.now(UTC),
        )
    )


async def concurrent_appends(path: Path, n: int, appenders: int) -> tuple[float, float]:
    """Single-event appends from `appenders` tasks at once: appends per second, CPU µs each."""
    events = [deploy_event(i) for i in range(n)]
    async with SqliteEventStore(path) as store:

        async def appender(k: int) -> None:
            for i in range(k, n, appenders):
                await store.append([StreamAppend(f"vm:{i:016x}", 0, (events[i],))])

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(appender(k) for k in range(appenders)))
        return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


async def bulk_appends(path: Path, n: int, per_append: int = 100) -> tuple[float, float]:
    """One appender writing `per_append` events per append: events per second, CPU µs each."""
    events = [deploy_event(i) for i in range(n)]
    async with SqliteEventStore(path) as store:
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, n, per_append):
            chunk = tuple(events[start : start + per_append])
            await store.append([StreamAppend(f"vm:bulk{start}", 0, chunk)])
        return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6


def chain_costs(path: Path) -> tuple[float, float] | None:
    """Microseconds per event to hash one event, and to verify the log at `path`."""
    if not hasattr(SqliteEventStore, "head_hash"):  # the store before the chain
        return None
    from adapters.event_chain import GENESIS, link, verify

    data = deploy_event(0).data
    at = datetime.now(UTC).isoformat()
    started = time.perf_counter()
    previous = GENESIS
    for i in range(100_000):
        previous = link(previous, i + 1, "vm:vm_0000000000000000", 1, "VmDeployRequested", data, at)
    per_link = (time.perf_counter() - started) / 100_000 * 1e6
    db = sqlite3.connect(path)
    started = time.perf_counter()
    report = verify(db)
    per_verify = (time.perf_counter() - started) / max(report.events, 1) * 1e6
    db.close()
    assert report.ok
    return per_link, per_verify


def main() -> None:
    disable_memory_statistics()  # as `hero-deployer` does before it opens a database
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help="single-event appends")
    parser.add_argument("--appenders", type=int, default=64)
    parser.add_argument("--events", type=int, default=200_000, help="events in appends of 100")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single = asyncio.run(concurrent_appends(Path(tmp) / "a.db", args.n, args.appenders))
        bulk = asyncio.run(bulk_appends(Path(tmp) / "b.db", args.events))
        costs = chain_costs(Path(tmp) / "b.db")
    label = f"appends, {args.appenders} at once"
    print(f"{label:<34} {single[0]:>9,.0f} appends/s   CPU {single[1]:6.2f} µs/append")
    print(
        f"{'appends of 100 events, one writer':<34} {bulk[0]:>9,.0f} events/s"
        f"    CPU {bulk[1]:6.2f} µs/event"
    )
    if costs is not None:
        print(f"{'hash chain':<34} {costs[0]:9.2f} µs/event   verify {costs[1]:.2f} µs/event")


if __name__ == "__main__":
    main()
