import hashlib
import tomllib

import pytest

from core.manifest import PROFILES, SERVICES, render_services_toml, sha256_hex


def test_demo_profile_lists_its_seven_services_in_order() -> None:
    doc = tomllib.loads(render_services_toml("alice"))

    assert doc["meta"] == {"user": "alice", "profile": "demo"}
    assert [s["name"] for s in doc["service"]] == [
        "proxy",
        "router",
        "proc",
        "cockpit",
        "embedder-small",
        "db",
        "books",
    ]


def test_each_service_carries_its_binary_port_and_args() -> None:
    doc = tomllib.loads(render_services_toml("alice", "demo"))

    by_name = {s["name"]: s for s in doc["service"]}
    assert by_name["proxy"] == {"name": "proxy", "binary": "hero_proxy", "port": 9988, "args": []}
    assert by_name["embedder-small"]["args"] == ["--model", "small"]
    ports = [s["port"] for s in doc["service"]]
    assert len(set(ports)) == len(ports)


def test_rendering_is_deterministic_and_per_user() -> None:
    assert render_services_toml("alice") == render_services_toml("alice")
    assert render_services_toml("alice") != render_services_toml("bob")


def test_every_profile_names_known_services() -> None:
    for names in PROFILES.values():
        assert set(names) <= set(SERVICES)


def test_unknown_profile_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown profile 'full'"):
        render_services_toml("alice", "full")


@pytest.mark.parametrize("username", ["", "a.b", 'a"b', "x" * 41])
def test_invalid_username_is_a_value_error(username: str) -> None:
    with pytest.raises(ValueError):
        render_services_toml(username)


def test_sha256_hex_hashes_the_utf8_text() -> None:
    text = render_services_toml("alice")
    assert sha256_hex(text) == hashlib.sha256(text.encode()).hexdigest()
    assert sha256_hex("é") == hashlib.sha256("é".encode()).hexdigest()
    assert len(sha256_hex("")) == 64
