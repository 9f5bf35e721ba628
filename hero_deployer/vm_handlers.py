"""Handlers of the tenant VM API: plain async functions of (request, meta, deps)."""

from __future__ import annotations

import asyncio
import hmac
import os
import time

import msgspec

from core.errors import VM_NOT_FOUND, InvalidInput, NotFound
from core.events import IdempotencyRecord, vm_stream
from core.operations import RequestMeta
from core.vm import (
    Context,
    DeployVm,
    GetVm,
    ListVms,
    MigrateResult,
    MigrateSecret,
    OutcomeCommand,
    RekeyVm,
    Vm,
    VmCommand,
    decide,
    evolve,
    owns,
)
from hero_deployer.commands import (
    Decision,
    consistent_views,
    execute,
    execute_one,
    idempotent,
)
from hero_deployer.deps import Deps

_encoder = msgspec.json.Encoder()


class _RandomPool:
    """os.urandom in 4 KiB draws: one getrandom call per 512 sids instead of one per sid."""

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def take(self, n: int) -> bytes:
        if self._offset + n > len(self._pool):
            self._pool, self._offset = os.urandom(4096), 0
        chunk = self._pool[self._offset : self._offset + n]
        self._offset += n
        return chunk


_random = _RandomPool()


def new_sid() -> str:
    """A fresh sid: the milliseconds since the epoch, then 32 random bits, in hex.

    Time-ordered, so a new VM's rows land at the end of every index keyed by its sid or its
    stream, and a commit of many deploys writes a few pages rather than a random page per VM;
    two sids of the same millisecond still differ at random.
    """
    return f"vm_{time.time_ns() // 1_000_000:012x}{_random.take(4).hex()}"


def owner_of(deps: Deps, secret: str, field: str = "secret") -> str:
    """The keyed fingerprint of a tenant's secret, after the `require_secret` rule."""
    if deps.require_secret and not secret:
        raise InvalidInput(f"{field} is required")
    return deps.fingerprint(secret)


def _result(vm: Vm | None) -> bytes:
    assert vm is not None
    return _encoder.encode(vm.public())


async def run_vm_command(
    deps: Deps,
    sid: str,
    command: VmCommand,
    ctx: Context,
    meta: RequestMeta,
    idempotency: IdempotencyRecord | None = None,
    *,
    reply: bool = True,
) -> bytes:
    """Decides one command on one VM and records its events; returns the Vm as JSON."""
    return await execute_one(
        deps,
        deps.vms,
        vm_stream(sid),
        lambda vm: decide(vm, command, ctx),
        evolve,
        _result if reply else None,
        meta,
        idempotency,
        new_stream=isinstance(command, DeployVm),
    )


async def deploy_vm(request: DeployVm, meta: RequestMeta, deps: Deps) -> bytes:
    ctx = Context(now=deps.clock(), owner=owner_of(deps, request.secret), new_sid=new_sid())

    async def run(idempotency: IdempotencyRecord | None) -> bytes:
        return await run_vm_command(deps, ctx.new_sid, request, ctx, meta, idempotency)

    return await idempotent(deps, meta, request, run)


async def vm_action(request: VmCommand, meta: RequestMeta, deps: Deps) -> bytes:
    """start_vm, stop_vm, restart_vm, delete_vm: the secret first, then the state."""
    assert not isinstance(request, DeployVm | OutcomeCommand | RekeyVm)
    ctx = Context(now=deps.clock(), owner=owner_of(deps, request.secret))

    async def run(idempotency: IdempotencyRecord | None) -> bytes:
        return await run_vm_command(deps, request.sid, request, ctx, meta, idempotency)

    return await idempotent(deps, meta, request, run)


async def record_outcome(deps: Deps, command: OutcomeCommand, request_id: str) -> None:
    """Records what a side effect did to a VM; used by the VM reactor."""
    meta = RequestMeta(operation="record_outcome", request_id=request_id)
    await run_vm_command(deps, command.sid, command, Context(now=deps.clock()), meta, reply=False)


