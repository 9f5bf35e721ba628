"""The local grid backend: capacity, idempotency, failure injection, real SSH, web and gateway."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import httpx
import msgspec
import pytest

from adapters.localgrid import LocalGrid, LocalNode, mycelium_ip
from adapters.ssh_asyncssh import AsyncsshShell
from core.ports import (
    BackendError,
    BackendGateway,
    BackendUnavailable,
    BackendVm,
    ComputeBackend,
    ExternalError,
    GatewaySpec,
    SshTarget,
    VmSpec,
)
from hero_deployer.app.natsserver import free_port
from tests.compute_contract import ComputeBackendContract

SMALL = {"cpu_count": 1, "memory_gb": 1, "disk_gb": 1, "rootfs_gb": 1}

NODES = [
    LocalNode(1, cpu=8, memory_gb=16, disk_gb=100, gateway_domain="gent01.test"),
    LocalNode(2, cpu=8, memory_gb=32, disk_gb=50, gateway_domain="gent02.test"),
    LocalNode(3, cpu=8, memory_gb=32, disk_gb=80, gateway_domain=""),
    LocalNode(4, cpu=64, memory_gb=512, disk_gb=9000, gateway_domain="gent04.test", up=False),
]


@pytest.fixture
async def grid(tmp_path: Path) -> AsyncIterator[LocalGrid]:
    async with LocalGrid(
        data_dir=tmp_path, nodes=NODES, deploy_delay=0, action_delay=0, ssh=False
    ) as g:
        yield g


@pytest.fixture(scope="module")
def other_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def spec(name: str, **kw: object) -> VmSpec:
    return VmSpec(name=name, **{**SMALL, **kw})  # type: ignore[arg-type]


def connect(vm: BackendVm, key: asyncssh.SSHKey | None, username: str = "root", **kw: object):
    return asyncssh.connect(
        vm.ssh_host,
        vm.ssh_port,
        username=username,
        client_keys=[key] if key else None,
        known_hosts=None,
        agent_path=None,
        config=None,
        **kw,
    )


async def ssh_vm(grid: LocalGrid, key: asyncssh.SSHKey, name: str = "vm1") -> BackendVm:
    return await grid.create_vm(spec(name, ssh_keys=(key.export_public_key().decode(),)))


async def set_up_behind_a_gateway(
    grid: LocalGrid, vm: BackendVm, key: asyncssh.SSHKey, name: str
) -> tuple[BackendGateway, bytes]:
    """Puts gateway `name` before the VM's web port and runs its setup; the gateway, host key."""
    gw = await grid.deploy_gateway(
        GatewaySpec(name=name, node_id=vm.node_id, backend_url=f"http://[{vm.mycelium_ip}]:9988")
    )
    async with connect(vm, key) as conn:
        host_key = conn.get_server_host_key().export_public_key()
        await conn.run("./setup-binaries.sh", check=True)
    return gw, host_key


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    return False


# The shared contract, on both the benchmark and the SSH flavour ----------------------------------


class TestLocalGridContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[ComputeBackend]:
        async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, ssh=False) as g:
            yield g


class TestLocalGridWithSshContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[ComputeBackend]:
        async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0) as g:
            yield g


# Nodes, placement, capacity ------------------------------------------------------------------


async def test_default_nodes_are_four_differing_nodes_with_gateway_domains(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, ssh=False) as g:
        nodes = await g.list_nodes()
    assert [n.node_id for n in nodes] == [1, 8, 13, 50]
    assert len({n.free_memory_gb for n in nodes}) == 4
    assert nodes[0].gateway_domain == "gent01.local.grid"
    assert all(n.up and n.free_cpu > 0 for n in nodes)


async def test_default_grid_takes_a_benchmark_load(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, ssh=False, deploy_delay=0, action_delay=0) as g:
        for i in range(3000):
            await g.create_vm(VmSpec(name=f"bench{i}"))
        assert len({(await g.find_vm(f"bench{i}")).node_id for i in range(3000)}) == 4  # type: ignore[union-attr]


async def test_default_nodes_enforce_capacity_when_asked(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, ssh=False, deploy_delay=0, unlimited=False) as g:
        with pytest.raises(BackendError, match="no up node has room"):
            await g.create_vm(VmSpec(name="huge", memory_gb=1024))


