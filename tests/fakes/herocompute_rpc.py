"""A fake hero_compute: a JSON-RPC 2.0 ComputeService with in-memory VMs that records every call."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import LoopbackServer

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
NOT_FOUND = -32004
CONFLICT = -32009
INVALID_STATE = -32010

_VM_PARAMS = frozenset({"sid", "secret"})
# hero_compute publishes no source: this table is our reading of its ComputeService, kept apart
# from the client's own table (adapters/herocompute.py CLIENT_METHODS) so that `rpc.discover`,
# built from it, can disagree with the client. Method -> (required params, optional params).
METHODS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "deploy_vm": (
        frozenset({"secret", "name"}),
        frozenset(
            {"image", "cpu_count", "memory_gb", "disk_gb", "rootfs_gb", "node_id"}
            | {"mycelium", "public_ip"}
        ),
    ),
    "get_vm": (_VM_PARAMS, frozenset()),
    "list_vms": (frozenset({"secret"}), frozenset()),
    "start_vm": (_VM_PARAMS, frozenset()),
    "stop_vm": (_VM_PARAMS, frozenset()),
    "restart_vm": (_VM_PARAMS, frozenset()),
    "delete_vm": (_VM_PARAMS, frozenset()),
    "inject_ssh_keys": (_VM_PARAMS | {"keys"}, frozenset()),
    "deploy_webgateway": (frozenset({"secret", "name", "node_id", "backend_url"}), frozenset()),
    "delete_webgateway": (frozenset({"secret", "name"}), frozenset()),
}


def openrpc_document(methods: dict[str, tuple[frozenset[str], frozenset[str]]]) -> dict[str, Any]:
    """An OpenRPC 1.2.6 document (open-rpc/spec 1.2.6/index.md: OpenRPC, Method and Content
    Descriptor Objects) describing `methods`, with named params."""
    return {
        "openrpc": "1.2.6",
        "info": {"title": "hero_compute ComputeService (fake)", "version": "0.0.0"},
        "methods": [
            {
                "name": name,
                "paramStructure": "by-name",
                "params": [
                    {"name": p, "required": p in required, "schema": {}}
                    for p in sorted(required | optional)
                ],
                "result": {"name": "result", "schema": {"type": "object"}},
            }
            for name, (required, optional) in methods.items()
        ],
    }


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RpcCall:
    method: str
    params: dict[str, Any]


@dataclass
class FakeVm:
    sid: str
    name: str
    secret: str
    spec: dict[str, Any]
    node_id: int
    status: str = "deploying"
    mycelium_ip: str = ""
    polls_left: int = 0
    error: str = ""
    ssh_keys: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": self.sid,
            "name": self.name,
            "image": self.spec.get("image", "ubuntu-24.04"),
            "cpu_count": self.spec.get("cpu_count", 16),
            "memory_gb": self.spec.get("memory_gb", 8),
            "disk_gb": self.spec.get("disk_gb", 200),
            "rootfs_gb": self.spec.get("rootfs_gb", 16),
            "status": self.status,
            "node_id": self.node_id,
            "mycelium_ip": self.mycelium_ip,
            "error": self.error,
        }


class HeroComputeRpc(LoopbackServer):
    """hero_compute's ComputeService on loopback (and optionally a Unix socket), in memory.

    A new VM turns `running` with a mycelium address on its `polls_until_running`-th get_vm.
    """

    def __init__(
        self,
        *,
        polls_until_running: int = 2,
        node_id: int = 13,
        gateway_domain: str = "gent01.grid.tf",
        fail_deploys_with: str = "",
        discovery: bool = True,
    ) -> None:
        super().__init__()
        # `rpc.discover` answers this document; None: no such method, as on a server without it.
        self.discovery: dict[str, Any] | None = openrpc_document(METHODS) if discovery else None
        self.polls_until_running = polls_until_running
        self.node_id = node_id
        self.gateway_domain = gateway_domain
        self.fail_deploys_with = fail_deploys_with
        self.calls: list[RpcCall] = []
        self.vms: dict[str, FakeVm] = {}
        self.gateways: dict[str, dict[str, Any]] = {}
        self.raw_bodies: list[bytes] = []
        self._injected: dict[str, RpcError] = {}
        self._hung: set[str] = set()
        self._released = asyncio.Event()
        self._sids = itertools.count(1)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/", self._handle), web.post("/rpc", self._handle)]

    async def __aexit__(self, *exc_info: object) -> None:
        self._released.set()  # hung calls end, so the server can stop at once
        await super().__aexit__(*exc_info)

    @asynccontextmanager
    async def unix_socket(self, path: str) -> AsyncIterator[str]:
        """Serves the same VMs on a Unix socket at `path` too, while inside the block."""
        runner = web.AppRunner(self.build_app(), access_log=None)
        await runner.setup()
        await web.UnixSite(runner, path).start()
        try:
            yield path
        finally:
            await runner.cleanup()

    # Test controls -------------------------------------------------------------------------------

    def fail_next(self, method: str, code: int, message: str) -> None:
        """The next call of `method` answers this JSON-RPC error."""
        self._injected[method] = RpcError(code, message)

    def hang(self, method: str) -> None:
        """Calls of `method` never get an answer."""
        self._hung.add(method)

    def params_of(self, method: str) -> list[dict[str, Any]]:
        return [c.params for c in self.calls if c.method == method]

    @property
    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    def vm_named(self, name: str) -> FakeVm | None:
        return next(
            (vm for vm in self.vms.values() if vm.name == name and vm.status != "deleted"), None
        )

    # JSON-RPC --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.raw_bodies.append(body)
        try:
            message = json.loads(body)
        except json.JSONDecodeError:
            return _error(None, RpcError(PARSE_ERROR, "parse error"))
        if not isinstance(message, dict):
            return _error(None, RpcError(INVALID_REQUEST, "invalid request"))
        rid = message.get("id")
        method = message.get("method")
        params = message.get("params", {})
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str) or rid is None:
            return _error(rid, RpcError(INVALID_REQUEST, "invalid request"))
        if not isinstance(params, dict):
            return _error(rid, RpcError(INVALID_PARAMS, "params must be an object"))
        self.calls.append(RpcCall(method, params))
        if method in self._hung:
            await self._released.wait()
            return _error(rid, RpcError(-32000, "server shutting down"))
        if method == "rpc.discover" and self.discovery is not None:
            return web.json_response({"jsonrpc": "2.0", "id": rid, "result": self.discovery})
        handler = getattr(self, f"_rpc_{method}", None)
        if handler is None or method not in METHODS:
            return _error(rid, RpcError(METHOD_NOT_FOUND, f"method not found: {method}"))
        try:
            if method in self._injected:
                raise self._injected.pop(method)
            _check(params, *METHODS[method])
            result = handler(params)
        except RpcError as e:
            return _error(rid, e)
        return web.json_response({"jsonrpc": "2.0", "id": rid, "result": result})

    def _rpc_deploy_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        name, secret = params["name"], params["secret"]
        if any(vm.name == name and vm.status != "deleted" for vm in self.vms.values()):
            raise RpcError(CONFLICT, f"a vm named {name} already exists")
        sid = f"vm_{next(self._sids):04d}"
        vm = FakeVm(
            sid=sid,
            name=name,
            secret=secret,
            spec={k: v for k, v in params.items() if k != "secret"},
            node_id=int(params.get("node_id") or self.node_id),
            polls_left=self.polls_until_running,
        )
        self.vms[sid] = vm
        return vm.as_json()

    def _rpc_get_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._owned(params)
        if vm.status == "deploying":
            vm.polls_left -= 1
            if vm.polls_left <= 0:
                if self.fail_deploys_with:
                    vm.status, vm.error = "failed", self.fail_deploys_with
                else:
                    vm.status, vm.mycelium_ip = "running", _mycelium_ip(vm.sid)
        return vm.as_json()

    def _rpc_list_vms(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "vms": [
                vm.as_json()
                for vm in self.vms.values()
                if vm.secret == params["secret"] and vm.status != "deleted"
            ]
        }

    def _rpc_start_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._transition(params, {"stopped": "running", "running": "running"})

    def _rpc_stop_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._transition(params, {"running": "stopped", "stopped": "stopped"})

    def _rpc_restart_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._transition(params, {"running": "running"})

    def _rpc_delete_vm(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._owned(params)
        if vm.status == "deleted":
            raise RpcError(NOT_FOUND, "vm not found")
        vm.status = "deleted"
        return vm.as_json()

    def _rpc_inject_ssh_keys(self, params: dict[str, Any]) -> dict[str, Any]:
        vm = self._owned({"sid": params["sid"], "secret": params["secret"]})
        keys = params["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise RpcError(INVALID_PARAMS, "keys must be a list of strings")
        vm.ssh_keys.extend(k for k in keys if k not in vm.ssh_keys)
        return {"sid": vm.sid, "keys": len(vm.ssh_keys)}

    def _rpc_deploy_webgateway(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params["name"]
        existing = self.gateways.get(name)
        if existing is not None:
            if existing["secret"] != params["secret"]:
                raise RpcError(CONFLICT, f"gateway name {name} is taken")
            return _public(existing)
        fqdn = f"{name}.{self.gateway_domain}"
        self.gateways[name] = {**params, "fqdn": fqdn, "url": f"https://{fqdn}"}
        return _public(self.gateways[name])

    def _rpc_delete_webgateway(self, params: dict[str, Any]) -> dict[str, Any]:
        gateway = self.gateways.get(params["name"])
        if gateway is None or gateway["secret"] != params["secret"]:
            raise RpcError(NOT_FOUND, "gateway not found")
        del self.gateways[params["name"]]
        return {"name": params["name"], "deleted": True}

    def _owned(self, params: dict[str, Any]) -> FakeVm:
        vm = self.vms.get(params["sid"])
        if vm is None or vm.secret != params["secret"]:
            raise RpcError(NOT_FOUND, "vm not found")
        return vm

    def _transition(self, params: dict[str, Any], allowed: dict[str, str]) -> dict[str, Any]:
        vm = self._owned(params)
        if vm.status not in allowed:
            raise RpcError(INVALID_STATE, f"cannot do that to a {vm.status} vm")
        vm.status = allowed[vm.status]
        return vm.as_json()


def _check(params: dict[str, Any], required: frozenset[str], optional: frozenset[str]) -> None:
    """The params of a call against the method's table entry: none missing, none unknown."""
    missing = required - params.keys()
    unknown = params.keys() - required - optional
    if missing or unknown:
        raise RpcError(
            INVALID_PARAMS, f"invalid params: missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    if not isinstance(params.get("secret", ""), str):
        raise RpcError(INVALID_PARAMS, "secret must be a string")


def _public(gateway: dict[str, Any]) -> dict[str, Any]:
    return {k: gateway[k] for k in ("name", "node_id", "backend_url", "fqdn", "url")}


def _mycelium_ip(sid: str) -> str:
    digest = hashlib.sha256(sid.encode()).hexdigest()
    groups = [digest[i : i + 4] for i in range(0, 28, 4)]
    return "4" + groups[0][1:] + ":" + ":".join(groups[1:])


def _error(rid: Any, error: RpcError) -> web.Response:
    return web.json_response(
        {"jsonrpc": "2.0", "id": rid, "error": {"code": error.code, "message": error.message}}
    )
