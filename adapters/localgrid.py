"""The embedded "local grid": a `ComputeBackend` on this machine, for development and tests.

Which VMs and gateways exist is kept in `data_dir/localgrid/ledger.jsonl` (see
`localgrid_ledger`): a grid entered again on the same data dir has them back, running VMs with
their SSH server (same host key) and web service, stopped ones stopped, gateways routing. Sandbox
folders and host keys on disk are reused when a VM of the same name is deployed again;
`destroy_vm` removes them. A grid used without `async with` keeps its state in memory only.

Capacity: nodes you pass are enforced. The default nodes are realistic, but unless you say
`unlimited=False` they do not refuse work, so benchmarks can deploy 100,000 VMs; their free
capacity then reports total minus used, never below zero.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from adapters.compute_power import PowerAction, PowerActions
from adapters.localgrid_faults import Faults
from adapters.localgrid_gateway import GatewayRoute, GatewayServer, parse_backend_url
from adapters.localgrid_ledger import Ledger, LedgerInUse, VmRecord
from adapters.localgrid_machine import WEB_PORT, Machine, VmMachine
from adapters.localgrid_nodes import LocalNode, Node, Nodes, default_nodes
from adapters.localgrid_remote import MachinePool
from adapters.localgrid_vm import Busy, GridVm, authorized_keys, mycelium_ip, view
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

log = structlog.get_logger(__name__)

# A VM's name is its workload name on the node: at most 36 characters (threefoldtech/zosbase
# pkg/gridtypes/id.go IsValidName); the characters stay the deployer's, which a real adapter
# maps to the grid's (adapters/opentofu.py grid_name).
_VM_NAME = re.compile(r"[A-Za-z0-9._-]{1,36}")
# A gateway name is a workload name and a name contract at once (core/gateway_names.py).
_GATEWAY_NAME = GRID_GATEWAY_NAME


class LocalGrid(PowerActions):
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
        self._nodes = Nodes(chosen, unlimited=nodes is None if unlimited is None else unlimited)
        self._deploy_delay = deploy_delay
        self._action_delay = action_delay
        self._jitter = jitter
        self._ssh = ssh
        self._max_calls = max_calls
        self._sleep = sleep
        self._vms: dict[str, GridVm] = {}
        self._by_ip: dict[str, GridVm] = {}  # only with ssh: the gateway's way to a web service
        self._faults = Faults()
        self._gateway = GatewayServer(self._web_port_for, gateway_port)
        self._gateway_lock = asyncio.Lock()
        self._ledger = Ledger(data_dir / "localgrid" / "ledger.jsonl")
        self._host = MachinePool(nice=10) if own_process and ssh else None
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
        self._faults.fail_next(operation, message, retryable=retryable, times=times)

    def set_unavailable(self, unavailable: bool) -> None:
        """Makes every call raise BackendUnavailable while True."""
        self._faults.unavailable = unavailable

    def set_node_up(self, node_id: int, up: bool) -> None:
        """Takes a node down or brings it back; its VMs keep running."""
        node = self._nodes.get(node_id)
        if node is None:
            raise KeyError(node_id)
        node.up = up

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
        return self._nodes.infos()

    async def create_vm(self, spec: VmSpec) -> BackendVm:
        """Deploys (or finds) the VM named `spec.name`; returns once it runs, else raises."""
        self._enter("deploy_vm", spec.name)
        existing = await self._settled(spec.name)
        if existing is not None:
            return view(existing)
        if _VM_NAME.fullmatch(spec.name) is None or spec.name in (".", ".."):
            raise BackendError(f"invalid vm name {spec.name!r}")
        keys = authorized_keys(spec) if self._ssh else frozenset()
        node = self._nodes.place(spec)
        vm = GridVm(spec=spec, node=node, mycelium_ip=mycelium_ip(spec.name))
        self._vms[spec.name] = vm
        self._nodes.reserve(node, spec, +1)
        if not self._ssh and self._deploy_delay <= 0:
            self._set_status(vm, "running")
            return view(vm)
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
        return view(vm)

    async def find_vm(self, name: str) -> BackendVm | None:
        self._enter("get_vm", name)
        vm = self._vms.get(name)
        return None if vm is None else view(vm)

    async def _power(self, action: PowerAction, name: str) -> None:
        """Stops and/or starts the VM's SSH server and web service: a stopped VM is silent but
        keeps its capacity, a web service that was set up comes back with a start."""
        self._enter(f"{action}_vm", name)
        vm = await self._existing(name)
        async with Busy(vm):
            await self._pause(self._action_delay)
            if vm.machine is not None:
                if action != "start":  # stop and restart halt it first
                    await vm.machine.halt()
                if action != "stop":
                    await self._boot(vm.machine)
            self._set_status(vm, "stopped" if action == "stop" else "running")

    async def destroy_vm(self, name: str) -> None:
        """Deletes the VM with its sandbox folder; one already gone counts as deleted."""
        self._enter("delete_vm", name)
        vm = await self._settled(name)
        if vm is None:
            return
        async with Busy(vm):
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
        self._faults.check(operation)

    async def _settled(self, name: str) -> GridVm | None:
        """The VM once no other operation on it is in flight, or None."""
        vm = self._vms.get(name)
        while vm is not None and vm.busy is not None:
            await asyncio.shield(vm.busy)
            vm = self._vms.get(name)
        return vm

    async def _existing(self, name: str) -> GridVm:
        vm = await self._settled(name)
        if vm is None:
            raise BackendNotFound(f"vm {name} not found")
        return vm

    def _forget(self, vm: GridVm) -> None:
        """Drops the VM's record and gives its capacity back, once."""
        name = vm.spec.name
        if self._vms.get(name) is vm:
            del self._vms[name]
            self._nodes.reserve(vm.node, vm.spec, -1)
            self._ledger.vm(name, None)
        if self._by_ip.get(vm.mycelium_ip) is vm:
            del self._by_ip[vm.mycelium_ip]

    def _attach_machine(self, vm: GridVm, keys: frozenset[bytes]) -> Machine:
        """Gives the VM its SSH server and web service (not yet booted), reachable by its IP."""
        name, root = vm.spec.name, self._root / vm.spec.name
        if self._host is not None:
            vm.machine = self._host.machine(name, root, keys)
        else:
            vm.machine = VmMachine(name=name, root=root, authorized_keys=keys)
        self._by_ip[vm.mycelium_ip] = vm
        return vm.machine

    def _set_status(self, vm: GridVm, status: BackendVmStatus) -> None:
        vm.status = status
        self._ledger.vm(
            vm.spec.name, VmRecord(spec=vm.spec, node_id=vm.node.spec.node_id, status=status)
        )

    @staticmethod
    def _route(spec: GatewaySpec, node: Node) -> GatewayRoute:
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
        booting: list[GridVm] = []
        for name, record in vms.items():
            node = self._nodes.get(record.node_id)
            if node is None:
                self._ledger.vm(name, None)  # its node is no longer configured
                continue
            vm = GridVm(spec=record.spec, node=node, mycelium_ip=mycelium_ip(name))
            vm.status = record.status
            self._vms[name] = vm
            self._nodes.reserve(node, record.spec, +1)
            if self._ssh:
                self._attach_machine(vm, authorized_keys(record.spec))
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
