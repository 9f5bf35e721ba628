"""A full disk: queries answer Unavailable at once, refused outcomes wait, nothing is lost.

The disk is made full with SQLite's own limit, `PRAGMA max_page_count`, set on the service's
connections to events.db and views.db (`bootstrap(on_connect=...)`): a write that needs a new
page fails with SQLITE_FULL, "database or disk is full", exactly as on a full file system.
The service runs against the real nats-server, the real database files and the local grid.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from nats.aio.client import Client
from structlog.testing import capture_logs

from adapters.localgrid import LocalGrid
from core.errors import NotFound
from core.retry import RetryPolicy
from core.vm_events import VmOperationFailed
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.app.settings import Settings
from hero_deployer.app.vm_handlers import OutcomeRecorder
from hero_deployer.sdk.client import HeroDeployerClient
from projections.runner import SqlRunner
from tests.conftest import TOKEN, Service, make_settings
from tests.helpers import deploy_running
from tests.test_users_e2e import Fifo, terminal

AUTH = {"Authorization": f"Bearer {TOKEN}"}
EVENTS_DB = "events.db"
VIEWS_DB = "views.db"
NO_LIMIT = 1 << 30


class PageLimits:
    """`PRAGMA max_page_count` on every writing connection of a database file, now and later.

    The limit is per connection, so it is set on each connection as it opens and on every one
    open when it changes. A limit of 1 means "no page more than now": SQLite does "not let the
    maximum page count fall below the current page count" (sqlite/sqlite, src/vdbe.c,
    OP_MaxPgcnt).
    """

    def __init__(self) -> None:
        self._limits: dict[str, int] = {}
        self._open: list[tuple[str, SqlRunner]] = []

    async def __call__(self, path: Path, execute: SqlRunner) -> None:
        self._open.append((path.name, execute))
        if path.name in self._limits:
            await execute(f"PRAGMA max_page_count = {self._limits[path.name]}")

    async def full(self, name: str) -> None:
        await self._set(name, 1)

    async def room(self, name: str) -> None:
        await self._set(name, NO_LIMIT)

    def closed(self) -> None:
        """The service stopped: its connections are gone, the limits stay for the next one."""
        self._open.clear()

    async def _set(self, name: str, pages: int) -> None:
        self._limits[name] = pages
        for file, execute in self._open:
            if file == name:
                await execute(f"PRAGMA max_page_count = {pages}")


class LogWatch:
    """A structlog processor that keeps each entry and lets a test wait for one by name."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._logged = asyncio.Event()

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        self.entries.append(dict(event_dict))
        self._logged.set()
        return event_dict

    def count(self, event: str) -> int:
        return sum(1 for entry in self.entries if entry["event"] == event)

    async def wait(self, event: str, *, at_least: int = 1, timeout: float = 30.0) -> None:
        """Returns once `event` was logged `at_least` times."""
        async with asyncio.timeout(timeout):
            while True:
                self._logged.clear()
                if self.count(event) >= at_least:
                    return
                await self._logged.wait()


class Gate:
    """The local grid's boot time: every VM boots once the test opens the gate."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.waiting = 0
        self.all_waiting = asyncio.Event()
        self.opened = asyncio.Event()

    async def sleep(self, _delay: float) -> None:
        self.waiting += 1
        if self.waiting >= self.expected:
            self.all_waiting.set()
        await self.opened.wait()


@asynccontextmanager
async def serving(
    settings: Settings, nc: Client, grid: LocalGrid, limits: PageLimits
) -> AsyncIterator[Service]:
    async with bootstrap(
        settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01), on_connect=limits
    ) as app:
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix, timeout=3.0)
        yield Service(app=app, client=client, settings=settings, grid=grid, nc=nc)
    limits.closed()


async def ask(service: Service, operation: str, body: dict[str, Any]) -> dict[str, Any]:
    """The reply's envelope, awaited for at most 3 s (a reply that never comes fails here)."""
    msg = await service.nc.request(
        f"{service.settings.prefix}.{operation}", json.dumps(body).encode(), 3.0, headers=AUTH
    )
    reply: dict[str, Any] = json.loads(msg.data)
    return reply


def unavailable(reply: dict[str, Any]) -> bool:
    return reply["ok"] is False and reply["error"]["code"] == "Unavailable"


def count_events(data_dir: Path, event_type: str) -> int:
    with sqlite3.connect(data_dir / EVENTS_DB) as db:
        row = db.execute("SELECT COUNT(*) FROM events WHERE type = ?", (event_type,)).fetchone()
    return int(row[0])


