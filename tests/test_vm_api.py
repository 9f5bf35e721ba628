"""The tenant VM API end to end: real nats-server, real SQLite, the local grid."""

from __future__ import annotations

import asyncio
import json
import re
import time

import msgspec
import pytest

from core.errors import Conflict, InvalidInput, InvalidState, NotFound
from core.events import EventRegistry
from core.vm import fold
from core.vm_events import VM_EVENT_TYPES
from tests.conftest import STORES, TOKEN, Service, logged_events
from tests.helpers import deploy_running, wait_for_event

AUTH = {"Authorization": f"Bearer {TOKEN}"}


pytestmark = pytest.mark.stores(*STORES)  # SQLite, and two replicas on a JetStream cluster


async def event_count(service: Service) -> int:
    return len(await logged_events(service))


async def test_deploy_reaches_running_through_events(service: Service) -> None:
    vm = await service.client.call("deploy_vm", {"name": "web-1", "secret": "s1"})
    assert vm["status"] == "deploying"
    assert vm["sid"].startswith("vm_")
    assert set(vm) == {
        "sid",
        "name",
        "slice_sid",
        "image",
        "cpu_count",
        "memory_gb",
        "disk_gb",
        "rootfs_gb",
        "status",
        "node_id",
        "mycelium_ip",
        "error",
        "created_at",
        "updated_at",
    }
    deployed = await wait_for_event(service.client, f"vm:{vm['sid']}", "VmDeployed")
    got = await service.client.call("get_vm", {"sid": vm["sid"], "secret": "s1"})
    assert got["status"] == "running"
    assert got["node_id"] == deployed["data"]["node_id"]
    assert got["mycelium_ip"] == deployed["data"]["mycelium_ip"] != ""


async def test_sids_are_unique_and_ordered_by_the_millisecond_of_the_deploy(
    service: Service,
) -> None:
    """Time-ordered sids keep a commit of many deploys at the end of every index."""
    before = time.time_ns() // 1_000_000
    vms = await asyncio.gather(
        *(service.client.call("deploy_vm", {"name": f"v{i}", "secret": "s"}) for i in range(50))
    )
    after = time.time_ns() // 1_000_000
    sids = [vm["sid"] for vm in vms]
    assert len(set(sids)) == 50
    for sid in sids:
        assert re.fullmatch(r"vm_[0-9a-f]{20}", sid)
        assert before <= int(sid[3:15], 16) <= after
    later = await service.client.call("deploy_vm", {"name": "later", "secret": "s"})
    assert later["sid"][:15] >= max(sids)[:15]


async def test_get_right_after_deploy_reads_own_write(service: Service) -> None:
    vm = await service.client.call("deploy_vm", {"name": "a", "secret": "s"})
    got = await service.client.call("get_vm", {"sid": vm["sid"], "secret": "s"})
    assert got["sid"] == vm["sid"]
    listed = await service.client.call("list_vms", {"secret": "s"})
    assert [v["sid"] for v in listed["vms"]] == [vm["sid"]]


async def test_two_tenants_never_see_each_others_vms(service: Service) -> None:
    a = await service.client.call("deploy_vm", {"name": "a", "secret": "alice"})
    b = await service.client.call("deploy_vm", {"name": "b", "secret": "bob"})
    alice = await service.client.call("list_vms", {"secret": "alice"})
    bob = await service.client.call("list_vms", {"secret": "bob"})
    assert [v["sid"] for v in alice["vms"]] == [a["sid"]]
    assert [v["sid"] for v in bob["vms"]] == [b["sid"]]
    for op in ("get_vm", "start_vm", "stop_vm", "restart_vm", "delete_vm"):
        with pytest.raises(NotFound):
            await service.client.call(op, {"sid": a["sid"], "secret": "bob"})


