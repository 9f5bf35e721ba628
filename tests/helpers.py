"""Small helpers tests share: wait for events on the real status stream, run the CLI, walk JSON."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from hero_deployer.sdk.client import HeroDeployerClient


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


def strings_under(key: str, node: Any) -> list[str]:
    """Every string value of `key` anywhere in a JSON document, depth first."""
    if isinstance(node, dict):
        own = [node[key]] if isinstance(node.get(key), str) else []
        return own + [s for v in node.values() for s in strings_under(key, v)]
    if isinstance(node, list):
        return [s for v in node for s in strings_under(key, v)]
    return []


# One body per operation that decodes as its request type (test_registry adds a `type` to it)
REQUEST_BODIES: dict[str, dict[str, Any]] = {
    "deploy_vm": {"name": "web", "secret": "s"},
    "list_vms": {"secret": "s"},
    "get_vm": {"sid": "vm_x", "secret": "s"},
    "start_vm": {"sid": "vm_x", "secret": "s"},
    "stop_vm": {"sid": "vm_x", "secret": "s"},
    "restart_vm": {"sid": "vm_x", "secret": "s"},
    "delete_vm": {"sid": "vm_x", "secret": "s"},
    "migrate_secret": {"old_secret": "a", "new_secret": "b"},
    "provision_user": {"username": "alice"},
    "decommission_user": {"username": "alice"},
    "get_user": {"username": "alice"},
    "reveal_initial_password": {"username": "alice"},
    "list_users": {},
    "events": {},
    "audit_events": {},
    "health": {},
}

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)  # the aggregate tests tell histories after it


def at(seconds: int) -> datetime:
    """The time `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def fields_but(struct: msgspec.Struct, *left_out: str) -> dict[str, Any]:
    """A struct's fields by name, but those `left_out`."""
    fields = msgspec.structs.asdict(struct)
    for name in left_out:
        del fields[name]
    return fields


HERO_DEPLOYER = (sys.executable, "-m", "hero_deployer")


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`hero-deployer ARGS` in its own process, stdin `input` (else no terminal), output as text."""
    return subprocess.run(
        [*HERO_DEPLOYER, *args],
        cwd=cwd,
        env=None if env is None else dict(env),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def arun_cli(
    *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """`hero-deployer ARGS` in its own process the loop awaits: exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *HERO_DEPLOYER,
        *args,
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def spawn_up(
    cwd: Path, env: Mapping[str, str], port: int, *, stderr: int = subprocess.PIPE
) -> subprocess.Popen[str]:
    """`hero-deployer up` in `cwd` on NATS port `port`; returns once it prints `ready`."""
    process = subprocess.Popen(
        [*HERO_DEPLOYER, "up", "--nats-port", str(port), "--web-port", "0"],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert process.stdout is not None
    ready = process.stdout.readline()
    if "ready" not in ready:
        process.kill()
        raise AssertionError(ready + (process.stderr.read() if process.stderr else ""))
    return process