async def test_picks_the_up_node_with_most_free_memory_then_disk(grid: LocalGrid):
    vm = await grid.create_vm(spec("a"))
    assert vm.node_id == 3
    second = await grid.create_vm(spec("b"))
    assert second.node_id == 2  # node 3 now has 31 GB free, node 2 still 32


async def test_free_capacity_counts_live_vms_and_delete_gives_it_back(grid: LocalGrid):
    await grid.create_vm(spec("a", node_id=1, cpu_count=2, memory_gb=4, disk_gb=10, rootfs_gb=2))
    node1 = (await grid.list_nodes())[0]
    assert (node1.free_cpu, node1.free_memory_gb, node1.free_disk_gb) == (6, 12.0, 88.0)
    await grid.destroy_vm("a")
    node1 = (await grid.list_nodes())[0]
    assert (node1.free_cpu, node1.free_memory_gb, node1.free_disk_gb) == (8, 16.0, 100.0)
    assert await grid.find_vm("a") is None


async def test_pinned_node_is_honoured(grid: LocalGrid):
    vm = await grid.create_vm(spec("a", node_id=1))
    assert vm.node_id == 1


@pytest.mark.parametrize(
    ("node_id", "message"),
    [(99, "node 99 does not exist"), (4, "node 4 is down"), (1, "not enough free capacity")],
)
async def test_bad_pinned_node_is_a_permanent_error(grid: LocalGrid, node_id: int, message: str):
    with pytest.raises(BackendError, match=message) as info:
        await grid.create_vm(spec("a", node_id=node_id, memory_gb=17))
    assert not info.value.retryable
    assert await grid.find_vm("a") is None


async def test_no_room_anywhere_is_a_permanent_error(grid: LocalGrid):
    with pytest.raises(BackendError, match="no up node has room") as info:
        await grid.create_vm(spec("a", memory_gb=33))
    assert not info.value.retryable


async def test_a_node_taken_down_gets_no_new_vms(grid: LocalGrid):
    grid.set_node_up(3, False)
    grid.set_node_up(2, False)
    assert (await grid.create_vm(spec("a"))).node_id == 1
    assert [n.up for n in await grid.list_nodes()] == [True, False, False, False]


# Deploy and actions --------------------------------------------------------------------------


async def test_deploy_is_idempotent_by_name(grid: LocalGrid):
    first = await grid.create_vm(spec("a", node_id=1))
    again = await grid.create_vm(spec("a", node_id=2))
    assert again == first
    assert (await grid.list_nodes())[0].free_memory_gb == 15.0
    assert grid.calls == [("deploy_vm", "a"), ("deploy_vm", "a"), ("list_nodes", "")]


async def test_concurrent_deploys_of_one_name_make_one_vm(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, nodes=NODES, deploy_delay=0.01, ssh=False) as g:
        a, b = await asyncio.gather(g.create_vm(spec("a")), g.create_vm(spec("a")))
        assert a == b and a.status == "running"
        assert sum(n.free_memory_gb for n in await g.list_nodes()) == 16 + 32 + 32 + 512 - 1


async def test_mycelium_ip_is_deterministic_and_in_400_7(grid: LocalGrid):
    vm = await grid.create_vm(spec("a"))
    assert vm.mycelium_ip == mycelium_ip("a") != mycelium_ip("b")
    assert ipaddress.IPv6Address(vm.mycelium_ip) in ipaddress.IPv6Network("400::/7")


async def test_zero_delay_never_sleeps(tmp_path: Path):
    async def no_sleep(delay: float) -> None:
        raise AssertionError("slept")

    async with LocalGrid(
        data_dir=tmp_path, deploy_delay=0, action_delay=0, ssh=False, sleep=no_sleep
    ) as g:
        await g.create_vm(spec("a"))
        await g.shutdown_vm("a")
        await g.boot_vm("a")
        await g.reboot_vm("a")
        await g.destroy_vm("a")


async def test_delays_sleep_within_the_jitter(tmp_path: Path):
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    async with LocalGrid(
        data_dir=tmp_path, deploy_delay=1.0, action_delay=0.2, jitter=0.1, ssh=False, sleep=record
    ) as g:
        await g.create_vm(spec("a"))
        await g.shutdown_vm("a")
    assert 0.9 <= slept[0] <= 1.1 and 0.18 <= slept[1] <= 0.22


