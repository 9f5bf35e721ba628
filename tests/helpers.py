"""Small helpers for end-to-end tests: wait for events on the real status stream."""

from __future__ import annotations

import asyncio
from typing import Any

from hero_deployer.client import HeroDeployerClient


async def wait_for_event(
    client: HeroDeployerClient, stream: str, event_type: str, *, timeout: float = 15.0
) -> dict[str, Any]:
    """The first event of `event_type` on `stream`: from the log, else live from the stream."""
    async with asyncio.timeout(timeout):
        async for event in client.follow(stream=stream):
            if event["type"] == event_type:
                return dict(event)
    raise AssertionError("unreachable")


async def deploy_running(client: HeroDeployerClient, secret: str, name: str = "web") -> str:
    """Deploys a VM and waits until the backend reports it running; returns its sid."""
    vm = await client.call("deploy_vm", {"name": name, "secret": secret})
    await wait_for_event(client, f"vm:{vm['sid']}", "VmDeployed")
    return str(vm["sid"])
