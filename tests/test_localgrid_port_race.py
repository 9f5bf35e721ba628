"""A local grid machine that loses its port between bind and listen boots on another one."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Two machine processes (or any two programs) can bind one port with SO_REUSEADDR while
# neither listens; the later listen() fails with EADDRINUSE. uvloop, which the machine process
# runs on, dropped that error when it made the listening socket itself and kept a closed one
# (uvloop/handles/streamserver.pyx, listen). The script has the other program listen right
# after the machine's socket is bound to the port, before that socket listens. Sockets are
# made from `socket.socket` (uvloop takes it when it is imported), so the script replaces it
# first.
LOST_PORT = textwrap.dedent(
    """
    import asyncio, socket, sys

    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    other.bind(("127.0.0.1", 0))
    port = other.getsockname()[1]

    class Raced(socket.socket):
        def bind(self, address):
            super().bind(address)
            if self is not other and address == ("127.0.0.1", port):
                other.listen()
                print("other listens", flush=True)

    socket.socket = Raced
    from pathlib import Path
    import uvloop
    import adapters.localgrid_machine
    from adapters.localgrid_machine import VmMachine
    from adapters.localgrid_ports import PortCursor

    adapters.localgrid_machine.PORTS = PortCursor(port, port)

    async def main() -> None:
        machine = VmMachine(name="m", root=Path(sys.argv[1]), authorized_keys=frozenset())
        try:
            await machine.boot()
        except Exception as exc:
            print("failed", type(exc).__name__, flush=True)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", machine.ssh_port)
            banner = await reader.readline()
            writer.close()
            print("booted", machine.ssh_port != port, banner.startswith(b"SSH-"), flush=True)
            await machine.halt()

    uvloop.run(main())
    """
)


async def test_a_machine_whose_port_another_program_listens_on_first_boots_on_another(
    tmp_path: Path,
) -> None:
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LOST_PORT,
        str(tmp_path / "m"),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:  # a deadline, so a hung child fails the test instead of holding the suite
        out, _ = await asyncio.wait_for(run.communicate(), timeout=60)
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    assert out.decode().splitlines() == ["other listens", "booted True True"]
