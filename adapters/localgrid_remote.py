"""The service's side of the local grid's machine process (`adapters.localgrid_host`).

`MachineHost` starts the child and speaks to it over a socket pair; each `RemoteMachine` stands
for one VM's machine there, with what the local grid reads of it mirrored here: its ports and
the owners SFTP set. The child waits for this side to take in a change before the SSH client
that caused it hears back, so the mirror is never behind what that client has seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import posixpath
import shutil
import socket
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import msgspec

from adapters.localgrid_host import (
    Ack,
    Boot,
    Booted,
    Failed,
    Frames,
    FromHost,
    Halt,
    OwnerSet,
    Remove,
    ToHost,
    WebStarted,
    read_frame,
)
from core.ports import BackendError

_GONE = "the local grid's machine process is not running"
MACHINES_PER_PROCESS = 8_000
"""A socket or more per VM: well within a process's usual 20,000 file descriptors."""


class MachinePool:
    """The machine processes of one grid: a new one once the last holds its share of VMs."""

    def __init__(self, *, nice: int = 0) -> None:
        self._nice = nice
        self._hosts = [MachineHost(nice=nice)]

    @property
    def pids(self) -> list[int]:
        """The process ids of the children that run."""
        return [host.pid for host in self._hosts if host.pid is not None]

    async def start(self) -> None:
        """Starts the first child (the others start with their first machine)."""
        await self._hosts[0].start()

    async def close(self) -> None:
        """Closes every child."""
        await asyncio.gather(*(host.close() for host in self._hosts))

    def machine(self, name: str, root: Path, authorized_keys: frozenset[bytes]) -> RemoteMachine:
        """A new machine for a VM, in the last child, or in a new one if that one is full."""
        if self._hosts[-1].held >= MACHINES_PER_PROCESS:
            self._hosts.append(MachineHost(nice=self._nice))
        return self._hosts[-1].machine(name, root, authorized_keys)


class MachineHost:
    """The child process that runs the local grid's machines; `nice` lowers its priority."""

    def __init__(self, *, nice: int = 0) -> None:
        self._nice = nice
        self._process: asyncio.subprocess.Process | None = None
        self._frames: Frames | None = None
        self._reading: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[FromHost]] = {}
        self._machines: weakref.WeakValueDictionary[int, RemoteMachine] = (
            weakref.WeakValueDictionary()
        )
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._encoder = msgspec.msgpack.Encoder()
        self._starting = asyncio.Lock()
        self._closed = False

    @property
    def held(self) -> int:
        """How many machines this side still holds a handle of."""
        return len(self._machines)

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Starts the child and connects to it."""
        ours, theirs = socket.socketpair()
        args = [sys.executable, "-m", "adapters.localgrid_host", str(theirs.fileno())]
        try:
            self._process = await asyncio.create_subprocess_exec(
                *([*args, str(self._nice)] if self._nice else args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,  # a pipe of ours would outlive us there
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        self._frames = Frames(writer)
        self._reading = asyncio.create_task(self._read(reader))

    async def close(self, timeout: float = 10.0) -> None:
        """Closes the socket: the child halts every machine and exits (killed after `timeout`)."""
        self._closed = True
        frames, self._frames = self._frames, None
        if frames is not None:
            frames.writer.close()
        process, self._process = self._process, None
        if process is not None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._reading is not None:
            await self._reading

    def machine(self, name: str, root: Path, authorized_keys: frozenset[bytes]) -> RemoteMachine:
        """A new machine for a VM, made in the child when it first boots."""
        handle = next(self._handles)
        machine = RemoteMachine(self, handle, name, root, authorized_keys)
        self._machines[handle] = machine
        return machine

    async def call(self, request: Callable[[int], ToHost]) -> FromHost:
        """Sends `request(id)` and returns the child's reply; ConnectionError if it is gone.

        A child not started yet (and not closed) is started first.
        """
        if self._frames is None and not self._closed:  # not started, or starting now
            async with self._starting:
                if self._process is None and not self._closed:
                    await self.start()
        if self._frames is None or self._frames.writer.is_closing():
            raise ConnectionError(_GONE)
        number = next(self._ids)
        future = self._waiting[number] = asyncio.get_running_loop().create_future()
        self._frames.send(self._encoder.encode(request(number)))
        reply: FromHost = await future
        return reply

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = msgspec.msgpack.Decoder(FromHost)
        while (body := await read_frame(reader)) is not None:
            message = decoder.decode(body)
            match message:
                case WebStarted(id=number, handle=handle, web_port=port):
                    if (machine := self._machines.get(handle)) is not None:
                        machine.web_started(port)
                    self._ack(number)
                case OwnerSet(id=number, handle=handle, path=path, uid=uid, gid=gid):
                    if (machine := self._machines.get(handle)) is not None:
                        machine.owners[path] = (uid, gid)
                    self._ack(number)
                case _:
                    future = self._waiting.pop(message.id, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ConnectionError(_GONE))

    def _ack(self, number: int) -> None:
        if self._frames is not None:
            self._frames.send(self._encoder.encode(Ack(number)))


class RemoteMachine:
    """One VM's machine in the child process, as the local grid uses a `VmMachine`."""

    def __init__(
        self,
        host: MachineHost,
        handle: int,
        name: str,
        root: Path,
        authorized_keys: frozenset[bytes],
    ) -> None:
        self.name = name
        self.root = root
        self.owners: dict[str, tuple[int | None, int | None]] = {}
        self._host = host
        self._handle = handle
        self._keys = sorted(authorized_keys)
        self.ssh_port = 0  # the last one, while halted
        self.web_port: int | None = None  # None while the web service does not answer

    def owner(self, path: str) -> tuple[int | None, int | None] | None:
        """The uid and gid set over SFTP on the VM's absolute `path`, or None."""
        return self.owners.get(posixpath.normpath(path))

    def web_started(self, port: int) -> None:
        """Takes in the child's notice that a command enabled the web service."""
        self.web_port = port

    async def boot(self) -> None:
        """Boots the machine in the child: OSError when the system refused, as `VmMachine`."""
        reply = await self._host.call(
            lambda n: Boot(n, self._handle, self.name, str(self.root), self._keys)
        )
        match reply:
            case Booted(ssh_port=ssh_port, web_port=web_port):
                self.ssh_port, self.web_port = ssh_port, web_port
            case Failed(message=message, os_error=True):
                raise OSError(message)
            case Failed(message=message):
                raise BackendError(f"vm {self.name} failed to boot: {message}", retryable=True)

    async def halt(self) -> None:
        """Stops the web service, commands, sessions and SSH server (gone with the child too)."""
        self.web_port = None
        with contextlib.suppress(ConnectionError):
            await self._host.call(lambda n: Halt(n, self._handle))

    async def remove(self) -> None:
        """Halts the machine and removes its sandbox folder."""
        self.web_port = None
        try:
            await self._host.call(lambda n: Remove(n, self._handle, str(self.root)))
        except ConnectionError:
            await asyncio.to_thread(shutil.rmtree, self.root, ignore_errors=True)
