"""`$SRV.STATS` counts what the edge answered, as nats micro defines the fields."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import TOKEN, Service

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _endpoint_stats(service: Service, name: str) -> dict[str, Any]:
    ping = json.loads((await service.nc.request("$SRV.PING.hero-deployer", b"", timeout=5)).data)
    reply = await service.nc.request(f"$SRV.STATS.hero-deployer.{ping['id']}", b"", timeout=5)
    endpoints = {e["name"]: e for e in json.loads(reply.data)["endpoints"]}
    return endpoints[name]


async def test_error_replies_are_counted_per_endpoint(service: Service) -> None:
    before = await _endpoint_stats(service, "get_vm")
    for _ in range(3):  # NotFound: a well-formed request for no such VM
        _, headers = await service.request("get_vm", b'{"sid": "vm_missing", "secret": "s"}', AUTH)
        assert headers["Nats-Service-Error-Code"] == "404"
    _, headers = await service.request("get_vm", b'{"sid": 1}', AUTH)  # InvalidInput
    assert headers["Nats-Service-Error-Code"] == "400"
    await service.request("get_vm", b"{}", {})  # Unauthorized
    after = await _endpoint_stats(service, "get_vm")
    assert after["num_requests"] - before["num_requests"] == 5
    assert after["num_errors"] - before["num_errors"] == 5
    assert after["last_error"].startswith("401:")
    untouched = await _endpoint_stats(service, "list_vms")
    assert untouched["num_errors"] == 0


async def test_processing_time_covers_the_handler(service: Service) -> None:
    await service.client.call("deploy_vm", {"name": "timed", "secret": "s"})
    stats = await _endpoint_stats(service, "deploy_vm")
    assert stats["num_requests"] == 1
    assert stats["num_errors"] == 0
    # the deploy's commit alone (a durable SQLite write) takes far more than handing off a task
    assert stats["processing_time"] >= 50_000
    assert stats["average_processing_time"] == stats["processing_time"]
