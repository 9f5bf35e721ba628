"""`up` under load: N VM deploys at C in flight against a real `hero-deployer up`, beside a bare
nats-py responder measured in the same run.

`up` runs as an operator starts it: its own nats-server (NKey identities), a fresh data dir, the
dashboard, the default local grid with its SSH sandboxes on and its own deploy delay. The load
generator connects as the client identity (DIR/client.nk). After the load, the run waits until
every deployed VM has its SSH server (the grid's ledger says running) and prints how long that
took, and the CPU the service's processes used.

`--busy 0.3` runs a competitor beside everything, bare responder included: a process per core
that is busy 30% of every 10 ms. It stands for a slower moment of a shared host, where the
same code measured p99s twice as high, so that a change to the tail can be judged there too.

    python -m bench.up_load [--n 20000] [--no-ssh] [--busy DUTY]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from bench.load import DEPLOY
from bench.run import TOKEN, load, noop_baseline, show, started
from hero_deployer.app.natsserver import CLIENT_SEED, NatsServer, free_port


class UpProcess:
    """`hero-deployer up` in its own process on free ports and a fresh data dir."""

    def __init__(self, data_dir: Path, nats_port: int, web_port: int, **env: str) -> None:
        self.data_dir = data_dir
        self.url = f"nats://127.0.0.1:{nats_port}"
        self._args = ["--data-dir", str(data_dir), "--nats-port", str(nats_port)]
        self._args += ["--web-port", str(web_port)]
        self._env = env
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> UpProcess:
        env = dict(os.environ, HERO_DEPLOYER_TOKEN=TOKEN, HERO_DEPLOYER_LOG_LEVEL="warning")
        env.update(self._env)
        self._process = started(["up", *self._args], env)
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU so far of `up` and each of its child processes, by command name."""
        assert self._process is not None
        return _tree_cpu(self._process.pid)

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        started = time.perf_counter()
        self._process.terminate()
        self._process.wait(120)
        print(f"    up stopped {time.perf_counter() - started:.1f} s after SIGTERM", flush=True)


_BUSY = """
import sys, time
duty = float(sys.argv[1])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * 0.01:
        pass
    time.sleep((1 - duty) * 0.01)
"""


class Competitor:
    """Another load on the host: one process per core, each busy `duty` of every 10 ms."""

    def __init__(self, duty: float) -> None:
        self._duty = duty
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Competitor:
        if self._duty > 0:
            command = [sys.executable, "-c", _BUSY, str(self._duty)]
            self._processes = [subprocess.Popen(command) for _ in range(os.cpu_count() or 1)]
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.wait(10)


def _tree_cpu(root: int) -> dict[str, float]:
    """CPU seconds of `root` and its descendants (Linux /proc), summed by command name."""
    stats: dict[int, tuple[int, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = _label(entry, text[text.index("(") + 1 : text.rindex(")")])
        fields = text.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        stats[int(entry.name)] = (int(fields[1]), name, cpu)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in stats.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    totals: dict[str, float] = {}
    for pid in tree:
        if pid in stats:
            _, name, cpu = stats[pid]
            totals[name] = totals.get(name, 0.0) + cpu
    return totals


def _label(proc: Path, name: str) -> str:
    """`service`, `machines` (the local grid's process), else the command's name."""
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return name
    if b"adapters.localgrid_host" in argv:
        return "machines"
    return "service" if b"hero_deployer" in argv else name


def _running(ledger: Path) -> int:
    """How many VMs the local grid's ledger holds as running (its last line per VM counts)."""
    status: dict[str, str] = {}
    for line in ledger.read_bytes().splitlines():
        try:
            entry = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue  # a line being written
        if entry.get("vm"):
            record = entry.get("record")
            status[entry["vm"]] = record["status"] if record else "gone"
    return sum(1 for s in status.values() if s == "running")


def _wait_running(ledger: Path, count: int, timeout: float) -> tuple[int, float]:
    """Polls the ledger until `count` VMs run, 20 s pass without one more, or `timeout` passes.

    Returns how many run and the seconds until the last of them did.
    """
    started = last_change = time.perf_counter()
    running = 0
    while (now := time.perf_counter()) - started < timeout and now - last_change < 20:
        if (seen := _running(ledger)) != running:
            running, last_change = seen, now
        if running >= count:
            break
        time.sleep(0.5)  # a benchmark's poll of another process's file, not a test
    return running, last_change - started


def measure_up(data: Path, label: str, n: int, baseline: float, **env: str) -> None:
    """Runs the load against a fresh `up` on `data` and prints its figures."""
    with UpProcess(data, free_port(), free_port(), **env) as up:
        before = up.cpu_seconds()
        figures = load(up.url, DEPLOY, n, nkey=data / CLIENT_SEED)
        show(label, figures, baseline)
        print(f"    p90 {figures['p90_ms']:.2f} ms   max {figures['max_ms']:.2f} ms")
        vms = int(figures["requests"] + figures["warmup"])
        running, waited = _wait_running(data / "localgrid" / "ledger.jsonl", vms, 300.0)
        print(f"    {running} of {vms} VMs running {waited:.1f} s after the last reply")
        after = up.cpu_seconds()
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        print("    CPU used: " + ", ".join(f"{n} {s:.1f} s" for n, s in sorted(used.items())))
        per_vm = ", ".join(f"{n} {s / vms * 1e6:.0f}" for n, s in sorted(used.items()))
        print(f"    CPU per deploy (whole pipeline, µs): {per_vm}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000, help=f"{DEPLOY} requests")
    parser.add_argument(
        "--no-ssh", action="store_true", help="also run `up` without SSH sandboxes, for reference"
    )
    parser.add_argument(
        "--busy",
        type=float,
        default=0.0,
        metavar="DUTY",
        help="a competitor busy DUTY (0-1) of each core meanwhile, for a slower host",
    )
    args = parser.parse_args()
    print(f"up under load on {os.cpu_count()} cores: {args.n} {DEPLOY}, 64 in flight")
    if args.busy:
        print(f"beside a competitor busy {args.busy:.0%} of each core")
    with Competitor(args.busy), tempfile.TemporaryDirectory(prefix="hero-up-load-") as tmp:

        async def baseline() -> dict[str, float]:
            port = free_port()
            async with NatsServer(port=port, data_dir=Path(tmp) / "bare", config=None):
                return await asyncio.to_thread(noop_baseline, f"nats://127.0.0.1:{port}", args.n)

        base = asyncio.run(baseline())
        show("bare nats-py no-op responder", base)
        measure_up(Path(tmp) / "up", f"{DEPLOY} in up (ssh sandboxes)", args.n, base["per_second"])
        if args.no_ssh:
            label = f"{DEPLOY} in up (no ssh)"
            no_ssh = {"HERO_DEPLOYER_LOCAL_SSH": "0"}
            measure_up(Path(tmp) / "up-no-ssh", label, args.n, base["per_second"], **no_ssh)


if __name__ == "__main__":
    main()
