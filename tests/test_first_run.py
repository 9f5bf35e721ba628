"""The first run as README.md tells it: the default relative data dir `./var`, the local grid."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, make_settings

TERMINAL = frozenset({"ProvisioningCompleted", "StepFailed"})


async def _terminal(client: HeroDeployerClient, username: str) -> dict[str, Any]:
    async with asyncio.timeout(60):
        async for event in client.follow(stream=f"user:{username}"):
            if event["type"] in TERMINAL:
                return dict(event)
    raise AssertionError("unreachable")


async def test_provisioning_reaches_ready_with_a_relative_data_dir(
    tmp_path: Path, nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = make_settings(
        Path("var"),
        local_ssh=True,
        step_base_delay=0.05,
        step_max_delay=0.2,
        step_retries=1,
        step_deadline=30.0,
    )
    # The backend the settings name (the local grid), built by the bootstrap as `up` builds it.
    async with bootstrap(settings, nc, forge=None, directory=None) as app:
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        reply = await client.call("provision_user", {"username": "alice"})
        assert reply["status"] == "provisioning"

        event = await _terminal(client, "alice")

        assert event["type"] == "ProvisioningCompleted", event
        user = await client.call("get_user", {"username": "alice"})
        assert (user["status"], user["step"], user["error"]) == ("ready", "done", "")
        async with httpx.AsyncClient() as http:
            health = await http.get(user["gateway_url"] + "/health")
        assert health.status_code == 200
        assert msgspec.json.decode(health.content)["status"] == "ok"
        # the VM's files are where the data dir says, not under some VM's home
        vms = tmp_path / "var" / "localgrid" / "vms"
        assert (vms / user["vm_sid"] / "run" / "hero-web.ready").is_file()
        assert not list((vms / user["vm_sid"] / "home").rglob("var"))
        # logged in as root, as the grid allows; the manifest belongs to driver
        manifest = "/home/driver/hero/cfg/cockpit/services.toml"
        assert (vms / user["vm_sid"] / manifest.lstrip("/")).is_file()
        assert isinstance(app.backend, LocalGrid)
        machine = app.backend._vms[user["vm_sid"]].machine
        assert machine is not None and machine.owner(manifest) == (1000, 1000)