async def test_not_found_is_identical_for_missing_sid_and_wrong_secret(service: Service) -> None:
    sid = await deploy_running(service.client, "right")
    wrong_body, wrong_headers = await service.request(
        "get_vm", json.dumps({"sid": sid, "secret": "wrong"}).encode(), AUTH
    )
    missing_body, missing_headers = await service.request(
        "get_vm", json.dumps({"sid": "vm_0000000000000000", "secret": "right"}).encode(), AUTH
    )
    assert (
        wrong_body
        == missing_body
        == {
            "ok": False,
            "error": {"code": "NotFound", "message": "vm not found"},
        }
    )
    assert wrong_headers == missing_headers
    assert wrong_headers["Nats-Service-Error-Code"] == "404"
    for op in ("stop_vm", "delete_vm"):
        wrong = await service.request(op, json.dumps({"sid": sid, "secret": "x"}).encode(), AUTH)
        missing = await service.request(
            op, json.dumps({"sid": "vm_nope", "secret": "right"}).encode(), AUTH
        )
        assert wrong == missing


async def test_empty_secret_reaches_only_vms_deployed_without_one(service: Service) -> None:
    open_vm = await service.client.call("deploy_vm", {"name": "open", "secret": ""})
    await service.client.call("deploy_vm", {"name": "closed", "secret": "s"})
    listed = await service.client.call("list_vms", {"secret": ""})
    assert [v["sid"] for v in listed["vms"]] == [open_vm["sid"]]
    with pytest.raises(NotFound):
        await service.client.call("get_vm", {"sid": open_vm["sid"], "secret": "s"})


async def test_require_secret_rejects_the_empty_secret(service: Service) -> None:
    for app in service.apps:  # every replica answers requests
        app.deps.require_secret = True
    before = await event_count(service)
    for op, body in (
        ("deploy_vm", {"name": "x", "secret": ""}),
        ("list_vms", {"secret": ""}),
        ("get_vm", {"sid": "vm_x", "secret": ""}),
        ("migrate_secret", {"old_secret": "", "new_secret": "n"}),
    ):
        with pytest.raises(InvalidInput, match="required"):
            await service.client.call(op, body)
    assert await event_count(service) == before


async def test_state_machine_over_nats(service: Service) -> None:
    c = service.client
    sid = await deploy_running(c, "s")
    with pytest.raises(InvalidState, match="cannot start a running vm"):
        await c.call("start_vm", {"sid": sid, "secret": "s"})
    assert (await c.call("stop_vm", {"sid": sid, "secret": "s"}))["status"] == "stopped"
    with pytest.raises(InvalidState):
        await c.call("restart_vm", {"sid": sid, "secret": "s"})
    assert (await c.call("start_vm", {"sid": sid, "secret": "s"}))["status"] == "running"
    assert (await c.call("restart_vm", {"sid": sid, "secret": "s"}))["status"] == "running"
    assert (await c.call("delete_vm", {"sid": sid, "secret": "s"}))["status"] == "deleting"
    await wait_for_event(c, f"vm:{sid}", "VmDeleted")
    assert (await c.call("get_vm", {"sid": sid, "secret": "s"}))["status"] == "deleted"
    assert (await c.call("list_vms", {"secret": "s"}))["vms"] == []
    with pytest.raises(InvalidState):
        await c.call("delete_vm", {"sid": sid, "secret": "s"})
    assert service.grid.calls[-1] == ("delete_vm", sid)


async def test_backend_failure_makes_the_vm_failed(service: Service) -> None:
    service.grid.fail_next("deploy_vm", "node 13 is out of capacity")
    vm = await service.client.call("deploy_vm", {"name": "doomed", "secret": "s"})
    await wait_for_event(service.client, f"vm:{vm['sid']}", "VmDeployFailed")
    got = await service.client.call("get_vm", {"sid": vm["sid"], "secret": "s"})
    assert got["status"] == "failed"
    assert got["error"] == "node 13 is out of capacity"


# migrate_secret -------------------------------------------------------------------------


