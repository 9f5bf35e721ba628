"""The service on a JetStream log: `serve --store jetstream`, replicas, and a cluster of three.

Every nats-server is the venv's, on loopback ports of its own; the stores, views and vaults are
real. The cluster configurations are generated (tests/jetstream_cluster.py).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from adapters.eventstore_jetstream import JetStreamEventStore
from adapters.jetstream_log import verify_chain
from adapters.localgrid import LocalGrid
from hero_deployer.bootstrap import SHARED_KEYS, SharedKeyMissing, bootstrap
from hero_deployer.client import HeroDeployerClient
from hero_deployer.natsserver import NatsServer
from hero_deployer.settings import Settings
from hero_deployer.vm_reactor import RetryPolicy
from tests.conftest import TOKEN, make_settings
from tests.helpers import deploy_running
from tests.jetstream_cluster import connect, jetstream_ready, jetstream_server

SECRET = "a-tenant-secret-long-enough"


@pytest.fixture
async def log_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with jetstream_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(log_server: NatsServer) -> AsyncIterator[Client]:
    client = await connect([log_server.url])
    await jetstream_ready(client)
    yield client
    await client.close()


def replica(data_dir: Path, prefix: str, **overrides: object) -> Settings:
    """A replica's settings: its own DIR, the shared prefix, the log in JetStream (R1 here)."""
    values: dict[str, object] = {"store": "jetstream", "replicas": 1, "prefix": prefix}
    return make_settings(data_dir, **{**values, **overrides})


async def test_the_service_keeps_its_log_in_jetstream(tmp_path: Path, nc: Client) -> None:
    settings = replica(tmp_path / "first", "js1.v1")
    grid = LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False)
    async with grid, bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        sid = await deploy_running(client, SECRET)
        health = await client.call("health", {})

    assert not (tmp_path / "first" / "events.db").exists()
    assert not (tmp_path / "first" / "vault.db").exists()
    async with JetStreamEventStore(nc, replicas=1) as log:
        types = [e.type for e in await log.read_stream(f"vm:{sid}")]
        assert types[0] == "VmDeployRequested"
        assert "VmDeployed" in types
        assert health["position"] <= await log.last_position()
    report = await verify_chain(nc, 5)
    assert report.ok
    assert report.events >= len(types)


async def test_a_replica_without_the_shared_keys_refuses_to_start(
    tmp_path: Path, nc: Client
) -> None:
    """It would otherwise make new keys, and the log's fingerprints and secrets would not open."""
    first = replica(tmp_path / "first", "js2.v1")
    grid = LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False)
    async with grid:
        async with bootstrap(first, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            client = HeroDeployerClient(nc, token=TOKEN, prefix=first.prefix)
            await deploy_running(client, SECRET)

        second_dir = tmp_path / "second"
        second = replica(second_dir, first.prefix, token="")
        with pytest.raises(SharedKeyMissing) as refused:
            async with bootstrap(second, nc, compute=grid):
                pass
        for name, variable in SHARED_KEYS:
            assert str(second_dir / name) in str(refused.value)
            assert variable in str(refused.value)
            assert not (second_dir / name).exists(), "a replica generated a key"


async def test_a_replica_with_the_copied_keys_answers_from_the_log(
    tmp_path: Path, nc: Client
) -> None:
    """The second replica's views come from the shared log; its fingerprints match the first's."""
    first = replica(tmp_path / "first", "js3.v1")
    grid = LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False)
    async with grid:
        async with bootstrap(first, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            client = HeroDeployerClient(nc, token=TOKEN, prefix=first.prefix)
            sid = await deploy_running(client, SECRET)
            before = await client.call("get_vm", {"sid": sid, "secret": SECRET})

        second_dir = tmp_path / "second"
        second_dir.mkdir(mode=0o700)
        for name in ("fingerprint.key", "master.key"):
            shutil.copy2(tmp_path / "first" / name, second_dir / name)
        second = replica(second_dir, first.prefix)  # the token given, as HERO_DEPLOYER_TOKEN
        async with bootstrap(second, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)):
            after = await client.call("get_vm", {"sid": sid, "secret": SECRET})
            listed = await client.call("list_vms", {"secret": SECRET})
    assert after == before
    assert [vm["sid"] for vm in listed["vms"]] == [sid]