async def test_queries_answer_unavailable_while_the_views_are_full_then_the_data(
    tmp_path: Path, nc: Client
) -> None:
    limits = PageLimits()
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        serving(settings, nc, grid, limits) as service,
    ):
        first = await service.client.call("deploy_vm", {"name": "first", "secret": "s"})
        await limits.full(VIEWS_DB)
        sids = [first["sid"]]
        for i in range(40):  # the store takes them; the views need pages they cannot get
            vm = await service.client.call("deploy_vm", {"name": f"vm{i}", "secret": "s"})
            sids.append(vm["sid"])
        last = sids[-1]

        queries = [
            ("get_vm", {"sid": last, "secret": "s"}),
            ("list_vms", {"secret": "s"}),
            ("events", {"stream": f"vm:{last}"}),
            ("get_user", {"username": "alice"}),
            ("list_users", {}),
        ]
        for operation, body in queries:
            reply = await ask(service, operation, body)
            assert unavailable(reply), (operation, reply)
        assert service.app.views.failing
        assert service.app.views.position < service.app.store.position
        health = await ask(service, "health", {})
        assert health["ok"] is True  # the service keeps serving
        later = await service.client.call("deploy_vm", {"name": "later", "secret": "s"})
        sids.append(later["sid"])

        await limits.room(VIEWS_DB)
        async with asyncio.timeout(30):
            await service.app.views.reached(service.app.store.position)

        got = await ask(service, "get_vm", {"sid": last, "secret": "s"})
        assert got["ok"] is True and got["result"]["sid"] == last
        listed = await ask(service, "list_vms", {"secret": "s"})
        assert sorted(vm["sid"] for vm in listed["result"]["vms"]) == sorted(sids)
        page = await ask(service, "events", {"stream": f"vm:{last}"})
        assert page["result"]["events"][0]["type"] == "VmDeployRequested"
        assert (await ask(service, "list_users", {}))["result"] == {"users": []}
        assert (await ask(service, "get_user", {"username": "alice"}))["error"][
            "code"
        ] == "NotFound"
        assert not service.app.views.failing


async def test_queries_give_up_within_a_second_while_another_writer_holds_the_views(
    service: Service,
) -> None:
    """A batch stuck on a lock (SQLite's busy timeout is 5 s) does not hold a query longer."""
    first = await service.client.call("deploy_vm", {"name": "first", "secret": "s"})
    other = sqlite3.connect(
        service.settings.data_dir / VIEWS_DB, isolation_level=None, check_same_thread=False
    )
    try:
        # another process writing views.db (off the loop: the runner may hold the lock a moment)
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
        vm = await service.client.call("deploy_vm", {"name": "second", "secret": "s"})
        reply = await ask(service, "get_vm", {"sid": vm["sid"], "secret": "s"})
        assert unavailable(reply)
        assert (await ask(service, "health", {}))["ok"] is True
    finally:
        other.execute("ROLLBACK")
        other.close()
    async with asyncio.timeout(30):
        await service.app.views.reached(service.app.store.position)
    listed = await service.client.call("list_vms", {"secret": "s"})
    assert [v["sid"] for v in listed["vms"]] == [first["sid"], vm["sid"]]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "across-a-restart"])
async def test_outcomes_the_full_store_refused_are_recorded_once_it_has_room(
    tmp_path: Path, nc: Client, restart: bool
) -> None:
    vms = 64
    limits = PageLimits()
    gate = Gate(expected=vms)
    settings = make_settings(tmp_path / "data")
    data_dir = settings.data_dir
    watch = LogWatch()
    with capture_logs(processors=[watch]):
        grid = LocalGrid(
            data_dir=tmp_path / "grid",
            deploy_delay=1.0,
            action_delay=0,
            ssh=False,
            sleep=gate.sleep,
        )
        async with grid:  # the grid outlives the service, as a real one does
            async with serving(settings, nc, grid, limits) as service:
                sids = []
                for i in range(vms):
                    vm = await service.client.call("deploy_vm", {"name": f"v{i}", "secret": "s"})
                    assert vm["status"] == "deploying"
                    sids.append(vm["sid"])
                async with asyncio.timeout(30):
                    await gate.all_waiting.wait()  # every deploy is under way on the grid
                await limits.full(EVENTS_DB)
                gate.opened.set()  # every VM runs now; the store cannot take one outcome

                await watch.wait("outcomes.refused")
                assert count_events(data_dir, "VmDeployed") == 0
                refused = await ask(service, "deploy_vm", {"name": "more", "secret": "s"})
                assert unavailable(refused)  # writes are refused cleanly meanwhile
                listed = await ask(service, "list_vms", {"secret": "s"})
                assert {vm["status"] for vm in listed["result"]["vms"]} == {"deploying"}
                if not restart:
                    await limits.room(EVENTS_DB)
                    await all_running(service, sids)

            if restart:  # stopped while full, started again while still full
                refusals = watch.count("outcomes.refused")
                async with serving(settings, nc, grid, limits) as service:
                    await watch.wait("outcomes.refused", at_least=refusals + 1)
                    assert count_events(data_dir, "VmDeployed") == 0
                    await limits.room(EVENTS_DB)
                    await all_running(service, sids)
    assert watch.count("vm_reactor.failed") == 0


