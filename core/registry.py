"""Every operation of the wire contract, declared once: its name, body, result and nature.

The server's dispatch, the SDK, the CLI, the AsyncAPI document and the dashboard derive from
`OPERATIONS`. The name is the row's, not a Struct tag: a tagged Struct would accept (and the SDK
would send) a `type` field the contract does not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import msgspec

from core import contract as c


@dataclass(frozen=True, slots=True)
class Op:
    """One operation of the contract: its name, body, result, one-line summary and nature.

    `mutates`: it changes state and takes an Idempotency-Key. `retried`: the SDK sends it again
    after a timeout. `authenticated`: it needs the bearer token unless the service exempts it.
    `description` is the longer text of the AsyncAPI document.
    """

    name: str
    request: type[msgspec.Struct]
    result: type[msgspec.Struct]
    summary: str
    mutates: bool = False
    retried: bool = True
    authenticated: bool = True
    description: str = ""


class Registry:
    """The operations, each found by its name or by its request type (one type per operation)."""

    def __init__(self, *ops: Op) -> None:
        self._by_name = {op.name: op for op in ops}
        self._by_request = {op.request: op for op in ops}
        if not len(self._by_name) == len(self._by_request) == len(ops):
            raise ValueError("every operation needs its own name and its own request type")

    def __iter__(self) -> Iterator[Op]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __getitem__(self, name: str) -> Op:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def of(self, request: msgspec.Struct) -> Op:
        """The operation whose body `request` is."""
        return self._by_request[type(request)]

    def row(self, request: type[msgspec.Struct]) -> Op:
        """The operation whose request type is `request`."""
        return self._by_request[request]

    @property
    def mutating(self) -> frozenset[str]:
        return frozenset(op.name for op in self if op.mutates)

    @property
    def unauthenticated(self) -> frozenset[str]:
        """The operations a service exempts from the bearer token unless told otherwise."""
        return frozenset(op.name for op in self if not op.authenticated)


OPERATIONS: Final = Registry(
    Op(
        "deploy_vm",
        c.DeployVm,
        c.VmOut,
        "Deploy a VM owned by `secret`.",
        mutates=True,
        description=(
            "Answered once the request is recorded, with the VM `deploying`; the outcome follows "
            "as `VmDeployed` (status `running`) or `VmDeployFailed` (status `failed`)."
        ),
    ),
    Op(
        "list_vms",
        c.ListVms,
        c.VmList,
        "The VMs of `secret`, deleted ones left out.",
        description="Exactly the VMs whose secret equals `secret`, deleted ones left out.",
    ),
    Op(
        "get_vm",
        c.GetVm,
        c.VmOut,
        "One VM, if `secret` owns it (also deleted).",
        description=(
            "A deleted VM is still returned, with status `deleted`. A VM that does not exist and "
            "a secret that does not match are the same NotFound."
        ),
    ),
    Op(
        "start_vm",
        c.StartVm,
        c.VmOut,
        "Start a stopped VM.",
        mutates=True,
        description="`stopped` → `running`; InvalidState otherwise (after the secret matched).",
    ),
    Op(
        "stop_vm",
        c.StopVm,
        c.VmOut,
        "Stop a running VM.",
        mutates=True,
        description="`running` → `stopped`; InvalidState otherwise (after the secret matched).",
    ),
    Op(
        "restart_vm",
        c.RestartVm,
        c.VmOut,
        "Restart a running VM.",
        mutates=True,
        description="`running` → `running`; InvalidState otherwise (after the secret matched).",
    ),
    Op(
        "delete_vm",
        c.DeleteVm,
        c.VmOut,
        "Delete a VM (any status but deleted).",
        mutates=True,
        description=(
            "Any status but `deleted` → `deleting`, then `VmDeleted` → `deleted`. Repeating it on "
            "a `deleting` VM records nothing."
        ),
    ),
    Op(
        "migrate_secret",
        c.MigrateSecret,
        c.MigrateResult,
        "Re-key every live VM of `old_secret` to `new_secret`, in one transaction.",
        mutates=True,
        description=(
            "Empty `new_secret` or `old_secret == new_secret` is InvalidInput; no live VM with "
            "`old_secret` is NotFound; otherwise every matching VM is re-keyed in one transaction."
        ),
    ),
    Op(
        "provision_user",
        c.ProvisionUser,
        c.UserOut,
        "Provision (or resume) a user.",
        mutates=True,
        description=(
            "On a `failed` user it resumes from the failed step; on one already `provisioning` it "
            "returns the User and records nothing; on a `ready` one it is InvalidState; a "
            "`decommissioned` one is provisioned anew."
        ),
    ),
    Op(
        "decommission_user",
        c.DecommissionUser,
        c.UserOut,
        "Decommission a user.",
        mutates=True,
        description="Works from `failed` too, and tolerates parts already gone.",
    ),
    Op("get_user", c.GetUser, c.UserOut, "One user."),
    # It changes state, but carries no Idempotency-Key and is never retried: a replayable reply
    # would mean storing the password, and a repeat is NotFound by design.
    Op(
        "reveal_initial_password",
        c.RevealInitialPassword,
        c.InitialPassword,
        "The initial Forge password of a user this service created, once.",
        retried=False,
        description=(
            "Once, for a Forge account this service created; stored only encrypted until then and "
            "destroyed after. A second call is NotFound."
        ),
    ),
    Op("list_users", c.ListUsers, c.UserList, "Every user."),
    Op(
        "events",
        c.EventsRequest,
        c.EventsPage,
        "Recorded events after a global position, in position order.",
        description=(
            "Events with position > `after`, in position order; `last` is the position of the last "
            "one returned (`after` when none), so the next page starts there. Only events the "
            "views already reflect are returned."
        ),
    ),
    Op(
        "audit_events",
        c.AuditEventsRequest,
        c.AuditPage,
        "Like `events`, with the request id and the actor (Hero-Actor) that recorded each.",
    ),
    Op(
        "health",
        c.Empty,
        c.Health,
        "Liveness, version and last position.",
        authenticated=False,
        description="Exempt from the bearer token by default.",
    ),
)