async def test_migrate_secret_rekeys_every_vm(service: Service) -> None:
    c = service.client
    sids = {
        (await c.call("deploy_vm", {"name": f"v{i}", "secret": "old"}))["sid"] for i in range(3)
    }
    other = await c.call("deploy_vm", {"name": "other", "secret": "someone"})
    result = await c.call("migrate_secret", {"old_secret": "old", "new_secret": "new"})
    assert result == {"migrated_count": 3, "failed_count": 0}
    assert {v["sid"] for v in (await c.call("list_vms", {"secret": "new"}))["vms"]} == sids
    assert (await c.call("list_vms", {"secret": "old"}))["vms"] == []
    for sid in sids:
        with pytest.raises(NotFound):
            await c.call("get_vm", {"sid": sid, "secret": "old"})
    assert (await c.call("get_vm", {"sid": other["sid"], "secret": "someone"}))["name"] == "other"
    # one transaction: the three VmSecretMigrated events share one commit time
    page = await c.call("events", {"after": 0, "limit": 1000})
    migrated = [e for e in page["events"] if e["type"] == "VmSecretMigrated"]
    assert len(migrated) == 3
    assert len({e["recorded_at"] for e in migrated}) == 1
    assert [e["position"] for e in migrated] == list(
        range(migrated[0]["position"], migrated[0]["position"] + 3)
    )


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"old_secret": "old", "new_secret": ""}, InvalidInput, "new_secret must not be empty"),
        ({"old_secret": "old", "new_secret": "old"}, InvalidInput, "must differ"),
        ({"old_secret": "nobody", "new_secret": "n"}, NotFound, "no vm has this secret"),
    ],
)
async def test_migrate_secret_rules(
    service: Service, body: dict[str, str], error: type[Exception], message: str
) -> None:
    await deploy_running(service.client, "old")
    before = await event_count(service)
    with pytest.raises(error, match=message):
        await service.client.call("migrate_secret", body)
    assert await event_count(service) == before


async def test_migrate_secret_from_the_empty_secret(service: Service) -> None:
    vm = await service.client.call("deploy_vm", {"name": "v", "secret": ""})
    result = await service.client.call("migrate_secret", {"old_secret": "", "new_secret": "n"})
    assert result["migrated_count"] == 1
    assert (await service.client.call("get_vm", {"sid": vm["sid"], "secret": "n"}))["sid"]


async def test_migrate_leaves_deleted_vms_out(service: Service) -> None:
    c = service.client
    gone = await deploy_running(c, "old", "gone")
    await c.call("delete_vm", {"sid": gone, "secret": "old"})
    await wait_for_event(c, f"vm:{gone}", "VmDeleted")
    with pytest.raises(NotFound):
        await c.call("migrate_secret", {"old_secret": "old", "new_secret": "new"})
    kept = await c.call("deploy_vm", {"name": "kept", "secret": "old"})
    assert (await c.call("migrate_secret", {"old_secret": "old", "new_secret": "new"}))[
        "migrated_count"
    ] == 1
    assert (await c.call("get_vm", {"sid": kept["sid"], "secret": "new"}))["name"] == "kept"


# auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer  {TOKEN}"},
    ],
)
async def test_token_missing_wrong_or_malformed_is_unauthorized(
    service: Service, headers: dict[str, str] | None
) -> None:
    before = await event_count(service)
    body, reply_headers = await service.request("deploy_vm", b'{"name":"x","secret":"s"}', headers)
    assert body["ok"] is False
    assert body["error"]["code"] == "Unauthorized"  # type: ignore[index]
    assert reply_headers["Nats-Service-Error-Code"] == "401"
    assert TOKEN not in json.dumps(body) + json.dumps(reply_headers)
    assert await event_count(service) == before


async def test_health_is_exempt_and_replies_never_echo_headers(service: Service) -> None:
    body, headers = await service.request("health", b"", {"X-Probe": "1"})
    assert body["ok"] is True
    assert body["result"]["status"] == "ok"  # type: ignore[index]
    assert "X-Probe" not in headers
    body, headers = await service.request("list_vms", b'{"secret":"s"}', AUTH)
    assert body == {"ok": True, "result": {"vms": []}}
    assert "Authorization" not in headers


# idempotency -----------------------------------------------------------------------------


async def deployed_with_key(service: Service, key: str) -> tuple[dict[str, object], dict[str, str]]:
    """The reply to deploy_vm `a` under Idempotency-Key `key` once it is deployed, and headers."""
    headers = {**AUTH, "Idempotency-Key": key}
    first, _ = await service.request("deploy_vm", b'{"name":"a","secret":"s"}', headers)
    await wait_for_event(service.client, f"vm:{first['result']['sid']}", "VmDeployed")  # type: ignore[index]
    return first, headers


async def test_idempotent_replay_returns_first_reply_and_appends_nothing(service: Service) -> None:
    first, headers = await deployed_with_key(service, "deploy-1")
    count = await event_count(service)
    again, _ = await service.request("deploy_vm", b'{ "secret": "s", "name": "a" }', headers)
    assert again == first
    assert await event_count(service) == count
    listed = await service.client.call("list_vms", {"secret": "s"})
    assert len(listed["vms"]) == 1


