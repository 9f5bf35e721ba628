"""`hero-deployer serve` in a process of its own, for the benchmarks that measure or kill it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


async def start_serve(
    url: str, data: Path, env: Mapping[str, str], *, timeout: float = 60.0
) -> asyncio.subprocess.Process:
    """`serve` on `url` with `data`, its log in `data`'s parent; returns once it prints `ready`."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hero_deployer", "serve", "--nats", url, "--data-dir", str(data)),
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=(data.parent / "service.log").open("ab"),
    )
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while b"ready" not in await process.stdout.readline():
            if process.returncode is not None:
                raise SystemExit(f"serve exited with {process.returncode}: see service.log")
    return process
