"""Grid gateway names for usernames: namespaced, deterministic, collision-free, valid on the grid.

A gateway name is two things on the ThreeFold grid at once, and must satisfy both:

- a workload name on the node: `^[a-zA-Z0-9_]+$`, 1..36 characters, not `ygg`
  (threefoldtech/zosbase `pkg/gridtypes/id.go`, `IsValidName`; 36 is the virtio-fs tag limit);
- a name contract on the chain: only `a-z 0-9 - _`, 3..64 characters, unique across the whole
  grid, whoever deployed it (threefoldtech/tfchain
  `substrate-node/pallets/pallet-smart-contract/src/name_contract.rs`, `NameContractName`).

So a name is `[a-z0-9_]{3,36}`, and the operator's prefix namespaces it: `<prefix>_<user part>`.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 36
MIN_LENGTH = 3
PREFIX_MAX_LENGTH = 12
# What the workload and the name contract both accept.
GRID_GATEWAY_NAME = re.compile(r"[a-z0-9_]{3,36}")
# A prefix: lowercase, starts with a letter or digit, leaves room for a user part.
PREFIX = re.compile(r"[a-z0-9][a-z0-9_]{0,11}")
_RESERVED = frozenset({"ygg"})  # zosbase pkg/gridtypes/id.go reservedNames
_USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,39}")
_KEPT = re.compile(r"[a-z0-9_]+")
# Every mapped name ends with this suffix, and no kept name does: the two sets never meet.
_SUFFIX = re.compile(r"_[0-9a-f]{12}\Z")
_HASH_CHARS = 12


def check_prefix(prefix: str) -> str | None:
    """Why `prefix` cannot namespace gateway names, or None when it can (the empty one can)."""
    if prefix == "" or PREFIX.fullmatch(prefix):
        return None
    return (
        f"gateway prefix {prefix!r} must be 1..{PREFIX_MAX_LENGTH} characters of a-z, 0-9 and _,"
        " starting with a letter or a digit"
    )


def gateway_name(username: str, prefix: str = "") -> str:
    """The gateway name of a user under `prefix`: `<prefix>_<user part>`, or the part alone.

    The user part is the username itself when it is lowercase `[a-z0-9_]` and fits; otherwise
    the username lowercased with `-` as `_`, cut to fit, plus `_` and 12 hex characters of its
    SHA-256, so `a-b`, `a_b`, `A_b` and `Alice`/`alice` get different names.
    """
    if not _USERNAME.fullmatch(username):
        raise ValueError(f"not a valid username: {username!r}")
    if problem := check_prefix(prefix):
        raise ValueError(problem)
    head = f"{prefix}_" if prefix else ""
    kept = head + username
    if (
        _KEPT.fullmatch(username)
        and MIN_LENGTH <= len(kept) <= MAX_LENGTH
        and not _SUFFIX.search(username)
        and kept not in _RESERVED
    ):
        return kept
    digest = hashlib.sha256(username.encode()).hexdigest()[:_HASH_CHARS]
    room = MAX_LENGTH - len(head) - 1 - _HASH_CHARS
    slug = username.lower().replace("-", "_")[:room]
    return f"{head}{slug}_{digest}"
