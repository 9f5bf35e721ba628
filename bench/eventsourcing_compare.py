"""The deploy workload through the `eventsourcing` library's SQLite application, for comparison.

In-process, without NATS: each save creates one VM aggregate with the fields of our
`VmDeployRequested` and commits it to a temporary SQLite file (WAL, SQLite's default
synchronous mode, FULL), one transaction per save.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate

from core.ports import DEFAULT_VM
from core.structs import from_fields
from core.vm_events import VmDeployRequested


@dataclass(kw_only=True)
class VmAggregate(Aggregate, created_event_name="DeployRequested"):
    """A VM as the library models it: its dataclass fields are its `DeployRequested` event's."""

    sid: str
    name: str
    owner: str
    image: str
    cpu_count: int
    memory_gb: int
    disk_gb: int
    rootfs_gb: int
    slice_sid: str
    node_id: int | None
    at: datetime
    status: str = field(init=False, default="deploying")


class Deployer(Application[object]):
    """The library's application, holding only VM aggregates."""

    def deploy(self, i: int) -> None:
        """Saves the VM our service would record for a deploy request with the default sizes."""
        request = from_fields(
            VmDeployRequested,
            DEFAULT_VM,
            sid=f"vm_{i:012d}",
            name=f"bench-{i}",
            owner=f"{i % 1000:064x}",  # a fingerprint-sized owner, as our events carry
            at=datetime.now(UTC),
        )
        self.save(VmAggregate(**msgspec.structs.asdict(request)))


def compare(n: int) -> float:
    """Saves `n` new VM aggregates one by one; prints and returns saves per second."""
    with tempfile.TemporaryDirectory() as tmp:
        app = Deployer(
            env={
                "PERSISTENCE_MODULE": "eventsourcing.sqlite",
                "SQLITE_DBNAME": str(Path(tmp) / "eventsourcing.db"),
            }
        )
        try:
            for i in range(min(200, n // 10)):  # warm-up, not measured
                app.deploy(10**9 + i)
            started = time.perf_counter()
            for i in range(n):
                app.deploy(i)
            elapsed = time.perf_counter() - started
        finally:
            app.close()
    per_second = n / elapsed
    print(f"{'eventsourcing SQLite application':<34} {per_second:>9,.0f} saves/s", flush=True)
    return per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30000, help="aggregates to save")
    compare(parser.parse_args().n)


if __name__ == "__main__":
    main()
