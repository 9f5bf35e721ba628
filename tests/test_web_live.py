"""The dashboard's EventHub on a real service: it follows the log only while someone listens.

A listener gets every event after it is handed out, none before; with nobody listening the hub
leaves the stream at the next event and starts again from the position of the next listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest_asyncio

from hero_deployer.sdk.client import EventOut
from hero_deployer.web.live import EventHub, Listener
from tests.conftest import Service
from tests.helpers import wait_for_event

DEADLINE = 10.0
SECRET = "s" * 32


@pytest_asyncio.fixture
async def hub(service: Service) -> AsyncIterator[EventHub]:
    hub = EventHub(service.client)
    await hub.start()
    yield hub
    await hub.close()


def following(hub: EventHub) -> bool:
    """Whether the hub follows the stream (it knows the position it follows from)."""
    return hub.position is not None


async def events_until(listener: Listener, stream: str, event_type: str) -> list[EventOut]:
    """The listener's events up to the first `event_type` of `stream`."""
    seen: list[EventOut] = []
    async with asyncio.timeout(DEADLINE):
        while True:
            event = await listener.queue.get()
            assert event is not None, "the hub closed the listener"
            seen.append(event)
            if event.stream == stream and event.type == event_type:
                return seen


async def test_a_listener_gets_every_event_after_it_is_handed_out(
    service: Service, hub: EventHub
) -> None:
    before = await service.client.deploy_vm(name="before", secret=SECRET)
    earlier = await wait_for_event(service.client, f"vm:{before.sid}", "VmDeployRequested")
    async with hub.listen() as listener:
        handed_out = await service.client.position()
        after = await service.client.deploy_vm(name="after", secret=SECRET)
        seen = await events_until(listener, f"vm:{after.sid}", "VmDeployRequested")
    positions = [event.position for event in seen]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # no gap
    assert positions[0] <= handed_out + 1  # nothing after the hand-out is missing
    assert positions[0] > earlier["position"]  # what came before the listener is not replayed


async def test_with_nobody_listening_the_hub_leaves_and_starts_again_where_the_log_is(
    service: Service, hub: EventHub
) -> None:
    async with hub.listen() as listener:
        first = await service.client.deploy_vm(name="first", secret=SECRET)
        await events_until(listener, f"vm:{first.sid}", "VmDeployRequested")
    assert hub.position is not None
    idle = await service.client.deploy_vm(name="idle", secret=SECRET)
    unheard = await wait_for_event(service.client, f"vm:{idle.sid}", "VmDeployRequested")
    async with asyncio.timeout(DEADLINE):
        while following(hub):  # an event nobody listened to made the hub leave
            await asyncio.sleep(0.01)
    async with hub.listen() as listener:
        assert hub.position is not None and hub.position >= unheard["position"]
        again = await service.client.deploy_vm(name="again", secret=SECRET)
        seen = await events_until(listener, f"vm:{again.sid}", "VmDeployRequested")
    assert seen[0].position > unheard["position"]
