"""The provisioning process manager: performs each user's next action and records its outcome.

It is driven by the event log, not by a coroutine that dies with the process. Every user event
(and every event of a user's VM) wakes that user's worker, which asks `core.user.next_action`
what is left to do, does it through the ports and records the outcome: the event it is, or
a failed try (`RecordStepRetried`, `RecordStepFailed`).
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
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import structlog

from core.contract import DeployVm
from core.domain import USERS, VMS
from core.events import RecordedEvent, stream_parts
from core.operations import RequestMeta
from core.ports import BackendError, ExternalError
from core.retry import step_policy as step_policy  # where the bootstrap takes it
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
from core.user_events import UserVmDeployed, UserVmDeployRequested
from core.user_state import User
from core.vm import Context as VmContext
from core.vm import Vm
from hero_deployer.app import user_handlers, vm_handlers
from hero_deployer.app.commands import Command, consistent_views, run
from hero_deployer.app.deps import Deps
from hero_deployer.app.user_effects import Effects, StepError
from hero_deployer.app.user_effects import ManagerConfig as ManagerConfig  # where the bootstrap and
from hero_deployer.app.user_effects import Ports as Ports  # the tests take them
from hero_deployer.app.user_handlers import FORGE_PASSWORD
from hero_deployer.app.vm_handlers import ssh_keys_for as ssh_keys_for

log = structlog.get_logger(__name__)


_VM_WAKERS = frozenset({"VmDeployed", "VmDeployFailed", "VmDeleted", "VmOperationFailed"})
_CRASH_BACKOFF = 1.0


# The process manager ------------------------------------------------------------------------


class UserManager:
    """A Follower handler: wakes per-user workers on events and never blocks the follower."""

    name = "user-manager"

    def __init__(self, deps: Deps, ports: Ports, config: ManagerConfig | None = None) -> None:
        self._deps = deps
        self._ports = ports
        self._config = config or ManagerConfig()
        self._policy = self._config.policy
        self._effects = Effects(deps, ports, self._config)
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
        user, _ = await self._deps.users.load(USERS.stream(username))
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
                await self._attempts(action, lambda _: self._effects.forge_user(user, action))
            case GenerateSshKey():
                await self._attempts(action, lambda _: self._effects.ssh_key(action))
            case SelectNode():
                await self._attempts(action, lambda _: self._effects.select_node(action))
            case DeployUserVm():
                await self._deploy_vm(user, action)
            case DeployGateway():
                await self._attempts(action, lambda _: self._effects.deploy_gateway(action))
            case WaitSsh():
                await self._attempts(action, lambda left: self._effects.wait_ssh(user, left))
            case UploadManifest():
                await self._attempts(action, lambda _: self._effects.upload_manifest(user, action))
            case RunSetup():
                await self._attempts(action, lambda left: self._effects.run_setup(user, left))
            case VerifyHealth():
                await self._verify_health(user, action)
            case DeleteGateway():
                await self._decommission(action, self._effects.delete_gateway(user, action))
            case DeleteUserVm():
                self._vm_owner[action.vm_sid] = action.username
                changed = self._changed.setdefault(action.username, asyncio.Event())
                deadline = self._policy.deadline_of(action.part)
                effect = self._effects.decommission_vm(action, changed, deadline)
                await self._decommission(action, effect)
            case FinishDecommission():
                await self._decommission(action, self._effects.finish(action))

    # Recording -------------------------------------------------------------------------------

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
            vm, _ = await self._deps.vms.load(VMS.stream(sid))
            status = vm.status if vm is not None else "missing"
            if vm is not None and status in ("running", "stopped"):
                found = await self._record_deployed(name, vm)
                if found is None:
                    return
                problem, replace = found, False
            elif status == "deploying":
                deadline, remaining = self._remaining(action)
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await changed.wait()
                    continue
                problem = f"vm {sid} was not deployed within the {deadline:g}s deadline"
                await self._record(name, RecordStepFailed(step=action.step, reason=problem))
                return
            else:
                error = f": {vm.error}" if vm is not None and vm.error else ""
                problem, replace = f"vm {sid} is {status}{error}", True
            tries += 1
            delay = self._policy.delay(tries)
            _, remaining = self._remaining(action)
            if tries >= self._policy.tries_of(action.step) or remaining <= delay:
                await self._record(name, RecordStepFailed(step=action.step, reason=problem))
                return
            await self._record(name, RecordStepRetried(step=action.step, reason=problem))
            await asyncio.sleep(delay)
            if not replace:
                continue
            fresh, _ = await self._deps.users.load(USERS.stream(name))
            if fresh is not None and fresh.status == "provisioning" and fresh.step == action.step:
                await self._request_vm(fresh, action)
            return

    async def _record_deployed(self, name: str, vm: Vm) -> str | None:
        """Records the user's VM as deployed where it runs now (None); else says what is wrong."""
        try:
            live = await self._effects.live_vm(vm.sid)
        except (ExternalError, BackendError, StepError) as exc:
            return getattr(exc, "message", str(exc))
        deployed = UserVmDeployed(
            **self._effects.stamp(name),
            vm_sid=vm.sid,
            mycelium_ip=live.mycelium_ip or vm.mycelium_ip,
            ssh_host=live.ssh_host,
            ssh_port=live.ssh_port,
        )
        await self._record(name, deployed)
        return None

    async def _request_vm(self, user: User, action: DeployUserVm) -> None:
        """Appends the VM's VmDeployRequested and the user's UserVmDeployRequested together."""
        name = action.username
        secret = await self._effects.vm_secret(name)
        sid = vm_handlers.new_sid()
        self._vm_owner[sid] = name
        now = self._deps.clock()
        # the user's VM is the default one (core.ports.DEFAULT_VM), on the node selected
        deploy = DeployVm(name=action.vm_name, secret=secret, node_id=action.node_id or None)
        vm_ctx = VmContext(now=now, owner=self._deps.fingerprint(secret), new_sid=sid)
        requested = UserVmDeployRequested(username=name, vm_sid=sid, at=now)
        commands: list[Command[Any]] = [
            Command(self._deps.users, name, requested, UserContext(now=now)),
            Command(self._deps.vms, sid, deploy, vm_ctx, new=True),
        ]
        meta = RequestMeta(operation="record_outcome", request_id=f"user-manager-{sid}")
        # both or neither: when the step moved on meanwhile, no VM is requested
        await run(self._deps, commands, meta, together=True)

    async def _verify_health(self, user: User, action: VerifyHealth) -> None:
        urls = [action.gateway_url]  # the gateway's URL, and any it answers at later
        await self._attempts(action, lambda _: self._effects.probe_health(user, urls))

    # Decommissioning ---------------------------------------------------------------------------

    async def _decommission(
        self,
        action: DeleteGateway | DeleteUserVm | FinishDecommission,
        work: Awaitable[OutcomeCommand],
    ) -> None:
        """Runs one part and records its outcome; a failure is recorded and the part is tried
        again after a backoff."""
        try:
            outcome = await work
        except (ExternalError, BackendError, StepError) as exc:
            reason = getattr(exc, "message", str(exc))
        else:
            await self._record(action.username, outcome)
            return
        log.info("user_manager.decommission_failed", username=action.username, part=action.part)
        await self._record(
            action.username, RecordDecommissionFailed(part=action.part, reason=reason)
        )
        await asyncio.sleep(self._policy.delay(action.failures + 1))
