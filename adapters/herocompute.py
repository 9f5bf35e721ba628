"""The hero_compute backend: a JSON-RPC 2.0 client for its ComputeService, over HTTP or a socket."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any, Final

import httpx

from adapters.compute_power import PowerAction, PowerActions
from adapters.httpx_owner import HttpxOwner
from adapters.openrpc import DISCOVER, ClientMethod, interface_mismatches
from core.ports import (
    BackendError,
    BackendGateway,
    BackendNotFound,
    BackendUnavailable,
    BackendVm,
    BackendVmStatus,
    GatewaySpec,
    NodeInfo,
    VmSpec,
)

# JSON-RPC error codes hero_compute uses for "no such VM or gateway" (and a wrong owner secret,
# which it does not tell apart from a missing VM). A message saying "not found" counts too.
NOT_FOUND_CODES: Final = frozenset({404, -32004})
METHOD_NOT_FOUND: Final = -32601

# hero_compute's VM statuses onto ours. Transitional states count as the state they come from,
# "deleting"/"deleted" as gone; anything unknown as still deploying.
STATUS_MAP: Final[dict[str, BackendVmStatus]] = {
    "running": "running",
    "started": "running",
    "restarting": "running",
    "stopping": "running",
    "stopped": "stopped",
    "halted": "stopped",
    "starting": "stopped",
    "failed": "failed",
    "error": "failed",
    "deploying": "deploying",
    "pending": "deploying",
    "creating": "deploying",
    "provisioning": "deploying",
}
GONE_STATUSES: Final = frozenset({"deleting", "deleted"})

DEFAULT_SOCKET_URL: Final = "http://localhost/"

_VM = frozenset({"sid", "secret"})
# Every method this client calls and the named params it sends. hero_compute publishes no source,
# so these names are unverified (docs/backends.md): `backend check` compares them with the OpenRPC
# document the server answers to `rpc.discover`, and `_call` refuses to send anything else.
CLIENT_METHODS: Final = (
    ClientMethod(DISCOVER, optional=True),
    ClientMethod("list_nodes", optional=True),
    ClientMethod("list_vms", frozenset({"secret"})),
    ClientMethod(
        "deploy_vm",
        frozenset(
            {"secret", "name", "image", "cpu_count", "memory_gb", "disk_gb", "rootfs_gb"}
            | {"mycelium", "public_ip"}
        ),
        sometimes=frozenset({"node_id"}),
    ),
    ClientMethod("get_vm", _VM),
    ClientMethod("start_vm", _VM),
    ClientMethod("stop_vm", _VM),
    ClientMethod("restart_vm", _VM),
    ClientMethod("delete_vm", _VM),
    ClientMethod("inject_ssh_keys", _VM | {"keys"}),
    ClientMethod("deploy_webgateway", frozenset({"secret", "name", "node_id", "backend_url"})),
    ClientMethod("delete_webgateway", frozenset({"secret", "name"})),
)
_SENDS: Final = {m.name: m.params for m in CLIENT_METHODS}
_POWER_METHODS: Final[dict[PowerAction, str]] = {
    "start": "start_vm",
    "stop": "stop_vm",
    "restart": "restart_vm",
}
NO_DISCOVERY: Final = (
    "hero_compute offers no OpenRPC discovery (`rpc.discover`), so the methods and params this "
    "client uses cannot be verified against it"
)


class HeroComputeBackend(HttpxOwner, PowerActions):
    """A ComputeBackend on hero_compute, owning its VMs with the deployer's own owner secret."""

    def __init__(
        self,
        *,
        url: str | None = None,
        socket_path: str | None = None,
        owner_secret: str,
        timeout: float = 30.0,
        poll_interval: float = 2.0,
        deploy_timeout: float = 900.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url and not socket_path and transport is None:
            raise BackendError("hero_compute needs a url or a socket path")
        if socket_path and transport is None:
            transport = httpx.AsyncHTTPTransport(uds=socket_path)
        self._url = url or DEFAULT_SOCKET_URL
        self._socket_path = socket_path
        self._secret = owner_secret
        self._poll_interval = poll_interval
        self._deploy_timeout = deploy_timeout
        self._ids = itertools.count(1)
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout)

    @property
    def endpoint(self) -> str:
        """Where requests go, for messages: the socket path, else the URL."""
        return f"unix:{self._socket_path}" if self._socket_path else self._url

    # ComputeBackend ---------------------------------------------------------------------------

    async def list_nodes(self) -> list[NodeInfo]:
        """Nodes hero_compute offers, or none when it does not expose a node list."""
        try:
            result = await self._call("list_nodes", {})
        except _MethodNotFound:
            return []
        nodes = result.get("nodes", []) if isinstance(result, dict) else result
        return [_node(n) for n in nodes if isinstance(n, dict)]

    async def create_vm(self, spec: VmSpec) -> BackendVm:
        """Deploys the VM unless one of that name exists, then waits until it has an address."""
        record = await self._find(spec.name)
        if record is None:
            params: dict[str, Any] = {
                "name": spec.name,
                "image": spec.image,
                "cpu_count": spec.cpu_count,
                "memory_gb": spec.memory_gb,
                "disk_gb": spec.disk_gb,
                "rootfs_gb": spec.rootfs_gb,
                "mycelium": spec.mycelium,
                "public_ip": spec.public_ip,
            }
            if spec.node_id is not None:
                params["node_id"] = spec.node_id
            record = _object(await self._call("deploy_vm", {"secret": self._secret, **params}))
        vm = await self._wait_running(_sid(record), spec.name)
        if spec.ssh_keys:
            await self._call(
                "inject_ssh_keys",
                {"sid": _sid(record), "secret": self._secret, "keys": list(spec.ssh_keys)},
            )
        return vm

    async def find_vm(self, name: str) -> BackendVm | None:
        record = await self._find(name)
        return None if record is None else _vm(record)

    async def _power(self, action: PowerAction, name: str) -> None:
        """Calls start_vm, stop_vm or restart_vm on the VM named `name`."""
        await self._act(_POWER_METHODS[action], name)

    async def destroy_vm(self, name: str) -> None:
        """Deletes the VM; one already gone (or deleted meanwhile) counts as deleted."""
        try:
            await self._act("delete_vm", name)
        except BackendNotFound:
            return

    async def deploy_gateway(self, spec: GatewaySpec) -> BackendGateway:
        """Deploys the web gateway; hero_compute answers an existing one of that name as is."""
        result = _object(
            await self._call(
                "deploy_webgateway",
                {
                    "secret": self._secret,
                    "name": spec.name,
                    "node_id": spec.node_id,
                    "backend_url": spec.backend_url,
                },
            )
        )
        fqdn = str(result.get("fqdn") or "")
        if not fqdn:
            raise BackendError("hero_compute returned a gateway without an fqdn", retryable=True)
        url = str(result.get("url") or f"https://{fqdn}")
        return BackendGateway(name=str(result.get("name") or spec.name), fqdn=fqdn, url=url)

    async def delete_gateway(self, name: str) -> None:
        try:
            await self._call("delete_webgateway", {"secret": self._secret, "name": name})
        except BackendNotFound:
            return

    # Operator checks ----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """What keeps this backend from working, in the operator's words; empty when usable."""
        return (await self.check_report())[0]

    async def check_report(self) -> tuple[list[str], list[str]]:
        """The problems `check` names, and notes that are no failure (an unverifiable interface)."""
        problems = await self._reach_problems()
        if problems:
            return problems, []
        try:
            document = await self._call(DISCOVER, {})
        except _MethodNotFound:
            return [], [NO_DISCOVERY]
        except BackendError as e:
            return [], [f"{NO_DISCOVERY}: {DISCOVER} failed: {e.message}"]
        found = interface_mismatches(document, CLIENT_METHODS)
        return [f"hero_compute's OpenRPC document: {m}" for m in found], []

    async def _reach_problems(self) -> list[str]:
        """An empty secret, a missing socket, or hero_compute not answering `list_vms`."""
        problems: list[str] = []
        if not self._secret:
            problems.append(
                "no owner secret is configured for hero_compute (the VMs would be public)"
            )
        if self._socket_path and not _exists(self._socket_path):
            problems.append(f"hero_compute socket {self._socket_path} does not exist")
            return problems
        try:
            await self._call("list_vms", {"secret": self._secret})
        except BackendUnavailable as e:
            problems.append(f"hero_compute at {self.endpoint} is not reachable: {e.message}")
        except BackendError as e:
            problems.append(f"hero_compute at {self.endpoint} refused list_vms: {e.message}")
        return problems

    # Internals ---------------------------------------------------------------------------------

    async def _find(self, name: str) -> dict[str, Any] | None:
        """The live VM record named `name` among the owner's VMs, if any."""
        result = await self._call("list_vms", {"secret": self._secret})
        vms = result.get("vms", []) if isinstance(result, dict) else result
        if not isinstance(vms, list):
            raise BackendError("hero_compute returned a malformed list_vms result")
        for record in vms:
            if (
                isinstance(record, dict)
                and record.get("name") == name
                and str(record.get("status", "")).lower() not in GONE_STATUSES
            ):
                return record
        return None

    async def _act(self, method: str, name: str) -> None:
        record = await self._find(name)
        if record is None:
            raise BackendNotFound(f"no vm named {name}")
        await self._call(method, {"sid": _sid(record), "secret": self._secret})

    async def _wait_running(self, sid: str, name: str) -> BackendVm:
        """Polls get_vm until the VM runs with a mycelium address, within the deploy deadline."""
        try:
            async with asyncio.timeout(self._deploy_timeout):
                while True:
                    record = _object(
                        await self._call("get_vm", {"sid": sid, "secret": self._secret})
                    )
                    vm = _vm(record)
                    if vm.status == "failed":
                        reason = str(record.get("error") or "no reason given")
                        raise BackendError(f"vm {name} failed to deploy: {self._redact(reason)}")
                    if vm.status == "running" and vm.mycelium_ip:
                        return vm
                    await asyncio.sleep(self._poll_interval)
        except TimeoutError:
            raise BackendError(
                f"vm {name} got no mycelium address within {self._deploy_timeout:g}s",
                retryable=True,
            ) from None

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        """One JSON-RPC call; maps every failure onto BackendError and its subclasses."""
        sends = _SENDS.get(method)
        if sends is None or not params.keys() <= sends:
            raise BackendError(f"hero_compute client bug: {method} does not match CLIENT_METHODS")
        request = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        try:
            response = await self._client.post(self._url, json=request)
        except httpx.TimeoutException:
            raise BackendUnavailable(f"hero_compute {method} timed out") from None
        except httpx.TransportError as e:
            raise BackendUnavailable(
                f"hero_compute {method}: {type(e).__name__}: {self._redact(str(e))}"
            ) from None
        if response.status_code >= 500:
            raise BackendUnavailable(f"hero_compute {method}: HTTP {response.status_code}")
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BackendError(
                f"hero_compute {method}: HTTP {response.status_code} without a JSON-RPC body"
            ) from None
        if not isinstance(body, dict):
            raise BackendError(f"hero_compute {method}: malformed JSON-RPC response")
        error = body.get("error")
        if error is not None:
            raise self._rpc_error(method, error)
        if response.status_code >= 400 or "result" not in body:
            raise BackendError(
                f"hero_compute {method}: HTTP {response.status_code}, no JSON-RPC result"
            )
        return body["result"]

    def _rpc_error(self, method: str, error: Any) -> BackendError:
        """The BackendError for a JSON-RPC error: the server's message, the secret redacted."""
        code = error.get("code") if isinstance(error, dict) else None
        raw = error.get("message") if isinstance(error, dict) else error
        message = self._redact(str(raw or "unknown error"))
        if code == METHOD_NOT_FOUND:
            return _MethodNotFound(f"hero_compute has no method {method}")
        if code in NOT_FOUND_CODES or "not found" in message.lower():
            return BackendNotFound(message)
        return BackendError(f"hero_compute {method}: {message}")

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text


