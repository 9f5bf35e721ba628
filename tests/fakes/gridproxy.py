"""A fake grid proxy `/nodes` endpoint that filters like the real one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import LoopbackServer

GIB = 1024**3
_BOOLS = {"true": True, "false": False}
_KNOWN_PARAMS = {"node_ids", "status", "healthy", "domain", "size", "page", "ret_count"}


def grid_node(
    node_id: int,
    *,
    total_memory_gb: float = 64,
    used_memory_gb: float = 0,
    total_disk_gb: float = 1000,
    used_disk_gb: float = 0,
    total_cpu: int = 32,
    used_cpu: int = 0,
    status: str = "up",
    healthy: bool = True,
    domain: str = "",
) -> dict[str, Any]:
    """A node as the grid proxy lists it (the fields that matter, a few more for realism)."""
    return {
        "id": f"node-{node_id}",
        "nodeId": node_id,
        "farmId": 1,
        "twinId": 100 + node_id,
        "country": "Belgium",
        "gridVersion": 3,
        "total_resources": {
            "cru": total_cpu,
            "mru": int(total_memory_gb * GIB),
            "sru": int(total_disk_gb * GIB),
            "hru": 0,
        },
        "used_resources": {
            "cru": used_cpu,
            "mru": int(used_memory_gb * GIB),
            "sru": int(used_disk_gb * GIB),
            "hru": 0,
        },
        "publicConfig": {
            "domain": domain,
            "gw4": "",
            "gw6": "",
            "ipv4": "",
            "ipv6": "",
        },
        "status": status,
        "healthy": healthy,
        "rentable": True,
        "rented": False,
    }


@dataclass(frozen=True)
class RecordedQuery:
    method: str
    path: str
    query: dict[str, str]


class FakeGridProxy(LoopbackServer):
    """Serves `GET /nodes` over configurable nodes, honouring node_ids/status/healthy/domain."""

    def __init__(self, nodes: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.nodes: list[dict[str, Any]] = list(nodes or [])
        self.requests: list[RecordedQuery] = []

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/nodes", self._nodes)
        return app

    async def _nodes(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        self.requests.append(RecordedQuery(request.method, request.path, query))
        unknown = set(query) - _KNOWN_PARAMS
        if unknown:
            return _error(f"unknown query parameter {sorted(unknown)[0]}")
        try:
            ids = {int(i) for i in query["node_ids"].split(",")} if "node_ids" in query else None
            size = int(query.get("size", "50"))
            healthy = _BOOLS[query["healthy"]] if "healthy" in query else None
            domain = _BOOLS[query["domain"]] if "domain" in query else None
        except (ValueError, KeyError):
            return _error("couldn't parse query parameters")
        statuses = set(query["status"].split(",")) if "status" in query else None
        selected = [
            n
            for n in self.nodes
            if (ids is None or n["nodeId"] in ids)
            and (statuses is None or n["status"] in statuses)
            and (healthy is None or n["healthy"] is healthy)
            and (domain is None or bool(n["publicConfig"]["domain"]) is domain)
        ]
        return web.json_response(selected[:size])


def _error(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
