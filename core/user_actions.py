"""What the provisioning process manager must do next for a user, derived from its state alone.

After a restart `next_action` names exactly the work still to do: every finished step is an event.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TypedDict

from core.contract import DecommissionPart, Step
from core.gateway_names import gateway_name
from core.ports import DEFAULT_VM, NodeInfo
from core.structs import Frozen
from core.user_state import User, backend_url_for, pending_decommission, vm_name_for


class Action(Frozen):
    """Work the process manager must do now for one user."""

    username: str


class StepAction(Action):
    """Run one provisioning step; `tries` failed already, the step began at `started_at`."""

    step: Step
    attempt: int
    tries: int
    started_at: datetime


class EnsureForgeUser(StepAction):
    """Find or create the Forge account, then its access token; seal a new password first."""

    display_name: str
    forge_email: str


class GenerateSshKey(StepAction):
    """Make an ED25519 key pair, seal the private key, record the public one."""


class SelectNode(StepAction):
    """Pick the candidate node with the most headroom that is up and gateway-capable."""


class DeployUserVm(StepAction):
    """Request the VM (`vm_sid` empty: pick a sid, record it with the VM's deploy) or await it."""

    vm_sid: str
    vm_name: str
    node_id: int
    ssh_public_key: str


class DeployGateway(StepAction):
    """Deploy the gateway `name` on the node, forwarding to `backend_url`."""

    name: str
    node_id: int
    gateway_domain: str
    vm_sid: str
    mycelium_ip: str
    backend_url: str


class WaitSsh(StepAction):
    """Poll until the VM accepts SSH with the user's key."""

    ssh_host: str
    ssh_port: int


class UploadManifest(StepAction):
    """Render the profile's services.toml and upload it over SFTP."""

    profile: str
    gateway_url: str
    ssh_host: str
    ssh_port: int


class RunSetup(StepAction):
    """Run the setup script over SSH."""

    ssh_host: str
    ssh_port: int


class VerifyHealth(StepAction):
    """GET `<gateway_url>/health` until it answers 200."""

    gateway_url: str


class DecommissionAction(Action):
    """One part of taking the user down; `failures` counts failed decommission actions so far."""

    part: DecommissionPart
    failures: int


class DeleteGateway(DecommissionAction):
    """Delete the gateway `name`; one already gone counts as deleted."""

    name: str


class DeleteUserVm(DecommissionAction):
    """Delete the VM `vm_sid` through the VM commands; one already gone counts as deleted."""

    vm_sid: str


class FinishDecommission(DecommissionAction):
    """Destroy the user's sealed key and VM secret, then record RecordDecommissioned."""


ProvisioningAction = (
    EnsureForgeUser
    | GenerateSshKey
    | SelectNode
    | DeployUserVm
    | DeployGateway
    | WaitSsh
    | UploadManifest
    | RunSetup
    | VerifyHealth
)
DecommissioningAction = DeleteGateway | DeleteUserVm | FinishDecommission
UserAction = ProvisioningAction | DecommissioningAction


def next_action(user: User | None) -> UserAction | None:
    """What the process manager must do now, or None when nothing is pending."""
    if user is None:
        return None
    match user.status:
        case "provisioning":
            return _step_action(user)
        case "decommissioning":
            return _decommission_action(user)
        case _:
            return None


class _StepFields(TypedDict):
    username: str
    step: Step
    attempt: int
    tries: int
    started_at: datetime


class _SshFields(TypedDict):
    ssh_host: str
    ssh_port: int


def _step_action(user: User) -> ProvisioningAction | None:
    base = _StepFields(
        username=user.username,
        step=user.step,
        attempt=user.attempt,
        tries=user.step_tries,
        started_at=user.step_started_at,
    )
    ssh = _SshFields(ssh_host=user.ssh_host, ssh_port=user.ssh_port)
    match user.step:
        case Step.FORGE_USER:
            return EnsureForgeUser(
                **base, display_name=user.display_name, forge_email=user.forge_email
            )
        case Step.SSH_KEY:
            return GenerateSshKey(**base)
        case Step.SELECT_NODE:
            return SelectNode(**base)
        case Step.DEPLOY_VM:
            return DeployUserVm(
                **base,
                vm_sid=user.vm_sid,
                vm_name=vm_name_for(user.username),
                node_id=user.node_id or 0,
                ssh_public_key=user.ssh_public_key,
            )
        case Step.DEPLOY_GATEWAY:
            return DeployGateway(
                **base,
                name=gateway_name(user.username),
                node_id=user.node_id or 0,
                gateway_domain=user.gateway_domain,
                vm_sid=user.vm_sid,
                mycelium_ip=user.mycelium_ip,
                backend_url=backend_url_for(user.mycelium_ip),
            )
        case Step.WAIT_SSH:
            return WaitSsh(**base, **ssh)
        case Step.UPLOAD_MANIFEST:
            return UploadManifest(**base, **ssh, profile=user.profile, gateway_url=user.gateway_url)
        case Step.RUN_SETUP:
            return RunSetup(**base, **ssh)
        case Step.VERIFY_HEALTH:
            return VerifyHealth(**base, gateway_url=user.gateway_url)
        case Step.DONE:
            return None


def _decommission_action(user: User) -> DecommissioningAction:
    name, failures = user.username, user.decommission_failures
    match pending_decommission(user)[0]:
        case DecommissionPart.DELETE_GATEWAY:
            return DeleteGateway(
                username=name,
                part=DecommissionPart.DELETE_GATEWAY,
                failures=failures,
                name=user.gateway_name or gateway_name(name),
            )
        case DecommissionPart.DELETE_VM:
            sid = next(s for s in user.all_vm_sids if s not in user.deleted_vm_sids)
            return DeleteUserVm(
                username=name, part=DecommissionPart.DELETE_VM, failures=failures, vm_sid=sid
            )
        case DecommissionPart.FINISH:
            return FinishDecommission(
                username=name, part=DecommissionPart.FINISH, failures=failures
            )


def pick_node(nodes: Iterable[NodeInfo]) -> NodeInfo | None:
    """The up, gateway-capable node with room for the VM and the most free memory, then disk."""
    fitting = [
        n
        for n in nodes
        if n.up
        and n.gateway_domain
        and n.free_memory_gb >= DEFAULT_VM.memory_gb
        and n.free_disk_gb >= DEFAULT_VM.disk_gb + DEFAULT_VM.rootfs_gb
    ]
    if not fitting:
        return None
    return max(fitting, key=lambda n: (n.free_memory_gb, n.free_disk_gb, -n.node_id))
