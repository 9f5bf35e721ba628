"""The typed SDK against the real service over a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError

from core.vm_events import VmDeployed, VmStopped
from hero_deployer.sdk.client import (
    MUTATING,
    OPERATIONS_BY_NAME,
    Conflict,
    EventOut,
    HeroDeployerClient,
    Internal,
    InvalidInput,
    InvalidState,
    MigrateResult,
    NotFound,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    VmOut,
    decode_event,
)
from tests.conftest import TOKEN, Service


def sdk(service: Service, **options: Any) -> HeroDeployerClient:
    return HeroDeployerClient(service.nc, token=TOKEN, prefix=service.settings.prefix, **options)


async def wait_for(client: HeroDeployerClient, stream: str, event_type: str) -> EventOut:
    """The first `event_type` event of `stream`, from the log or live."""
    async with asyncio.timeout(10), client.subscribe(stream=stream) as events:
        async for event in events:
            if event.type == event_type:
                return event
    raise AssertionError("the subscription ended")


async def stream_types(client: HeroDeployerClient, stream: str) -> list[str]:
    page = await client.events(stream=stream, limit=1000)
    return [e.type for e in page.events]


async def running_vm(client: HeroDeployerClient, secret: str, name: str = "web") -> VmOut:
    vm = await client.deploy_vm(name=name, secret=secret)
    await wait_for(client, f"vm:{vm.sid}", "VmDeployed")
    return await client.get_vm(vm.sid, secret)


# the operation table ---------------------------------------------------------------------


async def test_the_sdk_table_matches_the_services_operations(service: Service) -> None:
    for operation in service.app.operations:
        spec = OPERATIONS_BY_NAME[operation.name]
        assert spec.request is operation.request, operation.name
        assert spec.mutates == operation.mutates, operation.name
        assert spec.authenticated == (operation.name not in service.settings.exempt)
    assert {"deploy_vm", "stop_vm", "migrate_secret", "provision_user"} <= MUTATING
    assert not {"get_vm", "list_vms", "events", "health"} & MUTATING


# every VM operation ----------------------------------------------------------------------


async def test_vm_lifecycle_with_typed_results(service: Service) -> None:
    c = sdk(service)
    vm = await c.deploy_vm(name="web-1", secret="s1", cpu_count=2, memory_gb=4)
    assert isinstance(vm, VmOut)
    assert (vm.status, vm.name, vm.cpu_count, vm.memory_gb) == ("deploying", "web-1", 2, 4)
    deployed = await wait_for(c, f"vm:{vm.sid}", "VmDeployed")
    data = decode_event(deployed)
    assert isinstance(data, VmDeployed)

    got = await c.get_vm(vm.sid, "s1")
    assert (got.status, got.node_id, got.mycelium_ip) == ("running", data.node_id, data.mycelium_ip)
    assert got.created_at == vm.created_at
    assert await c.list_vms("s1") == [got]
    assert await c.list_vms("someone else") == []

    assert (await c.stop_vm(vm.sid, "s1")).status == "stopped"
    assert (await c.start_vm(vm.sid, "s1")).status == "running"
    assert (await c.restart_vm(vm.sid, "s1")).status == "running"
    assert (await c.delete_vm(vm.sid, "s1")).status == "deleting"
    await wait_for(c, f"vm:{vm.sid}", "VmDeleted")
    assert (await c.get_vm(vm.sid, "s1")).status == "deleted"
    assert await c.list_vms("s1") == []

    assert await stream_types(c, f"vm:{vm.sid}") == [
        "VmDeployRequested",
        "VmDeployed",
        "VmStopped",
        "VmStarted",
        "VmRestarted",
        "VmDeleteRequested",
        "VmDeleted",
    ]
    health = await c.health()
    assert health.status == "ok"
    assert health.position >= 7


async def test_migrate_secret_and_events_pages(service: Service) -> None:
    c = sdk(service)
    sids = {(await c.deploy_vm(name=f"v{i}", secret="old")).sid for i in range(3)}
    assert await c.migrate_secret("old", "new") == MigrateResult(migrated_count=3, failed_count=0)
    assert {vm.sid for vm in await c.list_vms("new")} == sids
    assert await c.list_vms("old") == []

    first = await c.events(limit=2)
    assert [e.position for e in first.events] == [1, 2]
    assert first.last == 2
    rest = await c.events(after=first.last, limit=1000)
    assert [e.position for e in rest.events] == list(range(3, 3 + len(rest.events)))
    migrated = [e for e in rest.events if e.type == "VmSecretMigrated"]
    assert {e.stream for e in migrated} == {f"vm:{sid}" for sid in sids}
    assert "old" not in bytes(migrated[0].data).decode()
    empty = await c.events(after=10_000)
    assert (empty.events, empty.last) == ([], 10_000)


async def test_pages_run_until_a_short_page_and_position_is_the_logs_last(service: Service) -> None:
    c = sdk(service)
    for i in range(3):
        await running_vm(c, "s", name=f"p{i}")  # deployed: the log stays still
    head = await c.position()
    assert head == (await c.health()).position >= 3
    pages = [[e.position for e in page.events] async for page in c.pages(page_size=2)]
    assert [p for page in pages for p in page] == list(range(1, head + 1))
    assert all(len(page) == 2 for page in pages[:-1]) and len(pages[-1]) < 2
    after = [page.last async for page in c.pages(after=head - 1, page_size=1)]
    assert after == [head, head]  # a full page of one, then the empty page that ends the run


# every error type ------------------------------------------------------------------------


async def test_contract_errors_are_raised_as_their_classes(service: Service) -> None:
    c = sdk(service)
    vm = await running_vm(c, "s")

    with pytest.raises(InvalidInput, match="name"):
        await c.deploy_vm(name="a b", secret="s")
    with pytest.raises(InvalidInput, match="cpu_count"):
        await c.deploy_vm(name="big", secret="s", cpu_count=65)
    with pytest.raises(InvalidInput, match="must differ"):
        await c.migrate_secret("s", "s")
    with pytest.raises(NotFound, match="vm not found"):
        await c.get_vm(vm.sid, "wrong")
    with pytest.raises(NotFound, match="no vm has this secret"):
        await c.migrate_secret("nobody", "n")
    with pytest.raises(InvalidState, match="cannot start a running vm"):
        await c.start_vm(vm.sid, "s")
    await c.stop_vm(vm.sid, "s", idempotency_key="stop-1")
    with pytest.raises(Conflict, match="idempotency key"):
        await c.restart_vm(vm.sid, "s", idempotency_key="stop-1")
    with pytest.raises(Unauthorized):
        await HeroDeployerClient(service.nc, token="wrong", prefix=service.settings.prefix).get_vm(
            vm.sid, "s"
        )
    unserved = HeroDeployerClient(service.nc, token=TOKEN, prefix="nobody.v1", retries=0)
    with pytest.raises(Unavailable) as unavailable:
        await unserved.health()
    assert not isinstance(unavailable.value, RequestTimeout)


@pytest_asyncio.fixture
async def envelope_responder(nc: Client) -> AsyncIterator[str]:
    """A responder at the protocol level that answers `get_vm` with the error code in `sid`."""
    prefix = f"fake{uuid.uuid4().hex[:8]}.v1"

    async def answer(msg: Msg) -> None:
        sid = msgspec.json.decode(msg.data)["sid"]
        if sid == "garbage":
            body = b"not json"
        else:
            body = msgspec.json.encode(
                {"ok": False, "error": {"code": sid, "message": f"a {sid} error"}}
            )
        await nc.publish(msg.reply, body)

    sub = await nc.subscribe(f"{prefix}.get_vm", cb=answer)
    await nc.flush()
    yield prefix
    await sub.unsubscribe()


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("InvalidInput", InvalidInput),
        ("Unauthorized", Unauthorized),
        ("NotFound", NotFound),
        ("Conflict", Conflict),
        ("InvalidState", InvalidState),
        ("Unavailable", Unavailable),
        ("Internal", Internal),
        ("SomethingNew", Internal),
        ("garbage", Internal),
    ],
)
async def test_every_error_code_maps_to_its_class(
    nc: Client, envelope_responder: str, code: str, error: type[Exception]
) -> None:
    client = HeroDeployerClient(nc, token=TOKEN, prefix=envelope_responder)
    with pytest.raises(error) as raised:
        await client.get_vm(code, "s")
    assert type(raised.value) is error


# retries: one Idempotency-Key across attempts ----------------------------------------------


@dataclass
class LossyRelay:
    """Forwards requests to the service and drops the first reply of every Idempotency-Key."""

    nc: Client
    target: str
    prefix: str = field(default_factory=lambda: f"relay{uuid.uuid4().hex[:8]}.v1")
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)
    on_drop: Callable[[], None] | None = None

    async def handle(self, msg: Msg) -> None:
        operation = msg.subject.removeprefix(self.prefix + ".")
        key = (msg.headers or {}).get("Idempotency-Key")
        first = all(k != key for _, k in self.seen)
        self.seen.append((operation, key))
        reply = await self.nc.request(
            f"{self.target}.{operation}", msg.data, headers=msg.headers, timeout=10
        )
        if first:
            self.dropped.append(reply.data)  # the service answered; the caller never hears it
            if self.on_drop is not None:
                self.on_drop()
            return
        await self.nc.publish(msg.reply, reply.data)


@pytest_asyncio.fixture
async def relay(service: Service) -> AsyncIterator[LossyRelay]:
    relay = LossyRelay(service.nc, service.settings.prefix)
    sub = await service.nc.subscribe(f"{relay.prefix}.>", cb=relay.handle)
    await service.nc.flush()
    yield relay
    await sub.unsubscribe()


async def test_a_retried_deploy_after_a_lost_reply_is_recorded_once(
    service: Service, relay: LossyRelay
) -> None:
    lossy = HeroDeployerClient(service.nc, token=TOKEN, prefix=relay.prefix, timeout=0.5)
    vm = await lossy.deploy_vm(name="once", secret="s")
    assert [op for op, _ in relay.seen] == ["deploy_vm", "deploy_vm"]
    assert relay.seen[0][1] is not None
    assert relay.seen[0][1] == relay.seen[1][1]
    assert msgspec.json.decode(relay.dropped[0])["result"]["sid"] == vm.sid
    c = sdk(service)
    assert [v.sid for v in await c.list_vms("s")] == [vm.sid]
    await wait_for(c, f"vm:{vm.sid}", "VmDeployed")
    assert await stream_types(c, f"vm:{vm.sid}") == ["VmDeployRequested", "VmDeployed"]


async def test_a_retried_stop_after_a_lost_reply_is_recorded_once(
    service: Service, relay: LossyRelay
) -> None:
    c = sdk(service)
    vm = await running_vm(c, "s")
    lossy = HeroDeployerClient(service.nc, token=TOKEN, prefix=relay.prefix, timeout=0.5)
    # without the same key the second attempt would be InvalidState: the vm is already stopped
    assert (await lossy.stop_vm(vm.sid, "s")).status == "stopped"
    assert len(relay.seen) == 2
    assert relay.seen[0][1] == relay.seen[1][1]
    assert (await stream_types(c, f"vm:{vm.sid}")).count("VmStopped") == 1


class CuttableProxy:
    """A TCP proxy in front of nats-server whose connections can be cut, forcing a reconnect."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("nats://").rpartition(":")
        self._upstream = (host, int(port))
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()


