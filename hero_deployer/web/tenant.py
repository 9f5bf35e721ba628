"""The tenant side: My VMs, one VM's page, and their JSON API (the secret only in POST bodies)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import msgspec
from aiohttp import web

from core.contract import DeployVm, GetVm, ListVms, MigrateSecret, Sid, VmRef
from core.registry import OPERATIONS
from hero_deployer.sdk.client import DomainError, NotFound, VmOut
from hero_deployer.web.forms import conforms, number_fields
from hero_deployer.web.middleware import CONFIG_KEY, error_json
from hero_deployer.web.render import (
    HTTP_STATUS,
    acting,
    client_key,
    json_response,
    render,
    session_of,
    words,
)

SIZE_LABELS: Final = {
    "cpu_count": "CPUs",
    "memory_gb": "Memory (GB)",
    "disk_gb": "Disk (GB)",
    "rootfs_gb": "Root disk (GB)",
}
SIZES: Final = number_fields(DeployVm, SIZE_LABELS)


class TenantRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str


class VmRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str
    sid: str


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A deploy from the form: the sizes are checked by the service against core's bounds."""

    secret: str
    name: str
    cpu_count: int | None = None
    memory_gb: int | None = None
    disk_gb: int | None = None
    rootfs_gb: int | None = None


class ActionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str
    sid: str
    action: Literal["start", "stop", "restart", "delete"]


# A tenant's action (the operation's name without `_vm`), and the contract's request that
# performs it: every operation that changes one VM named by (sid, secret)
ROWS: Final = {
    op.name.split("_")[0]: op for op in OPERATIONS if issubclass(op.request, VmRef) and op.mutates
}
ACTIONS: Final[dict[str, type[VmRef]]] = {
    action: kind for action, op in ROWS.items() if issubclass(kind := op.request, VmRef)
}
BUTTONS: Final = {
    action: {"label": action.capitalize(), "title": op.summary} for action, op in ROWS.items()
}
"""Each action's button: its label and its tooltip, the row's one-line summary."""


class MigrateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    old_secret: str
    new_secret: str

    @property
    def secret(self) -> str:
        """The secret this request tries: the one it proves ownership with."""
        return self.old_secret


def vm_json(vm: VmOut) -> Any:
    """A VM as the tenant page shows it, with how to reach it once it has an address."""
    body: dict[str, Any] = msgspec.to_builtins(vm)
    live = vm.status not in ("deleting", "deleted") and bool(vm.mycelium_ip)
    body["ssh_command"] = f"ssh root@{vm.mycelium_ip}" if live else ""
    return body


async def tenant_page(request: web.Request) -> web.StreamResponse:
    return render(request, "tenant.html", {"sizes": SIZES, "buttons": BUTTONS})


async def tenant_vm_page(request: web.Request) -> web.StreamResponse:
    """One VM's page; its data comes by POST with the secret from this browser's storage."""
    sid = request.match_info["sid"]
    if not conforms(sid, Sid):
        return render(request, "not_found.html", {"what": "There is no such VM."}, status=404)
    return render(request, "tenant_vm.html", {"sid": sid, "buttons": BUTTONS})


async def _tenant_call(
    request: web.Request,
    kind: type[msgspec.Struct],
    call: Callable[[Any], Awaitable[web.Response]],
    *,
    proves: bool = True,
) -> web.Response:
    """Decodes the body, applies the tenant limiter, maps errors to JSON answers.

    A call that `proves` the secret and succeeds lets it past the address's failure ceiling.
    """
    limiter = request.app[CONFIG_KEY].tenant_limiter
    try:
        body = msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as error:
        return error_json("InvalidInput", str(error), 400)
    except msgspec.DecodeError:
        return error_json("InvalidInput", "the body is not JSON", 400)
    address, secret = client_key(request), str(getattr(body, "secret", ""))
    wait = limiter.retry_after(address, secret)
    if wait > 0:
        return error_json(
            "TooManyRequests",
            f"Too many failed attempts; try again in {wait:.0f} s.",
            429,
            **{"Retry-After": str(max(1, round(wait)))},
        )
    try:
        response = await call(body)
    except NotFound as error:
        limiter.failed(address, secret)
        return error_json(error.code, words(error), 404)
    except DomainError as error:
        return error_json(error.code, words(error), HTTP_STATUS.get(error.code, 500))
    if proves:
        limiter.succeeded(address, secret)
    return response


async def tenant_vms(request: web.Request) -> web.StreamResponse:
    client = acting(request)
    browser, watches = session_of(request).id, request.app[CONFIG_KEY].watches
    limiter, address = request.app[CONFIG_KEY].tenant_limiter, client_key(request)

    async def call(body: TenantRequest) -> web.Response:
        vms = (await client.send(ListVms(secret=body.secret))).vms
        if vms:  # a wrong secret lists nothing: that is a failed guess, counted once per window
            limiter.succeeded(address, body.secret)
        else:
            limiter.found_nothing(address, body.secret)
        watches.show(browser, (vm.sid for vm in vms))
        return json_response({"vms": [vm_json(vm) for vm in vms]})

    return await _tenant_call(request, TenantRequest, call, proves=False)


async def tenant_vm(request: web.Request) -> web.StreamResponse:
    client = acting(request)
    browser, watches = session_of(request).id, request.app[CONFIG_KEY].watches

    async def call(body: VmRequest) -> web.Response:
        vm = await client.send(GetVm(sid=body.sid, secret=body.secret))
        watches.show(browser, [vm.sid])
        return json_response(vm_json(vm))

    return await _tenant_call(request, VmRequest, call)


async def tenant_deploy(request: web.Request) -> web.StreamResponse:
    client = acting(request)
    browser, watches = session_of(request).id, request.app[CONFIG_KEY].watches

    async def call(body: DeployRequest) -> web.Response:
        sizes = {f.name: getattr(body, f.name) for f in SIZES}
        given = {name: value for name, value in sizes.items() if value is not None}
        vm = await client.send(DeployVm(name=body.name, secret=body.secret, **given))
        watches.add(browser, vm.sid)
        return json_response(vm_json(vm))

    return await _tenant_call(request, DeployRequest, call)


async def tenant_action(request: web.Request) -> web.StreamResponse:
    client = acting(request)

    async def call(body: ActionRequest) -> web.Response:
        vm: VmOut = await client.send(ACTIONS[body.action](sid=body.sid, secret=body.secret))
        return json_response(vm_json(vm))

    return await _tenant_call(request, ActionRequest, call)


async def tenant_migrate(request: web.Request) -> web.StreamResponse:
    client = acting(request)

    async def call(body: MigrateRequest) -> web.Response:
        result = await client.send(
            MigrateSecret(old_secret=body.old_secret, new_secret=body.new_secret)
        )
        return json_response(msgspec.to_builtins(result))

    return await _tenant_call(request, MigrateRequest, call, proves=False)
