"""Fuzzes the live edge: random subjects, headers, bodies and sizes against a real service.

The service (`hero-deployer serve`, its own process, local grid) runs on a nats-server of its
own; this process sends N requests (default 100,000), a few dozen in flight, each a valid
request with random damage or random bytes. It prints how many replies were Internal (want 0),
how many requests got no reply in time (hangs, want 0), how many replies broke the envelope
(want 0), and how many events no accepted request explains (want 0): every event a request
records must match an `ok` reply (the VM's sid and `updated_at`, the user's name and
`updated_at`, the count of migrated VMs); outcome events of the reactors are left aside.

    .venv/bin/python -m bench.fuzz_edge [--requests 100000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError, TimeoutError

from bench.run import TOKEN
from bench.serve import served
from core import contract as c
from hero_deployer.sdk.client import OPERATIONS, HeroDeployerClient
from hero_deployer.sdk.wire import event_dict

PREFIX = "hero.v1"
SECRETS = ["", "alpha", "beta", "gamma"]
USERNAMES = ["fza", "fzb", "fzc"]
PAGE = ("after", "limit")  # a page's bounds, drawn though they have defaults
NAME = {op.request: op.name for op in OPERATIONS}  # the registry's name of each request type
COMMAND_EVENTS = {  # event type -> the operation whose ok reply must explain it
    "VmDeployRequested": NAME[c.DeployVm],
    "VmStarted": NAME[c.StartVm],
    "VmStopped": NAME[c.StopVm],
    "VmRestarted": NAME[c.RestartVm],
    "VmDeleteRequested": NAME[c.DeleteVm],
    "ProvisioningRequested": NAME[c.ProvisionUser],
    "ProvisioningResumed": NAME[c.ProvisionUser],
    "DecommissionRequested": NAME[c.DecommissionUser],
}
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 2**31, 2**70, -(2**70), 1.5, float("1e308"), "", " ", "web\n", "a\x00b",
    "é" * 70, "x" * 300, "\u202e", "../..", "vm:x\n", "*", ">", "$", [], {}, [1, "a"], {"a": 1},
]  # fmt: skip


class Fuzzer:
    """Makes one damaged request at a time from a seeded random source."""

    def __init__(self, rng: random.Random, sids: list[str]) -> None:
        self.rng = rng
        self.sids = sids

    def valid_body(self, op: str) -> dict[str, Any]:
        """A body `op` accepts: its request's required fields (and a page's bounds), at random."""
        r = self.rng
        draw: dict[str, Callable[[], Any]] = {
            "sid": lambda: (
                r.choice(self.sids) if r.random() < 0.8 else f"vm_{r.getrandbits(64):016x}"
            ),
            "name": lambda: f"fz-{r.getrandbits(20)}",
            "secret": lambda: r.choice(SECRETS),
            "old_secret": lambda: r.choice(SECRETS),
            "new_secret": lambda: r.choice(SECRETS),
            "username": lambda: r.choice(USERNAMES),
            "after": lambda: r.randrange(0, 50),
            "limit": lambda: r.randrange(1, 50),
        }
        fields = msgspec.structs.fields(OPERATIONS[op].request)
        return {f.name: draw[f.name]() for f in fields if f.required or f.name in PAGE}

    def body(self, op: str) -> bytes:
        r = self.rng
        roll = r.random()
        body = self.valid_body(op)
        if roll < 0.25:
            return msgspec.json.encode(body)
        if roll < 0.60:
            for _ in range(r.randrange(1, 4)):
                self._damage(body)
            return json.dumps(body, ensure_ascii=r.random() < 0.5).encode()
        if roll < 0.70:
            return r.randbytes(r.randrange(0, 300))
        if roll < 0.78:
            whole = msgspec.json.encode(body)
            return whole[: r.randrange(0, max(1, len(whole)))]
        if roll < 0.84:
            return msgspec.json.encode(r.choice(ODD_VALUES))
        if roll < 0.90:
            depth = r.choice([10, 1000, 100_000])
            return b"[" * depth + b"]" * depth if r.random() < 0.5 else b'{"a":' * depth
        if roll < 0.96:
            size = r.choice([1_000, 65_536, 500_000, 900_000])
            field = r.choice([*body, "name", "secret", "x"])
            return msgspec.json.encode({**body, field: "a" * size})
        return b"\xef\xbb\xbf" + msgspec.json.encode(body)  # a BOM, or invalid UTF-8 after it

    def _damage(self, body: dict[str, Any]) -> None:
        r = self.rng
        choice = r.random()
        if choice < 0.3 and body:
            body.pop(r.choice(list(body)))
        elif choice < 0.45:
            body[r.choice(["extra", "Secret", "sid ", "__proto__", "name"])] = r.choice(ODD_VALUES)
        elif body:
            body[r.choice(list(body))] = r.choice(ODD_VALUES)

    def headers(self) -> dict[str, str]:
        r = self.rng
        auth = r.choices(
            [f"Bearer {TOKEN}", None, "Bearer wrong", f"bearer {TOKEN}", f"Bearer {TOKEN} ",
             "Bearer", f"Bearer\t{TOKEN}", "Bearer " + "x" * 5000, f"Bearer {TOKEN}\x01"],
            weights=[80, 4, 4, 2, 2, 2, 2, 2, 2],
        )[0]  # fmt: skip
        headers = {} if auth is None else {"Authorization": auth}
        if r.random() < 0.4:
            headers["Idempotency-Key"] = r.choice(
                [uuid.uuid4().hex, "", "k" * 129, "ké", "k\x01", " ", "k" * 128]
            )
        if r.random() < 0.05:
            headers[r.choice(["X-Fuzz", "Nats-Service-Error", "Nats-Msg-Id"])] = "1"
        return headers

    def subject(self) -> str:
        r = self.rng
        op = r.choice([o.name for o in OPERATIONS])
        roll = r.random()
        if roll < 0.03:
            return f"{PREFIX}.{op.upper()}"
        if roll < 0.05:
            return f"{PREFIX}.{op}.{r.getrandbits(16)}"
        return f"{PREFIX}.{op}"


class Tally:
    """What came back, and what the `ok` replies explain."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.internal: list[str] = []
        self.broken: list[str] = []
        self.hangs = 0
        self.explained: dict[str, set[tuple[str, str]]] = {}
        self.migrated = 0
        self.deployed: set[str] = set()

    def record(self, op: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            reply = msgspec.json.decode(data)
            ok = reply["ok"]
        except (msgspec.DecodeError, KeyError, TypeError):
            self.broken.append(f"{op}: {data[:120]!r}")
            return
        if not ok:
            code = reply["error"]["code"]
            self.codes[code] += 1
            if code == "Internal":
                self.internal.append(f"{op}: {reply['error']['message']}")
            if "Nats-Service-Error-Code" not in headers:
                self.broken.append(f"{op}: an error reply without its micro headers")
            return
        self.codes["ok"] += 1
        result = reply["result"]
        if op == NAME[c.MigrateSecret]:
            self.migrated += result["migrated_count"]
        elif isinstance(result, dict) and "updated_at" in result:
            key = result.get("sid") or result.get("username")
            self.explained.setdefault(op, set()).add((key, result["updated_at"]))
            if op == NAME[c.DeployVm]:
                self.deployed.add(result["sid"])


async def send(nc: Client, fuzzer: Fuzzer, tally: Tally, count: int) -> None:
    for _ in range(count):
        subject, headers, body = fuzzer.subject(), fuzzer.headers(), fuzzer.body(NAME[c.Empty])
        op = subject.removeprefix(PREFIX + ".")
        if op in {o.name for o in OPERATIONS}:
            body = fuzzer.body(op)
        try:
            msg = await nc.request(subject, body, timeout=10, headers=headers)
        except NoRespondersError:
            tally.codes[
                "no responders (unknown subject)" if "." in op or op.isupper() else "NO RESPONDERS"
            ] += 1
            continue
        except TimeoutError:
            tally.hangs += 1
            continue
        tally.record(op, msg.data, dict(msg.headers or {}))


async def unexplained_events(nc: Client, tally: Tally) -> list[str]:
    """Command events no `ok` reply accounts for (user VMs' events are the manager's)."""
    client = HeroDeployerClient(nc, token=TOKEN, prefix=PREFIX, timeout=30)
    events = [event_dict(e) async for page in client.pages() for e in page.events]
    user_vms = {
        e["data"]["sid"] for e in events
        if e["type"] == "VmDeployRequested" and e["data"]["name"].startswith("user-")
    }  # fmt: skip
    wrong: list[str] = []
    migrated = 0
    for e in events:
        data, kind = e["data"], e["type"]
        migrated += kind == "VmSecretMigrated"
        op = COMMAND_EVENTS.get(kind)
        key = data.get("sid") or data.get("username")
        if op is None or key in user_vms:
            continue
        if kind == "VmDeployRequested" and key in tally.deployed:
            continue
        if (key, data["at"]) not in tally.explained.get(op, set()):
            wrong.append(f"{e['position']} {kind} {key}")
    if migrated != tally.migrated:
        wrong.append(f"{migrated} VmSecretMigrated for {tally.migrated} migrated in ok replies")
    return wrong


async def _call(nc: Client, op: str, body: dict[str, Any]) -> Any:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    msg = await nc.request(f"{PREFIX}.{op}", msgspec.json.encode(body), timeout=30, headers=headers)
    reply = msgspec.json.decode(msg.data)
    if not reply["ok"]:
        raise SystemExit(f"{op} failed: {reply}")
    return reply["result"]


async def run(requests: int, seed: int, in_flight: int) -> None:
    async with served(HERO_DEPLOYER_LOCAL_DEPLOY_DELAY="0") as nc:
        sids = [
            (await _call(nc, NAME[c.DeployVm], {"name": f"seed{i}", "secret": s}))["sid"]
            for i, s in enumerate(SECRETS * 3)
        ]
        tally = Tally()
        tally.deployed.update(sids)
        fuzzers = [Fuzzer(random.Random(seed * 1000 + i), sids) for i in range(in_flight)]
        started = time.perf_counter()
        share = requests // in_flight
        await asyncio.gather(*(send(nc, f, tally, share) for f in fuzzers))
        elapsed = time.perf_counter() - started
        health = await _call(nc, NAME[c.Empty], {})
        wrong = await unexplained_events(nc, tally)
    sent = share * in_flight
    print(
        f"sent {sent:,} fuzzed requests in {elapsed:.0f} s ({sent / elapsed:,.0f}/s),"
        f" {in_flight} in flight; the service answered health after: {health['status']}"
    )
    for code, n in sorted(tally.codes.items()):
        print(f"  {code:<34} {n:>8,}")
    print(f"Internal replies (want 0)           {len(tally.internal):>8,}")
    print(f"hangs, no reply in 10 s (want 0)    {tally.hangs:>8,}")
    print(f"broken envelopes (want 0)           {len(tally.broken):>8,}")
    print(f"events no ok reply explains (want 0){len(wrong):>8,}")
    for line in (tally.internal + tally.broken + wrong)[:10]:
        print("   ", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()
    print(
        f"bench/fuzz_edge.py on {os.cpu_count()} cores, python {sys.version.split()[0]},"
        f" seed {args.seed}"
    )
    asyncio.run(run(args.requests, args.seed, args.in_flight))


if __name__ == "__main__":
    main()
