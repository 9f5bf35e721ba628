"""Kills the service (`kill -9`) at random points of provisioning; every user must reach ready.

One data dir, one nats-server of its own, the local grid with real SSH VMs. Each round starts
`hero-deployer serve`, asks it to provision one more user (the ones before it may still be on
their way), waits for a random one of that user's provisioning events (from the status
stream) and a few random milliseconds more, and kills it with SIGKILL. After the last round the
service starts once more and every user must have reached `ready` once, with one VM: provisioning
continues from the last recorded step rather than starting over. The local grid's four nodes
hold about a hundred user VMs, so past `--live` users the oldest ready one is decommissioned in
each round (a kill can land in that too); it must end `decommissioned`, every other `ready`.
Prints the rounds, the time they took, and each user that did not make it.

    .venv/bin/python -m bench.soak_provision [--kills 200] [--max-wait 5] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from bench.serve import start_serve
from core.contract import DecommissionUser, ListUsers, ProvisionUser
from hero_deployer.app.natsserver import NatsServer, free_port
from hero_deployer.sdk.client import HeroDeployerClient

TOKEN = "bench-token-" + "s" * 32
PREFIX = "hero.v1"
STEP_EVENTS = (  # a user's events while provisioning, in order
    "ProvisioningRequested", "ForgeUserEnsured", "SshKeyGenerated", "NodeSelected",
    "UserVmDeployRequested", "UserVmDeployed", "GatewayDeployed", "SshReachable",
    "ManifestUploaded", "SetupCompleted", "HealthVerified", "ProvisioningCompleted",
)  # fmt: skip


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()  # SIGKILL: no shutdown, no flush, whatever was in flight is cut
    await process.wait()


async def _random_point(
    client: HeroDeployerClient, name: str, rng: random.Random, max_wait: float
) -> str:
    """Provisions `name` and returns after a random one of its events: the kill point."""
    events = await client.nc.subscribe(f"{PREFIX}.events.user.{name}.>")
    target, seen, last = rng.randrange(1, len(STEP_EVENTS) + 1), 0, "ProvisioningRequested?"
    try:
        await client.send(ProvisionUser(username=name))
        async with asyncio.timeout(max_wait):
            async for msg in events.messages:
                seen, last = seen + 1, msg.subject.rsplit(".", 1)[1]
                if seen >= target or last in ("ProvisioningCompleted", "StepFailed"):
                    break
    except TimeoutError:
        pass  # a step that takes longer: killed inside it
    finally:
        await events.unsubscribe()
    await asyncio.sleep(rng.uniform(0, 0.05))  # a random moment inside the step that follows
    return f"after {last}"


async def _users(client: HeroDeployerClient) -> dict[str, Any]:
    users = msgspec.to_builtins(await client.send(ListUsers()))["users"]
    return {u["username"]: u for u in users}


async def run(
    kills: int, max_wait: float, seed: int, deadline: float, keep: bool, live: int
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tempfile.mkdtemp(prefix="soak-kept-")) if keep else Path(tmp)
        if keep:
            print(f"data dir and service.log kept in {root}")
        data = root / "data"
        env = {
            **os.environ,
            "HERO_DEPLOYER_TOKEN": TOKEN,
            "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0.2",
            "HERO_DEPLOYER_LOCAL_ACTION_DELAY": "0",
            "HERO_DEPLOYER_LOCAL_SSH": "true",
            "HERO_DEPLOYER_LOG_LEVEL": "warning",
        }
        async with NatsServer(port=free_port(), data_dir=root, config=None) as nats_server:
            client = await HeroDeployerClient.connect(
                nats_server.url, token=TOKEN, timeout=5, retries=5,
                nats_options={"max_reconnect_attempts": -1},
            )  # fmt: skip
            started = time.perf_counter()
            steps_at_kill: Counter[str] = Counter()
            retired: list[str] = []
            try:
                for round_ in range(kills):
                    service = await start_serve(nats_server.url, data, env)
                    try:
                        await _retire_oldest(client, round_ - live, retired)
                        name = f"soak{round_:03d}"
                        steps_at_kill[await _random_point(client, name, rng, max_wait)] += 1
                    finally:
                        await _kill(service)  # on an error too: no serve outlives the soak
                    if (round_ + 1) % 10 == 0:
                        print(f"  {round_ + 1} kills, {time.perf_counter() - started:.0f} s",
                              flush=True)  # fmt: skip
                soak = time.perf_counter() - started
                service = await start_serve(nats_server.url, data, env)
                try:
                    users = await _settle(client, kills, set(retired), deadline)
                    history = {n: await _history(client, n) for n in users}
                finally:
                    service.send_signal(signal.SIGTERM)
                    await service.wait()
            finally:
                await client.close()
    _report(kills, soak, steps_at_kill, users, set(retired), history)


async def _retire_oldest(client: HeroDeployerClient, upto: int, retired: list[str]) -> None:
    """Decommissions the oldest ready users up to `upto`: the local grid's nodes are finite."""
    users = await _users(client)
    for index in range(len(retired), upto + 1):
        name = f"soak{index:03d}"
        if users.get(name, {}).get("status") not in ("ready", "failed"):
            return  # still on its way: retired in a later round
        await client.send(DecommissionUser(username=name))
        retired.append(name)