async def test_a_call_whose_reply_is_lost_in_a_reconnect_is_resent_with_its_key(
    service: Service, relay: LossyRelay, nats_url: str
) -> None:
    c = sdk(service)
    vm = await running_vm(c, "s")
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async with CuttableProxy(nats_url) as proxy:
        # the relay cuts the caller's connection instead of answering the first attempt
        relay.on_drop = proxy.cut
        client_nc = await nats.connect(
            proxy.url, reconnect_time_wait=0.05, reconnected_cb=on_reconnect
        )
        try:
            caller = HeroDeployerClient(client_nc, token=TOKEN, prefix=relay.prefix, timeout=1.0)
            assert (await caller.restart_vm(vm.sid, "s")).status == "running"
            assert reconnected.is_set()
        finally:
            await client_nc.close()
    assert len(relay.seen) == 2
    assert relay.seen[0][1] == relay.seen[1][1]
    assert (await stream_types(c, f"vm:{vm.sid}")).count("VmRestarted") == 1


async def test_read_calls_are_retried_too_and_time_out_as_request_timeout(
    service: Service,
) -> None:
    prefix = f"silent{uuid.uuid4().hex[:8]}.v1"
    received: list[dict[str, str]] = []

    async def swallow(msg: Msg) -> None:
        received.append(dict(msg.headers or {}))

    sub = await service.nc.subscribe(f"{prefix}.>", cb=swallow)
    await service.nc.flush()
    client = HeroDeployerClient(service.nc, token=TOKEN, prefix=prefix, timeout=0.1, retries=2)
    with pytest.raises(RequestTimeout):
        await client.start_vm("vm_x", "s")
    assert len(received) == 3
    assert len({h["Idempotency-Key"] for h in received}) == 1
    with pytest.raises(RequestTimeout):
        await client.get_vm("vm_x", "s")
    assert "Idempotency-Key" not in received[-1]
    assert len(received) == 6
    await sub.unsubscribe()


