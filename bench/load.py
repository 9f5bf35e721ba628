"""A load generator in its own process: N requests, C in flight, prints one JSON line of figures."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import nats

from core.contract import DeployVm, ListVms
from core.registry import OPERATIONS

DEPLOY = OPERATIONS.row(DeployVm).name  # the default load, and the op other benches load
LIST = OPERATIONS.row(ListVms).name  # the listing a tenant's secret reads


async def run(args: argparse.Namespace) -> dict[str, float]:
    nc = await nats.connect(args.url, **({"nkeys_seed": args.nkey} if args.nkey else {}))
    headers = {"Authorization": f"Bearer {args.token}"}
    request = await _requester(nc, headers)
    subject = f"{args.prefix}.{args.op}"
    sids: list[str] = json.loads(open(args.sids).read()) if args.sids else []
    latencies: list[float] = []
    errors = 0
    counter = iter(range(args.n))
    ops = args.op.split(",")

    def body(i: int) -> bytes:
        op = op_of(i)
        if op == DEPLOY:
            return msgspec.json.encode(
                {"name": f"bench-{i}", "secret": f"tenant-{i % args.tenants}"}
            )
        if op == LIST:
            return msgspec.json.encode({"secret": f"tenant-{i % args.tenants}"})
        if op == "noop":
            return b"{}"
        sid = sids[i % len(sids)]
        return msgspec.json.encode({"sid": sid, "secret": args.secret_of.format(i=i)})

    def op_of(i: int) -> str:
        # with sids, each pass over them uses the next op, so stop and start alternate per VM
        return ops[(i // len(sids)) % len(ops)] if sids else ops[i % len(ops)]

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            op = op_of(i)
            subj = subject if len(ops) == 1 else f"{args.prefix}.{op}"
            start = time.perf_counter()
            msg = await request(subj, body(i))
            latencies.append(time.perf_counter() - start)
            if not msg.data.startswith(b'{"ok":true') and msg.data != b"ok":
                errors += 1
                if errors <= 3:
                    print("error reply:", msg.data[:200].decode(errors="replace"), flush=True)

    # warm-up, not measured
    warmup = 0 if sids else min(200, args.n // 10)
    for _ in range(warmup):
        await nc.request(
            subject if len(ops) == 1 else f"{args.prefix}.{ops[0]}",
            body(10**9 + _) if ops[0] == DEPLOY else body(_),
            timeout=30,
            headers=headers,
        )
    started = time.perf_counter()
    # a request has no timeout of its own (a timer each would cost the generator): the run has one
    await asyncio.wait_for(
        asyncio.gather(*(worker() for _ in range(args.concurrency))), timeout=60 + args.n / 100
    )
    elapsed = time.perf_counter() - started
    await nc.drain()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000

    return {
        "requests": len(latencies),
        "warmup": warmup,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(0.50), 3),
        "p90_ms": round(pct(0.90), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(latencies[-1] * 1000, 3),
    }


async def _requester(
    nc: nats.NATS, headers: dict[str, str]
) -> Callable[[str, bytes], Awaitable[nats.aio.msg.Msg]]:
    """Request-reply with the least work per request this side: one reply subscription.

    nats-py's `request` also arms a timeout and draws random bytes for every request; here a
    request's reply subject is a counter under one inbox, and a reply resolves its future
    directly. The load generator shares the cores with the service: every microsecond it
    spends is one the service under test does not get.
    """
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    waiting: dict[str, asyncio.Future[nats.aio.msg.Msg]] = {}
    tokens = itertools.count()
    start = len(inbox) + 1

    async def on_reply(msg: nats.aio.msg.Msg) -> None:
        future = waiting.pop(msg.subject[start:], None)
        if future is not None:
            future.set_result(msg)

    await nc.subscribe(inbox + ".*", cb=on_reply)

    async def request(subject: str, payload: bytes) -> nats.aio.msg.Msg:
        token = str(next(tokens))
        future = waiting[token] = loop.create_future()
        await nc.publish(subject, payload, reply=f"{inbox}.{token}", headers=headers)
        return await future

    return request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", default="hero.v1")
    parser.add_argument("--token", default="")
    parser.add_argument("--nkey", default="", help="an NKey seed file to connect with")
    parser.add_argument("--op", default=DEPLOY)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sids", help="a JSON file of VM sids for start/stop")
    parser.add_argument("--secret-of", default="bench", help="secret for sid i")
    parser.add_argument(
        "--tenants", type=int, default=1000, help="deploys and listings use tenant-{i %% tenants}"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    _ = uuid
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