def _settled(user: dict[str, Any], retired: bool) -> bool:
    return bool(user["status"] == ("decommissioned" if retired else "ready"))


async def _settle(
    client: HeroDeployerClient, count: int, retired: set[str], deadline: float
) -> dict[str, Any]:
    """The users once every one is ready (or decommissioned, if retired), or at `deadline`."""
    until = time.monotonic() + deadline
    while True:
        users = await _users(client)
        done = all(_settled(u, n in retired) for n, u in users.items())
        if (len(users) == count and done) or time.monotonic() > until:
            return users
        await asyncio.sleep(0.5)  # polling the service's state from outside


async def _history(client: HeroDeployerClient, name: str) -> Counter[str]:
    """How often each kind of event happened to user `name`."""
    return Counter(
        [e.type async for page in client.pages(stream=f"user:{name}") for e in page.events]
    )


def _report(
    kills: int,
    soak: float,
    steps_at_kill: Counter[str],
    users: dict[str, Any],
    retired: set[str],
    history: dict[str, Counter[str]],
) -> None:
    completed = [n for n in users if history[n]["ProvisioningCompleted"] == 1]
    settled = [n for n, u in users.items() if _settled(u, n in retired)]
    again = [n for n in users if history[n]["UserVmDeployRequested"] != 1]
    print(f"{kills} kill -9 of serve in {soak:.0f} s ({soak / kills:.2f} s a round)")
    print("kill points (the last event seen of the new user):", dict(sorted(steps_at_kill.items())))
    print(f"users that reached ready once: {len(completed)}/{kills} (want all)")
    print(f"users ready now, or decommissioned when retired ({len(retired)}): "
          f"{len(settled)}/{kills} (want all)")  # fmt: skip
    print(f"users whose VM was asked for other than once: {len(again)} (want 0)")
    for name, user in sorted(users.items()):
        if name not in settled or name not in completed or name in again:
            print(f"  {name}: {user['status']} at {user['step']}: {user['error'][:200]}"
                  f" {dict(history[name])}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument(
        "--max-wait", type=float, default=5.0, help="longest wait for the chosen event"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data dir and service.log")
    parser.add_argument(
        "--live", type=int, default=40, help="users kept; older ready ones are decommissioned"
    )
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds to reach ready")
    args = parser.parse_args()
    print(
        f"bench/soak_provision.py on {os.cpu_count()} cores, python {sys.version.split()[0]},"
        f" seed {args.seed}"
    )
    asyncio.run(run(args.kills, args.max_wait, args.seed, args.deadline, args.keep, args.live))


if __name__ == "__main__":
    main()