async def test_actions_change_status(grid: LocalGrid):
    await grid.create_vm(spec("a"))
    await grid.shutdown_vm("a")
    assert (await grid.find_vm("a")).status == "stopped"  # type: ignore[union-attr]
    await grid.boot_vm("a")
    assert (await grid.find_vm("a")).status == "running"  # type: ignore[union-attr]
    await grid.reboot_vm("a")
    assert (await grid.find_vm("a")).status == "running"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["..", "x" * 37, "a/b", "vm\n"])
async def test_invalid_vm_name_is_refused(grid: LocalGrid, name: str):
    # 37: the node refuses workload names over 36 (zosbase pkg/gridtypes/id.go)
    with pytest.raises(BackendError, match="invalid vm name"):
        await grid.create_vm(spec(name))


# Failure injection ---------------------------------------------------------------------------


async def test_fail_next_fails_that_many_calls_then_recovers(grid: LocalGrid):
    grid.fail_next("deploy_vm", "boom", retryable=True, times=2)
    for _ in range(2):
        with pytest.raises(BackendError, match="boom") as info:
            await grid.create_vm(spec("a"))
        assert info.value.retryable
    assert (await grid.create_vm(spec("a"))).status == "running"
    assert grid.calls == [("deploy_vm", "a")] * 3


async def test_fail_next_touches_only_its_operation(grid: LocalGrid):
    grid.fail_next("stop_vm", "nope")
    await grid.create_vm(spec("a"))
    with pytest.raises(BackendError, match="nope") as info:
        await grid.shutdown_vm("a")
    assert not info.value.retryable
    assert (await grid.find_vm("a")).status == "running"  # type: ignore[union-attr]
    await grid.shutdown_vm("a")


async def test_fail_next_rejects_unknown_operations(grid: LocalGrid):
    with pytest.raises(ValueError, match="unknown operation"):
        grid.fail_next("deploy", "x")


async def test_unavailable_mode_refuses_every_call(grid: LocalGrid):
    grid.set_unavailable(True)
    for call in (
        grid.list_nodes(),
        grid.create_vm(spec("a")),
        grid.find_vm("a"),
        grid.destroy_vm("a"),
        grid.deploy_gateway(GatewaySpec(name="g", node_id=1, backend_url="http://[400::1]:9988")),
    ):
        with pytest.raises(BackendUnavailable) as info:
            await call
        assert info.value.retryable
    grid.set_unavailable(False)
    assert await grid.find_vm("a") is None


async def test_a_closed_grid_is_unavailable(tmp_path: Path):
    g = LocalGrid(data_dir=tmp_path, ssh=False, deploy_delay=0)
    await g.close()
    with pytest.raises(BackendUnavailable):
        await g.list_nodes()


# Gateways --------------------------------------------------------------------------------------


async def test_gateway_names_fqdn_and_is_idempotent(grid: LocalGrid):
    gw_spec = GatewaySpec(name="alice", node_id=1, backend_url="http://[400::1]:9988")
    gw = await grid.deploy_gateway(gw_spec)
    assert gw.fqdn == "alice.gent01.test"
    assert gw.url.startswith("http://127.0.0.1:")
    assert await grid.deploy_gateway(gw_spec) == gw
    await grid.delete_gateway("alice")
    await grid.delete_gateway("alice")


@pytest.mark.parametrize(
    ("name", "node_id", "url", "message"),
    [
        ("al-ice", 1, "http://[400::1]:9988", "invalid gateway name"),
        ("Alice", 1, "http://[400::1]:9988", "invalid gateway name"),  # no name contract
        ("ab", 1, "http://[400::1]:9988", "invalid gateway name"),  # name contracts: 3..64
        ("a" * 37, 1, "http://[400::1]:9988", "invalid gateway name"),  # workload: at most 36
        ("alice", 99, "http://[400::1]:9988", "node 99 does not exist"),
        ("alice", 3, "http://[400::1]:9988", "node 3 has no gateway"),
        ("alice", 4, "http://[400::1]:9988", "node 4 is down"),
        ("alice", 1, "ftp://x", "must look like"),
    ],
)
async def test_gateway_refusals(grid: LocalGrid, name: str, node_id: int, url: str, message: str):
    with pytest.raises(BackendError, match=message):
        await grid.deploy_gateway(GatewaySpec(name=name, node_id=node_id, backend_url=url))


