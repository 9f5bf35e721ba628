import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from adapters.herocompute import HeroComputeBackend
from core.ports import BackendError, BackendNotFound, BackendUnavailable, GatewaySpec
from tests.compute_contract import ComputeBackendContract, small_vm
from tests.fakes.herocompute_rpc import INVALID_STATE, NOT_FOUND, HeroComputeRpc

SECRET = "owner-secret-7f3a9c1e"


@pytest.fixture
async def rpc() -> AsyncIterator[HeroComputeRpc]:
    async with HeroComputeRpc(polls_until_running=3) as server:
        yield server


@pytest.fixture
async def client(rpc: HeroComputeRpc) -> AsyncIterator[HeroComputeBackend]:
    async with HeroComputeBackend(url=rpc.url + "/rpc", owner_secret=SECRET, poll_interval=0) as c:
        yield c


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # A short path: a Unix socket's path must fit in 108 bytes, pytest's tmp_path may not.
    path = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def socket_client(rpc: HeroComputeRpc, socket_dir: Path) -> AsyncIterator[HeroComputeBackend]:
    async with rpc.unix_socket(str(socket_dir / "rpc.sock")) as path:
        async with HeroComputeBackend(socket_path=path, owner_secret=SECRET, poll_interval=0) as c:
            yield c


class TestHeroComputeContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, client: HeroComputeBackend) -> HeroComputeBackend:
        return client


class TestHeroComputeOverUnixSocketContract(ComputeBackendContract):
    @pytest.fixture
    async def backend(self, socket_client: HeroComputeBackend) -> HeroComputeBackend:
        return socket_client


# Exact requests -----------------------------------------------------------------------------