# subscribe -------------------------------------------------------------------------------


def assert_exactly_once_in_order(seen: list[EventOut], log: list[EventOut]) -> None:
    positions = [e.position for e in seen]
    assert positions == list(range(1, len(seen) + 1)), positions
    expected = log[: len(seen)]
    assert [(e.position, e.stream, e.version, e.type) for e in seen] == [
        (e.position, e.stream, e.version, e.type) for e in expected
    ]


async def full_log(client: HeroDeployerClient) -> list[EventOut]:
    return (await client.events(limit=1000)).events


async def read_until(
    events: AsyncIterator[EventOut], seen: list[EventOut], done: Callable[[EventOut], bool]
) -> None:
    async with asyncio.timeout(10):
        async for event in events:
            seen.append(event)
            if done(event):
                return


async def test_a_subscriber_that_disconnects_resumes_exactly_once_in_order(
    service: Service, nats_url: str
) -> None:
    c = sdk(service)
    prefix = service.settings.prefix
    a = await c.deploy_vm(name="a", secret="s")
    seen: list[EventOut] = []

    first_nc = await nats.connect(nats_url)
    first = HeroDeployerClient(first_nc, token=TOKEN, prefix=prefix)
    async with first.subscribe() as events:
        await read_until(events, seen, lambda e: e.type == "VmDeployed")
        resume_at = events.position
    await first_nc.close()  # gone: what happens now reaches nobody live

    await c.stop_vm(a.sid, "s")
    sentinel = await running_vm(c, "s", "sentinel")
    await c.start_vm(a.sid, "s")

    async def churn() -> None:
        """Live events while the resumed subscriber is still catching up."""
        for _ in range(5):
            await c.stop_vm(a.sid, "s")
            await c.start_vm(a.sid, "s")
        await c.stop_vm(sentinel.sid, "s")

    second_nc = await nats.connect(nats_url)
    try:
        second = HeroDeployerClient(second_nc, token=TOKEN, prefix=prefix)
        async with second.subscribe(after=resume_at) as events:
            producer = asyncio.create_task(churn())
            await read_until(
                events, seen, lambda e: e.stream == f"vm:{sentinel.sid}" and e.type == "VmStopped"
            )
            await producer
    finally:
        await second_nc.close()
    assert_exactly_once_in_order(seen, await full_log(c))
    assert len(seen) == len(await full_log(c))


