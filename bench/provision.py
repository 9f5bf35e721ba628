"""Provisions N users (default 20) at once on the local grid and prints the time and peak memory.

The service runs as its own process (`hero-deployer serve`, local grid with real SSH VMs), on a
nats-server of its own; this process is the operator that provisions and follows the status
stream. Peak memory is the service process's high-water mark (VmHWM), so the nats-server and
this process are not counted; the VMs' setup commands are short-lived children of it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.serve import start_serve
from core.contract import ProvisionUser
from hero_deployer.app.natsserver import NatsServer, free_port
from hero_deployer.cli.progress import STEP_EVENTS
from hero_deployer.sdk.client import HeroDeployerClient

TOKEN = "bench-token-" + "p" * 32
TERMINAL = ("ProvisioningCompleted", "StepFailed")


def _memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS (now) of a process, in KiB, from /proc."""
    figures: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                figures[key] = int(value.split()[0])
    except OSError:
        pass
    return figures


async def run(users: int, deploy_delay: float, forge: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "HERO_DEPLOYER_TOKEN": TOKEN,
            "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": str(deploy_delay),
            "HERO_DEPLOYER_LOCAL_ACTION_DELAY": "0",
            "HERO_DEPLOYER_LOCAL_SSH": "true",
            "HERO_DEPLOYER_LOG_LEVEL": "warning",
        }
        async with NatsServer(port=free_port(), data_dir=root, config=None) as nats:
            fake: Any = None
            if forge:
                from tests.fakes.forgejo import FakeForgejo

                fake = await FakeForgejo().__aenter__()
                env["HERO_DEPLOYER_FORGE_URL"] = fake.url
                env["HERO_DEPLOYER_FORGE_ADMIN_USER"] = fake.admin_user
                env["HERO_DEPLOYER_FORGE_ADMIN_PASSWORD"] = fake.admin_password
            service = await start_serve(nats.url, root / "data", env, timeout=30.0)
            client = await HeroDeployerClient.connect(nats.url, token=TOKEN, timeout=30)
            try:
                await _measure(client, service.pid, users)
            finally:
                await client.close()
                service.send_signal(signal.SIGTERM)
                await service.wait()
                if fake is not None:
                    await fake.__aexit__(None, None, None)


async def _measure(client: HeroDeployerClient, pid: int, users: int) -> None:
    names = [f"bench{i:03d}" for i in range(users)]
    before = await client.position()
    idle = _memory_kib(pid)
    started = time.perf_counter()
    async with client.subscribe(after=before) as events:
        await asyncio.gather(*(client.send(ProvisionUser(username=n)) for n in names))
        finished: dict[str, float] = {}
        failed: dict[str, str] = {}
        steps: dict[str, list[float]] = {}
        last_at: dict[str, datetime] = {}
        async with asyncio.timeout(600):
            async for event in events:
                name = event.stream.removeprefix("user:")
                data: dict[str, Any] = _decode(event.data)
                at = datetime.fromisoformat(data["at"]) if "at" in data else None
                if at is not None and event.type == "ProvisioningRequested":
                    last_at[name] = at
                elif at is not None and event.type in STEP_EVENTS and name in last_at:
                    steps.setdefault(STEP_EVENTS[event.type], []).append(
                        (at - last_at[name]).total_seconds()
                    )
                    last_at[name] = at
                if event.type in TERMINAL:
                    finished[name] = time.perf_counter() - started
                    if event.type == "StepFailed":
                        failed[name] = f"{data['step']}: {data['reason']}"
                    if len(finished) == users:
                        break
    wall = time.perf_counter() - started
    memory = _memory_kib(pid)
    times = sorted(finished.values())
    print(f"provisioned {users - len(failed)}/{users} users concurrently on the local grid")
    print(f"{'wall time, all ready':<34} {wall:8.2f} s")
    print(f"{'per user: median':<34} {statistics.median(times):8.2f} s")
    print(f"{'per user: p95':<34} {times[max(0, int(len(times) * 0.95) - 1)]:8.2f} s")
    print(f"{'per user: slowest':<34} {times[-1]:8.2f} s")
    print(f"{'users ready per second':<34} {(users - len(failed)) / wall:8.2f}")
    for step, durations in steps.items():
        print(f"{'  step ' + step + ' (mean)':<34} {statistics.mean(durations) * 1000:8.0f} ms")
    if memory:
        print(f"{'service RSS before':<34} {idle.get('VmRSS', 0) / 1024:8.1f} MiB")
        print(f"{'service peak RSS (VmHWM)':<34} {memory.get('VmHWM', 0) / 1024:8.1f} MiB")
        print(f"{'service RSS after':<34} {memory.get('VmRSS', 0) / 1024:8.1f} MiB")
    for name, reason in failed.items():
        print(f"FAILED {name}: {reason}")


def _decode(raw: Any) -> dict[str, Any]:
    import msgspec

    decoded: dict[str, Any] = msgspec.json.decode(bytes(raw))
    return decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument(
        "--deploy-delay", type=float, default=0.0, help="seconds a local VM deploy takes"
    )
    parser.add_argument("--forge", action="store_true", help="with the fake Forgejo on loopback")
    args = parser.parse_args()
    print(f"bench/provision.py on {os.cpu_count()} cores, python {sys.version.split()[0]}")
    asyncio.run(run(args.users, args.deploy_delay, args.forge))


if __name__ == "__main__":
    main()
