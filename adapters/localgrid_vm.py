"""A VM of the local grid as the grid holds it, and what it says of it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from dataclasses import dataclass

import asyncssh

from adapters.localgrid_machine import Machine
from adapters.localgrid_nodes import Node
from core.ports import BackendVm, BackendVmStatus, VmSpec


def mycelium_ip(name: str) -> str:
    """A deterministic address in 400::/7 derived from the VM's name."""
    raw = bytearray(hashlib.sha256(name.encode()).digest()[:16])
    raw[0] = 0x04 | (raw[0] & 0x01)
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


@dataclass(slots=True)
class GridVm:
    """A VM the grid holds: its spec, node, status and machine."""

    spec: VmSpec
    node: Node
    mycelium_ip: str
    status: BackendVmStatus = "deploying"
    machine: Machine | None = None
    busy: asyncio.Future[None] | None = None  # set while an operation on this VM is in flight


def view(vm: GridVm) -> BackendVm:
    """What the grid says of the VM: its ports, its mycelium address, its status."""
    if vm.machine is not None:
        host, port = "127.0.0.1", vm.machine.ssh_port
    else:
        host, port = vm.mycelium_ip, 22
    return BackendVm(
        name=vm.spec.name,
        node_id=vm.node.spec.node_id,
        mycelium_ip=vm.mycelium_ip,
        status=vm.status,
        ssh_host=host,
        ssh_port=port,
    )


class Busy:
    """Marks a VM as having an operation in flight, so others on it wait their turn."""

    def __init__(self, vm: GridVm) -> None:
        self._vm = vm
        self._future: asyncio.Future[None] | None = None

    async def __aenter__(self) -> None:
        self._future = self._vm.busy = asyncio.get_running_loop().create_future()

    async def __aexit__(self, *exc: object) -> None:
        self._vm.busy = None
        if self._future is not None:
            self._future.set_result(None)


def authorized_keys(spec: VmSpec) -> frozenset[bytes]:
    """The public blobs of `spec.ssh_keys`; a line that does not parse authorizes nobody.

    A real VM's authorized_keys tolerates a bad line the same way.
    """
    blobs = set()
    for line in spec.ssh_keys:
        with contextlib.suppress(asyncssh.KeyImportError, ValueError):
            blobs.add(asyncssh.import_public_key(line).public_data)
    return frozenset(blobs)
