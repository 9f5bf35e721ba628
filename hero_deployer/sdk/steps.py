"""A user's provisioning steps as clients show them: labels, the events around them, a few words."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Final

from core.contract import Step
from core.user import STEP_EVENTS

__all__ = ["BEGIN_EVENTS", "STEP_EVENTS", "STEP_LABELS", "step_detail"]

STEP_LABELS: Final[dict[str, str]] = {
    Step.FORGE_USER: "Forge account",
    Step.SSH_KEY: "SSH key",
    Step.SELECT_NODE: "Select node",
    Step.DEPLOY_VM: "Deploy VM",
    Step.DEPLOY_GATEWAY: "Deploy gateway",
    Step.WAIT_SSH: "Wait for SSH",
    Step.UPLOAD_MANIFEST: "Upload manifest",
    Step.RUN_SETUP: "Run setup",
    Step.VERIFY_HEALTH: "Verify health",
    Step.DONE: "Done",
}

# The events that start a provisioning or a decommission: the clock of its first step starts
BEGIN_EVENTS: Final = ("ProvisioningRequested", "ProvisioningResumed", "DecommissionRequested")

# What an event produced, in a few words, from its data's fields
_DETAILS: Final[dict[str, str]] = {
    "NodeSelected": "node {node_id} ({gateway_domain})",
    "UserVmDeployed": "{vm_sid} at {mycelium_ip}",
    "GatewayDeployed": "{url}",
    "ManifestUploaded": "{path} sha256 {sha256:.12}",
    "SetupCompleted": "exit status {exit_status}",
    "HealthVerified": "answered {status_code}",
    "UserVmDeployRequested": "VM {vm_sid} requested",
    "GatewayDeleted": "{name}",
    "UserVmDeleted": "{vm_sid}",
}


def step_detail(kind: str, data: dict[str, Any]) -> str:
    """What an event of a user's stream produced, in a few words ("" when nothing to say)."""
    if kind == "ForgeUserEnsured":
        if data.get("skipped_reason"):
            return f"skipped: {data['skipped_reason']}"
        return "account created" if data.get("created") else "account exists"
    fields = defaultdict(str, data)
    if kind == "NodeSelected":
        fields["gateway_domain"] = data.get("gateway_domain") or "no gateway domain"
    return _DETAILS.get(kind, "").format_map(fields)
