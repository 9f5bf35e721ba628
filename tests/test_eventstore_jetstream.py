"""The JetStream event store: the shared contract on a real nats-server, then what only it does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client

from adapters.eventstore_jetstream import JetStreamEventStore
from hero_deployer.natsserver import NatsServer
from tests.eventstore_contract import EventStoreContract
from tests.jetstream_cluster import connect, jetstream_ready, jetstream_server


class TestJetStreamEventStore(EventStoreContract):
    """One nats-server with JetStream per test, kept in the folder of the path the suite gives."""

    @pytest.fixture(autouse=True)
    async def servers(self) -> AsyncIterator[None]:
        self.running: dict[Path, NatsServer] = {}
        self.connections: list[Client] = []
        try:
            yield
        finally:
            for nc in self.connections:
                await nc.close()
            for server in self.running.values():
                await server.stop()

    async def make_store(self, path: Path) -> JetStreamEventStore:
        server = self.running.get(path)
        if server is None:
            server = self.running[path] = jetstream_server(path.parent)
            await server.start()
        nc = await connect([server.url])
        self.connections.append(nc)
        await jetstream_ready(nc)
        return await JetStreamEventStore(nc, replicas=1).__aenter__()
