"""What the provisioning steps do outside: Forge, keys, nodes, the VM, the gateway, SSH, health.

Each effect returns the outcome event the process manager records, or raises: a StepError, an
ExternalError or a BackendError, which the manager turns into a retry or a failed step.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, TypedDict

import structlog

from adapters.forge_http import generate_password
from adapters.sshkeys import generate_ed25519
from core.contract import DeleteVm
from core.domain import VMS
from core.gateway_names import gateway_name
from core.manifest import render_services_toml, sha256_hex
from core.operations import RequestMeta
from core.ports import (
    DEFAULT_VM,
    BackendNotFound,
    BackendVm,
    ComputeBackend,
    ExternalError,
    Forge,
    GatewaySpec,
    HealthProbe,
    NodeDirectory,
    RemoteShell,
    SecretVault,
    SshTarget,
)
from core.retry import RetryPolicy
from core.user import OutcomeCommand
from core.user_actions import (
    DeleteGateway,
    DeleteUserVm,
    DeployGateway,
    EnsureForgeUser,
    FinishDecommission,
    GenerateSshKey,
    SelectNode,
    UploadManifest,
    pick_node,
)
from core.user_events import (
    ForgeUserEnsured,
    GatewayDeleted,
    GatewayDeployed,
    HealthVerified,
    ManifestUploaded,
    NodeSelected,
    SetupCompleted,
    SshKeyGenerated,
    SshReachable,
    UserDecommissioned,
    UserVmDeleted,
)
from core.user_state import User, backend_url_for
from core.vm import Context as VmContext
from core.vm import vm_spec
from core.vm_events import VmDeleted
from hero_deployer.app import vm_handlers
from hero_deployer.app.commands import Command, run
from hero_deployer.app.deps import Deps
from hero_deployer.app.user_handlers import FORGE_PASSWORD, FORGE_TOKEN, SSH_PRIVATE_KEY, VM_SECRET
from hero_deployer.app.vm_handlers import ssh_keys_for

log = structlog.get_logger(__name__)

VM: Final = DEFAULT_VM  # the user's VM, as the issue fixes it
MANIFEST_PATH: Final = "hero/cfg/cockpit/services.toml"
FORGE_TOKEN_SCOPES: Final = ("write:repository", "write:user")
NO_FORGE_REASON: Final = "no Forge URL is configured"


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    """What the process manager needs from the settings."""

    candidate_nodes: tuple[int, ...] = (1, 8, 13, 50)
    ssh_user: str = "root"  # the grid installs the VM's SSH key for root only
    manifest_owner: str = "driver"  # the manifest goes to ~driver/hero/cfg/cockpit/, driver's
    gateway_prefix: str = ""  # namespaces gateway names, unique across the whole grid
    setup_command: str = "./setup-binaries.sh"
    forge_email_domain: str = "users.noreply.hero.local"
    policy: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, slots=True)
class Ports:
    """The outside world the steps reach; `forge` and `directory` are optional."""

    backend: ComputeBackend
    shell: RemoteShell
    probe: HealthProbe
    vault: SecretVault
    forge: Forge | None = None
    directory: NodeDirectory | None = None


class _Stamp(TypedDict):
    username: str
    at: datetime


class StepError(Exception):
    """One try of a step failed; `outcome`, if any, is recorded instead of a plain failure."""

    def __init__(
        self, message: str, *, retryable: bool = False, outcome: OutcomeCommand | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.outcome = outcome


# The effects -------------------------------------------------------------------------------


class Effects:
    """The side effects of the provisioning steps, through the ports; each returns an outcome."""

    def __init__(self, deps: Deps, ports: Ports, config: ManagerConfig) -> None:
        self._deps = deps
        self._ports = ports
        self._config = config

    def stamp(self, username: str) -> _Stamp:
        """Whose outcome and when: the fields every outcome event starts with."""
        return _Stamp(username=username, at=self._deps.clock())

    async def forge_user(self, user: User, action: EnsureForgeUser) -> OutcomeCommand:
        forge, vault = self._ports.forge, self._ports.vault
        if forge is None:
            return ForgeUserEnsured(
                **self.stamp(action.username),
                created=False,
                forge_user_id=None,
                skipped_reason=NO_FORGE_REASON,
            )
        name = action.username
        found = await forge.find_user(name)
        if found is None:
            password = generate_password()
            # Sealed before the account exists: a crash after the create still has it.
            await vault.put(name, FORGE_PASSWORD, password.encode())
            email = action.forge_email or f"{name}@{self._config.forge_email_domain}"
            found = await forge.create_user(
                name, email=email, password=password, full_name=action.display_name
            )
        else:
            sealed = await vault.get(name, FORGE_PASSWORD)
            if sealed is None or user.forge_user_created:
                # An account this run did not create: it is used as it is.
                return ForgeUserEnsured(**self.stamp(name), created=False, forge_user_id=found.id)
            # An earlier try created it and stopped before recording that.
            password = sealed.decode()
        # Forgejo refuses a token name used before, so every try names its own.
        token_name = f"hero-deployer-{action.attempt}-{secrets.token_hex(4)}"
        token = await forge.create_token(
            name, password=password, token_name=token_name, scopes=FORGE_TOKEN_SCOPES
        )
        await vault.put(name, FORGE_TOKEN, token.encode())
        return ForgeUserEnsured(
            **self.stamp(name), created=True, forge_user_id=found.id, token_name=token_name
        )

    async def ssh_key(self, action: GenerateSshKey) -> OutcomeCommand:
        pair = generate_ed25519(comment=f"hero-deployer-{action.username}")
        await self._ports.vault.put(action.username, SSH_PRIVATE_KEY, pair.private_openssh.encode())
        return SshKeyGenerated(**self.stamp(action.username), public_key=pair.public_openssh)

    async def select_node(self, action: SelectNode) -> OutcomeCommand:
        candidates = self._config.candidate_nodes
        if self._ports.directory is not None:
            nodes = await self._ports.directory.candidate_nodes(candidates)
        else:
            listed = await self._ports.backend.list_nodes()
            nodes = [n for n in listed if n.node_id in candidates]
        best = pick_node(nodes)
        if best is None:
            ids = ", ".join(str(n) for n in candidates)
            raise StepError(
                f"none of the candidate nodes ({ids}) is up, gateway-capable and has room for"
                f" {VM.memory_gb} GB memory and {VM.disk_gb + VM.rootfs_gb} GB disk",
                retryable=True,
            )
        return NodeSelected(
            **self.stamp(action.username), node_id=best.node_id, gateway_domain=best.gateway_domain
        )

    async def vm_secret(self, username: str) -> str:
        """The user's VM secret from the vault, made and sealed on first use."""
        vault = self._ports.vault
        sealed = await vault.get(username, VM_SECRET)
        if sealed is not None:
            return sealed.decode()
        secret = secrets.token_urlsafe(32)
        await vault.put(username, VM_SECRET, secret.encode())
        return secret

    async def live_vm(self, sid: str) -> BackendVm:
        """The user's VM as the backend sees it; deployed again by name if the backend lost it.

        The local grid keeps its VMs in memory, so after a restart a VM the log says is running
        is gone; deploying the same name finds it on a real grid and rebuilds it (with its disk
        folder) on the local one.
        """
        backend = self._ports.backend
        found = await backend.find_vm(sid)
        if found is not None and found.status == "running":
            return found
        vm, _ = await self._deps.vms.load(VMS.stream(sid))
        if vm is None or vm.status not in ("running", "stopped"):
            raise StepError(f"vm {sid} is {vm.status if vm else 'missing'}")
        if found is None:
            log.warning("user_manager.vm_redeployed", sid=sid)
            keys = await ssh_keys_for(self._deps)(sid)
            return await backend.create_vm(vm_spec(vm, keys))
        if found.status == "stopped":
            await backend.boot_vm(sid)
            again = await backend.find_vm(sid)
            if again is not None:
                return again
        raise StepError(f"vm {sid} is {found.status}", retryable=True)

    async def deploy_gateway(self, action: DeployGateway) -> OutcomeCommand:
        gateway = await self._ports.backend.deploy_gateway(
            GatewaySpec(
                name=self.gateway_name(action.username),
                node_id=action.node_id,
                backend_url=action.backend_url,
                vm_name=action.vm_sid,
            )
        )
        return GatewayDeployed(
            **self.stamp(action.username), name=gateway.name, fqdn=gateway.fqdn, url=gateway.url
        )

    async def target(self, user: User) -> SshTarget:
        """Where and how to log in: the VM's live SSH address, as the user, with the user's key."""
        live = await self.live_vm(user.vm_sid)
        sealed = await self._ports.vault.get(user.username, SSH_PRIVATE_KEY)
        if sealed is None:
            raise StepError("the user's private key is not in the vault")
        return SshTarget(
            host=live.ssh_host or user.ssh_host,
            port=live.ssh_port,
            username=self._config.ssh_user,
            private_key=sealed.decode(),
        )

    async def wait_ssh(self, user: User, remaining: float) -> OutcomeCommand:
        target = await self.target(user)
        # A little under the step's time, so the shell reports why before the deadline cuts in.
        await self._ports.shell.wait_ready(target, timeout=max(0.1, remaining * 0.95 - 0.05))
        return SshReachable(**self.stamp(user.username))

    async def upload_manifest(self, user: User, action: UploadManifest) -> OutcomeCommand:
        manifest = render_services_toml(action.username, action.profile)
        target = await self.target(user)
        owner = self._config.manifest_owner
        await self._ports.shell.upload(target, MANIFEST_PATH, manifest.encode(), owner=owner)
        path = f"/home/{owner}/{MANIFEST_PATH}"
        return ManifestUploaded(**self.stamp(user.username), path=path, sha256=sha256_hex(manifest))

    async def run_setup(self, user: User, remaining: float) -> OutcomeCommand:
        target = await self.target(user)
        result = await self._ports.shell.run(
            target, self._config.setup_command, timeout=max(0.1, remaining * 0.95 - 0.05)
        )
        outcome = SetupCompleted(
            **self.stamp(user.username),
            exit_status=result.exit_status,
            output_tail=result.output_tail,
        )
        if result.exit_status != 0:
            tail = result.output_tail.strip().splitlines()[-1:] or [""]
            raise StepError(
                f"setup exited with status {result.exit_status}: {tail[0]}",
                retryable=True,
                outcome=outcome,
            )
        return outcome

    def gateway_name(self, username: str) -> str:
        """The user's gateway name in the operator's namespace (core.gateway_names)."""
        return gateway_name(username, self._config.gateway_prefix)

    async def probe_health(self, user: User, urls: list[str]) -> OutcomeCommand:
        """One probe of the gateway's `/health`; 200 is the outcome, anything else a StepError.

        A gateway that does not answer at all is deployed again (idempotent, by name) with
        the VM it forwards to, and its current URL is appended to `urls` for the next try.
        """
        url = urls[-1]
        try:
            status = await self._ports.probe.status(url.rstrip("/") + "/health")
        except ExternalError:
            await self.live_vm(user.vm_sid)
            gateway = await self._ports.backend.deploy_gateway(
                GatewaySpec(
                    name=user.gateway_name or self.gateway_name(user.username),
                    vm_name=user.vm_sid,
                    node_id=user.node_id or 0,
                    backend_url=backend_url_for(user.mycelium_ip),
                )
            )
            if gateway.url != url:
                urls.append(gateway.url)
            raise
        if status != 200:
            raise StepError(
                f"health check answered {status}",
                retryable=True,
                outcome=HealthVerified(**self.stamp(user.username), status_code=status),
            )
        return HealthVerified(**self.stamp(user.username), status_code=status)

    async def decommission_vm(
        self, action: DeleteUserVm, changed: asyncio.Event, deadline: float
    ) -> OutcomeCommand:
        """Deletes the VM through the VM commands and waits (on `changed`, set when the VM's
        events arrive) until it is deleted; if the reactor cannot, deletes it directly."""
        name, sid = action.username, action.vm_sid
        vm, _ = await self._deps.vms.load(VMS.stream(sid))
        if vm is not None and vm.status not in ("deleted", "deleting"):
            sealed = await self._ports.vault.get(name, VM_SECRET)
            owner = self._deps.fingerprint(sealed.decode()) if sealed is not None else vm.owner
            meta = RequestMeta(operation="record_outcome", request_id=f"user-manager-{sid}")
            ctx = VmContext(now=self._deps.clock(), owner=owner)
            await run(
                self._deps, [Command(self._deps.vms, sid, DeleteVm(sid=sid, secret=""), ctx)], meta
            )
        baseline = vm.updated_at if vm is not None else None
        loop = asyncio.get_running_loop()
        closes = loop.time() + deadline
        while True:
            changed.clear()
            vm, _ = await self._deps.vms.load(VMS.stream(sid))
            if vm is None or vm.status == "deleted":
                return UserVmDeleted(**self.stamp(name), vm_sid=sid)
            failed = bool(vm.error) and (baseline is None or vm.updated_at > baseline)
            remaining = closes - loop.time()
            if failed or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        # The reactor gave up (or is stuck): delete it here; one already gone counts as deleted.
        with contextlib.suppress(BackendNotFound):
            await self._ports.backend.destroy_vm(sid)
        deleted = VmDeleted(sid=sid, at=self._deps.clock())
        await vm_handlers.record_outcome(self._deps, deleted, f"user-manager-{sid}")
        return UserVmDeleted(**self.stamp(name), vm_sid=sid)

    async def delete_gateway(self, user: User, action: DeleteGateway) -> OutcomeCommand:
        """Deletes the user's gateway; one already gone counts as deleted."""
        # a gateway never recorded may still exist under the configured namespace
        name = user.gateway_name or self.gateway_name(action.username)
        with contextlib.suppress(BackendNotFound):
            await self._ports.backend.delete_gateway(name)
        return GatewayDeleted(**self.stamp(action.username), name=name)

    async def finish(self, action: FinishDecommission) -> OutcomeCommand:
        """Destroys the user's sealed key and VM secret."""
        vault = self._ports.vault
        await vault.delete(action.username, SSH_PRIVATE_KEY)
        await vault.delete(action.username, VM_SECRET)
        return UserDecommissioned(**self.stamp(action.username))
