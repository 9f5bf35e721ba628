import itertools
import re

import pytest

from core.gateway_names import MAX_LENGTH, gateway_name

GRID_RULE = re.compile(r"^[a-zA-Z0-9_]+$")
NAME_CONTRACT_RULE = re.compile(r"^[a-z0-9_-]{3,64}$")


@pytest.mark.parametrize("username", ["alice", "bob_2", "abc", "x" * 40, "0day"])
def test_names_the_grid_accepts_stay_as_they_are(username: str) -> None:
    assert gateway_name(username) == username


@pytest.mark.parametrize(
    "username",
    ["a-b", "Alice", "al", "a", "x-" * 20, "_", "build_0123456789ab", "Z" * 40, "a--b"],
)
def test_other_names_are_mapped_to_valid_grid_names(username: str) -> None:
    name = gateway_name(username)
    assert name != username
    assert GRID_RULE.match(name)
    assert NAME_CONTRACT_RULE.match(name)
    assert len(name) <= MAX_LENGTH
    assert name.startswith(username.lower().replace("-", "_") + "_")


def test_the_mapping_is_deterministic() -> None:
    assert gateway_name("a-b") == gateway_name("a-b") == "a_b_" + gateway_name("a-b")[-12:]


def test_names_differing_only_in_dash_or_case_get_different_gateways() -> None:
    names = ["a-b", "a_b", "A_b", "A-B", "a_B"]
    assert len({gateway_name(n) for n in names}) == len(names)


def test_a_username_that_looks_like_a_mapped_name_cannot_take_it() -> None:
    mapped = gateway_name("a-b")
    assert gateway_name(mapped) != mapped


def test_no_two_short_usernames_collide() -> None:
    alphabet = "aB1_-"
    usernames = [
        "".join(chars)
        for n in (1, 2, 3)
        for chars in itertools.product(alphabet, repeat=n)
        if chars[0] != "-"
    ]
    names = [gateway_name(u) for u in usernames]
    assert len(set(names)) == len(usernames)
    assert all(GRID_RULE.match(n) and NAME_CONTRACT_RULE.match(n) for n in names)


@pytest.mark.parametrize("username", ["", "-a", "a.b", "a b", "x" * 41, "é"])
def test_invalid_usernames_are_refused(username: str) -> None:
    with pytest.raises(ValueError):
        gateway_name(username)
