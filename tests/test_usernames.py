"""Forgejo's username rule: the service refuses what Forgejo would, before anything is recorded."""

from __future__ import annotations

import re
import sqlite3

import msgspec
import pytest

from core.contract import GetUser, ProvisionUser
from core.errors import InvalidInput
from core.manifest import render_services_toml
from core.usernames import RESERVED_USERNAMES, reserved_username, username_problem
from hero_deployer.sdk.asyncapi import build_spec
from tests.conftest import TOKEN, Service

AUTH = {"Authorization": f"Bearer {TOKEN}"}

# What the adapter used to send to Forgejo, which answered 422 (tests/test_forge_http.py), plus
# a final newline (msgspec's `pattern` searches, and `$` matches before it) and a dot.
REFUSED = ["_bob", "bob-", "a__b", "a-_b", "admin", "explore", "Admin", "USER", "bob\n", "a.b"]
REFUSED += ["", "x" * 41, "forgejo-actions", "report_abuse", "al ice", "bob\x00"]
ACCEPTED = ["alice", "a", "1abc", "a-b_c", "Bob-2", "x" * 40, "admins", "user1", "api-dev"]


def event_count(service: Service) -> int:
    with sqlite3.connect(service.settings.data_dir / "events.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])


@pytest.mark.parametrize("name", ACCEPTED)
def test_names_forgejo_accepts_pass(name: str) -> None:
    assert username_problem(name) is None
    body = msgspec.json.encode({"username": name})
    assert msgspec.json.decode(body, type=ProvisionUser).username == name


@pytest.mark.parametrize("name", REFUSED)
def test_names_forgejo_refuses_are_invalid_input_when_decoded(name: str) -> None:
    body = msgspec.json.encode({"username": name})
    with pytest.raises((msgspec.ValidationError, InvalidInput), match="username"):
        msgspec.json.decode(body, type=ProvisionUser)


@pytest.mark.parametrize("name", ["admin", "Explore", "_bob", "bob\n"])
def test_a_request_built_in_python_is_checked_too(name: str) -> None:
    with pytest.raises(InvalidInput, match=r"- at `\$\.username`"):
        ProvisionUser(username=name)


def test_reserved_names_compare_like_forgejo() -> None:
    assert all(reserved_username(n.upper()) for n in RESERVED_USERNAMES)
    assert reserved_username(" Admin ")  # models/db/name.go trims and lowers
    assert reserved_username("alice.keys")  # reservedUserPatterns `*.keys`
    assert not reserved_username("administrator")


def test_a_user_recorded_under_the_old_rule_stays_reachable() -> None:
    assert msgspec.json.decode(b'{"username": "_bob"}', type=GetUser).username == "_bob"
    for bad in (b'{"username": "bob\\n"}', b'{"username": "a.b"}', b'{"username": "-x"}'):
        with pytest.raises(msgspec.ValidationError, match="username"):
            msgspec.json.decode(bad, type=GetUser)


@pytest.mark.parametrize("name", ["admin", "_bob", "bob\n", "a.b"])
def test_the_manifest_refuses_what_provisioning_refuses(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid username"):
        render_services_toml(name)


@pytest.mark.parametrize("name", ["_bob", "bob-", "a__b", "admin", "explore", "Admin", "bob\n"])
async def test_the_service_refuses_them_as_invalid_input_and_records_nothing(
    service: Service, name: str
) -> None:
    body = msgspec.json.encode({"username": name})
    reply, headers = await service.request("provision_user", body, AUTH)

    assert reply["ok"] is False
    assert reply["error"]["code"] == "InvalidInput"  # type: ignore[index]
    assert "username" in reply["error"]["message"]  # type: ignore[index]
    assert headers["Nats-Service-Error-Code"] == "400"
    assert event_count(service) == 0
    health, _ = await service.request("health", b"")
    assert health["result"]["position"] == 0  # type: ignore[index]


async def test_the_sdk_refuses_a_reserved_name_with_the_same_error(service: Service) -> None:
    with pytest.raises(InvalidInput, match="reserves"):
        await service.client.provision_user("admin")
    assert event_count(service) == 0


async def test_a_name_forgejo_accepts_is_provisioned(service: Service) -> None:
    reply, _ = await service.request("provision_user", b'{"username": "a-b_c"}', AUTH)

    assert reply["ok"] is True
    assert reply["result"]["username"] == "a-b_c"  # type: ignore[index]
    assert event_count(service) >= 1


def test_the_asyncapi_schema_states_the_same_rule_in_ecma_262() -> None:
    schema = build_spec()["components"]["schemas"]["ProvisionUser"]["properties"]["username"]
    pattern, reserved = schema["pattern"], schema["not"]["pattern"]
    # Only syntax ECMA-262 and Python read alike: no \A, \Z, inline flags or named groups.
    for python_only in ("\\A", "\\Z", "(?i", "(?P", "(?<"):
        assert python_only not in pattern + reserved
    # ECMA's `$` (no m flag) is the end of the input, which Python spells `\Z`.
    for name in [n for n in ACCEPTED + REFUSED if "\n" not in n]:
        shape = re.search(pattern.replace("$", r"\Z"), name) is not None
        taken = re.search(reserved.replace("$", r"\Z"), name) is not None
        in_schema = shape and not taken and 1 <= len(name) <= schema["maxLength"]
        assert in_schema == (username_problem(name) is None), name
