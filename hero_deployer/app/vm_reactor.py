"""The VM reactor: turns recorded VM intents into backend calls and records their outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import structlog

from core.domain import VMS
from core.events import RecordedEvent
from core.ports import BackendError, ComputeBackend
from core.retry import RetryPolicy
from core.vm import OutcomeCommand, Vm, vm_spec
from core.vm_events import (
    VmDeleted,
    VmDeleteRequested,
    VmDeployed,
    VmDeployFailed,
    VmDeployRequested,
    VmOperationFailed,
    VmRestarted,
    VmStarted,
    VmStopped,
)
from hero_deployer.app.aggregates import Aggregates
from hero_deployer.app.vm_handlers import until_taken

log = structlog.get_logger(__name__)


def _now() -> datetime:
    """When an outcome is known; recording it stamps the decision's time over it."""
    return datetime.now(UTC)


T = TypeVar("T")

TRIGGERS = {
    "VmDeployRequested": "deploying",
    "VmStarted": "running",
    "VmRestarted": "running",
    "VmStopped": "stopped",
    "VmDeleteRequested": "deleting",
}
"""Event type → the status the VM must still have for the side effect to be worth doing."""


REACTOR_RETRY = RetryPolicy(deadline=900.0)
"""A backend call's tries: 5 in all, backoff from 0.5 s up to 30 s, 15 minutes at most."""


class VmReactor:
    """Runs each VM's side effects in order, different VMs concurrently; idempotent on replay."""

    name = "vm-reactor"

    def __init__(
        self,
        backend: ComputeBackend,
        vms: Aggregates[Vm],
        record: Callable[[OutcomeCommand, str], Awaitable[None]],
        *,
        retry: RetryPolicy | None = None,
        ssh_keys: Callable[[str], Awaitable[tuple[str, ...]]] | None = None,
    ) -> None:
        self._backend = backend
        self._vms = vms
        self._record = record
        self._retry = retry or REACTOR_RETRY
        self._ssh_keys = ssh_keys
        self._chains: dict[str, asyncio.Task[None]] = {}
        self._in_flight: dict[int, None] = {}

    async def handle(self, events: Sequence[RecordedEvent]) -> None:
        for recorded in events:
            if recorded.type in TRIGGERS and VMS.id_of(recorded.stream) is not None:
                self._schedule(recorded)

    def safe_position(self, read_position: int) -> int:
        if self._in_flight:
            return min(self._in_flight) - 1
        return read_position

    async def drain(self) -> None:
        """Waits for every scheduled side effect to finish."""
        while self._chains:
            await asyncio.gather(*list(self._chains.values()), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._chains.values()):
            task.cancel()
        await asyncio.gather(*list(self._chains.values()), return_exceptions=True)

    def _schedule(self, recorded: RecordedEvent) -> None:
        stream = recorded.stream  # one chain of effects per VM
        previous = self._chains.get(stream)
        self._in_flight[recorded.position] = None
        task = asyncio.create_task(self._after(previous, recorded))
        self._chains[stream] = task

        def done(t: asyncio.Task[None]) -> None:
            self._in_flight.pop(recorded.position, None)
            if self._chains.get(stream) is t:
                del self._chains[stream]

        task.add_done_callback(done)

    async def _after(self, previous: asyncio.Task[None] | None, recorded: RecordedEvent) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        try:
            # a store that cannot be read or written now is waited for: the intent stays in
            # flight, so the checkpoint stays before it, restarts included
            await until_taken(lambda: self._perform(recorded), "vm_reactor")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("vm_reactor.failed", stream=recorded.stream, event_type=recorded.type)

    async def _perform(self, recorded: RecordedEvent) -> None:
        sid = VMS.id_of(recorded.stream) or ""
        vm, _ = await self._vms.load(VMS.stream(sid))
        if vm is None or vm.status != TRIGGERS[recorded.type]:
            return  # a later event superseded this intent
        event = VMS.registry.decode(recorded.type, recorded.data)
        request_id = recorded.request_id
        match event:
            case VmDeployRequested():
                await self._deploy(event, request_id)
            case VmStarted():
                await self._act("start", sid, self._backend.boot_vm, request_id)
            case VmStopped():
                await self._act("stop", sid, self._backend.shutdown_vm, request_id)
            case VmRestarted():
                await self._act("restart", sid, self._backend.reboot_vm, request_id)
            case VmDeleteRequested():
                if await self._act("delete", sid, self._backend.destroy_vm, request_id):
                    await self._outcome(VmDeleted(sid=sid, at=_now()), request_id)

    async def _deploy(self, event: VmDeployRequested, request_id: str) -> None:
        keys = await self._ssh_keys(event.sid) if self._ssh_keys else ()
        spec = vm_spec(event, keys)
        try:
            vm = await self._with_retries(lambda: self._backend.create_vm(spec))
        except BackendError as error:
            failed = VmDeployFailed(sid=event.sid, error=error.message, at=_now())
            await self._outcome(failed, request_id)
            return
        await self._outcome(
            VmDeployed(sid=event.sid, node_id=vm.node_id, mycelium_ip=vm.mycelium_ip, at=_now()),
            request_id,
        )

    async def _act(
        self,
        operation: str,
        sid: str,
        call: Callable[[str], Awaitable[None]],
        request_id: str,
    ) -> bool:
        try:
            await self._with_retries(lambda: call(sid))
        except BackendError as error:
            await self._outcome(
                VmOperationFailed(sid=sid, operation=operation, error=error.message, at=_now()),
                request_id,
            )
            return False
        return True

    async def _outcome(self, command: OutcomeCommand, request_id: str) -> None:
        """Records what a side effect did, waiting out a store that refuses it (a full disk)."""
        await until_taken(lambda: self._record(command, request_id), "vm_outcome")

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retries retryable errors with backoff until the attempts or the deadline run out.

        Each backend call bounds its own time (HTTP and subprocess timeouts); the deadline
        here bounds the retrying, so an outcome is always recorded.
        """
        policy = self._retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline
        attempt = 0
        while True:
            try:
                return await call()
            except BackendError as error:
                attempt += 1
                if not error.retryable or attempt >= policy.tries_of():
                    raise
                delay = policy.delay(attempt + 1)  # from twice the base: a backend needs time
                if loop.time() + delay >= deadline:
                    raise
                log.warning("vm_reactor.retry", attempt=attempt, error=error.message)
                await asyncio.sleep(delay)
