import itertools
import re

import pytest

from core.gateway_names import MAX_LENGTH, check_prefix, gateway_name

# zosbase pkg/gridtypes/id.go IsValidName: the workload name, at most 36 characters.
WORKLOAD_RULE = re.compile(r"[a-zA-Z0-9_]{1,36}")
# tfchain pallet-smart-contract name_contract.rs NameContractName: the name contract.
NAME_CONTRACT_RULE = re.compile(r"[a-z0-9_-]{3,64}")


def valid_on_the_grid(name: str) -> bool:
    return bool(WORKLOAD_RULE.fullmatch(name) and NAME_CONTRACT_RULE.fullmatch(name))


@pytest.mark.parametrize("username", ["alice", "bob_2", "abc", "x" * 36, "0day"])
def test_names_the_grid_accepts_stay_as_they_are(username: str) -> None:
    assert gateway_name(username) == username


@pytest.mark.parametrize("username", ["alice", "bob_2", "0day"])
def test_a_prefix_namespaces_the_name(username: str) -> None:
    assert gateway_name(username, "herodemo") == f"herodemo_{username}"


@pytest.mark.parametrize(
    "username",
    ["a-b", "Alice", "al", "a", "x-" * 20, "_", "build_0123456789ab", "Z" * 40, "a--b", "x" * 37],
)
@pytest.mark.parametrize("prefix", ["", "hd", "herodemo0123"])
def test_other_names_are_mapped_to_valid_grid_names(username: str, prefix: str) -> None:
    name = gateway_name(username, prefix)
    assert name != username
    assert valid_on_the_grid(name), name
    assert len(name) <= MAX_LENGTH
    head = f"{prefix}_" if prefix else ""
    assert name.startswith(head + username.lower().replace("-", "_")[:10])


def test_uppercase_is_lowercased_and_does_not_take_the_lowercase_users_name() -> None:
    assert gateway_name("Alice", "hd") != gateway_name("alice", "hd") == "hd_alice"
    assert gateway_name("Alice", "hd").startswith("hd_alice_")


def test_the_mapping_is_deterministic() -> None:
    assert gateway_name("a-b") == gateway_name("a-b") == "a_b_" + gateway_name("a-b")[-12:]


def test_names_differing_only_in_dash_or_case_get_different_gateways() -> None:
    names = ["a-b", "a_b", "A_b", "A-B", "a_B"]
    assert len({gateway_name(n, "hd") for n in names}) == len(names)


def test_a_username_that_looks_like_a_mapped_name_cannot_take_it() -> None:
    mapped = gateway_name("a-b")
    assert gateway_name(mapped) != mapped


def test_long_usernames_that_share_a_beginning_differ() -> None:
    one, two = "a" * 39 + "b", "a" * 39 + "c"
    assert gateway_name(one, "herodemo0123") != gateway_name(two, "herodemo0123")


def test_no_two_short_usernames_collide() -> None:
    alphabet = "aB1_-"
    usernames = [
        "".join(chars)
        for n in (1, 2, 3)
        for chars in itertools.product(alphabet, repeat=n)
        if chars[0] != "-"
    ]
    for prefix in ("", "p"):
        names = [gateway_name(u, prefix) for u in usernames]
        assert len(set(names)) == len(usernames)
        assert all(valid_on_the_grid(n) for n in names)


def test_the_reserved_workload_name_is_never_used() -> None:
    assert gateway_name("ygg") != "ygg"


@pytest.mark.parametrize("username", ["", "-a", "a.b", "a b", "x" * 41, "é", "alice\n"])
def test_invalid_usernames_are_refused(username: str) -> None:
    with pytest.raises(ValueError):
        gateway_name(username)


@pytest.mark.parametrize("prefix", ["Hero", "hero-demo", "_hero", "h" * 13, "hero\n", "a.b"])
def test_prefixes_the_grid_would_refuse_are_named(prefix: str) -> None:
    assert check_prefix(prefix) is not None
    with pytest.raises(ValueError, match="gateway prefix"):
        gateway_name("alice", prefix)


@pytest.mark.parametrize("prefix", ["", "hero", "h", "hero_demo_01"])
def test_prefixes_that_fit_are_accepted(prefix: str) -> None:
    assert check_prefix(prefix) is None
