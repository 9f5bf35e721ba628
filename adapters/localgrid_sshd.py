"""A local grid VM's SSH side: public-key login as root, SFTP confined to its sandbox, exec I/O."""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncssh
import structlog

if TYPE_CHECKING:
    from adapters.localgrid_machine import VmMachine

_CHUNK = 65536
log = structlog.get_logger(__name__)


class VmSshServer(asyncssh.SSHServer):
    """Public-key auth against the VM's keys; everything else is refused."""

    def __init__(self, machine: VmMachine) -> None:
        self._machine = machine
        self._conn: asyncssh.SSHServerConnection | None = None
        self._username = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._machine.connected(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._machine.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        self._username = username
        return True

    def auth_completed(self) -> None:
        self._machine.ensure_home(self._username)

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._machine.accepts(username, key)


class SshListener:
    """A VM's SSH port: a listening socket that becomes an asyncssh server at the first knock.

    Most VMs a benchmark deploys are never logged into; an asyncssh server for each (its
    options are built on a thread) and a host key were most of the machine process's work.
    A client that knocks waits in the socket's backlog until the server takes it.
    """

    def __init__(
        self, sock: socket.socket, serve: Callable[[socket.socket], Awaitable[asyncssh.SSHAcceptor]]
    ) -> None:
        self.port: int = sock.getsockname()[1]
        self._sock = sock
        self._serve = serve
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._starting: asyncio.Task[None] | None = None
        self._closed = False
        asyncio.get_running_loop().add_reader(sock.fileno(), self._knocked)

    def _knocked(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._starting = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            acceptor = await self._serve(self._sock)
        except Exception:  # a server that cannot start refuses, as a dead sshd does
            log.exception("localgrid.ssh_start_failed")
            self._sock.close()
            return
        if self._closed:  # halted meanwhile
            acceptor.close()
            await acceptor.wait_closed()
            return
        self._acceptor = acceptor

    async def close(self) -> None:
        """Stops listening (the server, once it started, closes the socket)."""
        self._closed = True
        if self._starting is None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            return
        await self._starting
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()


class SandboxSftp(asyncssh.SFTPServer):
    """SFTP rooted at the sandbox; relative paths start at the home; nothing resolves outside."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], machine: VmMachine) -> None:
        username: str = chan.get_extra_info("username")
        home = machine.ensure_home(username)
        super().__init__(chan, chroot=os.fsencode(machine.root))
        self._machine = machine
        self._real_root = os.fsencode(os.path.realpath(machine.root))
        self._home = b"/" + os.fsencode(home.relative_to(machine.root).as_posix())

    def map_path(self, path: bytes) -> bytes:
        virtual = posixpath.normpath(posixpath.join(self._home, path)).lstrip(b"/")
        local = posixpath.join(self._real_root, virtual)
        real = os.path.realpath(local)
        if real != self._real_root and not real.startswith(self._real_root + b"/"):
            raise asyncssh.SFTPPermissionDenied("path leads outside the vm's filesystem")
        return local

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Sets what this machine can; an owner is recorded by the VM instead."""
        if attrs.uid is not None or attrs.gid is not None:
            virtual = posixpath.normpath(posixpath.join(self._home, path))
            await self._machine.set_owner(os.fsdecode(virtual), attrs.uid, attrs.gid)
            attrs = asyncssh.SFTPAttrs(
                size=attrs.size,
                permissions=attrs.permissions,
                atime=attrs.atime,
                mtime=attrs.mtime,
            )
        super().setstat(path, attrs)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported("links are not supported on this vm")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPOpUnsupported("links are not supported on this vm")


async def feed(source: asyncssh.SSHReader[bytes], sink: asyncio.StreamWriter) -> None:
    """Copies the session's stdin to the command until EOF."""
    with contextlib.suppress(OSError, asyncssh.Error):
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
    with contextlib.suppress(OSError):
        sink.close()


async def pump(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
    """Copies the command's output to the session until EOF; a gone client only drains it."""
    alive = True
    while chunk := await source.read(_CHUNK):
        if not alive:
            continue
        try:
            sink.write(chunk)
            await sink.drain()
        except (OSError, asyncssh.Error):
            alive = False


def kill(process: asyncio.subprocess.Process) -> None:
    """Kills the command's whole process group if it still runs."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
