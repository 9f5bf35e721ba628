"""Ports: what the core needs from the outside world, as Protocols. Adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal, Protocol

import msgspec

from core.events import IdempotencyRecord, RecordedEvent, StreamAppend

# Event store --------------------------------------------------------------------------------


class EventStore(Protocol):
    """An append-only log of events with per-stream optimistic concurrency."""

    async def append(
        self,
        appends: Sequence[StreamAppend],
        *,
        idempotency: IdempotencyRecord | None = None,
        request_id: str = "",
        actor: str = "",
    ) -> list[RecordedEvent]:
        """Records all appends in one transaction, or raises ConcurrencyError and records nothing.

        `request_id` and `actor` (who sent the command) are kept with each event for the audit.

        Returns once the events are durable. Raises Conflict if the idempotency key is taken.
        """
        ...

    async def read_stream(self, stream: str) -> list[RecordedEvent]:
        """All events of one stream, in version order."""
        ...

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]:
        """Events with position > `after`, in position order, optionally of one stream."""
        ...

    async def last_position(self) -> int: ...

    def known_version(self, stream: str) -> int | None:
        """The stream's latest version as far as this store knows without reading; None if not."""
        ...

    async def idempotent_reply(self, key: str) -> IdempotencyRecord | None:
        """The stored first reply of a keyed request, if any."""
        ...


# Compute backend ----------------------------------------------------------------------------


class BackendError(Exception):
    """A backend operation failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class BackendUnavailable(BackendError):
    """The backend could not be reached; always retryable."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)


class BackendNotFound(BackendError):
    """The backend has no such VM or gateway."""


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A grid node and its free capacity."""

    node_id: int
    free_memory_gb: float
    free_disk_gb: float
    free_cpu: int = 0
    gateway_domain: str = ""
    up: bool = True


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to deploy. `name` is deterministic, so deploying the same name again is idempotent."""

    name: str
    image: str = "ubuntu-24.04"
    cpu_count: int = 16
    memory_gb: int = 8
    disk_gb: int = 200
    rootfs_gb: int = 16
    node_id: int | None = None
    ssh_keys: tuple[str, ...] = ()
    mycelium: bool = True
    public_ip: bool = False


DEFAULT_VM: Final = VmSpec(name="")
"""The VM's defaults, said once: a tenant's VM request without sizes and every user's VM."""


BackendVmStatus = Literal["deploying", "running", "stopped", "failed"]


class BackendVm(msgspec.Struct, frozen=True, kw_only=True):
    """A VM as the backend sees it, with where to reach its SSH server."""

    name: str
    node_id: int
    mycelium_ip: str
    status: BackendVmStatus
    ssh_host: str = ""
    ssh_port: int = 22


class GatewaySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A web gateway `<name>.<node domain>` forwarding to `backend_url`.

    `vm_name` names the VM behind it, so a backend may reach that VM another way (its private
    network) on the URL's port; empty, the URL is taken as it is.
    """

    name: str
    node_id: int
    backend_url: str
    vm_name: str = ""


class BackendGateway(msgspec.Struct, frozen=True, kw_only=True):
    """A deployed gateway; `url` answers HTTP(S) for the VM's web service."""

    name: str
    fqdn: str
    url: str


class ComputeBackend(Protocol):
    """VMs and web gateways on some grid. Every call is idempotent by name."""

    async def list_nodes(self) -> list[NodeInfo]: ...

    async def create_vm(self, spec: VmSpec) -> BackendVm:
        """Deploys (or finds) the VM named `spec.name`; returns once it runs, else raises."""
        ...

    async def find_vm(self, name: str) -> BackendVm | None: ...

    async def boot_vm(self, name: str) -> None: ...

    async def shutdown_vm(self, name: str) -> None: ...

    async def reboot_vm(self, name: str) -> None: ...

    async def destroy_vm(self, name: str) -> None:
        """Deletes the VM; one already gone counts as deleted."""
        ...

    async def deploy_gateway(self, spec: GatewaySpec) -> BackendGateway: ...

    async def delete_gateway(self, name: str) -> None:
        """Deletes the gateway; one already gone counts as deleted."""
        ...


# Provisioning: Forge, node directory, SSH, health, sealed secrets ---------------------------


class ExternalError(Exception):
    """An outside service refused or failed; `message` is its own words, safe to record."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class ForgeUser(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    login: str
    email: str = ""


class Forge(Protocol):
    """A Forgejo server, reached with admin credentials."""

    async def find_user(self, username: str) -> ForgeUser | None: ...

    async def create_user(
        self, username: str, *, email: str, password: str, full_name: str = ""
    ) -> ForgeUser:
        """Creates the account (no password change forced); ExternalError with Forge's message."""
        ...

    async def create_token(
        self, username: str, *, password: str, token_name: str, scopes: Sequence[str]
    ) -> str:
        """Creates a scoped access token for the user, authenticating as the user."""
        ...


class NodeDirectory(Protocol):
    """The grid proxy: which nodes are up, healthy and gateway-capable, and their headroom."""

    async def candidate_nodes(self, node_ids: Sequence[int]) -> list[NodeInfo]: ...


class NameHolder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds a gateway name on the chain: the name contract and its twin."""

    contract_id: int
    twin_id: int


class GatewayNameRegistry(Protocol):
    """The grid's registry of gateway names (name contracts), shared by every deployer."""

    async def name_holder(self, name: str) -> NameHolder | None:
        """The live name contract holding `name`, or None while it is free."""
        ...


class SshTarget(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int = 22
    username: str = "root"
    private_key: str  # OpenSSH PEM; never logged, never in an event


class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    exit_status: int
    output_tail: str


class RemoteShell(Protocol):
    """SSH into a VM with the user's key."""

    async def wait_ready(self, target: SshTarget, *, timeout: float) -> None:
        """Returns once the VM accepts the key; ExternalError(retryable=True) on timeout."""
        ...

    async def upload(
        self, target: SshTarget, path: str, content: bytes, *, owner: str = ""
    ) -> None:
        """Writes `content` to `path` over SFTP, creating parent folders; with `owner`, from
        that account's home and owned by it (a login as root writing for another user)."""
        ...

    async def run(self, target: SshTarget, command: str, *, timeout: float) -> CommandResult: ...


class HealthProbe(Protocol):
    async def status(self, url: str) -> int:
        """The HTTP status of GET `url`; ExternalError(retryable=True) when it cannot connect."""
        ...


class Sealer(Protocol):
    """Authenticated encryption at rest (AES-GCM); `context` binds a ciphertext to its owner."""

    def seal(self, plaintext: bytes, *, context: bytes) -> bytes: ...

    def open(self, sealed: bytes, *, context: bytes) -> bytes: ...


class SecretVault(Protocol):
    """Sealed secrets (private keys, passwords, per-user VM secrets), outside the event log."""

    async def put(self, owner: str, kind: str, plaintext: bytes) -> None: ...

    async def get(self, owner: str, kind: str) -> bytes | None: ...

    async def delete(self, owner: str, kind: str) -> bool:
        """Destroys the secret; True if there was one."""
        ...