async def test_deploy_lists_then_deploys_then_polls_until_the_address_appears(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    spec = small_vm("alice", node_id=21, ssh_keys=("ssh-ed25519 AAAA alice",))

    vm = await client.create_vm(spec)

    assert rpc.methods == [
        "list_vms",
        "deploy_vm",
        "get_vm",
        "get_vm",
        "get_vm",
        "inject_ssh_keys",
    ]
    assert rpc.params_of("list_vms") == [{"secret": SECRET}]
    assert rpc.params_of("deploy_vm") == [
        {
            "secret": SECRET,
            "name": "alice",
            "image": "ubuntu-24.04",
            "cpu_count": 1,
            "memory_gb": 2,
            "disk_gb": 10,
            "rootfs_gb": 2,
            "node_id": 21,
            "mycelium": True,
            "public_ip": False,
        }
    ]
    sid = rpc.vm_named("alice").sid  # type: ignore[union-attr]
    assert rpc.params_of("get_vm") == [{"sid": sid, "secret": SECRET}] * 3
    assert rpc.params_of("inject_ssh_keys") == [
        {"sid": sid, "secret": SECRET, "keys": ["ssh-ed25519 AAAA alice"]}
    ]
    assert vm.node_id == 21
    assert vm.mycelium_ip == rpc.vm_named("alice").mycelium_ip  # type: ignore[union-attr]
    assert vm.ssh_host == vm.mycelium_ip


async def test_every_request_is_json_rpc_2_with_named_params_and_the_owner_secret(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    await client.create_vm(small_vm("bob"))
    await client.shutdown_vm("bob")
    await client.boot_vm("bob")
    await client.reboot_vm("bob")
    await client.deploy_gateway(GatewaySpec(name="bob", node_id=13, backend_url="http://[4::1]:80"))
    await client.delete_gateway("bob")
    await client.destroy_vm("bob")

    bodies = [json.loads(b) for b in rpc.raw_bodies]
    assert {b["jsonrpc"] for b in bodies} == {"2.0"}
    assert len({b["id"] for b in bodies}) == len(bodies)
    assert all(b["params"]["secret"] == SECRET for b in bodies)
    assert {"stop_vm", "start_vm", "restart_vm", "delete_vm"} <= set(rpc.methods)
    assert rpc.params_of("deploy_webgateway") == [
        {"secret": SECRET, "name": "bob", "node_id": 13, "backend_url": "http://[4::1]:80"}
    ]


async def test_redeploy_of_a_running_vm_deploys_nothing(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    await client.create_vm(small_vm("carol", ssh_keys=()))
    rpc.calls.clear()

    await client.create_vm(small_vm("carol", ssh_keys=()))

    assert rpc.methods == ["list_vms", "get_vm"]


async def test_a_vm_of_another_owner_is_invisible(rpc: HeroComputeRpc) -> None:
    async with (
        HeroComputeBackend(url=rpc.url, owner_secret=SECRET, poll_interval=0) as mine,
        HeroComputeBackend(url=rpc.url, owner_secret="someone-else", poll_interval=0) as theirs,
    ):
        await mine.create_vm(small_vm("dave"))

        assert await theirs.find_vm("dave") is None
        with pytest.raises(BackendNotFound):
            await theirs.shutdown_vm("dave")


async def test_list_nodes_is_empty_when_hero_compute_has_no_node_list(
    client: HeroComputeBackend,
) -> None:
    assert await client.list_nodes() == []


async def test_status_mapping_of_a_stopped_vm(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    await client.create_vm(small_vm("erin"))
    rpc.vm_named("erin").status = "halted"  # type: ignore[union-attr]

    assert (await client.find_vm("erin")).status == "stopped"  # type: ignore[union-attr]


# Error mapping ------------------------------------------------------------------------------


async def test_a_not_found_rpc_error_is_backend_not_found(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    await client.create_vm(small_vm("frank"))
    rpc.fail_next("stop_vm", NOT_FOUND, "vm not found")

    with pytest.raises(BackendNotFound, match="vm not found"):
        await client.shutdown_vm("frank")


async def test_another_rpc_error_is_a_backend_error_with_the_servers_message(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    await client.create_vm(small_vm("grace"))
    rpc.fail_next("restart_vm", INVALID_STATE, "cannot restart a stopped vm")

    with pytest.raises(BackendError, match="cannot restart a stopped vm") as raised:
        await client.reboot_vm("grace")

    assert type(raised.value) is BackendError
    assert not raised.value.retryable


async def test_the_owner_secret_never_appears_in_an_error(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    rpc.fail_next("deploy_vm", -32000, f"quota exceeded for owner {SECRET}")

    with pytest.raises(BackendError) as raised:
        await client.create_vm(small_vm("heidi"))

    assert "quota exceeded" in str(raised.value)
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value.args)


async def test_http_5xx_is_unavailable(rpc: HeroComputeRpc, client: HeroComputeBackend) -> None:
    await rpc.go_down("503")

    with pytest.raises(BackendUnavailable) as raised:
        await client.find_vm("ivan")

    assert raised.value.retryable


async def test_a_refused_connection_is_unavailable(rpc: HeroComputeRpc) -> None:
    async with HeroComputeBackend(url=rpc.url, owner_secret=SECRET) as client:
        await rpc.go_down("closed")

        with pytest.raises(BackendUnavailable):
            await client.destroy_vm("judy")


async def test_a_request_timeout_is_unavailable(rpc: HeroComputeRpc) -> None:
    rpc.hang("list_vms")
    async with HeroComputeBackend(url=rpc.url, owner_secret=SECRET, timeout=0.2) as client:
        with pytest.raises(BackendUnavailable, match="timed out"):
            await client.find_vm("ken")


async def test_a_response_that_is_not_json_rpc_is_a_backend_error() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy login</html>")

    transport = httpx.MockTransport(answer)
    async with HeroComputeBackend(url="http://hc", owner_secret=SECRET, transport=transport) as c:
        with pytest.raises(BackendError, match="without a JSON-RPC body") as raised:
            await c.find_vm("leo")

    assert not isinstance(raised.value, BackendUnavailable)


async def test_a_vm_that_fails_to_deploy_is_a_permanent_error() -> None:
    async with (
        HeroComputeRpc(polls_until_running=2, fail_deploys_with="no capacity on node 13") as rpc,
        HeroComputeBackend(url=rpc.url, owner_secret=SECRET, poll_interval=0) as client,
    ):
        with pytest.raises(BackendError, match="no capacity on node 13") as raised:
            await client.create_vm(small_vm("mallory"))

        assert not raised.value.retryable
        assert (await client.find_vm("mallory")).status == "failed"  # type: ignore[union-attr]


async def test_no_address_within_the_deadline_is_a_retryable_error() -> None:
    async with (
        HeroComputeRpc(polls_until_running=10**9) as rpc,
        HeroComputeBackend(
            url=rpc.url, owner_secret=SECRET, poll_interval=0.01, deploy_timeout=0.2
        ) as client,
    ):
        with pytest.raises(BackendError, match="no mycelium address") as raised:
            await client.create_vm(small_vm("niaj"))

    assert raised.value.retryable


# Operator check -----------------------------------------------------------------------------


async def test_check_is_empty_when_hero_compute_answers(client: HeroComputeBackend) -> None:
    assert await client.check() == []


async def test_check_names_a_missing_socket(socket_dir: Path) -> None:
    path = str(socket_dir / "absent.sock")
    async with HeroComputeBackend(socket_path=path, owner_secret=SECRET) as client:
        problems = await client.check()

    assert problems == [f"hero_compute socket {path} does not exist"]


async def test_check_names_an_unreachable_server_and_an_empty_secret(rpc: HeroComputeRpc) -> None:
    await rpc.go_down("503")
    async with HeroComputeBackend(url=rpc.url, owner_secret="") as client:
        problems = await client.check()

    assert len(problems) == 2
    assert "no owner secret" in problems[0]
    assert f"hero_compute at {rpc.url} is not reachable" in problems[1]


def test_a_backend_needs_somewhere_to_call() -> None:
    with pytest.raises(BackendError, match="url or a socket path"):
        HeroComputeBackend(owner_secret=SECRET)


# The unverified interface against hero_compute's own OpenRPC document (issue 11, item 8) --------


def renamed(document: dict[str, object], method: str, new: str) -> None:
    """Renames `method` in an OpenRPC document, as a server that calls it otherwise would."""
    for entry in document["methods"]:  # type: ignore[attr-defined]
        if entry["name"] == method:
            entry["name"] = new


def renamed_param(document: dict[str, object], method: str, param: str, new: str) -> None:
    for entry in document["methods"]:  # type: ignore[attr-defined]
        if entry["name"] == method:
            for descriptor in entry["params"]:
                if descriptor["name"] == param:
                    descriptor["name"] = new


async def test_a_matching_openrpc_document_gives_no_problem_and_no_note(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    assert await client.check_report() == ([], [])
    assert "rpc.discover" in rpc.methods


async def test_each_renamed_method_or_param_is_named(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    assert rpc.discovery is not None
    renamed(rpc.discovery, "deploy_webgateway", "deploy_gateway")
    renamed_param(rpc.discovery, "deploy_vm", "cpu_count", "cpu")
    renamed_param(rpc.discovery, "get_vm", "sid", "vm_id")

    problems, notes = await client.check_report()

    assert notes == []
    assert problems == [
        "hero_compute's OpenRPC document: `deploy_vm` has no param `cpu_count`, which the client "
        "sends",
        "hero_compute's OpenRPC document: `get_vm` has no param `sid`, which the client sends",
        "hero_compute's OpenRPC document: `get_vm` requires param `vm_id`, which the client does "
        "not always send",
        "hero_compute's OpenRPC document: no method `deploy_webgateway`, which the client calls",
    ]
    assert await client.check() == problems  # the service refuses to start on them too
    assert all(SECRET not in p for p in problems)


async def test_a_param_the_client_sends_only_sometimes_must_not_be_required(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    assert rpc.discovery is not None
    for entry in rpc.discovery["methods"]:
        if entry["name"] == "deploy_vm":
            for descriptor in entry["params"]:
                descriptor["required"] = descriptor["name"] == "node_id" or descriptor["required"]
            entry["paramStructure"] = "either"

    problems, _ = await client.check_report()

    assert problems == [
        "hero_compute's OpenRPC document: `deploy_vm` requires param `node_id`, which the client "
        "does not always send"
    ]


async def test_positional_params_and_references_are_understood(
    rpc: HeroComputeRpc, client: HeroComputeBackend
) -> None:
    assert rpc.discovery is not None
    methods = rpc.discovery["methods"]
    stop = next(m for m in methods if m["name"] == "stop_vm")
    rpc.discovery["components"] = {"methods": {"stop": stop}}
    methods[methods.index(stop)] = {"$ref": "#/components/methods/stop"}
    next(m for m in methods if m.get("name") == "start_vm")["paramStructure"] = "by-position"

    problems, _ = await client.check_report()

    assert problems == [
        "hero_compute's OpenRPC document: `start_vm` takes its params by position; the client "
        "sends them by name"
    ]


async def test_a_server_without_discovery_cannot_be_verified_which_is_a_note_not_a_failure() -> (
    None
):
    async with (
        HeroComputeRpc(discovery=False) as rpc,
        HeroComputeBackend(url=rpc.url, owner_secret=SECRET) as client,
    ):
        problems, notes = await client.check_report()
        assert await client.check() == []

    assert problems == []
    assert len(notes) == 1
    assert "cannot be verified" in notes[0] and "rpc.discover" in notes[0]


async def test_the_client_sends_nothing_outside_its_method_table(
    client: HeroComputeBackend, rpc: HeroComputeRpc
) -> None:
    with pytest.raises(BackendError, match="client bug"):
        await client._call("reboot_everything", {})
    with pytest.raises(BackendError, match="client bug"):
        await client._call("get_vm", {"sid": "vm_1", "secret": SECRET, "force": True})
    assert rpc.calls == []
