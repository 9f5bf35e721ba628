"""The aggregate cache never answers with a state older than what the store has committed."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec

from adapters.eventstore_sqlite import SqliteEventStore
from core.domain import VMS
from core.events import NewEvent, StreamAppend
from core.vm_events import VmDeployed, VmDeployRequested
from hero_deployer.app.aggregates import Aggregates
from tests.conftest import TOKEN, Service
from tests.helpers import wait_for_event

NOW = datetime(2026, 11, 25, tzinfo=UTC)
SID = "vm_0123456789abcdef"
STREAM = f"vm:{SID}"
REQUESTED = VmDeployRequested(
    sid=SID,
    name="a",
    owner="o",
    image="ubuntu-24.04",
    cpu_count=1,
    memory_gb=1,
    disk_gb=1,
    rootfs_gb=1,
    at=NOW,
)


async def test_a_commit_made_behind_the_cache_is_read_back(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "events.db") as store:
        vms = Aggregates(store, VMS)
        await store.append([StreamAppend(STREAM, 0, (NewEvent.of(REQUESTED),))])
        vm, version = await vms.load(STREAM)
        assert vm is not None and vm.status == "deploying" and version == 1

        # committed, but the committing command has not cached its state yet (a follower
        # woken by the commit loads first)
        deployed = VmDeployed(sid=SID, node_id=13, mycelium_ip="400::1", at=NOW)
        await store.append([StreamAppend(STREAM, 1, (NewEvent.of(deployed),))])
        assert store.known_version(STREAM) == 2

        vm, version = await vms.load(STREAM)
        assert vm is not None and vm.status == "running" and version == 2

        vms.remember(STREAM, None, 1)  # a late, older state never replaces a newer one
        assert (await vms.load(STREAM))[1] == 2


async def test_an_absent_stream_is_remembered_until_a_commit_creates_it(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "events.db") as store:
        vms = Aggregates(store, VMS)
        reads: list[str] = []
        assert store._point_reader is not None
        store._point_reader.set_trace_callback(reads.append)
        assert await vms.load(STREAM) == (None, 0)
        assert await vms.load(STREAM) == (None, 0)
        assert len(reads) == 1  # a missing sid named twice is read once, as an existing one is

        await store.append([StreamAppend(STREAM, 0, (NewEvent.of(REQUESTED),))])
        vm, version = await vms.load(STREAM)  # the remembered absence does not hide the commit
        assert vm is not None and vm.status == "deploying" and version == 1


async def test_a_missing_sid_costs_no_read_of_the_log(service: Service) -> None:
    """NotFound for a missing sid does the work of a wrong secret: no read of the log."""
    sid = (await service.client.call("deploy_vm", {"name": "web", "secret": "owner"}))["sid"]
    # the deploy's outcome is the last commit: after it the views can catch up with the log
    await wait_for_event(service.client, f"vm:{sid}", "VmDeployed")
    await service.client.call("get_vm", {"sid": sid, "secret": "owner"})  # views caught up
    reads: list[str] = []
    reader = service.app.store._point_reader
    assert reader is not None
    reader.set_trace_callback(reads.append)
    body = b'{"sid": "vm_000000000000ffffffff", "secret": "owner"}'
    missing = await service.request("stop_vm", body, {"Authorization": f"Bearer {TOKEN}"})
    wrong = await service.request(
        "stop_vm", msgspec.json.encode({"sid": sid, "secret": "not-the-owner"}),
        {"Authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    reader.set_trace_callback(None)
    assert missing == wrong and missing[0]["error"] == {
        "code": "NotFound",
        "message": "vm not found",
    }
    assert reads == []
