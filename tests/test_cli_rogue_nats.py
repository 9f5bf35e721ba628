"""The CLI sends nothing to a foreign nats-server on the port of a stopped `up` (issue 12)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from hero_deployer.app.context import SERVER_NAME_FILE
from hero_deployer.app.natsserver import free_port, nats_server_binary
from hero_deployer.cli.errors import EXIT_UNAVAILABLE
from tests.test_cli_up import _env, _up

SECRET = "tenant-secret-never-sent"


async def _cli(tmp_path: Path, data_dir: Path, port: int, **extra: str) -> tuple[int, str]:
    """`vms list` against 127.0.0.1:`port` with `data_dir`; its exit status and stderr."""
    env = _env(tmp_path) | {"HERO_DEPLOYER_SECRET": SECRET} | extra
    command = ["vms", "list", "--data-dir", str(data_dir), "--nats", f"nats://127.0.0.1:{port}"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hero_deployer", *command, "--timeout", "1",
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


def _stopped_up(tmp_path: Path, data_dir: Path, port: int) -> None:
    """Runs `up` on `port` until it is ready, then stops it."""
    process = _up(tmp_path, data_dir, port)
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert "ready" in ready, ready + (process.stderr.read() if process.stderr else "")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


async def _rogue(port: int) -> tuple[asyncio.subprocess.Process, nats.NATS, list[Msg]]:
    """An anonymous nats-server on `port` and a connection to it that records every message."""
    server = await asyncio.create_subprocess_exec(
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:  # a child signals nothing when it starts listening: poll its port
        try:
            observer = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
            break
        except (OSError, nats.errors.Error):
            assert time.monotonic() < deadline and server.returncode is None, "no rogue server"
            await asyncio.sleep(0.05)
    seen: list[Msg] = []

    async def record(msg: Msg) -> None:
        seen.append(msg)

    await observer.subscribe(">", cb=record)
    await observer.flush()
    return server, observer, seen


async def test_a_foreign_server_on_a_stopped_ups_port_gets_nothing(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "var", free_port()
    _stopped_up(tmp_path, data_dir, port)
    assert (data_dir / SERVER_NAME_FILE).stat().st_mode & 0o777 == 0o600
    server, observer, seen = await _rogue(port)
    try:
        status, stderr = await _cli(tmp_path, data_dir, port)
        await observer.flush()
        assert seen == [], "the rogue server saw a request"
        assert status == EXIT_UNAVAILABLE, stderr
        (line,) = stderr.splitlines()
        assert "is not the one hero-deployer up started" in line and "nothing was sent" in line

        # no name recorded for the URL (an operator's own NATS): no check, and the request
        # reaches whatever answers there, which is what the check above prevents
        token = (data_dir / "token").read_text().strip()
        elsewhere = tmp_path / "elsewhere"
        status, stderr = await _cli(tmp_path, elsewhere, port, HERO_DEPLOYER_TOKEN=token)
        await observer.flush()
        assert status == EXIT_UNAVAILABLE, stderr
        assert any(SECRET.encode() in msg.data for msg in seen)
        assert any(token in (msg.headers or {}).get("Authorization", "") for msg in seen)
    finally:
        await observer.close()
        server.terminate()
        await server.wait()
