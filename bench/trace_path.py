"""Traces one VM deploy from request to `VmDeployed` published and prints the files it crosses.

A real nats-server (a child on a free loopback port), the service bootstrapped in this process on
a fresh SQLite data dir with the local grid, and a plain nats-py client that sends the request and
waits for the event on the status subject. `sys.setprofile` (and `threading.setprofile` for the
database threads) records every Python function called meanwhile. The same is done for one
user's provisioning request up to its `ProvisioningRequested` published (sent with an
Idempotency-Key, so the idempotency path every mutating request may take shows as shared; the
Forge it is given answers nobody, so the new user's process stays at its first step and reaches
no VM): a function that one calls too is shared machinery, and the files of the functions only
the deploy calls are its operation-specific files (adapters aside:
a backend speaks its own protocol).

    .venv/bin/python -m bench.trace_path
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import nats

from adapters.localgrid import LocalGrid
from adapters.sqlite_runtime import disable_memory_statistics
from bench.load import DEPLOY
from core.contract import ProvisionUser
from core.registry import OPERATIONS
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.app.natsserver import NatsServer, free_port
from hero_deployer.app.settings import Settings

PROVISION = OPERATIONS.row(ProvisionUser).name  # the request the deploy's trace is set against
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "trace-token-" + "t" * 32
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


class Trace:
    """Counts the calls of project functions per file while it is on."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.functions: set[tuple[str, str]] = set()

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(str(ROOT)) and "/.venv/" not in path:
                name = str(Path(path).relative_to(ROOT))
                self.calls[name] += 1
                self.functions.add((name, frame.f_code.co_qualname))

    async def around(self, work: Callable[[], Awaitable[None]]) -> None:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        try:
            await work()
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]


async def _request(
    nc: Any, prefix: str, operation: str, body: dict[str, Any], key: str = ""
) -> dict[str, Any]:
    headers = {**HEADERS, "Idempotency-Key": key} if key else HEADERS
    reply = await nc.request(
        f"{prefix}.{operation}", msgspec.json.encode(body), timeout=10, headers=headers
    )
    decoded: dict[str, Any] = msgspec.json.decode(reply.data)
    if "error" in decoded:
        raise RuntimeError(f"{operation}: {decoded['error']}")
    return decoded


async def _until_published(
    nc: Any, prefix: str, event: str, operation: str, body: dict[str, Any], key: str = ""
) -> None:
    """Sends one request and returns once an event of its stream's kind `event` (e.g.
    `vm.*.VmDeployed`) is on the status subject."""
    published: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Any) -> None:
        if not published.done():
            published.set_result(None)

    sub = await nc.subscribe(f"{prefix}.events.{event}", cb=on_event)
    try:
        await _request(nc, prefix, operation, body, key)
        await asyncio.wait_for(published, 10)
    finally:
        await sub.unsubscribe()


def _deploy(nc: Any, prefix: str, name: str) -> Awaitable[None]:
    """One VM deploy, until its VmDeployed is published."""
    return _until_published(
        nc, prefix, "vm.*.VmDeployed", DEPLOY, {"name": name, "secret": "trace"}
    )


async def trace(data_dir: Path) -> tuple[Trace, Trace]:
    """One warm-up of each, then one traced VM deploy and one traced user provisioning."""
    async with NatsServer(port=free_port(), data_dir=data_dir / "nats") as server:
        nc = await nats.connect(server.url)
        settings = Settings(
            data_dir=data_dir / "service",
            token=TOKEN,
            local_ssh=True,
            local_deploy_delay=0.0,
            local_action_delay=0.0,
            # a Forge nobody answers: the new user's first step is retried, and its process
            # reaches no VM while the trace runs
            forge_url=f"http://127.0.0.1:{free_port()}",
            forge_admin_token="trace-admin-token",
        )
        prefix = settings.prefix
        async with (
            LocalGrid(data_dir=data_dir / "grid", deploy_delay=0, action_delay=0, ssh=True) as grid,
            bootstrap(settings, nc, compute=grid, directory=None),
        ):
            deploy, provision = Trace(), Trace()
            await _deploy(nc, prefix, "warm")
            await deploy.around(lambda: _deploy(nc, prefix, "traced"))
            await provision.around(
                lambda: _until_published(
                    nc,
                    prefix,
                    "user.traced.ProvisioningRequested",
                    PROVISION,
                    {"username": "traced"},
                    "trace-1",
                )
            )
        await nc.close()
    return deploy, provision


def operation_specific(deploy: Trace, provision: Trace) -> dict[str, list[str]]:
    """File → the functions in it that the deploy calls and the provisioning does not (adapters
    and this script aside)."""
    specific: dict[str, list[str]] = {}
    for name, function in sorted(deploy.functions - provision.functions):
        if not name.startswith(("adapters/", "bench/")):
            specific.setdefault(name, []).append(function)
    return specific


def report(deploy: Trace, provision: Trace) -> None:
    """Prints each file the deploy crosses, and the files of the functions only it calls."""
    print(f"{DEPLOY}: {sum(deploy.calls.values())} calls of {len(deploy.functions)} functions")
    print(f"in {len(deploy.calls)} project files:")
    specific = operation_specific(deploy, provision)
    for name, calls in sorted(deploy.calls.items()):
        mark = "operation-specific" if name in specific else ""
        print(f"  {name:<42} {calls:>6} calls   {mark}")
    print(
        f"operation-specific files (holding functions {DEPLOY} calls and {PROVISION} does"
        f" not; adapters aside): {len(specific)}"
    )
    for name, functions in specific.items():
        print(f"  {name}: {', '.join(functions)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.parse_args()
    disable_memory_statistics()
    with tempfile.TemporaryDirectory() as tmp:
        deploy, provision = asyncio.run(trace(Path(tmp)))
    report(deploy, provision)


if __name__ == "__main__":
    main()
