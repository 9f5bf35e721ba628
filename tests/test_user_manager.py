"""The process manager's pure parts: node choice, step policy, step settings."""

from __future__ import annotations

import pytest

from core.ports import NodeInfo
from core.retry import RetryPolicy
from core.user_actions import pick_node
from hero_deployer.app.bootstrap import manager_config
from hero_deployer.app.settings import Settings, per_step


def node(node_id: int, memory: float, disk: float, domain: str = "gw.example", up: bool = True):
    return NodeInfo(
        node_id=node_id, free_memory_gb=memory, free_disk_gb=disk, gateway_domain=domain, up=up
    )


def test_pick_node_prefers_memory_then_disk_among_usable_nodes() -> None:
    nodes = [
        node(1, 64, 1000),
        node(8, 128, 500),
        node(13, 128, 900),
        node(50, 512, 9000, domain=""),  # no gateway
        node(60, 512, 9000, up=False),
        node(70, 4, 9000),  # too little memory for the 8 GB VM
    ]
    chosen = pick_node(nodes)
    assert chosen is not None and chosen.node_id == 13
    assert pick_node([node(1, 8, 215)]) is None  # 200 GB disk + 16 GB rootfs do not fit
    assert pick_node([]) is None


def test_step_policy_backoff_doubles_with_jitter_up_to_its_ceiling() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0, retries=3, retries_by_step={"run_setup": 0})
    for tries, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        for _ in range(50):
            assert ceiling / 2 <= policy.delay(tries) <= ceiling
    assert policy.tries_of("wait_ssh") == 4
    assert policy.tries_of("run_setup") == 1


def test_a_policy_without_jitter_pauses_exactly_its_doubling_ceiling() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0, jitter=False)
    expected = {0: 0.5, 1: 0.5, 2: 1.0, 3: 2.0, 5: 8.0, 6: 10.0, 9: 10.0}
    assert {failures: policy.delay(failures) for failures in expected} == expected


def test_a_long_streak_of_failures_pauses_the_cap_instead_of_overflowing() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=2.0, jitter=False)
    assert [policy.delay(n) for n in (1_100, 10_000, 10**9)] == [2.0, 2.0, 2.0]
    assert 1.0 <= RetryPolicy(base_delay=0.1, max_delay=2.0).delay(10_000) <= 2.0


def test_step_settings_parse_and_name_real_steps() -> None:
    assert per_step("wait_ssh=2, run_setup=60", float) == {"wait_ssh": 2.0, "run_setup": 60.0}
    with pytest.raises(ValueError, match="step=value"):
        per_step("wait_ssh", float)
    config = manager_config(Settings(step_deadlines="wait_ssh=5", step_retries_by_step="ssh_key=0"))
    assert config.policy.deadline_of("wait_ssh") == 5.0
    assert config.policy.deadline_of("forge_user") == 600.0
    assert config.policy.tries_of("ssh_key") == 1
    with pytest.raises(ValueError, match="unknown step"):
        manager_config(Settings(step_deadlines="wait_for_godot=5"))


def test_candidate_nodes_and_forge_password_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HERO_DEPLOYER_CANDIDATE_NODES", "8, 13")
    monkeypatch.setenv("HERO_DEPLOYER_FORGE_ADMIN_PASSWORD", "Sup3r-secret!")
    settings = Settings.load()
    assert settings.candidate_nodes == (8, 13)
    assert settings.forge_admin_password == "Sup3r-secret!"
    assert "Sup3r-secret!" not in repr(settings)


def test_the_bearer_token_is_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERO_DEPLOYER_TOKEN", "t0ken-that-must-not-show")
    settings = Settings.load()
    assert settings.token == "t0ken-that-must-not-show"
    assert "t0ken-that-must-not-show" not in repr(settings)
