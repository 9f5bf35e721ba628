"""The local grid's nodes: their capacity, what live VMs use of it, and where a new VM goes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from core.ports import BackendError, NodeInfo, VmSpec


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


@dataclass(slots=True)
class Node:
    """A node and what its live VMs use."""

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


class Nodes:
    """The grid's nodes by id; `unlimited` ones take any VM (free capacity floors at zero)."""

    def __init__(self, chosen: Sequence[LocalNode], *, unlimited: bool) -> None:
        self._nodes = {n.node_id: Node(spec=n, up=n.up) for n in chosen}
        self._unlimited = unlimited

    def get(self, node_id: int) -> Node | None:
        return self._nodes.get(node_id)

    def infos(self) -> list[NodeInfo]:
        """Every node with its free capacity: total minus what live VMs use."""
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

    def place(self, spec: VmSpec) -> Node:
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
        best: Node | None = None
        best_key = (0, 0)
        for node in self._nodes.values():
            if node.up and self._fits(node, spec):
                _, memory, disk = node.free()
                if best is None or (memory, disk) > best_key:
                    best, best_key = node, (memory, disk)
        if best is None:
            raise BackendError(f"no up node has room for vm {spec.name}: needs {_needs(spec)}")
        return best

    @staticmethod
    def reserve(node: Node, spec: VmSpec, sign: int) -> None:
        """Takes (+1) or gives back (-1) the capacity `spec` uses on `node`."""
        node.cpu += sign * spec.cpu_count
        node.memory_gb += sign * spec.memory_gb
        node.disk_gb += sign * (spec.disk_gb + spec.rootfs_gb)

    def _fits(self, node: Node, spec: VmSpec) -> bool:
        if self._unlimited:
            return True
        cpu, memory, disk = node.free()
        return (
            spec.cpu_count <= cpu
            and spec.memory_gb <= memory
            and spec.disk_gb + spec.rootfs_gb <= disk
        )


def _needs(spec: VmSpec) -> str:
    disk = spec.disk_gb + spec.rootfs_gb
    return f"{spec.cpu_count} cpu, {spec.memory_gb} GB memory, {disk} GB disk"