async def test_one_stream_resumed_from_a_position_sees_only_its_events(service: Service) -> None:
    c = sdk(service)
    a = await running_vm(c, "s", "a")
    b = await running_vm(c, "s", "b")
    after = (await c.events(stream=f"vm:{a.sid}")).last
    await c.stop_vm(b.sid, "s")
    await c.stop_vm(a.sid, "s")
    seen: list[EventOut] = []
    async with c.subscribe(stream=f"vm:{a.sid}", after=after) as events:
        starter = asyncio.create_task(c.start_vm(a.sid, "s"))
        await read_until(events, seen, lambda e: e.type == "VmStarted")
        await starter
    assert [(e.type, e.version) for e in seen] == [("VmStopped", 3), ("VmStarted", 4)]
    assert all(isinstance(decode_event(e), VmStopped) for e in seen[:1])


async def test_live_messages_dropped_for_a_slow_consumer_are_filled_from_the_log(
    service: Service, nats_url: str
) -> None:
    c = sdk(service)
    slow_consumer_errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        if isinstance(error, SlowConsumerError):
            slow_consumer_errors.append(error)

    slow_nc = await nats.connect(nats_url, error_cb=on_error)
    slow = HeroDeployerClient(slow_nc, token=TOKEN, prefix=service.settings.prefix)
    seen: list[EventOut] = []
    try:
        async with slow.subscribe(pending_limit=2) as slow_events:
            # the slow subscriber reads nothing while these are published on its connection
            async with slow.subscribe() as witness:
                for i in range(8):
                    await c.deploy_vm(name=f"v{i}", secret="s")
                marker = await c.deploy_vm(name="marker", secret="s")
                marker_stream = f"vm:{marker.sid}"
                # once the witness has it live, the slow subscriber's connection has read it too
                await read_until(
                    witness, [], lambda e: e.stream == marker_stream and e.type == "VmDeployed"
                )
            assert slow_consumer_errors, "the pending limit never dropped a message"
            kick = await running_vm(c, "s", "kick")
            await c.stop_vm(kick.sid, "s")
            await read_until(
                slow_events, seen, lambda e: e.stream == f"vm:{kick.sid}" and e.type == "VmStopped"
            )
    finally:
        await slow_nc.close()
    assert_exactly_once_in_order(seen, await full_log(c))


