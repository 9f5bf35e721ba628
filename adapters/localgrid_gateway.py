"""The local grid's web gateway: one loopback HTTP server that forwards to VMs' web services."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from core.ports import BackendError

# Resolves a backend host and port to the loopback port that answers for it, or None.
Resolver = Callable[[str, int], int | None]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_PREFIX = "/gw/"


@dataclass(frozen=True, slots=True)
class GatewayRoute:
    """A gateway and the backend it forwards to."""

    name: str
    fqdn: str
    backend_url: str
    host: str
    port: int


def parse_backend_url(url: str) -> tuple[str, int]:
    """The normalised host and port of `http://host:port`; BackendError if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BackendError(f"backend_url {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"backend_url {url!r} must look like http://host:port")
    host = parts.hostname.lower()
    try:
        host = ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    return host, port if port is not None else (443 if parts.scheme == "https" else 80)


class GatewayServer:
    """Routes `/gw/<fqdn>/...` or `Host: <fqdn>` to the gateway's backend; 502 when it is silent."""

    def __init__(self, resolve: Resolver, port: int = 0) -> None:
        self._resolve = resolve
        self._requested_port = port
        self._routes: dict[str, GatewayRoute] = {}
        self._by_fqdn: dict[str, GatewayRoute] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Starts listening on the requested loopback port, or a free one."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._requested_port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)
        )

    async def close(self) -> None:
        """Stops listening and closes the forwarding client."""
        runner, self._runner = self._runner, None
        session, self._session = self._session, None
        if runner is not None:
            await runner.cleanup()
        if session is not None:
            await session.close()

    def url(self, fqdn: str) -> str:
        """The loopback URL of a gateway; it names the fqdn, as a real gateway's URL does."""
        return f"http://127.0.0.1:{self.port}{_PREFIX}{fqdn}"

    def get(self, name: str) -> GatewayRoute | None:
        return self._routes.get(name)

    def put(self, route: GatewayRoute) -> None:
        """Adds or replaces a gateway."""
        self.remove(route.name)
        self._routes[route.name] = route
        self._by_fqdn[route.fqdn.lower()] = route

    def remove(self, name: str) -> bool:
        """Removes a gateway; True if there was one."""
        route = self._routes.pop(name, None)
        if route is None:
            return False
        self._by_fqdn.pop(route.fqdn.lower(), None)
        return True

    def _route_for(self, request: web.Request) -> tuple[GatewayRoute | None, str]:
        """The gateway a request is for and the path to ask its backend."""
        host = request.headers.get("Host", "").rsplit(":", 1)[0].lower().rstrip(".")
        route = self._by_fqdn.get(host)
        if route is not None:
            return route, request.raw_path
        raw = request.raw_path
        if not raw.startswith(_PREFIX):
            return None, raw
        path, sep, query = raw[len(_PREFIX) :].partition("?")
        key, _, rest = path.partition("/")
        route = self._by_fqdn.get(key.lower()) or self._routes.get(key)
        return route, "/" + rest + (sep + query)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        route, path = self._route_for(request)
        if route is None:
            return web.json_response({"error": "no such gateway"}, status=404)
        port = self._resolve(route.host, route.port)
        if port is None or self._session is None:
            return _bad_gateway(f"{route.backend_url} does not answer")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-Proto"] = "http"
        try:
            async with self._session.request(
                request.method,
                f"http://127.0.0.1:{port}{path}",
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as upstream:
                body = await upstream.read()
                out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                return web.Response(status=upstream.status, body=body, headers=out)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _bad_gateway(f"{route.backend_url} failed: {exc.__class__.__name__}")


def _bad_gateway(reason: str) -> web.Response:
    return web.json_response({"error": "bad gateway", "reason": reason}, status=502)
