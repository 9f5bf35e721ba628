"""What every ComputeBackend must do: one suite, subclassed once per backend with its fixture."""

from __future__ import annotations

from typing import ClassVar

import pytest

from core.ports import (
    BackendError,
    BackendNotFound,
    BackendVm,
    ComputeBackend,
    GatewaySpec,
    VmSpec,
)

POWER_ACTIONS = ("start", "stop", "restart")


def small_vm(name: str, **overrides: object) -> VmSpec:
    """A small VM spec; the sizes are valid on every backend."""
    fields: dict[str, object] = {
        "name": name,
        "cpu_count": 1,
        "memory_gb": 2,
        "disk_gb": 10,
        "rootfs_gb": 2,
        "ssh_keys": ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIContractKey contract@test",),
    }
    fields.update(overrides)
    return VmSpec(**fields)  # type: ignore[arg-type]


class ComputeBackendContract:
    """The shared contract; a subclass overrides the `backend` fixture (and `unsupported`)."""

    # Power actions the backend declares it cannot do; they must say so, not pretend.
    unsupported: ClassVar[frozenset[str]] = frozenset()

    @pytest.fixture
    async def backend(self) -> ComputeBackend:
        raise NotImplementedError("a contract subclass provides the backend")

    async def _power(self, backend: ComputeBackend, action: str, name: str) -> None:
        methods = {
            "start": backend.boot_vm,
            "stop": backend.shutdown_vm,
            "restart": backend.reboot_vm,
        }
        await methods[action](name)

    # VMs -------------------------------------------------------------------------------------

    async def test_deploy_returns_a_running_vm_with_an_address(
        self, backend: ComputeBackend
    ) -> None:
        vm = await backend.create_vm(small_vm("contract-a"))

        assert vm.name == "contract-a"
        assert vm.status == "running"
        assert vm.mycelium_ip
        assert vm.node_id > 0
        assert vm.ssh_host
        assert 0 < vm.ssh_port < 65536

    async def test_deploying_the_same_name_again_finds_the_same_vm(
        self, backend: ComputeBackend
    ) -> None:
        first = await backend.create_vm(small_vm("contract-b"))
        again = await backend.create_vm(small_vm("contract-b"))

        assert again == first

    async def test_two_names_are_two_vms(self, backend: ComputeBackend) -> None:
        one = await backend.create_vm(small_vm("contract-c1"))
        two = await backend.create_vm(small_vm("contract-c2"))

        assert one.mycelium_ip != two.mycelium_ip
        assert (await backend.find_vm("contract-c1")) == one

    async def test_get_vm_reports_a_deployed_vm(self, backend: ComputeBackend) -> None:
        deployed = await backend.create_vm(small_vm("contract-d"))

        got = await backend.find_vm("contract-d")

        assert isinstance(got, BackendVm)
        assert got.status == "running"
        assert (got.name, got.mycelium_ip, got.node_id) == (
            deployed.name,
            deployed.mycelium_ip,
            deployed.node_id,
        )

    async def test_get_vm_of_an_unknown_name_is_none(self, backend: ComputeBackend) -> None:
        assert await backend.find_vm("contract-never-deployed") is None

    async def test_stop_start_restart_change_the_status(self, backend: ComputeBackend) -> None:
        await backend.create_vm(small_vm("contract-e"))
        expected = {"stop": "stopped", "start": "running", "restart": "running"}

        for action in ("stop", "start", "restart"):
            if action in self.unsupported:
                continue
            await self._power(backend, action, "contract-e")
            vm = await backend.find_vm("contract-e")
            assert vm is not None
            assert vm.status == expected[action], action

    async def test_unsupported_power_actions_say_so_and_change_nothing(
        self, backend: ComputeBackend
    ) -> None:
        before = await backend.create_vm(small_vm("contract-f"))

        for action in sorted(self.unsupported):
            with pytest.raises(BackendError, match="not supported") as raised:
                await self._power(backend, action, "contract-f")
            assert not raised.value.retryable, action
            assert not isinstance(raised.value, BackendNotFound), action

        assert await backend.find_vm("contract-f") == before
        assert set(self.unsupported) <= set(POWER_ACTIONS)

    @pytest.mark.parametrize("action", POWER_ACTIONS)
    async def test_a_power_action_on_an_unknown_vm_is_not_found(
        self, backend: ComputeBackend, action: str
    ) -> None:
        with pytest.raises(BackendNotFound):
            await self._power(backend, action, "contract-never-deployed")

    async def test_delete_removes_the_vm_and_a_second_delete_is_fine(
        self, backend: ComputeBackend
    ) -> None:
        await backend.create_vm(small_vm("contract-g"))

        await backend.destroy_vm("contract-g")
        assert await backend.find_vm("contract-g") is None
        await backend.destroy_vm("contract-g")
        assert await backend.find_vm("contract-g") is None

    async def test_deleting_a_vm_never_deployed_is_fine(self, backend: ComputeBackend) -> None:
        await backend.destroy_vm("contract-never-deployed")

    async def test_a_deleted_name_can_be_deployed_again(self, backend: ComputeBackend) -> None:
        await backend.create_vm(small_vm("contract-h"))
        await backend.destroy_vm("contract-h")

        vm = await backend.create_vm(small_vm("contract-h"))

        assert vm.status == "running"
        assert await backend.find_vm("contract-h") == vm

    # Gateways --------------------------------------------------------------------------------

    async def test_gateway_deploy_is_idempotent_and_names_its_fqdn(
        self, backend: ComputeBackend
    ) -> None:
        vm = await backend.create_vm(small_vm("contract-i"))
        spec = GatewaySpec(
            name="contractgw", node_id=vm.node_id, backend_url=f"http://[{vm.mycelium_ip}]:8080"
        )

        gateway = await backend.deploy_gateway(spec)
        again = await backend.deploy_gateway(spec)

        assert gateway.name == "contractgw"
        assert gateway.fqdn.startswith("contractgw.")
        assert gateway.url.startswith(("http://", "https://"))
        assert gateway.fqdn in gateway.url
        assert again == gateway

    async def test_gateway_delete_is_idempotent(self, backend: ComputeBackend) -> None:
        vm = await backend.create_vm(small_vm("contract-j"))
        spec = GatewaySpec(
            name="contractgwj", node_id=vm.node_id, backend_url=f"http://[{vm.mycelium_ip}]:80"
        )
        await backend.deploy_gateway(spec)

        await backend.delete_gateway("contractgwj")
        await backend.delete_gateway("contractgwj")
        await backend.delete_gateway("contractgwnever")

        redeployed = await backend.deploy_gateway(spec)
        assert redeployed.name == "contractgwj"
