"""Graceful shutdown: in-flight requests finish, every acknowledged command is in the log."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.aio.client import Client

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.localgrid import LocalGrid
from core.errors import DomainError
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, make_settings


async def test_stopping_under_load_loses_no_acknowledged_command(
    tmp_path: Path, nc: Client
) -> None:
    settings = make_settings(tmp_path / "data")
    client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix, timeout=5, retries=0)
    acknowledged: list[str] = []
    refused = 0
    first_answer = asyncio.Event()

    async def deploy(i: int) -> None:
        nonlocal refused
        try:
            vm = await client.call("deploy_vm", {"name": f"v{i}", "secret": "s"})
        except DomainError:
            refused += 1  # answered with an error (shutting down / no responders): not recorded
            return
        acknowledged.append(vm["sid"])
        first_answer.set()

    async with LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, ssh=False) as grid:
        async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            first = [asyncio.create_task(deploy(i)) for i in range(300)]
            await first_answer.wait()  # the service is busy now: the shutdown races the rest
        # the service is gone; every request has its answer
        await asyncio.gather(*first)

    assert acknowledged, "some deploys must have been answered before the shutdown"
    assert len(acknowledged) + refused == 300
    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        recorded = {e.stream for e in await store.read_all(limit=10_000)}
        assert {f"vm:{sid}" for sid in acknowledged} <= recorded
        positions = [e.position for e in await store.read_all(limit=10_000)]
        assert positions == list(range(1, len(positions) + 1))
