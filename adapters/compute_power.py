"""A compute backend's power calls (boot, shut down, reboot) as one action of the backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

PowerAction = Literal["start", "stop", "restart"]
"""What a power call asks of a VM, in the words of the wire operations (start_vm, ...)."""


class PowerActions(ABC):
    """`boot_vm`, `shutdown_vm` and `reboot_vm` of the ComputeBackend port, each one `_power`."""

    async def boot_vm(self, name: str) -> None:
        """Starts a stopped VM; a running one stays so."""
        await self._power("start", name)

    async def shutdown_vm(self, name: str) -> None:
        """Stops the VM; it keeps its capacity."""
        await self._power("stop", name)

    async def reboot_vm(self, name: str) -> None:
        """Stops and starts the VM."""
        await self._power("restart", name)

    @abstractmethod
    async def _power(self, action: PowerAction, name: str) -> None:
        """Does `action` to the VM named `name`, or raises BackendNotFound if there is none."""
