"""The local grid's machines in a child process: their own event loop and GIL, off the service's.

`python -m adapters.localgrid_host FD` serves one parent over the socket FD (a socket pair the
parent made): it boots, halts and removes `VmMachine`s on request, and tells the parent what a
VM changes by itself (a web service that setup started, an owner SFTP set) and waits for the
parent's acknowledgement before the SSH client that caused the change hears back. Frames are
msgpack, each after its length (4 bytes, big-endian). When the parent's end closes (the parent
stopped or died) every machine is halted and the process exits.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from adapters.localgrid_machine import VmMachine


class _Message(msgspec.Struct, frozen=True, tag=True):
    """A frame: its tag is the class name; `id` pairs a reply with its request or notice."""

    id: int


class _ForMachine(_Message, frozen=True):
    """A frame about the machine the parent calls `handle`."""

    handle: int


class Boot(_ForMachine, frozen=True):
    """Boots the machine (made on first use from name, sandbox root and authorized keys)."""

    name: str
    root: str
    keys: list[bytes]


class Halt(_ForMachine, frozen=True):
    """Halts the machine; one the host does not hold counts as halted."""


class Remove(_ForMachine, frozen=True):
    """Halts the machine and removes its sandbox folder."""

    root: str


class Ack(_Message, frozen=True):
    """The parent has taken the notice `id` in."""


class Booted(_Message, frozen=True):
    """The machine runs: its SSH port and its web service's port, if setup enabled it."""

    ssh_port: int
    web_port: int | None


class Done(_Message, frozen=True):
    """A halt or removal finished."""


class Failed(_Message, frozen=True):
    """A request failed; `os_error` when the system refused (a port, a folder)."""

    message: str
    os_error: bool


class WebStarted(_ForMachine, frozen=True):
    """Notice: a command enabled the machine's web service, which now answers on `web_port`."""

    web_port: int


class OwnerSet(_ForMachine, frozen=True):
    """Notice: SFTP gave the VM's absolute `path` an owner."""

    path: str
    uid: int | None
    gid: int | None


ToHost = Boot | Halt | Remove | Ack
FromHost = Booted | Done | Failed | WebStarted | OwnerSet

_HEADER = 4


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's body, or None at the end of the stream."""
    try:
        header = await reader.readexactly(_HEADER)
        return await reader.readexactly(int.from_bytes(header, "big"))
    except asyncio.IncompleteReadError:
        return None


def frame(body: bytes) -> bytes:
    """`body` with its length in front."""
    return len(body).to_bytes(_HEADER, "big") + body


class Frames:
    """Writes the frames sent during one loop turn together, in order: one system call."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._queued: list[bytes] = []

    def send(self, body: bytes) -> None:
        """Queues `body`'s frame; dropped once the writer is closing, as a write would be."""
        if self.writer.is_closing():
            return
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queued.append(frame(body))

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        if not self.writer.is_closing():
            self.writer.write(b"".join(queued))


class _Notices:
    """A machine's `Observer`: sends each change to the parent and waits for its Ack."""

    def __init__(self, host: _Host, handle: int) -> None:
        self._host = host
        self._handle = handle

    async def web_started(self, machine: VmMachine) -> None:
        port = machine.web_port
        if port is not None:
            await self._host.notify(lambda i: WebStarted(i, self._handle, port))

    async def owner_set(self, machine: VmMachine, path: str) -> None:
        uid, gid = machine.owner(path) or (None, None)
        await self._host.notify(lambda i: OwnerSet(i, self._handle, path, uid, gid))


class _Host:
    """The machines of one parent, by the parent's handle."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._frames = Frames(writer)
        self._machines: dict[int, VmMachine] = {}
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._notices = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._encoder = msgspec.msgpack.Encoder()

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Performs each request as its own task until the parent's end closes."""
        decoder = msgspec.msgpack.Decoder(ToHost)
        while (body := await read_frame(reader)) is not None:
            message = decoder.decode(body)
            if isinstance(message, Ack):
                future = self._acks.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(None)
                continue
            task = asyncio.create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        for future in self._acks.values():
            future.cancel()
        await asyncio.gather(*(m.halt() for m in self._machines.values()))

    async def notify(self, notice: Callable[[int], FromHost]) -> None:
        """Sends the notice `notice(id)` makes and waits until the parent acknowledges it."""
        self._notices += 1
        future = self._acks[self._notices] = asyncio.get_running_loop().create_future()
        self._send(notice(self._notices))
        await future

    async def _answer(self, request: Boot | Halt | Remove) -> None:
        try:
            reply: FromHost = await self._perform(request)
        except OSError as exc:
            reply = Failed(request.id, str(exc), os_error=True)
        except Exception as exc:  # the parent decides what a failure means
            reply = Failed(request.id, f"{type(exc).__name__}: {exc}", os_error=False)
        self._send(reply)

    async def _perform(self, request: Boot | Halt | Remove) -> FromHost:
        match request:
            case Boot(id=id, handle=handle):
                machine = self._machines.get(handle)
                if machine is None:
                    machine = self._machines[handle] = self._machine(request)
                try:
                    await machine.boot()
                except BaseException:
                    del self._machines[handle]  # boot halted it; the next Boot starts afresh
                    raise
                return Booted(id, machine.ssh_port, machine.web_port)
            case Halt(id=id, handle=handle):
                if (machine := self._machines.get(handle)) is not None:
                    await machine.halt()
                return Done(id)
            case Remove(id=id, handle=handle, root=root):
                gone = self._machines.pop(handle, None)
                await (gone if gone is not None else self._bare(handle, root)).remove()
                return Done(id)

    def _machine(self, boot: Boot) -> VmMachine:
        return VmMachine(
            name=boot.name,
            root=Path(boot.root),
            authorized_keys=frozenset(boot.keys),
            observer=_Notices(self, boot.handle),
        )

    @staticmethod
    def _bare(handle: int, root: str) -> VmMachine:
        """A machine never booted here, to remove what its sandbox holds on disk."""
        return VmMachine(name=str(handle), root=Path(root), authorized_keys=frozenset())

    def _send(self, message: FromHost) -> None:
        self._frames.send(self._encoder.encode(message))


async def _main(fd: int) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    await _Host(writer).serve(reader)
    writer.close()


def _tune_gc() -> None:
    """Moves the imported modules out of the collector's sight; collects the old rarely.

    Each VM's SSH server stays alive as long as the VM runs, so with the default thresholds
    a full pass over every server ran each time their number grew by a quarter: a third of
    this process's CPU while thousands of VMs boot.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def main() -> None:
    """Serves the parent on the socket whose descriptor is the first argument."""
    fd = int(sys.argv[1])
    _, most = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))  # a socket or more per VM
    if len(sys.argv) > 2:
        os.nice(int(sys.argv[2]))
    _tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        asyncio.run(_main(fd))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_main(fd))


if __name__ == "__main__":
    main()
