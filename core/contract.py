"""The wire contract: every request and result type the service speaks, in one place."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Final, Literal

import msgspec

from core.events import EventOut
from core.ports import DEFAULT_VM
from core.structs import Frozen
from core.usernames import Username, UserRefName, check_username

# VMs ----------------------------------------------------------------------------------------

# Patterns match the whole value: msgspec uses `re.search`, and `$` also matches before a final
# newline, so every pattern ends with `\Z` (the AsyncAPI document turns it into ECMA-262 `$`).
NAME_PATTERN = r"^[A-Za-z0-9._-]+\Z"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
Secret = Annotated[str, msgspec.Meta(max_length=256)]
Sid = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Image = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
CpuCount = Annotated[int, msgspec.Meta(ge=1, le=64)]
MemoryGb = Annotated[int, msgspec.Meta(ge=1, le=1024)]
DiskGb = Annotated[int, msgspec.Meta(ge=1, le=10240)]
RootfsGb = Annotated[int, msgspec.Meta(ge=1, le=1024)]
NodeId = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
SliceSid = Annotated[str, msgspec.Meta(max_length=64)]

VmStatus = Literal["deploying", "running", "failed", "stopped", "deleting", "deleted"]


class Request(Frozen, forbid_unknown_fields=True):
    """Base of every request body: unknown fields are rejected."""


# Commands a tenant sends --------------------------------------------------------------------


class DeployVm(Request):
    name: Name
    secret: Secret
    image: Image = DEFAULT_VM.image
    cpu_count: CpuCount = DEFAULT_VM.cpu_count
    memory_gb: MemoryGb = DEFAULT_VM.memory_gb
    disk_gb: DiskGb = DEFAULT_VM.disk_gb
    rootfs_gb: RootfsGb = DEFAULT_VM.rootfs_gb
    slice_sid: SliceSid = ""
    node_id: NodeId | None = None


class VmRef(Request):
    """A request that names one VM and proves ownership with its secret."""

    sid: Sid
    secret: Secret


class GetVm(VmRef):
    pass


class StartVm(VmRef):
    pass


class StopVm(VmRef):
    pass


class RestartVm(VmRef):
    pass


class DeleteVm(VmRef):
    pass


class ListVms(Request):
    secret: Secret


class MigrateSecret(Request):
    old_secret: Secret
    new_secret: Secret


# VM results ---------------------------------------------------------------------------------


class VmFields(Frozen):
    """What the contract shows of a VM: `VmOut` sends it, `core.vm.Vm` adds the owner."""

    sid: str
    name: str
    slice_sid: str
    image: str
    cpu_count: int
    memory_gb: int
    disk_gb: int
    rootfs_gb: int
    status: VmStatus
    node_id: int | None
    mycelium_ip: str
    error: str
    created_at: datetime
    updated_at: datetime


class VmOut(VmFields):
    """The contract's Vm resource: everything but the owner."""


class VmList(Frozen):
    vms: list[VmOut]


class MigrateResult(Frozen):
    migrated_count: int
    failed_count: int = 0


# Users --------------------------------------------------------------------------------------

PROFILE_PATTERN = r"^[a-z0-9][a-z0-9_-]*\Z"
# empty, or one `@` between two runs without spaces or control characters (C0, DEL, C1)
EMAIL_PATTERN = r"^(?:[^@\s\x00-\x1f\x7f-\x9f]+@[^@\s\x00-\x1f\x7f-\x9f]+)?\Z"

DisplayName = Annotated[str, msgspec.Meta(max_length=128)]
ForgeEmail = Annotated[str, msgspec.Meta(max_length=254, pattern=EMAIL_PATTERN)]
Profile = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=PROFILE_PATTERN)]

UserStatus = Literal["provisioning", "ready", "failed", "decommissioning", "decommissioned"]


class Step(StrEnum):
    """A provisioning step, in order; its value is the name events and replies carry."""

    FORGE_USER = "forge_user"
    SSH_KEY = "ssh_key"
    SELECT_NODE = "select_node"
    DEPLOY_VM = "deploy_vm"
    DEPLOY_GATEWAY = "deploy_gateway"
    WAIT_SSH = "wait_ssh"
    UPLOAD_MANIFEST = "upload_manifest"
    RUN_SETUP = "run_setup"
    VERIFY_HEALTH = "verify_health"
    DONE = "done"


