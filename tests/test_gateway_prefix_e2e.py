"""The operator's gateway prefix, end to end on the local grid over a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from core.gateway_names import gateway_name
from hero_deployer.app.bootstrap import bootstrap, manager_config
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, make_settings

STEPS: dict[str, Any] = {
    "step_base_delay": 0.05,
    "step_max_delay": 0.2,
    "step_retries": 1,
    "step_deadline": 30.0,
}


async def _until(client: HeroDeployerClient, username: str, types: set[str]) -> str:
    async with asyncio.timeout(60):
        async for event in client.follow(stream=f"user:{username}"):
            if event["type"] in types:
                return str(event["type"])
    raise AssertionError("unreachable")


async def test_gateways_live_in_the_operators_namespace_and_go_with_the_user(
    tmp_path: Path, nc: Client
) -> None:
    settings = make_settings(tmp_path / "data", local_ssh=True, gateway_prefix="hd", **STEPS)
    async with (
        LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0) as grid,
        bootstrap(settings, nc, compute=grid, forge=None, directory=None),
    ):
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        await client.call("provision_user", {"username": "Alice"})
        assert await _until(client, "Alice", {"ProvisioningCompleted", "StepFailed"}) == (
            "ProvisioningCompleted"
        )
        user = await client.call("get_user", {"username": "Alice"})
        name = gateway_name("Alice", "hd")
        assert name.startswith("hd_alice_")  # lowercased, and not the name of `alice`
        assert f"/gw/{name}.gent0" in user["gateway_url"]
        assert grid.calls.count(("deploy_gateway", name)) >= 1

        await client.call("decommission_user", {"username": "Alice"})
        assert await _until(client, "Alice", {"UserDecommissioned"}) == "UserDecommissioned"
        assert ("delete_gateway", name) in grid.calls


@pytest.mark.parametrize("prefix", ["Hero", "hero-demo", "h" * 13])
def test_a_prefix_no_name_contract_takes_is_refused_at_start(tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ValueError, match="gateway prefix"):
        manager_config(make_settings(tmp_path, gateway_prefix=prefix))
