"""The local grid's machines in their own process, sandboxes made at first login, named ports."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import asyncssh
import httpx
import pytest

import adapters.localgrid_machine
import adapters.localgrid_remote
from adapters.localgrid import LocalGrid
from adapters.localgrid_machine import VmMachine
from adapters.localgrid_ports import PortCursor, ephemeral_range
from core.ports import BackendError
from hero_deployer.app.natsserver import free_port
from tests.test_localgrid import connect, refused, set_up_behind_a_gateway, ssh_vm

ROOT = Path(__file__).resolve().parents[1]


async def python_process(script: str, *args: str) -> asyncio.subprocess.Process:
    """`python -c SCRIPT ARGS` started in the repository's root, its stdout piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )


async def exited(pid: int, timeout: float = 10.0) -> None:
    """Waits until process `pid` (any, not only a child) has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, done.set)  # a pidfd turns readable when its process exits
    try:
        async with asyncio.timeout(timeout):
            await done.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_vm_never_logged_into_has_its_sandbox_made_at_the_first_login(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey
) -> None:
    vm = await ssh_vm(ssh_grid, key)
    assert not ssh_grid.vm_folder("vm1").exists()
    async with connect(vm, key) as conn:
        presented = conn.get_server_host_key().public_data
        assert (await conn.run("cat /dev/null")).exit_status == 0
    folder = ssh_grid.vm_folder("vm1")
    assert (folder / "etc/passwd").read_text().startswith("root:x:0:0::/root:")
    stored = asyncssh.read_private_key(folder / "etc/ssh/ssh_host_ed25519_key")
    assert stored.public_data == presented


async def test_a_sandbox_that_cannot_be_read_fails_the_boot_for_a_retry(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey
) -> None:
    (ssh_grid.vm_folder("vm1") / "etc/ssh/ssh_host_ed25519_key").mkdir(parents=True)
    with pytest.raises(BackendError, match="vm vm1 failed to boot") as raised:
        await ssh_vm(ssh_grid, key)
    assert raised.value.retryable
    assert await ssh_grid.find_vm("vm1") is None


async def test_a_grid_of_its_own_process_restarts_with_the_same_host_key_and_web_service(
    tmp_path: Path, key: asyncssh.SSHKey
) -> None:
    port = free_port()  # the gateway's URL stays valid across the restart
    async with LocalGrid(
        data_dir=tmp_path, deploy_delay=0, own_process=True, gateway_port=port
    ) as g:
        vm = await ssh_vm(g, key)
        gw, host_key = await set_up_behind_a_gateway(g, vm, key, "vm1")
        assert g.web_port("vm1") is not None  # known here once the command has returned
    async with LocalGrid(
        data_dir=tmp_path, deploy_delay=0, own_process=True, gateway_port=port
    ) as g:
        vm = await g.find_vm("vm1")  # type: ignore[assignment]
        assert vm is not None and vm.status == "running"
        async with connect(vm, key) as conn:
            assert conn.get_server_host_key().export_public_key() == host_key
        assert g.web_port("vm1") is not None
        async with httpx.AsyncClient(trust_env=False) as http:
            assert (await http.get(gw.url + "/health")).status_code == 200


async def test_the_machine_process_ends_with_the_grid(tmp_path: Path, key: asyncssh.SSHKey) -> None:
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, own_process=True) as g:
        vm = await ssh_vm(g, key)
        assert g._host is not None and len(g._host.pids) == 1
        pid = g._host.pids[0]
        assert pid != os.getpid()
    await exited(pid)  # close() has already waited for it
    assert await refused(vm.ssh_port)


async def test_a_full_machine_process_is_joined_by_another(
    tmp_path: Path, key: asyncssh.SSHKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters.localgrid_remote, "MACHINES_PER_PROCESS", 2)
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, own_process=True) as g:
        vms = [await ssh_vm(g, key, name) for name in ("a", "b", "c")]
        for vm in vms:
            async with connect(vm, key) as conn:
                assert (await conn.run("echo $LOCALGRID_VM")).stdout == f"{vm.name}\n"
        assert g._host is not None
        pids = g._host.pids
        assert len(set(pids)) == 2 and os.getpid() not in pids
    for pid in pids:
        await exited(pid)
    for vm in vms:
        assert await refused(vm.ssh_port)


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from adapters.localgrid import LocalGrid
    from core.ports import VmSpec

    async def main() -> None:
        async with LocalGrid(data_dir=Path(sys.argv[1]), deploy_delay=0, own_process=True) as g:
            spec = VmSpec(name="vm1", cpu_count=1, memory_gb=1, disk_gb=1, rootfs_gb=1)
            vm = await g.create_vm(spec)
            print(g._host.pids[0], vm.ssh_port, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_the_machine_process_ends_when_the_service_is_killed(tmp_path: Path) -> None:
    service = await python_process(CHILD, str(tmp_path))
    assert service.stdout is not None
    try:
        async with asyncio.timeout(30):
            pid, port = map(int, (await service.stdout.readline()).split())
        assert not await refused(port)
    finally:
        service.send_signal(signal.SIGKILL)
        await service.wait()
    await exited(pid)
    assert await refused(port)


async def test_a_machine_takes_the_cursor_s_port_unless_someone_else_listens_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cursor = PortCursor(port, port)
    monkeypatch.setattr(adapters.localgrid_machine, "PORTS", cursor)
    first = VmMachine(name="a", root=tmp_path / "a", authorized_keys=frozenset())
    second = VmMachine(name="b", root=tmp_path / "b", authorized_keys=frozenset())
    try:
        await first.boot()  # its one port is taken: the kernel picks one
        assert first.ssh_port not in (0, port) and not await refused(first.ssh_port)
        taken.close()
        await second.boot()
        assert second.ssh_port == port and not await refused(port)
        assert cursor.candidates(1) == []  # held by this process
        await second.halt()
        assert cursor.candidates(1) == [port]
    finally:
        taken.close()
        await first.halt()
        await second.halt()


def test_the_port_cursor_walks_its_range_round_and_skips_what_it_holds() -> None:
    cursor = PortCursor(100, 104)
    cursor._next = 103
    assert cursor.candidates(3) == [103, 104, 100]
    cursor.hold(101)
    assert cursor.candidates(2) == [102, 103]
    for port in (100, 102, 103, 104):
        cursor.hold(port)
    assert cursor.candidates(3) == []
    cursor.release(102)
    assert cursor.candidates(3) == [102]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024\t2047\n", (1024, 2047)), ("garbage", (32768, 60999)), ("9 3", (32768, 60999))],
)
def test_the_ephemeral_range_is_read_from_the_kernel_else_linux_default(
    tmp_path: Path, text: str, expected: tuple[int, int]
) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    assert ephemeral_range(path) == expected
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)


OUT_OF_FDS = textwrap.dedent(
    """
    import asyncio, errno, resource, socket, sys
    from pathlib import Path
    from adapters.localgrid_machine import VmMachine

    async def main() -> None:
        warm = VmMachine(name="w", root=Path(sys.argv[1]) / "w", authorized_keys=frozenset())
        await warm.boot()  # everything a boot imports is imported now
        await warm.halt()
        machine = VmMachine(name="m", root=Path(sys.argv[1]) / "m", authorized_keys=frozenset())
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        try:
            await machine.boot()
        except OSError as exc:
            print("refused", errno.errorcode[exc.errno], flush=True)
        else:
            print("booted on", machine.ssh_port, flush=True)

    asyncio.run(main())
    """
)


async def test_a_machine_out_of_file_descriptors_fails_its_boot_rather_than_listen_on_no_port(
    tmp_path: Path,
) -> None:
    run = await python_process(OUT_OF_FDS, str(tmp_path / "m"))
    out, _ = await run.communicate()
    assert out.decode().split() == ["refused", "EMFILE"]