async def test_a_lost_tail_is_picked_up_by_the_idle_poll(service: Service, nats_url: str) -> None:
    c = sdk(service)
    dropped: list[Exception] = []

    async def on_error(error: Exception) -> None:
        dropped.append(error)

    slow_nc = await nats.connect(nats_url, error_cb=on_error)
    slow = HeroDeployerClient(slow_nc, token=TOKEN, prefix=service.settings.prefix)
    seen: list[EventOut] = []
    try:
        async with slow.subscribe(pending_limit=1, poll_interval=0.05) as events:
            async with slow.subscribe() as witness:
                last = await c.deploy_vm(name="a", secret="s")
                await read_until(
                    witness, [], lambda e: e.stream == f"vm:{last.sid}" and e.type == "VmDeployed"
                )
            assert dropped
            await read_until(
                events, seen, lambda e: e.stream == f"vm:{last.sid}" and e.type == "VmDeployed"
            )
    finally:
        await slow_nc.close()
    assert_exactly_once_in_order(seen, await full_log(c))


async def test_follow_yields_plain_json_for_the_cli(service: Service) -> None:
    c = sdk(service)
    vm = await c.deploy_vm(name="a", secret="s")
    async with asyncio.timeout(10):
        async for event in c.follow(stream=f"vm:{vm.sid}"):
            assert set(event) == {"position", "stream", "version", "type", "data", "recorded_at"}
            assert isinstance(event["data"], dict)
            assert isinstance(event["recorded_at"], str)
            if event["type"] == "VmDeployed":
                break


async def test_connect_owns_and_drains_its_connection(service: Service, nats_url: str) -> None:
    async with await HeroDeployerClient.connect(
        nats_url, token=TOKEN, prefix=service.settings.prefix
    ) as client:
        assert (await client.health()).status == "ok"
        nc = client.nc
    assert nc.is_closed
    injected = sdk(service)
    await injected.close()
    assert not service.nc.is_closed