async def test_idempotency_key_with_another_body_is_conflict(service: Service) -> None:
    _, headers = await deployed_with_key(service, "k-1")
    count = await event_count(service)
    body, reply_headers = await service.request("deploy_vm", b'{"name":"b","secret":"s"}', headers)
    assert body["error"]["code"] == "Conflict"  # type: ignore[index]
    assert reply_headers["Nats-Service-Error-Code"] == "409"
    body, _ = await service.request("delete_vm", b'{"sid":"vm_x","secret":"s"}', headers)
    assert body["error"]["code"] == "Conflict"  # type: ignore[index]
    assert await event_count(service) == count


async def test_concurrent_requests_with_one_key_append_once(service: Service) -> None:
    headers = {**AUTH, "Idempotency-Key": "same"}
    replies = await asyncio.gather(
        *(service.request("deploy_vm", b'{"name":"a","secret":"s"}', headers) for _ in range(20))
    )
    assert len({json.dumps(r[0], sort_keys=True) for r in replies}) == 1
    assert len((await service.client.call("list_vms", {"secret": "s"}))["vms"]) == 1


@pytest.mark.parametrize("key", ["", "x" * 129, "tab\there", "é"])
async def test_malformed_idempotency_key_is_invalid_input(service: Service, key: str) -> None:
    body, _ = await service.request(
        "deploy_vm", b'{"name":"a","secret":"s"}', {**AUTH, "Idempotency-Key": key}
    )
    assert body["error"]["code"] == "InvalidInput"  # type: ignore[index]
    assert await event_count(service) == 0


# concurrency -----------------------------------------------------------------------------


async def test_200_concurrent_start_stop_leave_contiguous_versions(service: Service) -> None:
    c = service.client
    sid = await deploy_running(c, "s")

    async def flip(i: int) -> str:
        op = "stop_vm" if i % 2 == 0 else "start_vm"
        try:
            return str((await c.call(op, {"sid": sid, "secret": "s"}))["status"])
        except InvalidState:
            return "invalid"
        except Conflict:
            return "conflict"

    outcomes = await asyncio.gather(*(flip(i) for i in range(200)))
    assert "conflict" not in outcomes
    assert outcomes.count("stopped") + outcomes.count("running") >= 2
    await service.app.reactor.drain()
    events = await service.app.store.read_stream(f"vm:{sid}")
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    registry = EventRegistry(VM_EVENT_TYPES)
    folded = fold([registry.decode(e.type, e.data) for e in events])
    got = await c.call("get_vm", {"sid": sid, "secret": "s"})
    assert folded is not None
    assert got["status"] == folded.status
    assert msgspec.json.decode(msgspec.json.encode(folded.public())) == got


# hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "body", "field"),
    [
        ("deploy_vm", b'{"name": "a", "secret": "s"', "malformed"),
        ("deploy_vm", b"\xff\xfe", "malformed"),
        ("deploy_vm", b'{"name":"a","secret":"s","admin":true}', "admin"),
        ("deploy_vm", b'{"name":"a","secret":"s","cpu_count":"16"}', "cpu_count"),
        ("deploy_vm", b'{"name":"a","secret":"s","cpu_count":65}', "cpu_count"),
        ("deploy_vm", b'{"name":"a","secret":"s","memory_gb":0}', "memory_gb"),
        ("deploy_vm", b'{"name":"a","secret":"s","disk_gb":10241}', "disk_gb"),
        ("deploy_vm", b'{"name":"a","secret":"s","rootfs_gb":1025}', "rootfs_gb"),
        ("deploy_vm", b'{"name":"' + b"a" * 65 + b'","secret":"s"}', "name"),
        ("deploy_vm", b'{"name":"a b","secret":"s"}', "name"),
        ("deploy_vm", b'{"name":"a","secret":"' + b"s" * 257 + b'"}', "secret"),
        ("deploy_vm", b'{"secret":"s"}', "name"),
        ("deploy_vm", b"[]", "object"),
        ("get_vm", b'{"sid":"' + b"v" * 65 + b'","secret":"s"}', "sid"),
        ("events", b'{"limit":0}', "limit"),
        ("events", b'{"limit":1001}', "limit"),
        ("events", b'{"after":-1}', "after"),
        ("events", b'{"stream":"x:y"}', "stream"),
        ("list_vms", b"{}", "secret"),
    ],
)
async def test_bad_input_is_invalid_input_and_appends_nothing(
    service: Service, operation: str, body: bytes, field: str
) -> None:
    reply, headers = await service.request(operation, body, AUTH)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "InvalidInput"  # type: ignore[index]
    assert field in reply["error"]["message"]  # type: ignore[index]
    assert headers["Nats-Service-Error-Code"] == "400"
    assert await event_count(service) == 0


