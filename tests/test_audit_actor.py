"""Who did it: the Hero-Actor header and the request id reach the audit read, not the contract's.

A real service on a real nats-server (the `service` fixture).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.contract import Part
from core.operations import ACTOR_PATTERN
from hero_deployer.app.parts import setup_parts
from hero_deployer.sdk.client import HeroDeployerClient, local_actor
from tests.conftest import TOKEN, Service, make_settings
from tests.helpers import arun_cli, wait_for_event

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTRACT_EVENT_FIELDS = {"position", "stream", "version", "type", "data", "recorded_at"}


async def test_the_actor_and_request_id_of_a_command_are_recorded_with_its_events(
    service: Service,
) -> None:
    dashboard = service.client.with_actor("dashboard op-3f2a")
    vm = await dashboard.deploy_vm(name="web", secret="s")
    await wait_for_event(service.client, f"vm:{vm.sid}", "VmDeployed")
    page = await service.client.audit_events(stream=f"vm:{vm.sid}")
    requested = [e for e in page.events if e.type == "VmDeployRequested"]
    assert len(requested) == 1
    assert requested[0].actor == "dashboard op-3f2a"
    assert requested[0].request_id  # the edge's id of that request
    outcome = [e for e in page.events if e.type == "VmDeployed"]
    assert outcome and outcome[0].actor == ""  # recorded by the service itself
    # The contract's `events` reply keeps exactly its six fields.
    reply, _ = await service.request("events", b"{}", AUTH)
    events = reply["result"]["events"]  # type: ignore[index]
    assert events and all(set(e) == CONTRACT_EVENT_FIELDS for e in events)


async def test_the_sdk_says_sdk_unless_told_otherwise(service: Service) -> None:
    vm = await service.client.deploy_vm(name="plain", secret="s")
    page = await service.client.audit_events(stream=f"vm:{vm.sid}", limit=1)
    assert [e.actor for e in page.events] == ["sdk"]
    twin = service.client.with_actor("other")
    assert service.client.actor == "sdk" and twin.actor == "other" and twin.nc is service.nc


async def test_an_invalid_actor_header_is_invalid_input_and_records_nothing(
    service: Service,
) -> None:
    before = (await service.client.health()).position
    for actor in ("tab\there", "x" * 65, "-starts-with-dash", "token=ab;c"):
        reply, _ = await service.request(
            "deploy_vm", b'{"name":"a","secret":"s"}', {**AUTH, "Hero-Actor": actor}
        )
        assert reply["ok"] is False, actor
        assert reply["error"]["code"] == "InvalidInput"  # type: ignore[index]
        assert "Hero-Actor" in reply["error"]["message"]  # type: ignore[index]
        assert actor not in json.dumps(reply)
    assert (await service.client.health()).position == before
    ok, _ = await service.request(
        "deploy_vm", b'{"name":"a","secret":"s"}', {**AUTH, "Hero-Actor": "cli bob@box-1"}
    )
    assert ok["ok"] is True


def test_the_local_actor_fits_the_header_rule() -> None:
    import re

    label = local_actor("cli")
    assert label.startswith("cli ") and "@" in label
    assert re.match(ACTOR_PATTERN, label)


async def test_health_lists_the_parts_found_at_start(service: Service) -> None:
    health = await service.client.health()
    names = {p.name: p.state for p in health.parts}
    assert names == {"backend": "ok", "forge": "missing"}  # the fixture runs without a Forge


async def test_health_parts_are_an_optional_addition(service: Service) -> None:
    reply, _ = await service.request("health", b"{}")
    result = reply["result"]
    assert {"status", "version", "position"} <= set(result)  # type: ignore[arg-type]
    client = HeroDeployerClient(service.nc, token=TOKEN, prefix=service.settings.prefix)
    assert (await client.health()).status == "ok"


def test_setup_parts_name_what_is_missing_without_urls_or_credentials(tmp_path: Path) -> None:
    base = tmp_path
    grid = make_settings(
        base,
        backend="hero-compute",
        forge_url="https://forge.example/",
        forge_admin_password="hunter2-secret",
    )
    parts = setup_parts(grid, forge=True, grid_proxy=False)
    assert [(p.name, p.state) for p in parts] == [
        ("backend", "ok"),
        ("forge", "ok"),
        ("grid_proxy", "missing"),
    ]
    no_creds = make_settings(base, forge_url="https://forge.example/")
    forge = {p.name: p for p in setup_parts(no_creds, forge=True, grid_proxy=False)}["forge"]
    assert forge == Part("forge", "missing", forge.message) and "admin" in forge.message
    text = " ".join(p.message for p in parts)
    assert "forge.example" not in text and "hunter2" not in text


async def test_the_cli_names_itself_and_its_user_in_the_audit(
    service: Service, nats_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "HERO_DEPLOYER_TOKEN": TOKEN,
        "HERO_DEPLOYER_PREFIX": service.settings.prefix,
        "HERO_DEPLOYER_SECRET": "s",
    }
    code, out, err = await arun_cli(
        *("vms", "deploy", "from-cli", "--nats", nats_url, "--json"),
        *("--data-dir", str(tmp_path / "cli")),
        env=env,
        cwd=tmp_path,
    )
    assert code == 0, err
    sid = json.loads(out.splitlines()[-1])["sid"]
    page = await service.client.audit_events(stream=f"vm:{sid}", limit=1)
    assert [e.actor for e in page.events] == [local_actor("cli")]
