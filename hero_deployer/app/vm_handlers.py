"""Handlers of the tenant VM API: plain async functions of (request, meta, deps)."""

from __future__ import annotations

import asyncio
import hmac
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TypeVar

import msgspec
import structlog

from core.contract import DeployVm, GetVm, ListVms, MigrateResult, MigrateSecret
from core.domain import USERS, VMS
from core.errors import VM_NOT_FOUND, Conflict, InvalidInput, NotFound, Unavailable
from core.operations import RequestMeta
from core.retry import RetryPolicy
from core.vm import Context, OutcomeCommand, RekeyVm, Vm, VmCommand
from hero_deployer.app.commands import (
    Command,
    Decided,
    Record,
    consistent_views,
    idempotent,
    run,
)
from hero_deployer.app.deps import Deps

_encoder = msgspec.json.Encoder()

log = structlog.get_logger(__name__)

T = TypeVar("T")

REFUSALS = (Unavailable, Conflict, sqlite3.Error)
"""What a store that cannot take a write right now raises: a full disk, a lost race, I/O."""


STORE_RETRY = RetryPolicy(base_delay=0.1, max_delay=2.0)
"""The pauses between tries of a write the store refused: from 0.1 s, doubling, up to 2 s."""


async def until_taken(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Calls `call` until the store takes it, pausing longer after each refusal.

    An outcome of a side effect that already happened must not be lost to a full disk.
    """
    failures = 0
    while True:
        try:
            return await call()
        except REFUSALS as error:
            failures += 1
            log.warning("store.refused", what=what, failures=failures, error=str(error))
            await asyncio.sleep(STORE_RETRY.delay(failures))


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


def vm_reply(decided: list[Decided]) -> bytes:
    """The Vm resource after the command, as JSON."""
    vm = decided[0].state
    assert isinstance(vm, Vm)
    return _encoder.encode(vm.public())


async def deploy(request: DeployVm, meta: RequestMeta, deps: Deps) -> bytes:
    ctx = Context(now=deps.clock(), owner=owner_of(deps, request.secret), new_sid=new_sid())
    command = Command(deps.vms, ctx.new_sid, request, ctx, new=True)

    async def once(record: Record | None) -> bytes:
        return await run(deps, [command], meta, record, reply=vm_reply)

    return await idempotent(deps, meta, request, once)


async def vm_action(request: VmCommand, meta: RequestMeta, deps: Deps) -> bytes:
    """A start, stop, restart or delete of one VM: the secret first, then the state."""
    assert not isinstance(request, DeployVm | OutcomeCommand | RekeyVm)
    ctx = Context(now=deps.clock(), owner=owner_of(deps, request.secret))
    if await surely_absent(deps, request.sid):
        deps.vms.remember(VMS.stream(request.sid), None, 0)  # then loaded as a cached VM is
    command = Command(deps.vms, request.sid, request, ctx)

    async def once(record: Record | None) -> bytes:
        return await run(deps, [command], meta, record, reply=vm_reply)

    return await idempotent(deps, meta, request, once)


async def surely_absent(deps: Deps, sid: str) -> bool:
    """Whether no VM has `sid`: the views say so, and they hold every event committed so far.

    Asked for every sid+secret command, so NotFound takes as long for a missing sid as for a
    wrong secret (the contract): one indexed lookup either way, then a cached state (None for
    a missing sid), where a missing sid would otherwise cost a read of the log. A VM is only
    ever created under a fresh sid, so a sid absent now stays absent for the command. The
    log's last position is asked of the store: beside other writers (JetStream), this
    replica's views may lag a VM another one just recorded, and then the log is read.
    """
    caught_up = deps.views.position >= await deps.store.last_position()
    return await deps.vm_view.get_json(sid) is None and caught_up


async def record_outcome(deps: Deps, command: OutcomeCommand, request_id: str) -> None:
    """Records what a side effect did to a VM; used by the VM reactor."""
    await record_outcomes(deps, [command], request_id)


async def record_outcomes(
    deps: Deps, commands: Sequence[OutcomeCommand], request_id: str = ""
) -> None:
    """One append over the streams of `commands`, which name each VM at most once."""
    ctx = Context(now=deps.clock())
    meta = RequestMeta(operation="record_outcome", request_id=request_id)
    await run(deps, [Command(deps.vms, c.sid, c, ctx) for c in commands], meta)


class OutcomeRecorder:
    """Records side-effect outcomes in batches: whatever arrives while one commits goes next.

    Each VM has at most one outcome in flight (the reactor runs a VM's effects in order), so a
    batch is one multi-stream append: one decision per VM, one commit for all. A batch the
    store refuses (a full disk) is tried again, with what arrived meanwhile, after a pause
    that grows: an outcome is never dropped, and a full disk costs one try per pause.

    A batch is at most 64 outcomes, a request commit's size at 64 in flight: the log has one
    writer, so a request that arrives while outcomes commit waits for them. At 512, 20,000
    deploys in `up` beside a competitor taking 30% of each core (`bench.up_load --busy 0.3`)
    had a request p99 of 49-72 ms, as outcome commits of 512 events took up to 60 ms; at 64,
    24-54 ms (16 of 19 runs under 50). Without the competitor: 19-24 ms at 512 (5 runs),
    12-30 ms at 64 (8 runs).
    """

    def __init__(self, deps: Deps, max_batch: int = 64) -> None:
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
        for _, future in self._waiting:
            future.cancel()
        self._waiting.clear()

    async def _run(self) -> None:
        refused = 0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._waiting:
                batch = self._next_batch()
                try:
                    await record_outcomes(self._deps, [command for command, _ in batch])
                except REFUSALS as error:  # kept waiting, in order, for the next try
                    refused += 1
                    log.warning("outcomes.refused", outcomes=len(batch), error=str(error))
                    await asyncio.sleep(STORE_RETRY.delay(refused))
                    continue
                except Exception:  # one bad outcome must not fail the others
                    refused = 0
                    del self._waiting[: len(batch)]
                    await self._record_one_by_one(batch)
                    continue
                refused = 0
                del self._waiting[: len(batch)]
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    def _next_batch(self) -> list[tuple[OutcomeCommand, asyncio.Future[None]]]:
        """The oldest outcomes up to the first one of a VM already in the batch."""
        sids: set[str] = set()
        batch = []
        for item in self._waiting[: self._max_batch]:
            if item[0].sid in sids:
                break
            sids.add(item[0].sid)
            batch.append(item)
        return batch

    async def _record_one_by_one(
        self, batch: list[tuple[OutcomeCommand, asyncio.Future[None]]]
    ) -> None:
        for command, future in batch:
            try:
                await until_taken(partial(record_outcome, self._deps, command, ""), "outcome")
            except Exception as error:
                future.set_exception(error)
            else:
                future.set_result(None)


async def one_vm(request: GetVm, meta: RequestMeta, deps: Deps) -> bytes:
    owner = owner_of(deps, request.secret)
    await consistent_views(deps)
    found = await deps.vm_view.get_json(request.sid)
    if found is None or not hmac.compare_digest(found[0], owner):
        raise NotFound(VM_NOT_FOUND)
    return found[1]


async def owned_vms(request: ListVms, meta: RequestMeta, deps: Deps) -> bytes:
    owner = owner_of(deps, request.secret)
    await consistent_views(deps)
    return b'{"vms":[' + b",".join(await deps.vm_view.list_json(owner)) + b"]}"


async def migrate(request: MigrateSecret, meta: RequestMeta, deps: Deps) -> bytes:
    """Re-keys every live VM of the old secret to the new one, all in one transaction."""
    if not request.new_secret:
        raise InvalidInput("new_secret must not be empty")
    if hmac.compare_digest(request.old_secret.encode(), request.new_secret.encode()):
        raise InvalidInput("new_secret must differ from old_secret")
    old = owner_of(deps, request.old_secret, "old_secret")
    new = deps.fingerprint(request.new_secret)
    ctx = Context(now=deps.clock(), owner=old)

    def migrated(decided: list[Decided]) -> bytes:
        if not decided:
            raise NotFound("no vm has this secret")
        return _encoder.encode(MigrateResult(migrated_count=len(decided)))

    async def once(record: Record | None) -> bytes:
        await consistent_views(deps)
        candidates = await deps.vm_view.by_owner(old)
        if not candidates:
            raise NotFound("no vm has this secret")
        # a VM deleted or re-keyed meanwhile is refused by its aggregate and left out
        commands = [
            Command(deps.vms, vm.sid, RekeyVm(sid=vm.sid, new_owner=new), ctx) for vm in candidates
        ]
        return await run(deps, commands, meta, record, reply=migrated, skip_refused=True)

    return await idempotent(deps, meta, request, once)


def ssh_keys_for(deps: Deps) -> Callable[[str], Awaitable[tuple[str, ...]]]:
    """The public keys to inject into VM `sid`: the user's key if it is a user's VM, else none.

    The VM's name only suggests the user; the user's own stream must list the sid (both were
    appended in one transaction), so a tenant VM named `user-alice` never gets alice's key.
    """

    async def keys(sid: str) -> tuple[str, ...]:
        vm, _ = await deps.vms.load(VMS.stream(sid))
        if vm is None or not vm.name.startswith("user-"):
            return ()
        user, _ = await deps.users.load(USERS.stream(vm.name.removeprefix("user-")))
        if user is None or sid not in user.all_vm_sids or not user.ssh_public_key:
            return ()
        return (user.ssh_public_key,)

    return keys
