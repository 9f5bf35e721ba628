"""The provisioning steps as the CLI's progress and the dashboard's timeline show them."""

from __future__ import annotations

from typing import Any

import pytest

from core.contract import STEPS
from hero_deployer.sdk.steps import STEP_EVENTS, STEP_LABELS, step_detail


def test_every_step_has_a_label_and_every_step_event_names_a_step() -> None:
    assert set(STEP_LABELS) == set(STEPS)
    assert set(STEP_EVENTS.values()) <= set(STEPS)


@pytest.mark.parametrize(
    ("kind", "data", "detail"),
    [
        ("ForgeUserEnsured", {"created": True, "skipped_reason": ""}, "account created"),
        ("ForgeUserEnsured", {"created": False}, "account exists"),
        ("ForgeUserEnsured", {"skipped_reason": "no forge"}, "skipped: no forge"),
        ("NodeSelected", {"node_id": 8, "gateway_domain": "gw.example"}, "node 8 (gw.example)"),
        ("NodeSelected", {"node_id": 8, "gateway_domain": ""}, "node 8 (no gateway domain)"),
        ("UserVmDeployed", {"vm_sid": "vm_1", "mycelium_ip": "4ff::1"}, "vm_1 at 4ff::1"),
        ("GatewayDeployed", {"url": "https://a.gw.example"}, "https://a.gw.example"),
        (
            "ManifestUploaded",
            {"path": "/m.json", "sha256": "ab" * 32},
            "/m.json sha256 abababababab",
        ),
        ("SetupCompleted", {"exit_status": 0}, "exit status 0"),
        ("HealthVerified", {"status_code": 200}, "answered 200"),
        ("UserVmDeployRequested", {"vm_sid": "vm_2"}, "VM vm_2 requested"),
        ("GatewayDeleted", {"name": "alice"}, "alice"),
        ("UserVmDeleted", {"vm_sid": "vm_2"}, "vm_2"),
        ("StepRetried", {"step": "wait_ssh"}, ""),
    ],
)
def test_step_detail_says_what_an_event_produced(
    kind: str, data: dict[str, Any], detail: str
) -> None:
    assert step_detail(kind, data) == detail


def test_a_missing_field_reads_as_empty_not_as_an_error() -> None:
    assert step_detail("GatewayDeployed", {}) == ""
