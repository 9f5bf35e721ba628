"""Runs every benchmark of the VM service and prints its figures.

Each service-level figure is measured with the service and the load generator in separate
processes on one nats-server (all on loopback), 64 requests in flight, durable replies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from adapters.sqlite_runtime import disable_memory_statistics
from bench.load import DEPLOY
from core.contract import DeployVm, ListVms, StartVm, StopVm
from core.registry import OPERATIONS
from hero_deployer.app.natsserver import NatsServer, free_port

TOKEN = "bench-token-" + "b" * 32
ROOT = Path(__file__).resolve().parents[1]

FIGURES: dict[str, float] = {}
"""Figures later benchmarks compare with, by operation name (deploys: requests per second)."""


def name_of(request: type[msgspec.Struct]) -> str:
    """The registry's name of the operation whose request type is `request`."""
    return OPERATIONS.row(request).name


def _python() -> str:
    return sys.executable


def started(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """`hero-deployer ARGS` in its own process, returned once it prints its ready line."""
    process = subprocess.Popen(
        [_python(), "-m", "hero_deployer", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if "hero-deployer ready" in line:
            return process
    raise RuntimeError(f"{args[0]} exited with {process.wait()} before it was ready")


def load(
    url: str,
    op: str,
    n: int,
    *,
    prefix: str = "hero.v1",
    sids: Path | None = None,
    secret_of: str = "bench",
    concurrency: int = 64,
    tenants: int = 1000,
    nkey: Path | None = None,
) -> dict[str, float]:
    args = [
        _python(),
        "-m",
        "bench.load",
        "--url",
        url,
        "--prefix",
        prefix,
        "--token",
        TOKEN,
        "--op",
        op,
        "--n",
        str(n),
        "--concurrency",
        str(concurrency),
        "--secret-of",
        secret_of,
        "--tenants",
        str(tenants),
    ]
    if sids is not None:
        args += ["--sids", str(sids)]
    if nkey is not None:
        args += ["--nkey", str(nkey)]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    for line in out.splitlines():
        if not line.startswith("{"):
            print("   ", line)
    return dict(json.loads(lines[-1]))


def show(label: str, figures: dict[str, float], baseline: float | None = None) -> None:
    ratio = f"  ({figures['per_second'] / baseline:.0%} of bare responder)" if baseline else ""
    print(
        f"{label:<34} {figures['per_second']:>9,.0f} req/s   p50 {figures['p50_ms']:6.2f} ms"
        f"   p99 {figures['p99_ms']:6.2f} ms   errors {int(figures['errors'])}{ratio}"
        + (f"   service CPU {figures['cpu_us']:.0f} µs/req" if "cpu_us" in figures else ""),
        flush=True,
    )


class ServiceProcess:
    """`hero-deployer serve` in its own process, on a fresh data dir."""

    def __init__(self, url: str, data_dir: Path, **env: str) -> None:
        self._url = url
        self._data_dir = data_dir
        self._env = env
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServiceProcess:
        env = dict(os.environ)
        env.update(
            HERO_DEPLOYER_TOKEN=TOKEN,
            HERO_DEPLOYER_LOCAL_SSH="0",
            HERO_DEPLOYER_LOG_LEVEL="warning",
            **self._env,
        )
        self._process = started(
            ["serve", "--nats", self._url, "--data-dir", str(self._data_dir)], env
        )
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU the service process has used so far (Linux /proc)."""
        assert self._process is not None
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        self._process.wait(30)


def noop_baseline(url: str, n: int) -> dict[str, float]:
    responder = subprocess.Popen(
        [_python(), "-m", "bench.noop_responder", url, "hero.v1.noop"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert responder.stdout is not None
    responder.stdout.readline()
    try:
        return load(url, "noop", n)
    finally:
        responder.terminate()
        responder.wait()


def service_figures(url: str, n: int, deploy_delay: str) -> None:
    baseline = noop_baseline(url, n)
    show("bare nats-py no-op responder", baseline)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        with ServiceProcess(
            url,
            data,
            HERO_DEPLOYER_LOCAL_DEPLOY_DELAY=deploy_delay,
            HERO_DEPLOYER_LOCAL_ACTION_DELAY=deploy_delay,
        ) as service:
            cpu = service.cpu_seconds()
            deploy = load(url, DEPLOY, n)
            time.sleep(float(deploy_delay) + 1.0)  # let the outcomes of the last deploys land
            deploy["cpu_us"] = (
                (service.cpu_seconds() - cpu) / (deploy["requests"] + deploy["warmup"]) * 1e6
            )
            show(f"{DEPLOY} (whole pipeline)", deploy, baseline["per_second"])
            FIGURES[DEPLOY] = deploy["per_second"]
            sids = asyncio.run(_running_sids(url, 2000))
            sids_file = data / "sids.json"
            sids_file.write_text(json.dumps(sids))
            cpu = service.cpu_seconds()
            flips = load(
                url,
                f"{name_of(StopVm)},{name_of(StartVm)}",
                n - n % (2 * len(sids)) or n,
                sids=sids_file,
                secret_of="stopstart",
            )
            time.sleep(float(deploy_delay) + 1.0)
            flips["cpu_us"] = (
                (service.cpu_seconds() - cpu) / (flips["requests"] + flips["warmup"]) * 1e6
            )
            show(
                f"{name_of(StopVm)}/{name_of(StartVm)} (existing VMs)",
                flips,
                baseline["per_second"],
            )
            cpu = service.cpu_seconds()
            listing = load(url, name_of(ListVms), n // 4)
            listing["cpu_us"] = (
                (service.cpu_seconds() - cpu) / (listing["requests"] + listing["warmup"]) * 1e6
            )
            show(name_of(ListVms), listing, baseline["per_second"])


async def _running_sids(url: str, count: int) -> list[str]:
    """Deploys `count` VMs with one secret and waits until every one is running."""
    from hero_deployer.sdk.client import HeroDeployerClient

    client = await HeroDeployerClient.connect(url, token=TOKEN)
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> str:
        async with sem:
            vm = await client.send(DeployVm(name=f"flip-{i}", secret="stopstart"))
            return str(vm.sid)

    sids = await asyncio.gather(*(one(i) for i in range(count)))
    while True:
        vms = (await client.send(ListVms(secret="stopstart"))).vms
        if all(vm.status == "running" for vm in vms):
            break
        await asyncio.sleep(0.2)  # a benchmark's set-up poll, not a test
    await client.close()
    return list(sids)


def main() -> None:
    disable_memory_statistics()  # as `hero-deployer` does before it opens a database
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=30000, help="requests per service benchmark")
    parser.add_argument("--only", default="service,eventsourcing,rebuild,list")
    parser.add_argument("--events", type=int, default=1_000_000, help="events for rebuild")
    parser.add_argument(
        "--vms", type=int, default=100_000, help="VMs in the view the listing reads"
    )
    parser.add_argument("--deploy-delay", default="0.05", help="local grid delay, seconds")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"hero-deployer benchmarks on {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if "service" in only:
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:

            async def serve_nats() -> None:
                async with NatsServer(port=port, data_dir=Path(tmp), config=None):
                    await asyncio.to_thread(
                        service_figures, f"nats://127.0.0.1:{port}", args.n, args.deploy_delay
                    )

            asyncio.run(serve_nats())
    if "eventsourcing" in only:
        from bench.eventsourcing_compare import compare

        saves = compare(args.n)
        if DEPLOY in FIGURES:
            print(
                f"{DEPLOY + ' over NATS / eventsourcing':<34} {FIGURES[DEPLOY]:>9,.0f} req/s"
                f" vs {saves:,.0f} saves/s = {FIGURES[DEPLOY] / saves:.1f}x",
                flush=True,
            )
    if "rebuild" in only or "list" in only:
        from bench.views import rebuild_and_list

        rebuild_and_list(args.events, args.vms, do_list="list" in only)
    _ = time


if __name__ == "__main__":
    main()
