"""A fake grid proxy (`/nodes`, `/contracts`) that filters like the real one, and the grid's
registry of name contracts, which every deployer (and the stand-in `tofu`) shares."""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import LoopbackServer

GIB = 1024**3
_BOOLS = {"true": True, "false": False}
# tfgrid-sdk-go grid-proxy/pkg/types/nodes.go NodeFilter (the ones the fake implements).
_KNOWN_PARAMS = {
    "node_ids",
    "status",
    "healthy",
    "domain",
    "rented",
    "dedicated",
    "size",
    "page",
    "ret_count",
}
# tfgrid-sdk-go grid-proxy/pkg/types/contracts.go ContractFilter (the ones the fake implements).
_CONTRACT_PARAMS = {"type", "name", "state", "twin_id", "size", "page", "ret_count"}
# The query GridProxyDirectory.candidate_nodes sends for the tests' candidates 1, 8, 13 and 50.
CANDIDATE_QUERY = {
    "node_ids": "1,8,13,50",
    "status": "up",
    "healthy": "true",
    "domain": "true",
    "rented": "false",
    "dedicated": "false",
}
# tfchain substrate-node/pallets/pallet-smart-contract/src/name_contract.rs NameContractName:
# at least MIN_NAME_LENGTH (3) bytes, at most the runtime's MaxNameContractNameLength (64), and
# only a-z 0-9 - _.
NAME_CONTRACT_CHARS = re.compile(r"[a-z0-9_-]*")
NAME_CONTRACT_MIN, NAME_CONTRACT_MAX = 3, 64


class NameContractError(Exception):
    """What tfchain answers when a name contract cannot be created (its error's name)."""


class NameRegistry:
    """The chain's name contracts in a JSON file, shared by every process that opens it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, name: str, twin_id: int) -> int:
        """Registers `name` for `twin_id` as tfchain's create_name_contract does; its id."""
        # name_contract.rs: TryFrom<Vec<u8>> for NameContractName
        if len(name.encode()) < NAME_CONTRACT_MIN:
            raise NameContractError("NameContractNameTooShort")
        if len(name.encode()) > NAME_CONTRACT_MAX:
            raise NameContractError("NameContractNameTooLong")
        if not NAME_CONTRACT_CHARS.fullmatch(name):
            raise NameContractError("NameNotValid")
        with self._data() as data:
            # pallet-smart-contract lib.rs: ContractIDByNameRegistration holds a name until the
            # contract is deleted, whoever's it is: `NameExists`.
            held = data["contracts"].get(name)
            if held is not None and held["state"] != "Deleted":
                raise NameContractError("NameExists")
            data["next_id"] += 1
            data["contracts"][name] = {
                "contract_id": data["next_id"],
                "twin_id": twin_id,
                "state": "Created",
            }
            return int(data["next_id"])

    def cancel(self, name: str, twin_id: int) -> None:
        """Deletes the twin's contract of `name` (cancel_contract); the name is free again."""
        with self._data() as data:
            held = data["contracts"].get(name)
            if held is not None and held["twin_id"] == twin_id:
                held["state"] = "Deleted"

    def contracts(self) -> list[dict[str, Any]]:
        """Every name contract as the grid proxy lists contracts (contracts.go RawContract)."""
        with self._data() as data:
            return [
                {
                    "contract_id": c["contract_id"],
                    "twin_id": c["twin_id"],
                    "state": c["state"],
                    "created_at": 1_700_000_000 + c["contract_id"],
                    "type": "name",
                    "details": {"name": name},
                }
                for name, c in data["contracts"].items()
            ]

    @contextmanager
    def _data(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.with_name(self.path.name + ".lock").open("ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = (
                json.loads(self.path.read_text())
                if self.path.exists()
                else {"next_id": 0, "contracts": {}}
            )
            yield data
            self.path.write_text(json.dumps(data))


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
    rented: bool = False,
    dedicated: bool = False,
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
        "dedicated": dedicated,
        "rentable": dedicated and not rented,
        "rented": rented,
        "rentedByTwinId": 7 if rented else 0,
    }


@dataclass(frozen=True)
class RecordedQuery:
    method: str
    path: str
    query: dict[str, str]


class FakeGridProxy(LoopbackServer):
    """Serves `GET /nodes` over configurable nodes (node_ids, status, healthy, domain, rented,
    dedicated) and `GET /contracts` over a name registry (type, name, state, twin_id)."""

    def __init__(
        self, nodes: list[dict[str, Any]] | None = None, *, names: NameRegistry | None = None
    ) -> None:
        super().__init__()
        self.nodes: list[dict[str, Any]] = list(nodes or [])
        self.names = names
        self.requests: list[RecordedQuery] = []

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/nodes", self._nodes), web.get("/contracts", self._contracts)]

    def _query(
        self, request: web.Request, known: AbstractSet[str]
    ) -> tuple[dict[str, str], web.Response | None]:
        """Records the request; its query, and the refusal of a parameter not in `known`."""
        query = dict(request.query)
        self.requests.append(RecordedQuery(request.method, request.path, query))
        unknown = set(query) - known
        return query, _error(f"unknown query parameter {sorted(unknown)[0]}") if unknown else None

    async def _contracts(self, request: web.Request) -> web.Response:
        query, refusal = self._query(request, _CONTRACT_PARAMS)
        if refusal is not None:
            return refusal
        states = set(request.query.getall("state", []))
        try:
            twin = int(query["twin_id"]) if "twin_id" in query else None
        except ValueError:
            return _error("couldn't parse query parameters")
        listed = self.names.contracts() if self.names is not None else []
        selected = [
            c
            for c in listed
            if query.get("type", c["type"]) == c["type"]
            and query.get("name", c["details"]["name"]) == c["details"]["name"]
            and (not states or c["state"] in states)
            and (twin is None or c["twin_id"] == twin)
        ]
        return web.json_response(selected)

    async def _nodes(self, request: web.Request) -> web.Response:
        query, refusal = self._query(request, _KNOWN_PARAMS)
        if refusal is not None:
            return refusal
        try:
            ids = {int(i) for i in query["node_ids"].split(",")} if "node_ids" in query else None
            size = int(query.get("size", "50"))
            healthy = _BOOLS[query["healthy"]] if "healthy" in query else None
            domain = _BOOLS[query["domain"]] if "domain" in query else None
            rented = _BOOLS[query["rented"]] if "rented" in query else None
            dedicated = _BOOLS[query["dedicated"]] if "dedicated" in query else None
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
            and (rented is None or n["rented"] is rented)
            and (dedicated is None or n["dedicated"] is dedicated)
        ]
        return web.json_response(selected[:size])


def _error(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)