async def test_the_secret_never_reaches_replies_events_or_the_database(service: Service) -> None:
    secret = "correct-horse-battery-staple-4242"
    vm = await service.client.call("deploy_vm", {"name": "a", "secret": secret})
    await wait_for_event(service.client, f"vm:{vm['sid']}", "VmDeployed")
    await service.client.call("migrate_secret", {"old_secret": secret, "new_secret": secret + "2"})
    page = await service.client.call("events", {})
    assert secret not in json.dumps(page)
    assert secret not in json.dumps(vm)
    for name in ("events.db", "views.db"):  # every replica's, whichever store
        for path in service.settings.data_dir.rglob(name + "*"):
            assert secret.encode() not in path.read_bytes()
    assert all(secret.encode() not in bytes(e.data) for e in await logged_events(service))


async def test_still_serving_after_1000_garbage_requests(service: Service) -> None:
    import random

    rng = random.Random(7)
    ops = ["deploy_vm", "get_vm", "list_vms", "stop_vm", "migrate_secret", "events", "health"]

    async def garbage(i: int) -> None:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        reply, _ = await service.request(ops[i % len(ops)], body, AUTH if i % 3 else None)
        assert isinstance(reply, dict)

    for start in range(0, 1000, 100):
        await asyncio.gather(*(garbage(i) for i in range(start, start + 100)))
    assert await event_count(service) == 0
    vm = await service.client.call("deploy_vm", {"name": "after", "secret": "s"})
    assert vm["status"] == "deploying"


async def test_events_pages_by_position(service: Service) -> None:
    c = service.client
    for i in range(5):
        await c.call("deploy_vm", {"name": f"v{i}", "secret": "s"})
    first = await c.call("events", {"after": 0, "limit": 2})
    assert [e["position"] for e in first["events"]] == [1, 2]
    assert first["last"] == 2
    rest = await c.call("events", {"after": first["last"], "limit": 1000})
    positions = [e["position"] for e in rest["events"]]
    assert positions == list(range(3, 3 + len(positions)))
    empty = await c.call("events", {"after": 10_000})
    assert empty == {"events": [], "last": 10_000}
    one = first["events"][0]
    assert set(one) == {"position", "stream", "version", "type", "data", "recorded_at"}
    only = await c.call("events", {"stream": one["stream"]})
    assert {e["stream"] for e in only["events"]} == {one["stream"]}


async def test_registered_as_a_nats_micro_service(service: Service) -> None:
    ping = json.loads((await service.nc.request("$SRV.PING.hero-deployer", b"", timeout=5)).data)
    assert ping["name"] == "hero-deployer"
    info = json.loads(
        (await service.nc.request(f"$SRV.INFO.hero-deployer.{ping['id']}", b"", timeout=5)).data
    )
    endpoints = {e["name"]: e for e in info["endpoints"]}
    prefix = service.settings.prefix
    for operation in (
        "deploy_vm",
        "list_vms",
        "get_vm",
        "start_vm",
        "stop_vm",
        "restart_vm",
        "delete_vm",
        "migrate_secret",
        "events",
        "health",
        "provision_user",
        "decommission_user",
        "get_user",
        "list_users",
        "reveal_initial_password",
    ):
        assert endpoints[operation]["subject"] == f"{prefix}.{operation}"
        assert endpoints[operation]["queue_group"] == "hero-deployer"
    stats = await service.nc.request(f"$SRV.STATS.hero-deployer.{ping['id']}", b"", timeout=5)
    assert json.loads(stats.data)["name"] == "hero-deployer"
