"""The edge never replies on a subject in our own namespace or the system's (`$...`)."""

from __future__ import annotations

from nats.aio.msg import Msg
from structlog.testing import capture_logs

from tests.conftest import TOKEN, Service

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_forged_reply_subject_gets_nothing_and_others_still_get_replies(
    service: Service,
) -> None:
    prefix = service.settings.prefix
    caught: list[Msg] = []

    async def catch(msg: Msg) -> None:
        caught.append(msg)

    events = await service.nc.subscribe(f"{prefix}.events.>", cb=catch)
    system = await service.nc.subscribe("$JS.API.>", cb=catch)
    forged = (f"{prefix}.events.vm.vm_forged.VmDeleted", "$JS.API.STREAM.DELETE.EVENTS")
    with capture_logs() as logs:
        for reply in forged:
            for operation in ("health", "get_vm"):
                body = b'{"sid": "vm_forged", "secret": "s"}' if operation == "get_vm" else b"{}"
                await service.nc.publish(f"{prefix}.{operation}", body, reply=reply, headers=AUTH)
            await service.nc.publish("$SRV.PING.hero-deployer", b"", reply=reply)
        # the same endpoints, asked after, still answer: their replies trail the forged ones
        health, _ = await service.request("health", b"{}")
        missing, headers = await service.request("get_vm", b'{"sid": "vm_x", "secret": "s"}', AUTH)
        pong = await service.nc.request("$SRV.PING.hero-deployer", b"", timeout=5)
        await service.nc.flush()
    await events.unsubscribe()
    await system.unsubscribe()
    assert health["ok"] is True
    assert headers["Nats-Service-Error-Code"] == "404" and missing["ok"] is False
    assert b"hero-deployer" in pong.data
    assert [msg.subject for msg in caught] == []
    refused = [entry for entry in logs if entry["event"] == "request.reply_subject_refused"]
    assert sorted(entry["reply"] for entry in refused) == sorted(forged * 3)
    assert all(TOKEN not in repr(entry) for entry in logs)
