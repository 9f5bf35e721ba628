"""The provisioning process manager: performs each user's next action and records its outcome.

It is driven by the event log, not by a coroutine that dies with the process. Every user event
(and every event of a user's VM) wakes that user's worker, which asks `core.user.next_action`
what is left to do, does it through the ports and records the outcome with a `Record…` command.
At start it wakes every user still provisioning or decommissioning, so after a crash the work
continues from the last recorded step. Each user has one worker (its steps run in order);
different users run concurrently, so a slow step of one never holds up another.

Every step has a deadline and a bounded number of tries with exponential backoff and jitter;
each failed try that is followed by another is recorded (`StepRetried`), and when the tries or
the time run out the step is recorded as failed with a readable reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, TypedDict

import structlog

from adapters.forge_http import generate_password
from adapters.sshkeys import generate_ed25519
from core.contract import STEPS, DeleteVm, DeployVm
from core.domain import USERS, VMS
from core.events import RecordedEvent, stream_parts, user_stream, vm_stream
from core.gateway_names import gateway_name
from core.manifest import render_services_toml, sha256_hex
from core.operations import RequestMeta
from core.ports import (
    DEFAULT_VM,
    BackendError,
    BackendNotFound,
    BackendVm,
    ComputeBackend,
    ExternalError,
    Forge,
    GatewaySpec,
    HealthProbe,
    NodeDirectory,
    NodeInfo,
    RemoteShell,
    SecretVault,
    SshTarget,
    VmSpec,
)
from core.retry import RetryPolicy
from core.user import Context as UserContext
from core.user import OutcomeCommand, RecordDecommissionFailed, RecordStepFailed, RecordStepRetried
from core.user_actions import (
    DeleteGateway,
    DeleteUserVm,
    DeployGateway,
    DeployUserVm,
    EnsureForgeUser,
    FinishDecommission,
    GenerateSshKey,
    RunSetup,
    SelectNode,
    StepAction,
    UploadManifest,
    UserAction,
    VerifyHealth,
    WaitSsh,
    next_action,
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
    UserVmDeployed,
    UserVmDeployRequested,
)
from core.user_state import User, backend_url_for
from core.vm import Context as VmContext
from core.vm import RecordDeleted
from hero_deployer import user_handlers, vm_handlers
from hero_deployer.commands import Command, consistent_views, run
from hero_deployer.deps import Deps
from hero_deployer.user_handlers import FORGE_PASSWORD, FORGE_TOKEN, SSH_PRIVATE_KEY, VM_SECRET

log = structlog.get_logger(__name__)

VM: Final = DEFAULT_VM  # the user's VM, as the issue fixes it
MANIFEST_PATH: Final = "hero/cfg/cockpit/services.toml"
FORGE_TOKEN_SCOPES: Final = ("write:repository", "write:user")
NO_FORGE_REASON: Final = "no Forge URL is configured"

_VM_WAKERS = frozenset({"VmDeployed", "VmDeployFailed", "VmDeleted", "VmOperationFailed"})
_CRASH_BACKOFF = 1.0


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


# Looking up a user VM's key for the VM reactor -------------------------------------------


def ssh_keys_for(deps: Deps) -> Callable[[str], Awaitable[tuple[str, ...]]]:
    """The public keys to inject into VM `sid`: the user's key if it is a user's VM, else none.

    The VM's name only suggests the user; the user's own stream must list the sid (both were
    appended in one transaction), so a tenant VM named `user-alice` never gets alice's key.
    """

    async def keys(sid: str) -> tuple[str, ...]:
        vm, _ = await deps.vms.load(vm_stream(sid))
        if vm is None or not vm.name.startswith("user-"):
            return ()
        user, _ = await deps.users.load(user_stream(vm.name.removeprefix("user-")))
        if user is None or sid not in user.all_vm_sids or not user.ssh_public_key:
            return ()
        return (user.ssh_public_key,)

    return keys


# The process manager ------------------------------------------------------------------------


class UserManager:
    """A Follower handler: wakes per-user workers on events and never blocks the follower."""

    name = "user-manager"

    def __init__(self, deps: Deps, ports: Ports, config: ManagerConfig | None = None) -> None:
        self._deps = deps
        self._ports = ports
        self._config = config or ManagerConfig()
        self._policy = self._config.policy
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._vm_owner: dict[str, str] = {}
        self._started_at = deps.clock()
        self._start_task: asyncio.Task[None] | None = None

    # Follower handler ------------------------------------------------------------------------

    async def handle(self, events: Sequence[RecordedEvent]) -> None:
        for recorded in events:
            kind, id = stream_parts(recorded.stream)
            if kind == USERS.kind:
                if recorded.type == "InitialPasswordRevealed":
                    # The request destroys the password after recording the reveal; if the
                    # process died in between, this event (replayed after the checkpoint) does.
                    await self._ports.vault.delete(id, FORGE_PASSWORD)
                self.kick(id)
            elif recorded.type in _VM_WAKERS and kind == VMS.kind:
                owner = self._vm_owner.get(id)
                if owner is not None:
                    self.kick(owner)

    def safe_position(self, read_position: int) -> int:
        # The work is re-derived from each user's state at start, so no event needs replaying.
        return read_position

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Wakes every user with work left, once the views have caught up with the log."""
        self._start_task = asyncio.create_task(self._resume_all(), name="user-manager-start")

    async def close(self) -> None:
        tasks = list(self._workers.values())
        if self._start_task is not None:
            tasks.append(self._start_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Waits until no worker runs (tests and benchmarks)."""
        while self._workers:
            await asyncio.gather(*list(self._workers.values()), return_exceptions=True)

    def kick(self, username: str) -> None:
        """Makes the user's worker look at the user again; starts it if it is idle."""
        self._changed.setdefault(username, asyncio.Event()).set()
        wake = self._wake.setdefault(username, asyncio.Event())
        wake.set()
        if username not in self._workers:
            self._workers[username] = asyncio.create_task(
                self._work(username, wake), name=f"user-{username}"
            )

    async def _resume_all(self) -> None:
        await vm_handlers.until_taken(lambda: consistent_views(self._deps), "user_manager_start")
        pending = await self._deps.user_view.pending()
        if pending:
            log.info("user_manager.resuming", users=len(pending))
        for username in pending:
            self.kick(username)

    async def _work(self, username: str, wake: asyncio.Event) -> None:
        try:
            while wake.is_set():
                wake.clear()
                try:
                    if await self._step(username):
                        wake.set()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("user_manager.failed", username=username)
                    await asyncio.sleep(_CRASH_BACKOFF)
                    wake.set()
        finally:
            if self._workers.get(username) is asyncio.current_task():
                del self._workers[username]
                self._wake.pop(username, None)
                self._changed.pop(username, None)

    async def _step(self, username: str) -> bool:
        """Performs the user's next action; True if it may have left more to do."""
        user, _ = await self._deps.users.load(user_stream(username))
        if user is None:
            return False
        for sid in user.all_vm_sids:
            self._vm_owner[sid] = username
        action = next_action(user)
        if action is None:
            return False
        log.debug("user_manager.action", username=username, action=type(action).__name__)
        await self._perform(user, action)
        return True

    async def _perform(self, user: User, action: UserAction) -> None:
        match action:
            case EnsureForgeUser():
                await self._attempts(action, lambda _: self._forge_user(user, action))
            case GenerateSshKey():
                await self._attempts(action, lambda _: self._ssh_key(action))
            case SelectNode():
                await self._attempts(action, lambda _: self._select_node(action))
            case DeployUserVm():
                await self._deploy_vm(user, action)
            case DeployGateway():
                await self._attempts(action, lambda _: self._deploy_gateway(action))
            case WaitSsh():
                await self._attempts(action, lambda left: self._wait_ssh(user, left))
            case UploadManifest():
                await self._attempts(action, lambda _: self._upload_manifest(user, action))
            case RunSetup():
                await self._attempts(action, lambda left: self._run_setup(user, left))
            case VerifyHealth():
                await self._verify_health(user, action)
            case DeleteGateway():
                await self._decommission(action, self._delete_gateway(user, action))
            case DeleteUserVm():
                await self._decommission(action, self._delete_vm(user, action))
            case FinishDecommission():
                await self._decommission(action, self._finish(action))

    # Recording -------------------------------------------------------------------------------

    def _of(self, username: str) -> _Stamp:
        """Whose outcome and when: the fields every outcome event starts with."""
        return _Stamp(username=username, at=self._deps.clock())

    async def _record(self, username: str, command: OutcomeCommand) -> None:
        """Records a step's outcome, waiting out a store that refuses it rather than redo it."""
        request_id = f"user-manager-{uuid.uuid4().hex[:12]}"
        await vm_handlers.until_taken(
            lambda: user_handlers.record_user_outcome(self._deps, username, command, request_id),
            "user_outcome",
        )

    def _remaining(self, action: StepAction) -> tuple[float, float]:
        """The step's deadline in seconds and what is left of it now.

        The window opens when the step began, or when this process started if that is later:
        a restart gives an interrupted step one more full window, never an endless one.
        """
        deadline = self._policy.deadline_of(action.step)
        opened = max(action.started_at, self._started_at)
        closes = opened + timedelta(seconds=deadline)
        return deadline, (closes - self._deps.clock()).total_seconds()

    async def _attempts(
        self, action: StepAction, attempt: Callable[[float], Awaitable[OutcomeCommand]]
    ) -> None:
        """Tries a step until it succeeds, its tries run out or its deadline passes."""
        name, step = action.username, action.step
        tries = action.tries
        last = ""
        while True:
            deadline, remaining = self._remaining(action)
            if remaining <= 0:
                reason = f"no success within its {deadline:g}s deadline" + (
                    f"; last error: {last}" if last else ""
                )
                await self._record(name, RecordStepFailed(step=step, reason=reason))
                return
            try:
                async with asyncio.timeout(remaining) as scope:
                    outcome = await attempt(remaining)
            except TimeoutError:
                if not scope.expired():
                    error = StepError(f"{step} timed out", retryable=True)
                else:
                    error = StepError(
                        f"did not finish within its {deadline:g}s deadline"
                        + (f"; last error: {last}" if last else "")
                    )
            except StepError as exc:
                error = exc
            except (ExternalError, BackendError) as exc:
                error = StepError(exc.message, retryable=exc.retryable)
            else:
                await self._record(name, outcome)
                return
            tries += 1
            last = error.message
            delay = self._policy.delay(tries)
            _, remaining = self._remaining(action)
            if not error.retryable or tries >= self._policy.tries_of(step) or remaining <= delay:
                log.info("user_manager.step_failed", username=name, step=step, reason=last)
                final = error.outcome or RecordStepFailed(step=step, reason=last)
                await self._record(name, final)
                return
            log.info("user_manager.step_retried", username=name, step=step, reason=last)
            await self._record(name, RecordStepRetried(step=step, reason=last))
            await asyncio.sleep(delay)

    # Provisioning steps ------------------------------------------------------------------------

    async def _forge_user(self, user: User, action: EnsureForgeUser) -> OutcomeCommand:
        forge, vault = self._ports.forge, self._ports.vault
        if forge is None:
            return ForgeUserEnsured(
                **self._of(action.username),
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
                return ForgeUserEnsured(**self._of(name), created=False, forge_user_id=found.id)
            # An earlier try created it and stopped before recording that.
            password = sealed.decode()
        # Forgejo refuses a token name used before, so every try names its own.
        token_name = f"hero-deployer-{action.attempt}-{secrets.token_hex(4)}"
        token = await forge.create_token(
            name, password=password, token_name=token_name, scopes=FORGE_TOKEN_SCOPES
        )
        await vault.put(name, FORGE_TOKEN, token.encode())
        return ForgeUserEnsured(
            **self._of(name), created=True, forge_user_id=found.id, token_name=token_name
        )

    async def _ssh_key(self, action: GenerateSshKey) -> OutcomeCommand:
        pair = generate_ed25519(comment=f"hero-deployer-{action.username}")
        await self._ports.vault.put(action.username, SSH_PRIVATE_KEY, pair.private_openssh.encode())
        return SshKeyGenerated(**self._of(action.username), public_key=pair.public_openssh)

    async def _select_node(self, action: SelectNode) -> OutcomeCommand:
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
            **self._of(action.username), node_id=best.node_id, gateway_domain=best.gateway_domain
        )

    async def _deploy_vm(self, user: User, action: DeployUserVm) -> None:
        """Requests the user's VM, or waits until the requested one runs (or fails).

        A VM that failed is replaced by a new one (a new sid), as long as tries and time are
        left; a backend that cannot say where a running VM is, is asked again.
        """
        if not action.vm_sid:
            await self._request_vm(user, action)
            return
        name, sid = action.username, action.vm_sid
        changed = self._changed.setdefault(name, asyncio.Event())
        tries = action.tries
        while True:
            changed.clear()
            vm, _ = await self._deps.vms.load(vm_stream(sid))
            status = vm.status if vm is not None else "missing"
            if vm is not None and status in ("running", "stopped"):
                try:
                    live = await self._live_vm(sid)
                except (ExternalError, BackendError, StepError) as exc:
                    problem, replace = getattr(exc, "message", str(exc)), False
                else:
                    deployed = UserVmDeployed(
                        **self._of(name),
                        vm_sid=sid,
                        mycelium_ip=live.mycelium_ip or vm.mycelium_ip,
                        ssh_host=live.ssh_host,
                        ssh_port=live.ssh_port,
                    )
                    await self._record(name, deployed)
                    return
            elif status == "deploying":
                deadline, remaining = self._remaining(action)
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await changed.wait()
                    continue
                problem = f"vm {sid} was not deployed within the {deadline:g}s deadline"
                await self._record(name, RecordStepFailed(step="deploy_vm", reason=problem))
                return
            else:
                error = f": {vm.error}" if vm is not None and vm.error else ""
                problem, replace = f"vm {sid} is {status}{error}", True
            tries += 1
            delay = self._policy.delay(tries)
            _, remaining = self._remaining(action)
            if tries >= self._policy.tries_of("deploy_vm") or remaining <= delay:
                await self._record(name, RecordStepFailed(step="deploy_vm", reason=problem))
                return
            await self._record(name, RecordStepRetried(step="deploy_vm", reason=problem))
            await asyncio.sleep(delay)
            if not replace:
                continue
            fresh, _ = await self._deps.users.load(user_stream(name))
            if fresh is not None and fresh.status == "provisioning" and fresh.step == "deploy_vm":
                await self._request_vm(fresh, action)
            return

    async def _request_vm(self, user: User, action: DeployUserVm) -> None:
        """Appends the VM's VmDeployRequested and the user's UserVmDeployRequested together."""
        name = action.username
        secret = await self._vm_secret(name)
        sid = vm_handlers.new_sid()
        self._vm_owner[sid] = name
        now = self._deps.clock()
        deploy = DeployVm(
            name=action.vm_name,
            secret=secret,
            image=VM.image,
            cpu_count=VM.cpu_count,
            memory_gb=VM.memory_gb,
            disk_gb=VM.disk_gb,
            rootfs_gb=VM.rootfs_gb,
            node_id=action.node_id or None,
        )
        vm_ctx = VmContext(now=now, owner=self._deps.fingerprint(secret), new_sid=sid)
        requested = UserVmDeployRequested(username=name, vm_sid=sid, at=now)
        commands: list[Command[Any]] = [
            Command(self._deps.users, name, requested, UserContext(now=now)),
            Command(self._deps.vms, sid, deploy, vm_ctx),
        ]
        meta = RequestMeta(operation="record_outcome", request_id=f"user-manager-{sid}")
        # both or neither: when the step moved on meanwhile, no VM is requested
        await run(self._deps, commands, meta, together=True)

    async def _vm_secret(self, username: str) -> str:
        """The user's VM secret from the vault, made and sealed on first use."""
        vault = self._ports.vault
        sealed = await vault.get(username, VM_SECRET)
        if sealed is not None:
            return sealed.decode()
        secret = secrets.token_urlsafe(32)
        await vault.put(username, VM_SECRET, secret.encode())
        return secret

    async def _live_vm(self, sid: str) -> BackendVm:
        """The user's VM as the backend sees it; deployed again by name if the backend lost it.

        The local grid keeps its VMs in memory, so after a restart a VM the log says is running
        is gone; deploying the same name finds it on a real grid and rebuilds it (with its disk
        folder) on the local one.
        """
        backend = self._ports.backend
        found = await backend.get_vm(sid)
        if found is not None and found.status == "running":
            return found
        vm, _ = await self._deps.vms.load(vm_stream(sid))
        if vm is None or vm.status not in ("running", "stopped"):
            raise StepError(f"vm {sid} is {vm.status if vm else 'missing'}")
        if found is None:
            log.warning("user_manager.vm_redeployed", sid=sid)
            keys = await ssh_keys_for(self._deps)(sid)
            return await backend.deploy_vm(
                VmSpec(
                    name=sid,
                    image=vm.image,
                    cpu_count=vm.cpu_count,
                    memory_gb=vm.memory_gb,
                    disk_gb=vm.disk_gb,
                    rootfs_gb=vm.rootfs_gb,
                    node_id=vm.node_id,
                    ssh_keys=keys,
                )
            )
        if found.status == "stopped":
            await backend.start_vm(sid)
            again = await backend.get_vm(sid)
            if again is not None:
                return again
        raise StepError(f"vm {sid} is {found.status}", retryable=True)

    async def _deploy_gateway(self, action: DeployGateway) -> OutcomeCommand:
        gateway = await self._ports.backend.deploy_gateway(
            GatewaySpec(
                name=self._gateway_name(action.username),
                node_id=action.node_id,
                backend_url=action.backend_url,
                vm_name=action.vm_sid,
            )
        )
        return GatewayDeployed(
            **self._of(action.username), name=gateway.name, fqdn=gateway.fqdn, url=gateway.url
        )

    async def _target(self, user: User) -> SshTarget:
        """Where and how to log in: the VM's live SSH address, as the user, with the user's key."""
        live = await self._live_vm(user.vm_sid)
        sealed = await self._ports.vault.get(user.username, SSH_PRIVATE_KEY)
        if sealed is None:
            raise StepError("the user's private key is not in the vault")
        return SshTarget(
            host=live.ssh_host or user.ssh_host,
            port=live.ssh_port,
            username=self._config.ssh_user,
            private_key=sealed.decode(),
        )

    async def _wait_ssh(self, user: User, remaining: float) -> OutcomeCommand:
        target = await self._target(user)
        # A little under the step's time, so the shell reports why before the deadline cuts in.
        await self._ports.shell.wait_ready(target, timeout=max(0.1, remaining * 0.95 - 0.05))
        return SshReachable(**self._of(user.username))

    async def _upload_manifest(self, user: User, action: UploadManifest) -> OutcomeCommand:
        manifest = render_services_toml(action.username, action.profile)
        target = await self._target(user)
        owner = self._config.manifest_owner
        await self._ports.shell.upload(target, MANIFEST_PATH, manifest.encode(), owner=owner)
        path = f"/home/{owner}/{MANIFEST_PATH}"
        return ManifestUploaded(**self._of(user.username), path=path, sha256=sha256_hex(manifest))

    async def _run_setup(self, user: User, remaining: float) -> OutcomeCommand:
        target = await self._target(user)
        result = await self._ports.shell.run(
            target, self._config.setup_command, timeout=max(0.1, remaining * 0.95 - 0.05)
        )
        outcome = SetupCompleted(
            **self._of(user.username),
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

    async def _verify_health(self, user: User, action: VerifyHealth) -> None:
        urls = [action.gateway_url]

        async def attempt(_: float) -> OutcomeCommand:
            url = urls[-1]
            try:
                status = await self._ports.probe.status(url.rstrip("/") + "/health")
            except ExternalError:
                # The gateway does not answer at all: make sure the VM and the gateway exist
                # (deploying the same name again is idempotent) and try its current URL next.
                await self._live_vm(user.vm_sid)
                gateway = await self._ports.backend.deploy_gateway(
                    GatewaySpec(
                        name=user.gateway_name or self._gateway_name(user.username),
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
                    outcome=HealthVerified(**self._of(user.username), status_code=status),
                )
            return HealthVerified(**self._of(user.username), status_code=status)

        await self._attempts(action, attempt)

    # Decommissioning ---------------------------------------------------------------------------

    async def _decommission(
        self, action: DeleteGateway | DeleteUserVm | FinishDecommission, work: Awaitable[None]
    ) -> None:
        """Runs one part; a failure is recorded and the part is tried again after a backoff."""
        try:
            await work
        except (ExternalError, BackendError, StepError) as exc:
            reason = getattr(exc, "message", str(exc))
        else:
            return
        log.info("user_manager.decommission_failed", username=action.username, part=action.part)
        await self._record(
            action.username, RecordDecommissionFailed(part=action.part, reason=reason)
        )
        await asyncio.sleep(self._policy.delay(action.failures + 1))

    async def _delete_gateway(self, user: User, action: DeleteGateway) -> None:
        # a gateway never recorded may still exist under the configured namespace
        name = user.gateway_name or self._gateway_name(action.username)
        with contextlib.suppress(BackendNotFound):
            await self._ports.backend.delete_gateway(name)
        await self._record(action.username, GatewayDeleted(**self._of(action.username), name=name))

    def _gateway_name(self, username: str) -> str:
        """The user's gateway name in the operator's namespace (core.gateway_names)."""
        return gateway_name(username, self._config.gateway_prefix)

    async def _delete_vm(self, user: User, action: DeleteUserVm) -> None:
        """Deletes the VM through the VM commands; if the reactor cannot, deletes it directly."""
        name, sid = action.username, action.vm_sid
        self._vm_owner[sid] = name
        deadline = self._policy.deadline_of("delete_vm")
        changed = self._changed.setdefault(name, asyncio.Event())
        vm, _ = await self._deps.vms.load(vm_stream(sid))
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
            vm, _ = await self._deps.vms.load(vm_stream(sid))
            if vm is None or vm.status == "deleted":
                await self._record(name, UserVmDeleted(**self._of(name), vm_sid=sid))
                return
            failed = bool(vm.error) and (baseline is None or vm.updated_at > baseline)
            remaining = closes - loop.time()
            if failed or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        # The reactor gave up (or is stuck): delete it here; one already gone counts as deleted.
        with contextlib.suppress(BackendNotFound):
            await self._ports.backend.delete_vm(sid)
        await vm_handlers.record_outcome(self._deps, RecordDeleted(sid=sid), f"user-manager-{sid}")
        await self._record(name, UserVmDeleted(**self._of(name), vm_sid=sid))

    async def _finish(self, action: FinishDecommission) -> None:
        vault = self._ports.vault
        await vault.delete(action.username, SSH_PRIVATE_KEY)
        await vault.delete(action.username, VM_SECRET)
        await self._record(action.username, UserDecommissioned(**self._of(action.username)))


def pick_node(nodes: Iterable[NodeInfo]) -> NodeInfo | None:
    """The up, gateway-capable node with room for the VM and the most free memory, then disk."""
    fitting = [
        n
        for n in nodes
        if n.up
        and n.gateway_domain
        and n.free_memory_gb >= VM.memory_gb
        and n.free_disk_gb >= VM.disk_gb + VM.rootfs_gb
    ]
    if not fitting:
        return None
    return max(fitting, key=lambda n: (n.free_memory_gb, n.free_disk_gb, -n.node_id))


def step_policy(
    *,
    deadline: float,
    retries: int,
    base_delay: float,
    max_delay: float,
    deadlines: Mapping[str, float],
    retries_by_step: Mapping[str, float],
) -> RetryPolicy:
    """A RetryPolicy whose per-step overrides name real steps (ValueError otherwise)."""
    known: set[str] = {*STEPS, "delete_gateway", "delete_vm", "finish"}
    for name in (*deadlines, *retries_by_step):
        if name not in known:
            raise ValueError(f"unknown step {name!r} in the step settings")
    return RetryPolicy(
        deadline=deadline,
        retries=retries,
        base_delay=base_delay,
        max_delay=max_delay,
        deadlines=dict(deadlines),
        retries_by_step={k: int(v) for k, v in retries_by_step.items()},
    )
