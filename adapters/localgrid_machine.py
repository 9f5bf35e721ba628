"""One local grid VM's insides: its sandbox folder, SSH server (SFTP and exec) and web service.

The sandbox `data_dir/localgrid/vms/<name>/` stands for the VM's filesystem root. SFTP is
confined to it; exec runs a real `/bin/sh` on this machine with its working directory and HOME
in the sandbox, which is a convenience for tests and demos, not an isolation boundary.

As on the grid, the VM's keys log in as `root` only: zos installs the SSH_KEY of a VM for root
(threefoldtech/zosbase `pkg/vm/manager.go`). The image's accounts are in the sandbox's
`/etc/passwd` (root, and `driver`, the account Hero's services run as); ownership set over
SFTP is kept by the VM, not given to this machine's files.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import re
import shutil
import socket
import tomllib
from pathlib import Path
from typing import Any, Protocol

import asyncssh
from aiohttp import web

from adapters.localgrid_ports import PORTS, listening_socket
from adapters.localgrid_sshd import SandboxSftp, SshListener, VmSshServer, feed, kill, pump

WEB_PORT = 9988
SETUP_SCRIPT_NAME = "setup-binaries.sh"
SERVICES_TOML = "hero/cfg/cockpit/services.toml"
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")  # whole value: fullmatch
LOGIN_USER = "root"
SERVICE_USER = "driver"  # Hero's services run as driver and read its cockpit config
# The image's accounts (/etc/passwd lines: name, no password, uid, gid, home, shell).
IMAGE_ACCOUNTS = (
    ("root", 0, 0, "/root"),
    ("driver", 1000, 1000, "/home/driver"),
)

_HOST_KEY = "etc/ssh/ssh_host_ed25519_key"
_WEB_MARKER = "run/hero-web.ready"

SETUP_SCRIPT = """#!/bin/sh
# Stand-in for Hero's setup-binaries.sh on a local grid VM: "installs" the binaries and enables
# the web service on port 9988. The local grid starts that service when this command returns.
set -eu
root="${LOCALGRID_VM_ROOT:?run me over ssh on a local grid vm}"
mkdir -p "$root/run"
printf '%s\\n' "$USER" > "$root/run/hero-web.ready"
echo "hero binaries installed; web service enabled on port 9988"
"""


class Observer(Protocol):
    """Hears what a VM changes by itself, before the SSH client that caused it hears back."""

    async def web_started(self, machine: VmMachine) -> None: ...

    async def owner_set(self, machine: VmMachine, path: str) -> None: ...


class Machine(Protocol):
    """What the local grid uses of a VM's machine, here (`VmMachine`) or in a child process."""

    name: str

    @property
    def ssh_port(self) -> int: ...

    @property
    def web_port(self) -> int | None: ...

    def owner(self, path: str) -> tuple[int | None, int | None] | None: ...

    async def boot(self) -> None: ...

    async def halt(self) -> None: ...

    async def remove(self) -> None: ...


