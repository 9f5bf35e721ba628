"""VM deploys on SQLite, then on a JetStream cluster of three (R3) with one and with two replicas.

    python -m bench.scale_out [--n 2000] [--concurrency 64]

Each figure is measured with `serve` and the load generator (bench/load.py, no Idempotency-Key)
in their own processes on loopback: SQLite on one nats-server; JetStream on a fresh cluster of
three nats-servers for each replica count, the two replicas in one queue group and the load
sent to one node. Every process shares this machine's cores, the nats-servers included, so the
figures compare the configurations here rather than promise a cluster's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

from bench.load import DEPLOY
from bench.run import ServiceProcess, load, show
from hero_deployer.app.natsserver import NatsServer, free_port
from tests.jetstream_cluster import running_cluster, stream_created

SERVE_ENV = {"HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0", "HERO_DEPLOYER_LOCAL_ACTION_DELAY": "0"}


async def sqlite_figure(tmp: Path, n: int, concurrency: int) -> dict[str, float]:
    async with NatsServer(port=free_port(), data_dir=tmp / "nats") as server:
        with ServiceProcess(server.url, tmp / "sqlite", **SERVE_ENV):
            return await asyncio.to_thread(load, server.url, DEPLOY, n, concurrency=concurrency)


async def jetstream_figure(tmp: Path, replicas: int, n: int, concurrency: int) -> dict[str, float]:
    async with running_cluster(tmp / "cluster") as nodes:
        urls = [node.url for node in nodes]
        await stream_created(urls)
        env = {**SERVE_ENV, "HERO_DEPLOYER_STORE": "jetstream", "HERO_DEPLOYER_REPLICAS": "3"}
        with contextlib.ExitStack() as stack:
            first = tmp / "replica0"
            await asyncio.to_thread(
                stack.enter_context, ServiceProcess(",".join(urls), first, **env)
            )
            for i in range(1, replicas):
                data_dir = tmp / f"replica{i}"
                data_dir.mkdir(mode=0o700)
                for name in ("fingerprint.key", "master.key"):
                    shutil.copy2(first / name, data_dir / name)
                process = ServiceProcess(",".join(urls), data_dir, **env)
                await asyncio.to_thread(stack.enter_context, process)
            return await asyncio.to_thread(load, urls[0], DEPLOY, n, concurrency=concurrency)


async def main(n: int, concurrency: int) -> None:
    print(f"{DEPLOY}, {n} requests, {concurrency} in flight", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        show("SQLite (one process)", await sqlite_figure(Path(tmp) / "s", n, concurrency))
    for replicas in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            figures = await jetstream_figure(Path(tmp), replicas, n, concurrency)
            show(f"JetStream R3, {replicas} replica{'s' * (replicas > 1)}", figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency))