async def test_gateway_answers_502_while_nothing_listens(grid: LocalGrid):
    vm = await grid.create_vm(spec("a"))
    gw = await grid.deploy_gateway(
        GatewaySpec(name="gwa", node_id=1, backend_url=f"http://[{vm.mycelium_ip}]:9988")
    )
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(gw.url + "/health")).status_code == 502
        assert (await http.get(f"http://127.0.0.1:{grid.gateway_port}/gw/nope/")).status_code == 404


# SSH, SFTP, exec, setup and the web service ------------------------------------------------------


async def test_ssh_accepts_the_vm_key_and_runs_commands_in_the_home(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey, tmp_path: Path
):
    vm = await ssh_vm(ssh_grid, key)
    assert vm.ssh_host == "127.0.0.1" and vm.ssh_port > 0
    async with connect(vm, key) as conn:
        result = await conn.run('echo "hi $USER"; pwd; echo oops >&2; exit 3')
    home = (tmp_path / "localgrid" / "vms" / "vm1" / "root").resolve()
    assert result.exit_status == 3
    assert result.stdout.splitlines() == ["hi root", str(home)]
    assert result.stderr == "oops\n"
    assert (home / "setup-binaries.sh").exists()


async def test_ssh_feeds_stdin_to_the_command(ssh_grid: LocalGrid, key: asyncssh.SSHKey):
    vm = await ssh_vm(ssh_grid, key)
    async with connect(vm, key) as conn:
        result = await conn.run("tr a-z A-Z", input="hello")
    assert result.stdout == "HELLO"


async def test_ssh_refuses_other_keys_and_passwords(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey, other_key: asyncssh.SSHKey
):
    vm = await ssh_vm(ssh_grid, key)
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, other_key):
            pass
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, None, password="secret"):
            pass
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, key, username="../etc"):
            pass


async def test_vm_without_ssh_keys_admits_nobody(ssh_grid: LocalGrid, key: asyncssh.SSHKey):
    vm = await ssh_grid.create_vm(spec("nokeys"))
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, key):
            pass


async def test_unparseable_ssh_keys_authorize_nobody(ssh_grid: LocalGrid, key: asyncssh.SSHKey):
    vm = await ssh_grid.create_vm(spec("bad", ssh_keys=("ssh-ed25519 nope",)))
    assert vm.status == "running"
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, key):
            pass


async def test_sftp_writes_into_the_home_and_stays_in_the_sandbox(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey, tmp_path: Path
):
    vm = await ssh_vm(ssh_grid, key)
    root = tmp_path / "localgrid" / "vms" / "vm1"
    (tmp_path / "outside.txt").write_text("host secret")
    async with connect(vm, key) as conn, conn.start_sftp_client() as sftp:
        await sftp.makedirs("hero/cfg/cockpit", exist_ok=True)
        async with sftp.open("hero/cfg/cockpit/services.toml", "w") as f:
            await f.write("x = 1\n")
        async with sftp.open("/etc/motd", "w") as f:
            await f.write("welcome\n")
        assert await sftp.realpath(".") == "/root"
        assert await sftp.realpath("../../..") == "/"
        with pytest.raises(asyncssh.SFTPNoSuchFile):
            await sftp.open("../../../../outside.txt")
        await conn.run("ln -s " + str(tmp_path) + " escape")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.open("escape/outside.txt")
        with pytest.raises(asyncssh.SFTPPermissionDenied):
            await sftp.listdir("escape")
        with pytest.raises(asyncssh.SFTPOpUnsupported):
            await sftp.symlink("/", "root-link")
    assert (root / "root/hero/cfg/cockpit/services.toml").read_text() == "x = 1\n"
    assert (root / "etc/motd").read_text() == "welcome\n"


