"""Faults under load: the nats-server restarts while the SDK retries with the same key."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg

from adapters.localgrid import LocalGrid
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.app.natsserver import free_port, nats_server_binary
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, make_settings

DEPLOYS = 60
IN_FLIGHT = 8


class RestartableNats:
    """A nats-server child on one loopback port that can be killed and started again there."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:  # a connect that succeeds is the readiness signal, bounded by the deadline
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """kill -9: in-flight requests and replies are lost, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def server() -> Iterator[RestartableNats]:
    nats_server = RestartableNats()
    nats_server.start()
    yield nats_server
    if nats_server.process is not None and nats_server.process.poll() is None:
        nats_server.kill()


async def _connect(url: str) -> Client:
    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.05, connect_timeout=2
    )


@pytest_asyncio.fixture
async def connections(server: RestartableNats) -> AsyncIterator[tuple[Client, Client]]:
    service_nc, client_nc = await _connect(server.url), await _connect(server.url)
    yield service_nc, client_nc
    for nc in (client_nc, service_nc):
        await nc.close()


async def test_a_nats_restart_under_load_loses_and_doubles_no_deploy(
    tmp_path: Path, server: RestartableNats, connections: tuple[Client, Client]
) -> None:
    service_nc, client_nc = connections
    settings = make_settings(tmp_path / "data")
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, service_nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        # each attempt waits 1 s; 30 attempts outlast a restart by far
        client = HeroDeployerClient(
            client_nc, token=TOKEN, prefix=settings.prefix, timeout=1.0, retries=30
        )
        names = iter(f"web-{i}" for i in range(DEPLOYS))
        answered: dict[str, str] = {}
        seen = 0
        killed = asyncio.Event()

        async def on_request(msg: Msg) -> None:
            """Kills the server when the request a third of the way through reaches it."""
            nonlocal seen
            seen += 1
            if seen == DEPLOYS // 3:
                server.kill()
                killed.set()

        observer = await _connect(server.url)
        await observer.subscribe(f"{settings.prefix}.deploy_vm", cb=on_request)

        async def deployer() -> None:
            for name in names:
                vm = await client.deploy_vm(name=name, secret="tenant")
                answered[name] = vm.sid

        async def restart() -> None:
            await killed.wait()
            await asyncio.to_thread(server.start)

        try:
            async with asyncio.timeout(120):
                await asyncio.gather(restart(), *(deployer() for _ in range(IN_FLIGHT)))
        finally:
            await observer.close()

        assert service_nc.stats["reconnects"] >= 1 and client_nc.stats["reconnects"] >= 1
        assert len(answered) == DEPLOYS  # every call returned a VM
        assert len(set(answered.values())) == DEPLOYS
        recorded = await app.store.read_all(after=0, limit=10_000)
        requested = [r for r in recorded if r.type == "VmDeployRequested"]
        assert len(requested) == DEPLOYS  # nothing lost, nothing doubled
        assert Counter(r.stream for r in requested) == Counter(
            f"vm:{sid}" for sid in answered.values()
        )
