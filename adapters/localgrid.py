"""The embedded "local grid": a `ComputeBackend` on this machine, for development and tests.

Which VMs and gateways exist is kept in `data_dir/localgrid/ledger.jsonl` (see
`localgrid_ledger`): a grid entered again on the same data dir has them back, running VMs with
their SSH server (same host key) and web service, stopped ones stopped, gateways routing. Sandbox
folders and host keys on disk are reused when a VM of the same name is deployed again;
`delete_vm` removes them. A grid used without `async with` keeps its state in memory only.

Capacity: nodes you pass are enforced. The default nodes are realistic, but unless you say
`unlimited=False` they do not refuse work, so benchmarks can deploy 100,000 VMs; their free
capacity then reports total minus used, never below zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import asyncssh
import msgspec
import structlog

from adapters.localgrid_gateway import GatewayRoute, GatewayServer, parse_backend_url
from adapters.localgrid_ledger import Ledger, LedgerInUse, VmRecord
from adapters.localgrid_machine import WEB_PORT, Machine, VmMachine
from adapters.localgrid_remote import MachineHost
from core.gateway_names import GRID_GATEWAY_NAME
from core.ports import (
    BackendError,
    BackendGateway,
    BackendNotFound,
    BackendUnavailable,
    BackendVm,
    BackendVmStatus,
    GatewaySpec,
    NodeInfo,
    VmSpec,
)

OPERATIONS = frozenset(
    {
        "list_nodes",
        "deploy_vm",
        "get_vm",
        "start_vm",
        "stop_vm",
        "restart_vm",
        "delete_vm",
        "deploy_gateway",
        "delete_gateway",
    }
)

log = structlog.get_logger(__name__)

# A VM's name is its workload name on the node: at most 36 characters (threefoldtech/zosbase
# pkg/gridtypes/id.go IsValidName); the characters stay the deployer's, which a real adapter
# maps to the grid's (adapters/opentofu.py grid_name).
_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,36}")
# A gateway name is a workload name and a name contract at once (core/gateway_names.py).
_GATEWAY_NAME = GRID_GATEWAY_NAME


class LocalNode(msgspec.Struct, frozen=True):
    """A node of the local grid: its total capacity and the domain of its web gateway."""

    node_id: int
    cpu: int
    memory_gb: int
    disk_gb: int
    gateway_domain: str
    up: bool = True


def default_nodes(suffix: str = "local.grid") -> tuple[LocalNode, ...]:
    """Four nodes of differing sizes, like a small farm, with gateways `gentNN.<suffix>`."""
    return (
        LocalNode(1, cpu=32, memory_gb=128, disk_gb=4_000, gateway_domain=f"gent01.{suffix}"),
        LocalNode(8, cpu=64, memory_gb=256, disk_gb=8_000, gateway_domain=f"gent02.{suffix}"),
        LocalNode(13, cpu=48, memory_gb=384, disk_gb=12_000, gateway_domain=f"gent03.{suffix}"),
        LocalNode(50, cpu=16, memory_gb=64, disk_gb=2_000, gateway_domain=f"gent04.{suffix}"),
    )


def mycelium_ip(name: str) -> str:
    """A deterministic address in 400::/7 derived from the VM's name."""
    raw = bytearray(hashlib.sha256(name.encode()).digest()[:16])
    raw[0] = 0x04 | (raw[0] & 0x01)
    return socket.inet_ntop(socket.AF_INET6, bytes(raw))


@dataclass(slots=True)
class _Node:
    spec: LocalNode
    up: bool
    cpu: int = 0
    memory_gb: int = 0
    disk_gb: int = 0

    def free(self) -> tuple[int, int, int]:
        return (
            self.spec.cpu - self.cpu,
            self.spec.memory_gb - self.memory_gb,
            self.spec.disk_gb - self.disk_gb,
        )


@dataclass(slots=True)
class _Vm:
    spec: VmSpec
    node: _Node
    mycelium_ip: str
    status: BackendVmStatus = "deploying"
    machine: Machine | None = None
    busy: asyncio.Future[None] | None = None  # set while an operation on this VM is in flight


@dataclass(slots=True)
class _Failure:
    message: str
    retryable: bool