async def test_setup_brings_up_the_web_service_behind_the_gateway(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey
):
    vm = await ssh_vm(ssh_grid, key)
    gw = await ssh_grid.deploy_gateway(
        GatewaySpec(name="vm1", node_id=vm.node_id, backend_url=f"http://[{vm.mycelium_ip}]:9988")
    )
    toml = '[services.cockpit]\ncmd = "cockpit"\n\n[services.forge]\ncmd = "forge"\n'
    async with httpx.AsyncClient(trust_env=False) as http:
        assert (await http.get(gw.url + "/health")).status_code == 502
        assert ssh_grid.web_port("vm1") is None
        async with connect(vm, key) as conn:
            async with conn.start_sftp_client() as sftp:
                # Hero's services run as driver and read driver's cockpit config
                await sftp.makedirs("/home/driver/hero/cfg/cockpit", exist_ok=True)
                async with sftp.open("/home/driver/hero/cfg/cockpit/services.toml", "w") as f:
                    await f.write(toml)
            result = await conn.run("./setup-binaries.sh")
        assert result.exit_status == 0, result.stderr
        health = await http.get(gw.url + "/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "vm": "vm1", "services": ["cockpit", "forge"]}
        by_host = await http.get(
            f"http://127.0.0.1:{ssh_grid.gateway_port}/health", headers={"Host": gw.fqdn}
        )
        assert by_host.status_code == 200
        await ssh_grid.shutdown_vm("vm1")
        assert (await http.get(gw.url + "/health")).status_code == 502
        await ssh_grid.boot_vm("vm1")
        assert (await http.get(gw.url + "/health")).status_code == 200
        await ssh_grid.delete_gateway("vm1")
        assert (await http.get(gw.url + "/health")).status_code == 404


async def test_delete_stops_the_servers_and_wipes_the_sandbox(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey
):
    vm = await ssh_vm(ssh_grid, key)
    async with connect(vm, key) as conn:
        await conn.run("sh setup-binaries.sh", check=True)
    web_port = ssh_grid.web_port("vm1")
    assert web_port is not None
    await ssh_grid.destroy_vm("vm1")
    assert await refused(vm.ssh_port) and await refused(web_port)
    assert not ssh_grid.vm_folder("vm1").exists()


async def test_redeploy_after_restart_reuses_host_key_and_setup(
    tmp_path: Path, key: asyncssh.SSHKey
):
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0) as g:
        vm = await ssh_vm(g, key)
        async with connect(vm, key) as conn:
            first_host_key = conn.get_server_host_key().export_public_key()
            await conn.run("./setup-binaries.sh", check=True)
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0) as g:
        vm = await ssh_vm(g, key)
        async with connect(vm, key) as conn:
            assert conn.get_server_host_key().export_public_key() == first_host_key
        assert g.web_port("vm1") is not None


async def test_a_restarted_grid_has_its_vms_and_gateways_back(tmp_path: Path, key: asyncssh.SSHKey):
    """Running VMs boot again (same host key, web service up), stopped ones stay stopped."""
    port = free_port()
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, gateway_port=port) as g:
        vm = await ssh_vm(g, key, "web")
        await ssh_vm(g, key, "idle")
        await g.shutdown_vm("idle")
        await ssh_vm(g, key, "gone")
        await g.destroy_vm("gone")
        gw, host_key = await set_up_behind_a_gateway(g, vm, key, "web")
        used = {n.node_id: n.free_memory_gb for n in await g.list_nodes()}

    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, gateway_port=port) as g:
        web, idle = await g.find_vm("web"), await g.find_vm("idle")
        assert web is not None and idle is not None
        assert (web.status, idle.status) == ("running", "stopped")
        assert await g.find_vm("gone") is None
        assert {n.node_id: n.free_memory_gb for n in await g.list_nodes()} == used
        async with connect(web, key) as conn:
            assert conn.get_server_host_key().export_public_key() == host_key
            assert (await conn.run("true")).exit_status == 0
        assert g.web_port("idle") is None
        async with httpx.AsyncClient(trust_env=False) as http:
            health = await http.get(gw.url + "/health")
        assert health.status_code == 200 and health.json()["vm"] == "web"
        await g.boot_vm("idle")
        await g.delete_gateway("web")

    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0, gateway_port=port) as g:
        assert (await g.find_vm("idle")).status == "running"  # type: ignore[union-attr]
        assert await refused(port)  # no gateway left: the gateway server does not even start


async def test_one_data_dir_serves_one_grid_at_a_time(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as first:
        await first.create_vm(spec("a"))
        with pytest.raises(BackendError, match="in use by another local grid"):
            async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False):
                pass
        await first.create_vm(spec("b"))  # the refused grid changed nothing
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as again:
        assert [await again.find_vm(n) is not None for n in "ab"] == [True, True]