async def all_running(service: Service, sids: list[str]) -> None:
    """Waits on the status stream for every VM's VmDeployed, then checks the views agree."""
    waiting = {f"vm:{sid}" for sid in sids}
    async with asyncio.timeout(60):
        async for event in service.client.follow():
            if event["type"] == "VmDeployed":
                waiting.discard(event["stream"])
                if not waiting:
                    break
    listed = await service.client.call("list_vms", {"secret": "s"})
    assert {vm["sid"]: vm["status"] for vm in listed["vms"]} == dict.fromkeys(sids, "running")
    assert count_events(service.settings.data_dir, "VmDeployed") == len(sids)


async def test_the_reactor_logs_a_failure_with_its_cause(tmp_path: Path, nc: Client) -> None:
    """A side effect that fails unexpectedly is logged with its traceback, not a TypeError."""

    async def broken_boot(_delay: float) -> None:
        raise RuntimeError("the grid exploded")

    settings = make_settings(tmp_path / "data")
    watch = LogWatch()
    with capture_logs(processors=[structlog.processors.format_exc_info, watch]):
        async with (
            LocalGrid(
                data_dir=tmp_path / "grid", deploy_delay=1.0, ssh=False, sleep=broken_boot
            ) as grid,
            serving(settings, nc, grid, PageLimits()) as service,
        ):
            vm = await service.client.call("deploy_vm", {"name": "web", "secret": "s"})
            await watch.wait("vm_reactor.failed")
    [failed] = [e for e in watch.entries if e["event"] == "vm_reactor.failed"]
    assert failed["stream"] == f"vm:{vm['sid']}"
    assert failed["event_type"] == "VmDeployRequested"
    assert "RuntimeError: the grid exploded" in failed["exception"]


async def test_outcomes_of_one_vm_keep_their_order_and_a_bad_one_fails_alone(
    service: Service,
) -> None:
    """The recorder's batches name each VM once; an outcome the domain refuses fails alone."""
    sid = await deploy_running(service.client, "s")
    recorder = OutcomeRecorder(service.app.deps)
    at = datetime.now(UTC)  # recording stamps the decision's time over it
    try:
        results = await asyncio.gather(
            recorder.record(VmOperationFailed(sid=sid, operation="stop", error="first", at=at)),
            recorder.record(VmOperationFailed(sid=sid, operation="stop", error="second", at=at)),
            recorder.record(
                VmOperationFailed(sid="vm_missing", operation="stop", error="x", at=at)
            ),
            return_exceptions=True,
        )
    finally:
        await recorder.close()
    assert results[:2] == [None, None]
    assert isinstance(results[2], NotFound)
    events = await service.app.store.read_stream(f"vm:{sid}")
    failed = [json.loads(e.data)["error"] for e in events if e.type == "VmOperationFailed"]
    assert failed == ["first", "second"]


async def test_a_user_step_whose_outcome_the_full_store_refused_is_not_run_again(
    tmp_path: Path, nc: Client
) -> None:
    """The process manager waits for room to record a step it did, instead of redoing it."""
    started = Fifo(tmp_path / "setup-started")
    release = tmp_path / "setup-release"
    runs = tmp_path / "setup-runs"
    settings = make_settings(
        tmp_path / "data",
        local_ssh=True,
        step_base_delay=0.05,
        step_max_delay=0.2,
        # Counts its runs, says it started, waits (inside the VM) to be released, sets up, and
        # ends with 5,000 characters of output: the outcome keeps a 4,000-character tail, more
        # than a 4 KiB page holds, so recording it needs a page the full file cannot add.
        setup_command=(
            f"echo ran >> {runs}; echo started >> {started.path};"
            f" while [ ! -e {release} ]; do sleep 0.02; done;"
            " ./setup-binaries.sh && printf '%05000d' 0"
        ),
    )
    limits = PageLimits()
    watch = LogWatch()
    try:
        with capture_logs(processors=[watch]):
            async with (
                LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0) as grid,
                bootstrap(
                    settings,
                    nc,
                    compute=grid,
                    retry=RetryPolicy(base_delay=0.01),
                    forge=None,
                    directory=None,
                    on_connect=limits,
                ) as app,
            ):
                client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
                await client.call("provision_user", {"username": "frank"})
                async with asyncio.timeout(60):
                    assert await started.line() == b"started"
                await limits.full(EVENTS_DB)
                release.touch()  # the setup finishes; its outcome finds the store full

                await watch.wait("store.refused")
                refusal = next(e for e in watch.entries if e["event"] == "store.refused")
                assert refusal["what"] == "user_outcome"
                user = await client.call("get_user", {"username": "frank"})
                assert (user["status"], user["step"]) == ("provisioning", "run_setup")
                assert count_events(settings.data_dir, "SetupCompleted") == 0

                await limits.room(EVENTS_DB)
                done = await terminal(client, "frank")
                assert done["type"] == "ProvisioningCompleted", done
                assert app.manager is not None
    finally:
        release.touch()
        started.close()
    assert runs.read_text().splitlines() == ["ran"]
    assert count_events(settings.data_dir, "SetupCompleted") == 1