STEPS: Final[tuple[Step, ...]] = tuple(Step)


class DecommissionPart(StrEnum):
    """A part of a decommission, in order; its value is the name events carry."""

    DELETE_GATEWAY = "delete_gateway"
    DELETE_VM = "delete_vm"
    FINISH = "finish"


DEFAULT_PROFILE: Final = "demo"


# Commands an operator sends -----------------------------------------------------------------


class ProvisionUser(Request):
    username: Username
    display_name: DisplayName = ""
    forge_email: ForgeEmail = ""
    profile: Profile = DEFAULT_PROFILE

    def __post_init__(self) -> None:
        # Decoding checked the shape; Forgejo's reserved names need code, and so does a request
        # built in Python (the SDK, the dashboard), which msgspec does not validate.
        check_username(self.username)


class UserRef(Request):
    """A request that names one user (also one recorded before Forgejo's rule was enforced)."""

    username: UserRefName


class DecommissionUser(UserRef):
    pass


class GetUser(UserRef):
    pass


class RevealInitialPassword(UserRef):
    pass


class ListUsers(Request):
    pass


# User results -------------------------------------------------------------------------------


class UserOut(Frozen):
    """The contract's User resource."""

    username: str
    display_name: str
    forge_email: str
    status: UserStatus
    step: Step
    vm_sid: str
    node_id: int | None
    gateway_url: str
    ssh_public_key: str
    forge_user_created: bool
    error: str
    created_at: datetime
    updated_at: datetime


class UserList(Frozen):
    users: list[UserOut]


class InitialPassword(Frozen):
    """The revealed initial password of a user: the only place the password ever appears."""

    username: str
    initial_password: str


# The log and the service -------------------------------------------------------------------


class Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The body of an operation that takes no fields."""


class Part(msgspec.Struct, frozen=True):
    """One part of the setup as the service found it at start: configured or missing."""

    name: str
    state: Literal["ok", "missing"]
    message: str


STREAM_PATTERN = r"^(vm|user):[A-Za-z0-9._-]{1,64}\Z"

StreamName = Annotated[str, msgspec.Meta(pattern=STREAM_PATTERN, max_length=70)]


class EventsRequest(Frozen, forbid_unknown_fields=True):
    stream: StreamName | None = None
    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class EventsPage(msgspec.Struct, frozen=True):
    events: list[EventOut]
    last: int


class AuditEvent(EventOut):
    """An event with the request that recorded it: its id and its sender's `Hero-Actor` label.

    `actor` is empty for what the service records itself (a side effect's outcome).
    """

    request_id: str
    actor: str


class AuditPage(msgspec.Struct, frozen=True):
    events: list[AuditEvent]
    last: int


class Health(msgspec.Struct, frozen=True):
    """Liveness, version, last position, and the events the status stream had to set aside.

    `events_set_aside` counts the events no retry could publish since this process started (a
    subject NATS refuses, a payload over its max_payload); `last_set_aside_position` is the last
    one's position, null when none. The log keeps them: `events` returns them. `head_hash` is
    the hash chain's head, the hash of the event at `position` (hex; see docs/api.md). `parts`
    says which parts of the setup (backend, Forge, grid proxy) the service found at start.
    """

    status: str
    version: str
    position: int
    events_set_aside: int = 0
    last_set_aside_position: int | None = None
    head_hash: str = ""
    parts: list[Part] = msgspec.field(default_factory=list)


class AuditEventsRequest(EventsRequest):
    """The body of an audit log page: the fields of `EventsRequest`."""


# Headers a request carries ------------------------------------------------------------------

AUTHORIZATION_HEADER: Final = "Authorization"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
ACTOR_HEADER: Final = "Hero-Actor"

# The NATS micro service and the headers of its error replies -------------------------------

SERVICE_NAME: Final = "hero-deployer"
QUEUE_GROUP: Final = "hero-deployer"
ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
ERROR_HEADER: Final = "Nats-Service-Error"
DEFAULT_PREFIX: Final = "hero.v1"
