"""`backend check` beyond the compute backend: Forge credentials and scopes, mycelium on this host,
and hero_compute's interface against its OpenRPC document."""

from __future__ import annotations

import json
import os
from ipaddress import IPv6Address
from pathlib import Path

from adapters.mycelium_host import mycelium_addresses
from hero_deployer.app.backends import check_backend
from hero_deployer.app.settings import Settings
from tests.conftest import make_settings
from tests.fakes.forgejo import FakeForgejo
from tests.fakes.herocompute_rpc import HeroComputeRpc
from tests.helpers import arun_cli

ROOT = Path(__file__).resolve().parent.parent
SECRET = "owner-secret-never-shown-0c1d"
# /proc/net/if_inet6 as Linux writes it: address, ifindex, prefix length, scope, flags, name.
LOOPBACK = "00000000000000000000000000000001 01 80 10 80       lo\n"
LINK_LOCAL = "fe80000000000000020c29fffe5e3e5b 02 40 20 80     eth0\n"
MYCELIUM = "04a1b2c3d4e5f60718293a4b5c6d7e8f 05 07 00 80 mycelium\n"


def if_inet6(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "if_inet6"
    path.write_text(text)
    return path


def test_only_addresses_in_400_slash_7_count_as_mycelium() -> None:
    text = LOOPBACK + LINK_LOCAL + MYCELIUM + "05ff" + "0" * 28 + " 06 40 00 80 tun1\n"
    text += "0600" + "0" * 28 + " 07 40 00 80 other\n"  # just outside 400::/7

    assert mycelium_addresses(text) == [
        ("mycelium", IPv6Address("4a1:b2c3:d4e5:f607:1829:3a4b:5c6d:7e8f")),
        ("tun1", IPv6Address("5ff::")),
    ]
    assert mycelium_addresses("garbage\n\n" + LOOPBACK) == []


async def test_a_host_without_mycelium_gets_a_note_for_a_real_backend(tmp_path: Path) -> None:
    async with HeroComputeRpc() as rpc:
        settings = make_settings(
            tmp_path, backend="hero-compute", hero_compute_url=rpc.url, hero_compute_secret=SECRET
        )
        without = await check_backend(settings, if_inet6=if_inet6(tmp_path, LOOPBACK + LINK_LOCAL))
        with_it = await check_backend(settings, if_inet6=if_inet6(tmp_path, LOOPBACK + MYCELIUM))
        unreadable = await check_backend(settings, if_inet6=tmp_path / "missing")

    assert without.problems == [] and len(without.notes) == 1
    assert "no mycelium address (400::/7)" in without.notes[0]
    assert with_it.problems == [] and with_it.notes == []
    assert (
        unreadable.notes and "cannot tell whether this host is on mycelium" in unreadable.notes[0]
    )


async def test_the_local_backend_needs_no_mycelium(tmp_path: Path) -> None:
    report = await check_backend(make_settings(tmp_path), if_inet6=tmp_path / "missing")
    assert (report.problems, report.notes) == ([], [])


async def test_hero_compute_without_discovery_is_usable_with_a_note(tmp_path: Path) -> None:
    async with HeroComputeRpc(discovery=False) as rpc:
        settings = make_settings(
            tmp_path, backend="hero-compute", hero_compute_url=rpc.url, hero_compute_secret=SECRET
        )
        report = await check_backend(settings, if_inet6=if_inet6(tmp_path, MYCELIUM))

    assert report.problems == []
    assert report.notes == [
        "hero_compute offers no OpenRPC discovery (`rpc.discover`), so the methods and params "
        "this client uses cannot be verified against it"
    ]


def forge_settings(tmp_path: Path, forge: FakeForgejo, *, token: bool) -> Settings:
    """Settings for the forge `forge` with its admin token, or else its admin password."""
    credential = (
        {"forge_admin_token": forge.admin_token}
        if token
        else {"forge_admin_password": forge.admin_password}
    )
    return make_settings(
        tmp_path, forge_url=forge.url, forge_admin_user=forge.admin_user, **credential
    )


async def test_a_forge_token_without_its_scopes_is_a_problem(tmp_path: Path) -> None:
    async with FakeForgejo(admin_token_scopes=("read:user",)) as forge:
        report = await check_backend(forge_settings(tmp_path, forge, token=True))

    assert len(report.problems) == 1
    assert "lacks the `write:admin` scope" in report.problems[0]
    assert forge.admin_token not in report.problems[0]


async def test_a_forge_with_working_credentials_passes(tmp_path: Path) -> None:
    async with FakeForgejo() as forge:
        report = await check_backend(forge_settings(tmp_path, forge, token=False))

    assert (report.problems, report.notes) == ([], [])


async def test_the_cli_prints_problems_and_notes(tmp_path: Path) -> None:
    async with (
        FakeForgejo(admin_token_scopes=("write:repository",)) as forge,
        HeroComputeRpc(discovery=False) as rpc,
    ):
        env = {
            **os.environ,
            "HERO_DEPLOYER_BACKEND": "hero-compute",
            "HERO_DEPLOYER_HERO_COMPUTE_URL": rpc.url,
            "HERO_DEPLOYER_HERO_COMPUTE_SECRET": SECRET,
            "HERO_DEPLOYER_FORGE_URL": forge.url,
            "HERO_DEPLOYER_FORGE_ADMIN_USER": forge.admin_user,
            "HERO_DEPLOYER_FORGE_ADMIN_TOKEN": forge.admin_token,
        }
        args = ("backend", "check", "--data-dir", str(tmp_path))
        code, out, _ = await arun_cli(*args, "--json", cwd=ROOT, env=env, timeout=30)
        text_code, text, _ = await arun_cli(*args, cwd=ROOT, env=env, timeout=30)

    report = json.loads(out)
    assert code == text_code == 1
    lines = text.splitlines()
    assert lines[0] == "backend hero-compute: not usable"
    assert sum(line.startswith("  - the forgejo admin token lacks") for line in lines) == 2
    assert any(line.startswith("  note: hero_compute offers no OpenRPC") for line in lines)
    assert report["usable"] is False
    assert sorted(p.split("`")[1] for p in report["problems"]) == ["read:user", "write:admin"]
    assert any("cannot be verified" in n for n in report["notes"])
    assert SECRET not in out and forge.admin_token not in out
