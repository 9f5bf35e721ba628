from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from adapters.health_http import HttpxHealthProbe
from core.ports import ExternalError
from tests.fakes import LoopbackServer


class HealthServer(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.paths: list[str] = []

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/health", self._health), web.get("/moved", self._moved)]

    async def _health(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        return web.json_response({"status": "ok"}, status=self.status)

    async def _moved(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        raise web.HTTPFound("/health")


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    async with HealthServer() as s:
        yield s


@pytest.fixture
async def probe() -> AsyncIterator[HttpxHealthProbe]:
    async with HttpxHealthProbe(timeout=0.5) as p:
        yield p


async def test_reports_the_status_of_a_get(server: HealthServer, probe: HttpxHealthProbe) -> None:
    assert await probe.status(f"{server.url}/health") == 200
    server.status = 502
    assert await probe.status(f"{server.url}/health") == 502
    assert await probe.status(f"{server.url}/nowhere") == 404
    assert server.paths == ["/health", "/health"]


async def test_a_redirect_is_reported_not_followed(
    server: HealthServer, probe: HttpxHealthProbe
) -> None:
    assert await probe.status(f"{server.url}/moved") == 302
    assert server.paths == ["/moved"]


async def test_a_service_unavailable_answer_is_a_status(
    server: HealthServer, probe: HttpxHealthProbe
) -> None:
    await server.go_down("503")
    assert await probe.status(f"{server.url}/health") == 503


async def test_no_connection_is_retryable(server: HealthServer, probe: HttpxHealthProbe) -> None:
    await server.go_down("closed")

    with pytest.raises(ExternalError, match="cannot reach") as caught:
        await probe.status(f"{server.url}/health")

    assert caught.value.retryable is True


async def test_no_answer_in_time_is_retryable(
    server: HealthServer, probe: HttpxHealthProbe
) -> None:
    await server.go_down("hang")

    with pytest.raises(ExternalError, match="did not answer in time") as caught:
        await probe.status(f"{server.url}/health")

    assert caught.value.retryable is True
