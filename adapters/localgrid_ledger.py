"""The local grid's memory on disk: which VMs and gateways exist, so a restart keeps them.

An append-only journal of JSON lines, one per change, handed to the OS once per turn of the event
loop that made the changes (no fsync: it is a simulation, and a line lost in a crash is a VM the
reactor deploys again by name). Opening folds the journal, drops a torn last line, and rewrites
it compacted.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import BinaryIO, TypeVar

import msgspec

from core.ports import BackendVmStatus, GatewaySpec, VmSpec


class VmRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A VM the grid holds: what was deployed, where, and whether it runs."""

    spec: VmSpec
    node_id: int
    status: BackendVmStatus


class _Entry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One change: a VM or a gateway put (its record or spec) or removed (None)."""

    vm: str = ""
    record: VmRecord | None = None
    gateway: str = ""
    route: GatewaySpec | None = None


V = TypeVar("V")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Entry)


class LedgerInUse(Exception):
    """Another grid, in this process or another, holds the ledger."""


class Ledger:
    """Records the grid's VMs and gateways in `path`; `open` gives back what it held.

    One grid at a time: `open` takes an exclusive lock (`<path>.lock`) until `close`.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None
        self._lock: BinaryIO | None = None
        self._flush_due = False

    def open(self) -> tuple[dict[str, VmRecord], dict[str, GatewaySpec]]:
        """The VMs and gateways recorded so far; later changes are appended."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        lock = self._path.with_name(self._path.name + ".lock").open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise LedgerInUse(f"{self._path} is in use by another local grid") from None
        self._lock = lock
        vms: dict[str, VmRecord] = {}
        gateways: dict[str, GatewaySpec] = {}
        if self._path.exists():
            for line in self._path.read_bytes().splitlines():
                try:
                    entry = _decoder.decode(line)
                except msgspec.DecodeError:
                    continue  # a line torn by a crash in the middle of a write
                if entry.vm:
                    _put(vms, entry.vm, entry.record)
                if entry.gateway:
                    _put(gateways, entry.gateway, entry.route)
        compacted = self._path.with_name(self._path.name + ".tmp")
        with compacted.open("wb") as out:
            out.writelines(
                [_line(_Entry(vm=name, record=record)) for name, record in vms.items()]
                + [_line(_Entry(gateway=name, route=spec)) for name, spec in gateways.items()]
            )
        os.replace(compacted, self._path)
        self._file = self._path.open("ab")
        return vms, gateways

    def vm(self, name: str, record: VmRecord | None) -> None:
        """Records the VM as it is now; None when it is gone."""
        self._append(_Entry(vm=name, record=record))

    def gateway(self, name: str, spec: GatewaySpec | None) -> None:
        """Records the gateway; None when it is gone."""
        self._append(_Entry(gateway=name, route=spec))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

    def _append(self, entry: _Entry) -> None:
        """Buffers the line; the loop's next turn flushes every line of this one at once.

        A flush is a write(2) of its own (2-11 µs each under load): a VM changes status two or
        three times per deploy, and many VMs change in one turn under load.
        """
        if self._file is None:  # a grid never entered keeps its memory to itself
            return
        self._file.write(_line(entry))
        if self._flush_due:
            return
        try:
            asyncio.get_running_loop().call_soon(self._flush)
        except RuntimeError:  # no loop runs here: write through
            self._file.flush()
            return
        self._flush_due = True

    def _flush(self) -> None:
        self._flush_due = False
        if self._file is not None:
            self._file.flush()


def _put(table: dict[str, V], name: str, value: V | None) -> None:
    if value is None:
        table.pop(name, None)
    else:
        table[name] = value


def _line(entry: _Entry) -> bytes:
    return _encoder.encode(entry) + b"\n"