class VmMachine:
    """Runs one VM's SSH server and, once setup has run, its web service on loopback ports."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        authorized_keys: frozenset[bytes],
        observer: Observer | None = None,
    ) -> None:
        self.name = name
        self.root = root
        self._authorized_keys = authorized_keys
        self._observer = observer
        self._host_key: asyncssh.SSHKey | None = None
        self._prepared = False  # the sandbox's folders, accounts and host key are on disk
        self._sshd: SshListener | None = None
        self._ssh_port = 0
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self._processes: set[asyncio.subprocess.Process] = set()
        self._web: web.AppRunner | None = None
        self._web_port: int | None = None
        self._web_user = ""
        self._owners: dict[str, tuple[int | None, int | None]] = {}

    @property
    def ssh_port(self) -> int:
        """The loopback port of the SSH server (the last one, while halted)."""
        return self._ssh_port

    @property
    def web_port(self) -> int | None:
        """The loopback port of the web service, or None while it does not answer."""
        return self._web_port

    def home(self, username: str) -> Path:
        """The real folder of the user's home (`/root`, else `/home/<username>`) in the sandbox."""
        return self.root / "root" if username == "root" else self.root / "home" / username

    def accepts(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Says whether `key` may log in as `username`: the VM's keys are root's only."""
        return username == LOGIN_USER and key.public_data in self._authorized_keys

    def owner(self, path: str) -> tuple[int | None, int | None] | None:
        """The uid and gid set over SFTP on the VM's absolute `path`, or None."""
        return self._owners.get(posixpath.normpath(path))

    async def set_owner(self, path: str, uid: int | None, gid: int | None) -> None:
        """Records the owner SFTP gave `path` (this machine's file keeps its own)."""
        path = posixpath.normpath(path)
        self._owners[path] = (uid, gid)
        if self._observer is not None:
            await self._observer.owner_set(self, path)

    async def boot(self) -> None:
        """Listens on the SSH port, and starts the web service if set up.

        The SSH server, its host key and a sandbox not on disk yet are made at the first
        connection, not here: most VMs a benchmark deploys are never logged into.
        """
        if self._sshd is not None:
            return
        try:
            user = None
            if self._host_key is not None or self.root.exists():
                user = await asyncio.to_thread(self._recall)
            self._sshd = SshListener(listening_socket(PORTS, self._ssh_port), self._serve_ssh)
            self._ssh_port = self._sshd.port
            if user is not None:
                await self._start_web(user)
        except BaseException:
            await self.halt()
            raise

    async def halt(self) -> None:
        """Stops the web service, running commands, SSH sessions and the SSH server."""
        sshd, self._sshd = self._sshd, None  # first: a finishing command sees it
        for process in list(self._processes):
            kill(process)
        await self._stop_web()
        if sshd is not None:
            await sshd.close()
            PORTS.release(self._ssh_port)
        connections = list(self.connections)
        for conn in connections:
            conn.close()
        for conn in connections:
            await conn.wait_closed()
        self.connections.clear()

    async def remove(self) -> None:
        """Halts the VM and removes its sandbox folder: the VM's disk is gone."""
        await self.halt()
        await asyncio.to_thread(shutil.rmtree, self.root, ignore_errors=True)

    def ensure_home(self, username: str) -> Path:
        """Creates the user's home with its `setup-binaries.sh`, once."""
        home = self.home(username)
        script = home / SETUP_SCRIPT_NAME
        if not script.exists():
            home.mkdir(parents=True, exist_ok=True)
            script.write_text(SETUP_SCRIPT)
            script.chmod(0o755)
        return home

    def connected(self, conn: asyncssh.SSHServerConnection) -> None:
        """Takes a new connection; the sandbox is made first, before it can log in."""
        self.connections.add(conn)
        if not self._prepared:
            try:
                self._prepare()
            except OSError:
                conn.abort()

    def _recall(self) -> str | None:
        """Reads the sandbox's host key (or makes one); the web service's user, if set up."""
        if self._host_key is None:
            path = self.root / _HOST_KEY
            try:
                self._host_key = asyncssh.import_private_key(path.read_bytes())
            except FileNotFoundError:
                self._host_key = _new_host_key(self.name)
        return self._web_marker()

    def _prepare(self) -> None:
        homes = [home.lstrip("/") for _, _, _, home in IMAGE_ACCOUNTS]
        for folder in ("home", "run", "tmp", "etc/ssh", *homes):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        passwd = self.root / "etc" / "passwd"
        if not passwd.exists():
            passwd.write_text(
                "".join(f"{n}:x:{u}:{g}::{h}:/bin/bash\n" for n, u, g, h in IMAGE_ACCOUNTS)
            )
        path = self.root / _HOST_KEY
        if self._host_key is None:
            self._recall()
        if not path.exists():
            assert self._host_key is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._host_key.export_private_key())
        self._prepared = True

    async def _serve_ssh(self, sock: socket.socket) -> asyncssh.SSHAcceptor:
        """The VM's SSH server on its listening socket, with the sandbox's host key."""
        if self._host_key is None:
            await asyncio.to_thread(self._recall)
        return await asyncssh.create_server(
            lambda: VmSshServer(self),
            sock=sock,
            server_host_keys=[self._host_key],
            process_factory=self._run_process,
            sftp_factory=lambda chan: SandboxSftp(chan, self),
            allow_scp=False,
            encoding=None,
            agent_forwarding=False,
            x11_forwarding=False,
            gss_host=None,
            config=None,
        )

    async def _run_process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """Runs an exec (or shell) request with `/bin/sh` in the user's home."""
        username: str = process.get_extra_info("username")
        home = self.ensure_home(username)
        argv = ["/bin/sh", "-c", process.command] if process.command else ["/bin/sh"]
        env = {
            "HOME": str(home),
            "USER": username,
            "LOGNAME": username,
            "SHELL": "/bin/sh",
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "LOCALGRID_VM": self.name,
            "LOCALGRID_VM_ROOT": str(self.root),
        }
        try:
            child = await asyncio.create_subprocess_exec(
                *argv,
                cwd=home,
                env=env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            process.stderr.write(f"localgrid: cannot run /bin/sh: {exc}\n".encode())
            process.exit(127)
            return
        self._processes.add(child)
        assert child.stdin and child.stdout and child.stderr
        feeder = asyncio.create_task(feed(process.stdin, child.stdin))
        try:
            await asyncio.gather(
                pump(child.stdout, process.stdout), pump(child.stderr, process.stderr)
            )
            status = await child.wait()
        finally:
            feeder.cancel()
            kill(child)
            self._processes.discard(child)
        await self._after_command()
        process.exit(status if status >= 0 else 128 - status)

    async def _after_command(self) -> None:
        """Starts the web service once a command has enabled it (the marker `setup` writes)."""
        if self._web is not None or self._sshd is None:
            return
        user = self._web_marker()
        if user is not None:
            await self._start_web(user)
            if self._observer is not None and self._web_port is not None:
                await self._observer.web_started(self)

    def _web_marker(self) -> str | None:
        try:
            user = (self.root / _WEB_MARKER).read_text().strip()
        except OSError:
            return None
        return user if USERNAME_PATTERN.fullmatch(user) else None

    async def _start_web(self, user: str) -> None:
        self._web_user = user
        app = web.Application()
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        except BaseException:
            await runner.cleanup()
            raise
        if self._sshd is None or self._web is not None:  # halted or started meanwhile
            await runner.cleanup()
            return
        self._web = runner
        self._web_port = int(runner.addresses[0][1])

    async def _stop_web(self) -> None:
        runner, self._web, self._web_port = self._web, None, None
        if runner is not None:
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"status": "ok", "vm": self.name, "services": []}
        path = self.home(SERVICE_USER) / SERVICES_TOML
        try:
            body["services"] = service_names(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            pass
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            body["config_error"] = str(exc)
        return web.json_response(body)


def _new_host_key(name: str) -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519", comment=f"localgrid-{name}")


def service_names(doc: dict[str, Any]) -> list[str]:
    """The service names a `services.toml` declares, in a few plausible layouts."""
    services = doc.get("services", doc.get("service", doc))
    if isinstance(services, list):
        return [str(s["name"]) for s in services if isinstance(s, dict) and "name" in s]
    if isinstance(services, dict):
        return sorted(key for key, value in services.items() if isinstance(value, dict))
    return []