async def test_a_torn_ledger_line_is_dropped_and_the_rest_kept(tmp_path: Path):
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as g:
        await g.create_vm(spec("a"))
        await g.create_vm(spec("b"))
    ledger = tmp_path / "localgrid" / "ledger.jsonl"
    ledger.write_bytes(ledger.read_bytes() + b'{"vm":"c","record":{"spe')  # a crash mid-write

    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as g:
        assert [await g.find_vm(name) is not None for name in "abc"] == [True, True, False]
        await g.create_vm(spec("d"))
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as g:
        assert [await g.find_vm(name) is not None for name in "abcd"] == [True, True, False, True]
    assert len(ledger.read_bytes().splitlines()) == 3  # compacted: one line per VM


async def test_the_ledger_is_on_disk_once_the_loop_turns_after_the_changes(tmp_path: Path):
    """Changes made in one turn of the loop reach the file together, before the next turn."""
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, ssh=False) as g:
        ledger = tmp_path / "localgrid" / "ledger.jsonl"
        await asyncio.gather(g.create_vm(spec("a")), g.create_vm(spec("b")))
        next_turn = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(next_turn.set_result, None)
        await next_turn
        names = [msgspec.json.decode(line)["vm"] for line in ledger.read_bytes().splitlines()]
        assert set(names) == {"a", "b"}


async def test_ssh_is_not_up_before_the_deploy_delay_ends(tmp_path: Path, key: asyncssh.SSHKey):
    sleeping = asyncio.Event()
    wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def held(delay: float) -> None:
        sleeping.set()
        await wake

    async with LocalGrid(data_dir=tmp_path, deploy_delay=1.0, sleep=held) as g:
        task = asyncio.create_task(ssh_vm(g, key))
        await sleeping.wait()
        assert (await g.find_vm("vm1")).status == "deploying"  # type: ignore[union-attr]
        assert not g.vm_folder("vm1").exists()
        again = asyncio.create_task(ssh_vm(g, key))
        wake.set_result(None)
        vm = await task
        assert vm.status == "running" and await again == vm
        async with connect(vm, key) as conn:
            assert (await conn.run("true")).exit_status == 0


async def test_close_leaves_no_listening_sockets(tmp_path: Path, key: asyncssh.SSHKey):
    async with LocalGrid(data_dir=tmp_path, deploy_delay=0, action_delay=0) as g:
        vm = await ssh_vm(g, key)
        await g.deploy_gateway(
            GatewaySpec(
                name="vm1", node_id=vm.node_id, backend_url=f"http://[{vm.mycelium_ip}]:9988"
            )
        )
        conn = await connect(vm, key)
        await conn.run("./setup-binaries.sh", check=True)
        ports = [vm.ssh_port, g.web_port("vm1"), g.gateway_port]
    assert all(port for port in ports)
    for port in ports:
        assert await refused(port)  # type: ignore[arg-type]
    await asyncio.wait_for(conn.wait_closed(), 5)


async def test_the_vm_keys_log_in_as_root_only_as_on_the_grid(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey
):
    # zos installs a VM's SSH_KEY for root (zosbase pkg/vm/manager.go); the deployer used to log
    # in as driver, which the grid refuses.
    vm = await ssh_vm(ssh_grid, key)
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(vm, key, username="driver"):
            pass
    async with connect(vm, key) as conn:
        assert (await conn.run("echo $USER")).stdout == "root\n"


async def test_an_upload_as_root_for_driver_belongs_to_driver(
    ssh_grid: LocalGrid, key: asyncssh.SSHKey, tmp_path: Path
):
    vm = await ssh_vm(ssh_grid, key)
    target = SshTarget(
        host=vm.ssh_host,
        port=vm.ssh_port,
        username="root",
        private_key=key.export_private_key().decode(),
    )

    await AsyncsshShell().upload(
        target, "hero/cfg/cockpit/services.toml", b"[services.x]\n", owner="driver"
    )

    root = tmp_path / "localgrid" / "vms" / "vm1"
    assert (root / "home/driver/hero/cfg/cockpit/services.toml").read_bytes() == b"[services.x]\n"
    machine = ssh_grid._vms["vm1"].machine
    assert machine is not None
    for path in ("/home/driver/hero", "/home/driver/hero/cfg", "/home/driver/hero/cfg/cockpit"):
        assert machine.owner(path) == (1000, 1000), path
    assert machine.owner("/home/driver/hero/cfg/cockpit/services.toml") == (1000, 1000)
    assert machine.owner("/home/driver") is None  # the image made it, with its owner
    with pytest.raises(ExternalError, match="the vm has no account 'nobody'"):
        await AsyncsshShell().upload(target, "x.toml", b"x", owner="nobody")
