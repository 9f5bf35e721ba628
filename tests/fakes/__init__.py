"""Protocol-level fakes: real HTTP servers on loopback that answer like the services they fake."""

from __future__ import annotations

import asyncio
from typing import Literal, Self

from aiohttp import web
from aiohttp.typedefs import Handler

DownMode = Literal["503", "closed", "hang"]


class LoopbackServer:
    """An aiohttp app on 127.0.0.1:<free port> that can be taken down and brought back."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port = 0
        self._resume = asyncio.Event()
        self.down: DownMode | None = None

    def routes(self) -> list[web.RouteDef]:
        """The routes to serve; each fake lists its own."""
        raise NotImplementedError

    def build_app(self) -> web.Application:
        """The application serving `routes()`."""
        app = web.Application()
        app.add_routes(self.routes())
        return app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    async def __aenter__(self) -> Self:
        app = self.build_app()
        app.middlewares.append(self._down_middleware)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._resume.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def go_down(self, mode: DownMode = "503") -> None:
        """`503` answers 503; `closed` refuses and drops connections; `hang` never answers."""
        self.down = mode
        self._resume.clear()
        if mode == "closed" and self._site is not None:
            await self._site.stop()
            self._site = None
            server = self._runner.server if self._runner else None
            for connection in server.connections if server else []:
                connection.force_close()

    async def come_up(self) -> None:
        """Answers normally again, on the same port; hung requests go on."""
        self.down = None
        self._resume.set()
        if self._site is None:
            await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await self._site.start()
        self._port = self._runner.addresses[0][1]

    @web.middleware
    async def _down_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.down == "503":
            return web.json_response({"message": "service unavailable"}, status=503)
        if self.down == "closed" and request.transport is not None:
            request.transport.abort()
        if self.down == "hang":
            await self._resume.wait()
        return await handler(request)