class _MethodNotFound(BackendError):
    """hero_compute does not offer the method called."""


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _object(result: Any) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise BackendError("hero_compute returned a malformed result")
    vm = result.get("vm")
    return vm if isinstance(vm, dict) else result


def _sid(record: dict[str, Any]) -> str:
    sid = record.get("sid") or record.get("id")
    if not sid:
        raise BackendError("hero_compute returned a vm without an id")
    return str(sid)


def _vm(record: dict[str, Any]) -> BackendVm:
    status = str(record.get("status", "")).lower()
    mycelium_ip = str(record.get("mycelium_ip") or "")
    return BackendVm(
        name=str(record.get("name", "")),
        node_id=int(record.get("node_id") or 0),
        mycelium_ip=mycelium_ip,
        status=STATUS_MAP.get(status, "deploying"),
        ssh_host=mycelium_ip,
    )


def _node(record: dict[str, Any]) -> NodeInfo:
    return NodeInfo(
        node_id=int(record.get("node_id") or record.get("id") or 0),
        free_memory_gb=float(record.get("free_memory_gb") or 0),
        free_disk_gb=float(record.get("free_disk_gb") or 0),
        free_cpu=int(record.get("free_cpu") or 0),
        gateway_domain=str(record.get("gateway_domain") or ""),
        up=bool(record.get("up", True)),
    )
