"""The local grid's machine process as the service's side starts and calls it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from adapters.localgrid_remote import MachineHost


async def test_boots_while_the_child_starts_wait_for_its_start(tmp_path: Path) -> None:
    host = MachineHost()  # started by its first call, as a pool's second child is
    machines = [host.machine(f"vm{i}", tmp_path / f"vm{i}", frozenset()) for i in range(20)]
    try:
        first = asyncio.create_task(machines[0].boot())
        async with asyncio.timeout(60):  # a child that never starts fails the test
            while host.pid is None:  # the child exists; its socket may not be open yet
                await asyncio.sleep(0)
        await asyncio.gather(first, *(machine.boot() for machine in machines[1:]))
        ports = {machine.ssh_port for machine in machines}
        assert len(ports) == 20 and 0 not in ports
    finally:
        await host.close()
