"""`hero-deployer backend check` and `api-spec`: what an operator runs before starting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hero_deployer.cli import main
from hero_deployer.sdk.asyncapi import build_spec


def test_local_backend_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backend", "check", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "backend": "local",
        "usable": True,
        "problems": [],
        "notes": [],
    }


def test_opentofu_without_tofu_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HERO_DEPLOYER_TOFU_PATH", str(tmp_path / "no-such-tofu"))
    code = main(["backend", "check", "--backend", "opentofu", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "backend opentofu: not usable" in out
    assert "not found" in out


def test_hero_compute_needs_its_secret_and_a_reachable_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["backend", "check", "--backend", "hero-compute", "--data-dir", str(tmp_path)]
    assert main(args) == 1
    assert "HERO_DEPLOYER_HERO_COMPUTE_SECRET" in capsys.readouterr().out
    monkeypatch.setenv("HERO_DEPLOYER_HERO_COMPUTE_SECRET", "owner-secret-never-printed")
    monkeypatch.setenv("HERO_DEPLOYER_HERO_COMPUTE_URL", "http://127.0.0.1:9")
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "not reachable" in out
    assert "owner-secret-never-printed" not in out


def test_api_spec_prints_the_generated_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["api-spec"]) == 0
    assert json.loads(capsys.readouterr().out) == build_spec("hero.v1")
