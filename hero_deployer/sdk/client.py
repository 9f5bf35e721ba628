"""The typed async SDK of the wire contract, used by the CLI, the dashboard and other services.

One method per operation, results decoded into the msgspec types of `core`, the contract's error
codes raised as the `core.errors` classes (re-exported here), an Idempotency-Key on every
state-changing call that its own retries reuse, and `subscribe`, which catches up through
`events` and then follows the status stream with no gaps and no duplicates.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final, Self, TypeVar

import msgspec
import nats
from nats.aio.client import Client

from core.contract import (
    ACTOR_HEADER,
    AUTHORIZATION_HEADER,
    DEFAULT_PREFIX,
    DEFAULT_PROFILE,
    IDEMPOTENCY_HEADER,
    AuditEventsRequest,
    AuditPage,
    DecommissionUser,
    DeleteVm,
    DeployVm,
    Empty,
    EventsPage,
    EventsRequest,
    GetUser,
    GetVm,
    Health,
    InitialPassword,
    ListUsers,
    ListVms,
    MigrateResult,
    MigrateSecret,
    ProvisionUser,
    RestartVm,
    RevealInitialPassword,
    StartVm,
    StopVm,
    UserList,
    UserOut,
    VmList,
    VmOut,
    VmRef,
)
from core.errors import (
    Conflict,
    DomainError,
    Internal,
    InvalidInput,
    InvalidState,
    NotFound,
    Unauthorized,
    Unavailable,
)
from core.events import EventOut
from core.ports import DEFAULT_VM
from core.registry import OPERATIONS, Op
from core.retry import RetryPolicy
from hero_deployer.sdk.subscription import EventSubscription
from hero_deployer.sdk.wire import (
    NatsIdentity,
    RequestTimeout,
    decode_event,
    event_dict,
    local_actor,
    nats_credentials,
    raise_error,
    request_with_retries,
)

__all__ = [
    "MUTATING",
    "OPERATIONS",
    "AuditPage",
    "Conflict",
    "DomainError",
    "EventOut",
    "EventSubscription",
    "EventsPage",
    "Health",
    "HeroDeployerClient",
    "InitialPassword",
    "Internal",
    "InvalidInput",
    "InvalidState",
    "MigrateResult",
    "NatsIdentity",
    "NotFound",
    "Op",
    "RequestTimeout",
    "Unauthorized",
    "Unavailable",
    "UserOut",
    "VmOut",
    "decode_event",
    "local_actor",
    "nats_credentials",
    "raise_error",
]

T = TypeVar("T")

DEFAULT_ACTOR: Final = "sdk"
OPERATIONS_BY_NAME: Final[dict[str, Op]] = {op.name: op for op in OPERATIONS}
MUTATING: Final = OPERATIONS.mutating
NOT_RETRIED: Final = frozenset(op.name for op in OPERATIONS if not op.retried)


class HeroDeployerClient:
    """Request-reply over NATS with the bearer token; errors come back as DomainErrors.

    `timeout` bounds each attempt; `retries` is how many times a request is sent again after a
    timeout, a reconnect or no responders. A state-changing request carries the same
    Idempotency-Key on every attempt, so the service records it once.
    """

    def __init__(
        self,
        nc: Client,
        *,
        token: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = 10.0,
        retries: int = 2,
        retry_delay: float = 0.1,
        actor: str = DEFAULT_ACTOR,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.nc = nc
        self.prefix = prefix
        self.actor = actor
        self._token = token
        self._timeout = timeout
        self._retry = RetryPolicy(
            retries=retries, base_delay=retry_delay, max_delay=2.0, jitter=False
        )
        self._once = dataclasses.replace(self._retry, retries=0)  # for what is never retried
        self._owns_connection = False

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        nkey: str | Path | None = None,
        creds: str | Path | None = None,
        nats_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> HeroDeployerClient:
        """Connects to NATS at `url` as the identity of an NKey seed or a creds file, if given.

        `close` drains this connection.
        """
        options: dict[str, Any] = {"allow_reconnect": True, "max_reconnect_attempts": 3}
        options.update(nats_credentials(nkey=nkey, creds=creds))
        options.update(nats_options or {})
        nc = await nats.connect(url, **options)
        client = cls(nc, **kwargs)
        client._owns_connection = True
        return client

    def with_actor(self, actor: str) -> HeroDeployerClient:
        """This client on the same connection, sending `actor` as its Hero-Actor header."""
        twin = copy.copy(self)
        twin.actor = actor
        twin._owns_connection = False
        return twin

    async def close(self) -> None:
        """Drains the connection if `connect` made it; an injected one stays its owner's."""
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # The untyped path (the CLI's) ---------------------------------------------------------------

    async def call(
        self, operation: str, body: Any = None, *, idempotency_key: str | None = None
    ) -> Any:
        """Sends one request and returns its `result` as plain JSON values."""
        raw = await self.call_raw(operation, body, idempotency_key=idempotency_key)
        return msgspec.json.decode(raw)

    async def call_raw(
        self, operation: str, body: Any = None, *, idempotency_key: str | None = None
    ) -> bytes:
        """Sends one request (with retries) and returns its `result` as JSON bytes."""
        headers = {AUTHORIZATION_HEADER: f"Bearer {self._token}"}
        if self.actor:
            headers[ACTOR_HEADER] = self.actor
        if idempotency_key is not None or operation in MUTATING:
            headers[IDEMPOTENCY_HEADER] = idempotency_key or uuid.uuid4().hex
        payload = msgspec.json.encode(body if body is not None else {})
        return await request_with_retries(
            self.nc,
            f"{self.prefix}.{operation}",
            payload,
            headers=headers,
            timeout=self._timeout,
            policy=self._once if operation in NOT_RETRIED else self._retry,
        )

    async def send(self, request: msgspec.Struct, *, idempotency_key: str | None = None) -> Any:
        """Sends any request of the contract and returns its operation's result, decoded."""
        op = OPERATIONS.of(request)
        return await self._send(request, op.result, idempotency_key)

    async def _send(
        self, request: msgspec.Struct, result: type[T], idempotency_key: str | None = None
    ) -> T:
        operation = OPERATIONS.of(request).name
        raw = await self.call_raw(operation, request, idempotency_key=idempotency_key)
        try:
            return msgspec.json.decode(raw, type=result)
        except msgspec.ValidationError as error:
            raise Internal(f"malformed {operation} result: {error}") from None

    # VMs ----------------------------------------------------------------------------------------

    async def deploy_vm(
        self,
        *,
        name: str,
        secret: str,
        image: str = DEFAULT_VM.image,
        cpu_count: int = DEFAULT_VM.cpu_count,
        memory_gb: int = DEFAULT_VM.memory_gb,
        disk_gb: int = DEFAULT_VM.disk_gb,
        rootfs_gb: int = DEFAULT_VM.rootfs_gb,
        slice_sid: str = "",
        node_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> VmOut:
        """Deploys a VM owned by `secret`; it is `deploying` until a VmDeployed or failure."""
        body = DeployVm(
            name=name,
            secret=secret,
            image=image,
            cpu_count=cpu_count,
            memory_gb=memory_gb,
            disk_gb=disk_gb,
            rootfs_gb=rootfs_gb,
            slice_sid=slice_sid,
            node_id=node_id,
        )
        return await self._send(body, VmOut, idempotency_key)

    async def list_vms(self, secret: str) -> list[VmOut]:
        """Exactly the VMs whose secret equals `secret`, deleted ones left out."""
        return (await self._send(ListVms(secret=secret), VmList)).vms

    async def get_vm(self, sid: str, secret: str) -> VmOut:
        return await self._send(GetVm(sid=sid, secret=secret), VmOut)

    async def start_vm(self, sid: str, secret: str, *, idempotency_key: str | None = None) -> VmOut:
        return await self._act(StartVm, sid, secret, idempotency_key)

    async def stop_vm(self, sid: str, secret: str, *, idempotency_key: str | None = None) -> VmOut:
        return await self._act(StopVm, sid, secret, idempotency_key)

    async def restart_vm(
        self, sid: str, secret: str, *, idempotency_key: str | None = None
    ) -> VmOut:
        return await self._act(RestartVm, sid, secret, idempotency_key)

    async def delete_vm(
        self, sid: str, secret: str, *, idempotency_key: str | None = None
    ) -> VmOut:
        return await self._act(DeleteVm, sid, secret, idempotency_key)

    async def _act(
        self, request: type[VmRef], sid: str, secret: str, idempotency_key: str | None
    ) -> VmOut:
        """Sends a state-changing request about one VM (start, stop, restart, delete)."""
        return await self._send(request(sid=sid, secret=secret), VmOut, idempotency_key)

    async def migrate_secret(
        self, old_secret: str, new_secret: str, *, idempotency_key: str | None = None
    ) -> MigrateResult:
        """Re-keys every live VM of `old_secret`; NotFound when it owns none."""
        body = MigrateSecret(old_secret=old_secret, new_secret=new_secret)
        return await self._send(body, MigrateResult, idempotency_key)

    # Users --------------------------------------------------------------------------------------

    async def provision_user(
        self,
        username: str,
        *,
        display_name: str = "",
        forge_email: str = "",
        profile: str = DEFAULT_PROFILE,
        idempotency_key: str | None = None,
    ) -> UserOut:
        body = ProvisionUser(
            username=username, display_name=display_name, forge_email=forge_email, profile=profile
        )
        return await self._send(body, UserOut, idempotency_key)

    async def decommission_user(
        self, username: str, *, idempotency_key: str | None = None
    ) -> UserOut:
        body = DecommissionUser(username=username)
        return await self._send(body, UserOut, idempotency_key)

    async def get_user(self, username: str) -> UserOut:
        return await self._send(GetUser(username=username), UserOut)

    async def list_users(self) -> list[UserOut]:
        return (await self._send(ListUsers(), UserList)).users

    async def reveal_initial_password(self, username: str) -> InitialPassword:
        """The initial Forge password, once; a second call is NotFound. Never retried."""
        body = RevealInitialPassword(username=username)
        return await self._send(body, InitialPassword)

    # The log ------------------------------------------------------------------------------------

    async def events(
        self, *, stream: str | None = None, after: int = 0, limit: int = 100
    ) -> EventsPage:
        """One page of events with position > `after`; `page.last` is where the next starts."""
        body = EventsRequest(stream=stream, after=after, limit=limit)
        return await self._send(body, EventsPage)

    async def audit_events(
        self, *, stream: str | None = None, after: int = 0, limit: int = 100
    ) -> AuditPage:
        """Like `events`, each event with the request id and actor of the command behind it."""
        body = AuditEventsRequest(stream=stream, after=after, limit=limit)
        return await self._send(body, AuditPage)

    async def health(self) -> Health:
        return await self._send(Empty(), Health)

    async def position(self) -> int:
        """The log's last position (from `health`): where to follow from after a request."""
        return (await self.health()).position

    async def pages(
        self, *, stream: str | None = None, after: int = 0, page_size: int = 1000
    ) -> AsyncIterator[EventsPage]:
        """Pages of events after `after` (of `stream` if given), until one comes back short."""
        while True:
            page = await self.events(stream=stream, after=after, limit=page_size)
            yield page
            if len(page.events) < page_size:
                return
            after = page.last

    def subscribe(
        self,
        stream: str | None = None,
        after: int = 0,
        *,
        page_size: int = 1000,
        poll_interval: float | None = 10.0,
        pending_limit: int = 65536,
    ) -> EventSubscription:
        """Every event after `after` (of `stream` if given), in order, each exactly once.

        Use it as `async with client.subscribe(...) as events: async for event in events: ...`;
        `events.position` is the position of the last event delivered, to resume from.
        """
        return EventSubscription(
            self,
            stream=stream,
            after=after,
            page_size=page_size,
            poll_interval=poll_interval,
            pending_limit=pending_limit,
        )

    async def follow(self, after: int = 0, stream: str | None = None) -> AsyncIterator[Any]:
        """`subscribe`, with each event as plain JSON values (the CLI's `events --follow`)."""
        async with self.subscribe(stream=stream, after=after) as events:
            async for event in events:
                yield event_dict(event)
