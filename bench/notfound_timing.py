"""Times NotFound replies: a missing sid against an existing sid with a wrong secret.

For each operation that takes a sid and a secret, the service (`hero-deployer serve`, its own
process, on a nats-server of its own) answers interleaved pairs of requests, one at a time: one
naming a sid that does not exist, one naming a live VM with a secret that is not its own. Both
must be NotFound with the same body and headers; this prints their median round trips, the
difference, and the two-sided p-value of a Mann-Whitney U test (normal approximation with a tie
correction). The contract wants the medians within 2 %.

    .venv/bin/python -m bench.notfound_timing [--samples 1000] [--fresh-missing-sid]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client

from bench.run import TOKEN, ServiceProcess
from core.contract import DeployVm, GetVm, VmRef
from core.registry import OPERATIONS as REGISTRY
from hero_deployer.app.natsserver import NatsServer, free_port

# Every operation that names one VM by (sid, secret), from the registry
OPERATIONS = tuple(op.name for op in REGISTRY if issubclass(op.request, VmRef))
DEPLOY, GET = (next(op.name for op in REGISTRY if op.request is kind) for kind in (DeployVm, GetVm))
HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def mann_whitney_p(xs: list[float], ys: list[float]) -> float:
    """The two-sided p-value that xs and ys come from one distribution (U, normal approx.)."""
    pooled = sorted([(v, 0) for v in xs] + [(v, 1) for v in ys])
    n1, n2, n = len(xs), len(ys), len(pooled)
    rank_sum_x = 0.0
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid_rank = (i + j) / 2 + 1  # ranks start at 1; ties share their mean rank
        rank_sum_x += mid_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        t = j - i + 1
        tie_term += t**3 - t
        i = j + 1
    u = rank_sum_x - n1 * (n1 + 1) / 2
    mean = n1 * n2 / 2
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return 1.0
    z = (u - mean) / math.sqrt(variance)
    return math.erfc(abs(z) / math.sqrt(2))


def random_sid() -> str:
    """A sid of the service's shape (`vm_` + milliseconds + 32 random bits) that nobody has."""
    return f"vm_{time.time_ns() // 1_000_000:012x}{random.getrandbits(32):08x}"


async def _timed(nc: Client, subject: str, body: bytes) -> tuple[float, bytes, dict[str, str]]:
    start = time.perf_counter()
    msg = await nc.request(subject, body, timeout=10, headers=HEADERS)
    elapsed = time.perf_counter() - start
    return elapsed, msg.data, dict(msg.headers or {})


async def _live_vm(nc: Client, prefix: str) -> str:
    """Deploys a VM and waits until it runs; returns its sid."""
    body = msgspec.json.encode({"name": "timing", "secret": "the-owner"})
    reply = msgspec.json.decode(
        (await nc.request(f"{prefix}.{DEPLOY}", body, timeout=10, headers=HEADERS)).data
    )
    if not reply.get("ok"):
        raise SystemExit(f"{DEPLOY} failed: {reply}")
    sid: str = reply["result"]["sid"]
    get = msgspec.json.encode({"sid": sid, "secret": "the-owner"})
    async with asyncio.timeout(30):
        while True:
            vm = msgspec.json.decode(
                (await nc.request(f"{prefix}.{GET}", get, timeout=10, headers=HEADERS)).data
            )
            if vm["result"]["status"] == "running":
                return sid
            await asyncio.sleep(0.05)  # polling a remote state, not synchronising threads


async def measure(
    nc: Client, prefix: str, operation: str, sid: str, samples: int, same_missing: bool
) -> dict[str, float]:
    """Interleaved, randomly ordered pairs after a warm-up; returns medians (µs) and p-value."""
    subject = f"{prefix}.{operation}"
    fixed_missing = random_sid()
    wrong = msgspec.json.encode({"sid": sid, "secret": "not-the-owner"})
    times: dict[str, list[float]] = {"missing": [], "wrong": []}
    seen: dict[str, set[tuple[bytes, tuple[tuple[str, str], ...]]]] = {
        "missing": set(),
        "wrong": set(),
    }
    for index in range(samples + samples // 5):
        missing_sid = fixed_missing if same_missing else random_sid()
        missing = msgspec.json.encode({"sid": missing_sid, "secret": "not-the-owner"})
        pair = [("missing", missing), ("wrong", wrong)]
        random.shuffle(pair)
        for kind, body in pair:
            elapsed, data, headers = await _timed(nc, subject, body)
            seen[kind].add((data, tuple(sorted(headers.items()))))
            if index >= samples // 5:  # the first fifth warms caches up and is not counted
                times[kind].append(elapsed * 1e6)
    if seen["missing"] != seen["wrong"] or len(seen["missing"]) != 1:
        raise SystemExit(f"{operation}: the replies differ: {seen}")
    reply = msgspec.json.decode(next(iter(seen["missing"]))[0])
    if reply.get("error", {}).get("code") != "NotFound":
        raise SystemExit(f"{operation}: expected NotFound, got {reply}")
    m, w = statistics.median(times["missing"]), statistics.median(times["wrong"])
    return {"missing": m, "wrong": w, "p": mann_whitney_p(times["missing"], times["wrong"])}


async def run(samples: int, same_missing: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with NatsServer(port=free_port(), data_dir=root, config=None) as server:
            with ServiceProcess(server.url, root / "data", HERO_DEPLOYER_LOCAL_DEPLOY_DELAY="0"):
                nc = await nats.connect(server.url)
                try:
                    sid = await _live_vm(nc, "hero.v1")
                    print(
                        f"{'operation':<12} {'missing µs':>11} {'wrong µs':>9} {'diff':>7}"
                        f" {'p (U test)':>11}"
                    )
                    worst = 0.0
                    for operation in OPERATIONS:
                        f = await measure(nc, "hero.v1", operation, sid, samples, same_missing)
                        diff = (f["missing"] - f["wrong"]) / f["wrong"]
                        worst = max(worst, abs(diff))
                        print(
                            f"{operation:<12} {f['missing']:>11.1f} {f['wrong']:>9.1f}"
                            f" {diff:>+7.1%} {f['p']:>11.3g}",
                            flush=True,
                        )
                    print(f"largest difference of medians: {worst:.1%} (target: within 2 %)")
                finally:
                    await nc.drain()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="counted pairs per operation")
    parser.add_argument(
        "--fresh-missing-sid",
        action="store_true",
        help="a never-seen random sid in every pair (default: one missing sid, repeated, as a"
        " prober repeats a sid to average the noise out)",
    )
    args = parser.parse_args()
    print(
        f"bench/notfound_timing.py on {os.cpu_count()} cores, python {sys.version.split()[0]},"
        f" {args.samples} pairs per operation,"
        f" {'a fresh' if args.fresh_missing_sid else 'one repeated'} missing sid"
    )
    asyncio.run(run(args.samples, not args.fresh_missing_sid))


if __name__ == "__main__":
    main()