@dataclass(slots=True)
class _Injected:
    failures: dict[str, deque[_Failure]] = field(default_factory=dict)
    unavailable: bool = False


class LocalGrid:
    """A `ComputeBackend` whose VMs are SSH servers, folders and web services on loopback."""

    def __init__(
        self,
        *,
        data_dir: Path,
        nodes: Sequence[LocalNode] | None = None,
        deploy_delay: float = 1.0,
        action_delay: float = 0.2,
        jitter: float = 0.1,
        ssh: bool = True,
        gateway_domain_suffix: str = "local.grid",
        unlimited: bool | None = None,
        max_calls: int = 100_000,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        gateway_port: int = 0,
        own_process: bool = False,
    ) -> None:
        """`jitter` is relative (0.1 = ±10 %); `unlimited` defaults to True for default nodes.

        `gateway_port` 0 picks a free port; a fixed one keeps gateway URLs valid across restarts.
        `own_process` runs the VMs' SSH servers and web services in a child process (entered
        with `async with`), so they take neither this event loop nor its GIL.
        """
        # Absolute once: the root reaches commands that run with a VM's home as their cwd.
        data_dir = data_dir.absolute()
        self._root = data_dir / "localgrid" / "vms"
        chosen = tuple(nodes) if nodes is not None else default_nodes(gateway_domain_suffix)
        self._nodes = {n.node_id: _Node(spec=n, up=n.up) for n in chosen}
        self._unlimited = nodes is None if unlimited is None else unlimited
        self._deploy_delay = deploy_delay
        self._action_delay = action_delay
        self._jitter = jitter
        self._ssh = ssh
        self._max_calls = max_calls
        self._sleep = sleep
        self._vms: dict[str, _Vm] = {}
        self._by_ip: dict[str, _Vm] = {}  # only with ssh: the gateway's way to a web service
        self._injected = _Injected()
        self._gateway = GatewayServer(self._web_port_for, gateway_port)
        self._gateway_lock = asyncio.Lock()
        self._ledger = Ledger(data_dir / "localgrid" / "ledger.jsonl")
        self._host = MachineHost(nice=10) if own_process and ssh else None
        self._closed = False
        self.calls: list[tuple[str, str]] = []

    async def __aenter__(self) -> Self:
        if self._host is not None:
            await self._host.start()
        try:
            await self._restore()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stops every SSH server, web service and the gateway; later calls are Unavailable."""
        if self._closed:
            return
        self._closed = True
        machines = [vm.machine for vm in self._vms.values() if vm.machine is not None]
        await asyncio.gather(*(m.halt() for m in machines))
        if self._host is not None:
            await self._host.close()
        await self._gateway.close()
        self._ledger.close()

    # Test controls ---------------------------------------------------------------------------

    def fail_next(
        self, operation: str, message: str, *, retryable: bool = False, times: int = 1
    ) -> None:
        """Makes the next `times` calls of `operation` raise BackendError(message)."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {sorted(OPERATIONS)}")
        queue = self._injected.failures.setdefault(operation, deque())
        queue.extend(_Failure(message, retryable) for _ in range(times))

    def set_unavailable(self, unavailable: bool) -> None:
        """Makes every call raise BackendUnavailable while True."""
        self._injected.unavailable = unavailable

    def set_node_up(self, node_id: int, up: bool) -> None:
        """Takes a node down or brings it back; its VMs keep running."""
        self._nodes[node_id].up = up

    def vm_folder(self, name: str) -> Path:
        """The sandbox folder that stands for the VM's filesystem root."""
        return self._root / name

    def web_port(self, name: str) -> int | None:
        """The loopback port of a VM's web service, or None while it does not answer."""
        vm = self._vms.get(name)
        return None if vm is None or vm.machine is None else vm.machine.web_port

    @property
    def gateway_port(self) -> int:
        """The gateway server's loopback port (0 until the first gateway is deployed)."""
        return self._gateway.port

    # ComputeBackend ----------------------------------------------------------------------------

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node with its free capacity: total minus what live VMs use."""
        self._enter("list_nodes", "")
        infos = []
        for node in self._nodes.values():
            cpu, memory, disk = node.free()
            infos.append(
                NodeInfo(
                    node_id=node.spec.node_id,
                    free_memory_gb=float(max(memory, 0)),
                    free_disk_gb=float(max(disk, 0)),
                    free_cpu=max(cpu, 0),
                    gateway_domain=node.spec.gateway_domain,
                    up=node.up,
                )
            )
        return infos

    async def deploy_vm(self, spec: VmSpec) -> BackendVm:
        """Deploys (or finds) the VM named `spec.name`; returns once it runs, else raises."""
        self._enter("deploy_vm", spec.name)
        existing = await self._settled(spec.name)
        if existing is not None:
            return self._view(existing)
        if _VM_NAME.fullmatch(spec.name) is None or spec.name in (".", ".."):
            raise BackendError(f"invalid vm name {spec.name!r}")
        keys = _authorized_keys(spec) if self._ssh else frozenset()
        node = self._place(spec)
        vm = _Vm(spec=spec, node=node, mycelium_ip=mycelium_ip(spec.name))
        self._vms[spec.name] = vm
        self._reserve(node, spec, +1)
        if not self._ssh and self._deploy_delay <= 0:
            self._set_status(vm, "running")
            return self._view(vm)
        busy = vm.busy = asyncio.get_running_loop().create_future()
        try:
            await self._pause(self._deploy_delay)
            if self._ssh:
                await self._boot(self._attach_machine(vm, keys))
            self._set_status(vm, "running")
        except BaseException:
            self._forget(vm)
            raise
        finally:
            vm.busy = None
            busy.set_result(None)
        return self._view(vm)

    async def get_vm(self, name: str) -> BackendVm | None:
        self._enter("get_vm", name)
        vm = self._vms.get(name)
        return None if vm is None else self._view(vm)

    async def start_vm(self, name: str) -> None:
        """Starts a stopped VM (its SSH server and web service); a running one stays so."""
        self._enter("start_vm", name)
        vm = await self._existing(name)
        async with self._busy(vm):
            await self._pause(self._action_delay)
            if vm.machine is not None:
                await self._boot(vm.machine)
            self._set_status(vm, "running")

    async def stop_vm(self, name: str) -> None:
        """Stops the VM: its SSH server and web service go silent; it keeps its capacity."""
        self._enter("stop_vm", name)
        vm = await self._existing(name)
        async with self._busy(vm):
            await self._pause(self._action_delay)
            if vm.machine is not None:
                await vm.machine.halt()
            self._set_status(vm, "stopped")

    async def restart_vm(self, name: str) -> None:
        """Stops and starts the VM; a web service that was set up comes back."""
        self._enter("restart_vm", name)
        vm = await self._existing(name)
        async with self._busy(vm):
            await self._pause(self._action_delay)
            if vm.machine is not None:
                await vm.machine.halt()
                await self._boot(vm.machine)
            self._set_status(vm, "running")

    async def delete_vm(self, name: str) -> None:
        """Deletes the VM with its sandbox folder; one already gone counts as deleted."""
        self._enter("delete_vm", name)
        vm = await self._settled(name)
        if vm is None:
            return
        async with self._busy(vm):
            await self._pause(self._action_delay)
            if vm.machine is not None:
                await vm.machine.remove()
            self._forget(vm)

    async def deploy_gateway(self, spec: GatewaySpec) -> BackendGateway:
        """Routes `<name>.<node domain>` to `spec.backend_url`; the same name again updates it."""
        self._enter("deploy_gateway", spec.name)
        if _GATEWAY_NAME.fullmatch(spec.name) is None:
            raise BackendError(
                f"invalid gateway name {spec.name!r}: 3 to 36 of lowercase letters, digits and _"
            )
        node = self._nodes.get(spec.node_id)
        if node is None:
            raise BackendError(f"node {spec.node_id} does not exist")
        if not node.up:
            raise BackendError(f"node {spec.node_id} is down")
        if not node.spec.gateway_domain:
            raise BackendError(f"node {spec.node_id} has no gateway")
        route = self._route(spec, node)
        async with self._gateway_lock:
            if not self._gateway.running:
                await self._gateway.start()
        self._gateway.put(route)
        self._ledger.gateway(spec.name, spec)
        return BackendGateway(name=spec.name, fqdn=route.fqdn, url=self._gateway.url(route.fqdn))

    async def delete_gateway(self, name: str) -> None:
        """Removes the gateway; one already gone counts as deleted."""
        self._enter("delete_gateway", name)
        if self._gateway.remove(name):
            self._ledger.gateway(name, None)

    # Internals ---------------------------------------------------------------------------------

    def _enter(self, operation: str, name: str) -> None:
        """Records the call, then raises what the test controls or a closed grid demand."""
        calls = self.calls
        calls.append((operation, name))
        if len(calls) > 2 * self._max_calls:
            del calls[: len(calls) - self._max_calls]
        if self._closed:
            raise BackendUnavailable("local grid is closed")
        injected = self._injected
        if injected.unavailable:
            raise BackendUnavailable("local grid is unavailable")
        if injected.failures:
            queue = injected.failures.get(operation)
            if queue:
                failure = queue.popleft()
                if not queue:
                    del injected.failures[operation]
                raise BackendError(failure.message, retryable=failure.retryable)

    async def _settled(self, name: str) -> _Vm | None:
        """The VM once no other operation on it is in flight, or None."""
        vm = self._vms.get(name)
        while vm is not None and vm.busy is not None:
            await asyncio.shield(vm.busy)
            vm = self._vms.get(name)
        return vm

    async def _existing(self, name: str) -> _Vm:
        vm = await self._settled(name)
        if vm is None:
            raise BackendNotFound(f"vm {name} not found")
        return vm

    def _busy(self, vm: _Vm) -> _Busy:
        return _Busy(vm)

    def _place(self, spec: VmSpec) -> _Node:
        """The pinned node, or the up node with the most free memory, then disk, that fits."""
        if spec.node_id is not None:
            node = self._nodes.get(spec.node_id)
            if node is None:
                raise BackendError(f"node {spec.node_id} does not exist")
            if not node.up:
                raise BackendError(f"node {spec.node_id} is down")
            if not self._fits(node, spec):
                cpu, memory, disk = node.free()
                raise BackendError(
                    f"node {spec.node_id} has not enough free capacity for vm {spec.name}: "
                    f"needs {_needs(spec)}, has {cpu} cpu, {memory} GB memory, {disk} GB disk"
                )
            return node
        best: _Node | None = None
        best_key = (0, 0)
        for node in self._nodes.values():
            if node.up and self._fits(node, spec):
                _, memory, disk = node.free()
                if best is None or (memory, disk) > best_key:
                    best, best_key = node, (memory, disk)
        if best is None:
            raise BackendError(f"no up node has room for vm {spec.name}: needs {_needs(spec)}")
        return best

    def _fits(self, node: _Node, spec: VmSpec) -> bool:
        if self._unlimited:
            return True
        cpu, memory, disk = node.free()
        return (
            spec.cpu_count <= cpu
            and spec.memory_gb <= memory
            and spec.disk_gb + spec.rootfs_gb <= disk
        )

    @staticmethod
    def _reserve(node: _Node, spec: VmSpec, sign: int) -> None:
        node.cpu += sign * spec.cpu_count
        node.memory_gb += sign * spec.memory_gb
        node.disk_gb += sign * (spec.disk_gb + spec.rootfs_gb)

    def _forget(self, vm: _Vm) -> None:
        """Drops the VM's record and gives its capacity back, once."""
        name = vm.spec.name
        if self._vms.get(name) is vm:
            del self._vms[name]
            self._reserve(vm.node, vm.spec, -1)
            self._ledger.vm(name, None)
        if self._by_ip.get(vm.mycelium_ip) is vm:
            del self._by_ip[vm.mycelium_ip]

    def _attach_machine(self, vm: _Vm, keys: frozenset[bytes]) -> Machine:
        """Gives the VM its SSH server and web service (not yet booted), reachable by its IP."""
        name, root = vm.spec.name, self._root / vm.spec.name
        if self._host is not None:
            vm.machine = self._host.machine(name, root, keys)
        else:
            vm.machine = VmMachine(name=name, root=root, authorized_keys=keys)
        self._by_ip[vm.mycelium_ip] = vm
        return vm.machine

    def _set_status(self, vm: _Vm, status: BackendVmStatus) -> None:
        vm.status = status
        self._ledger.vm(
            vm.spec.name, VmRecord(spec=vm.spec, node_id=vm.node.spec.node_id, status=status)
        )

    @staticmethod
    def _route(spec: GatewaySpec, node: _Node) -> GatewayRoute:
        host, port = parse_backend_url(spec.backend_url)
        fqdn = f"{spec.name}.{node.spec.gateway_domain}"
        return GatewayRoute(
            name=spec.name, fqdn=fqdn, backend_url=spec.backend_url, host=host, port=port
        )

    async def _restore(self) -> None:
        """Takes back the VMs and gateways the ledger recorded, booting the VMs that ran."""
        try:
            vms, gateways = await asyncio.to_thread(self._ledger.open)
        except LedgerInUse as error:
            raise BackendError(str(error)) from None
        booting: list[_Vm] = []
        for name, record in vms.items():
            node = self._nodes.get(record.node_id)
            if node is None:
                self._ledger.vm(name, None)  # its node is no longer configured
                continue
            vm = _Vm(spec=record.spec, node=node, mycelium_ip=mycelium_ip(name))
            vm.status = record.status
            self._vms[name] = vm
            self._reserve(node, record.spec, +1)
            if self._ssh:
                self._attach_machine(vm, _authorized_keys(record.spec))
                if record.status == "running":
                    booting.append(vm)
        routes = [
            self._route(spec, node)
            for spec in gateways.values()
            if (node := self._nodes.get(spec.node_id)) is not None and node.spec.gateway_domain
        ]
        if routes:
            await self._gateway.start()
            for route in routes:
                self._gateway.put(route)
        booted = await asyncio.gather(
            *(self._boot(vm.machine) for vm in booting if vm.machine is not None),
            return_exceptions=True,
        )
        for vm, outcome in zip(booting, booted, strict=True):
            if isinstance(outcome, BaseException):
                log.warning("localgrid.restore_boot_failed", vm=vm.spec.name, error=str(outcome))
                self._set_status(vm, "stopped")

    async def _boot(self, machine: Machine) -> None:
        """Boots the machine; a grid closed meanwhile halts it again."""
        try:
            await machine.boot()
        except OSError as exc:
            raise BackendError(f"vm {machine.name} failed to boot: {exc}", retryable=True) from exc
        if self._closed:
            await machine.halt()
            raise BackendUnavailable("local grid is closed")

    async def _pause(self, delay: float) -> None:
        """Sleeps `delay` ± jitter; a delay of 0 does not sleep at all."""
        if delay <= 0:
            return
        spread = delay * self._jitter
        await self._sleep(max(0.0, delay + random.uniform(-spread, spread)))

    def _web_port_for(self, host: str, port: int) -> int | None:
        """The loopback port answering for `http://[host]:port`, the VM's web service."""
        if port != WEB_PORT:
            return None
        vm = self._by_ip.get(host)
        if vm is None or vm.machine is None:
            return None
        return vm.machine.web_port

    def _view(self, vm: _Vm) -> BackendVm:
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


class _Busy:
    """Marks a VM as having an operation in flight, so others on it wait their turn."""

    def __init__(self, vm: _Vm) -> None:
        self._vm = vm
        self._future: asyncio.Future[None] | None = None

    async def __aenter__(self) -> None:
        self._future = self._vm.busy = asyncio.get_running_loop().create_future()

    async def __aexit__(self, *exc: object) -> None:
        self._vm.busy = None
        if self._future is not None:
            self._future.set_result(None)


def _authorized_keys(spec: VmSpec) -> frozenset[bytes]:
    """The public blobs of `spec.ssh_keys`; a line that does not parse authorizes nobody.

    A real VM's authorized_keys tolerates a bad line the same way.
    """
    blobs = set()
    for line in spec.ssh_keys:
        with contextlib.suppress(asyncssh.KeyImportError, ValueError):
            blobs.add(asyncssh.import_public_key(line).public_data)
    return frozenset(blobs)


def _needs(spec: VmSpec) -> str:
    disk = spec.disk_gb + spec.rootfs_gb
    return f"{spec.cpu_count} cpu, {spec.memory_gb} GB memory, {disk} GB disk"
