"""Names an older Forgejo reserves are refused before anything is recorded, like today's."""

from __future__ import annotations

import sqlite3

import msgspec
import pytest

from core.usernames import username_problem
from tests.conftest import TOKEN, Service

AUTH = {"Authorization": f"Bearer {TOKEN}"}

# models/user/user.go `reservedUsernames` before the list was cut (DennisRasey/forgejo 6a0d81d).
OLDER_RESERVED = ["commits", "debug", "error", "new", "raw", "search", "serviceworker.js"]


@pytest.mark.parametrize("name", [*OLDER_RESERVED, "Search", "NEW"])
def test_names_an_older_forgejo_reserves_are_refused(name: str) -> None:
    assert username_problem(name) is not None


@pytest.mark.parametrize("name", ["searcher", "news", "raw1", "new-user"])
def test_names_that_only_start_like_them_pass(name: str) -> None:
    assert username_problem(name) is None


async def test_the_service_refuses_search_and_records_nothing(service: Service) -> None:
    body = msgspec.json.encode({"username": "search"})
    reply, _ = await service.request("provision_user", body, AUTH)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "InvalidInput"  # type: ignore[index]
    with sqlite3.connect(service.settings.data_dir / "events.db") as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