class OutcomeRecorder:
    """Records side-effect outcomes in batches: whatever arrives while one commits goes next.

    Each VM has at most one outcome in flight (the reactor runs a VM's effects in order), so a
    batch is one multi-stream append: one decision per VM, one commit for all.
    """

    def __init__(self, deps: Deps, max_batch: int = 512) -> None:
        self._deps = deps
        self._max_batch = max_batch
        self._waiting: list[tuple[OutcomeCommand, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def record(self, command: OutcomeCommand, request_id: str = "") -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="outcome-recorder")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((command, future))
        self._wakeup.set()
        await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    await self._record_batch([command for command, _ in batch])
                except Exception as error:  # one bad outcome must not fail the others
                    if len(batch) == 1:
                        batch[0][1].set_exception(error)
                        continue
                    for command, future in batch:
                        try:
                            await record_outcome(self._deps, command, "")
                        except Exception as single:
                            future.set_exception(single)
                        else:
                            future.set_result(None)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _record_batch(self, commands: list[OutcomeCommand]) -> None:
        ctx = Context(now=self._deps.clock())
        by_stream = {vm_stream(c.sid): c for c in commands}
        if len(by_stream) != len(commands):  # the same VM twice: keep them in order, one by one
            for command in commands:
                await record_outcome(self._deps, command, "")
            return

        def decide_all(states: dict[str, tuple[Vm | None, int]]) -> tuple[list[Decision], bytes]:
            decisions = []
            for stream, (vm, version) in states.items():
                events = decide(vm, by_stream[stream], ctx)
                decisions.append(Decision(stream, version, events))
            return decisions, b""

        meta = RequestMeta(operation="record_outcome", request_id="")
        await execute(self._deps, self._deps.vms, list(by_stream), decide_all, evolve, meta, None)


async def get_vm(request: GetVm, meta: RequestMeta, deps: Deps) -> bytes:
    owner = owner_of(deps, request.secret)
    await consistent_views(deps)
    found = await deps.vm_view.get_json(request.sid)
    if found is None or not hmac.compare_digest(found[0], owner):
        raise NotFound(VM_NOT_FOUND)
    return found[1]


async def list_vms(request: ListVms, meta: RequestMeta, deps: Deps) -> bytes:
    owner = owner_of(deps, request.secret)
    await consistent_views(deps)
    return b'{"vms":[' + b",".join(await deps.vm_view.list_json(owner)) + b"]}"


async def migrate_secret(request: MigrateSecret, meta: RequestMeta, deps: Deps) -> bytes:
    """Re-keys every live VM of the old secret to the new one, all in one transaction."""
    if not request.new_secret:
        raise InvalidInput("new_secret must not be empty")
    if hmac.compare_digest(request.old_secret.encode(), request.new_secret.encode()):
        raise InvalidInput("new_secret must differ from old_secret")
    old = owner_of(deps, request.old_secret, "old_secret")
    new = deps.fingerprint(request.new_secret)
    ctx = Context(now=deps.clock(), owner=old)

    async def run(idempotency: IdempotencyRecord | None) -> bytes:
        await consistent_views(deps)
        candidates = await deps.vm_view.by_owner(old)
        if not candidates:
            raise NotFound("no vm has this secret")
        streams = [vm_stream(vm.sid) for vm in candidates]

        def decide_all(states: dict[str, tuple[Vm | None, int]]) -> tuple[list[Decision], bytes]:
            decisions = []
            for stream, (vm, version) in states.items():
                if vm is None or vm.status == "deleted" or not owns(vm, old):
                    continue
                events = decide(vm, RekeyVm(sid=vm.sid, new_owner=new), ctx)
                decisions.append(Decision(stream, version, events))
            if not decisions:
                raise NotFound("no vm has this secret")
            return decisions, _encoder.encode(MigrateResult(migrated_count=len(decisions)))

        return await execute(deps, deps.vms, streams, decide_all, evolve, meta, idempotency)

    return await idempotent(deps, meta, request, run)
