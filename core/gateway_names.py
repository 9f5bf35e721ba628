"""Grid gateway names for usernames: deterministic, collision-free and valid on the grid."""

from __future__ import annotations

import hashlib
import re

# What both the gateway workload (`^[a-zA-Z0-9_]+$`) and the chain's name contracts (lowercase,
# 3..64 characters) accept; the gateway name is also a DNS label, where case does not count.
_KEPT = re.compile(r"^[a-z0-9_]{3,40}$")
# Every mapped name ends with this suffix, and no kept name does: the two sets never meet.
_SUFFIX = re.compile(r"_[0-9a-f]{12}$")
_USERNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,39}$")
_HASH_CHARS = 12

MAX_LENGTH = 40 + 1 + _HASH_CHARS


def gateway_name(username: str) -> str:
    """The gateway name of a user: the username itself when the grid accepts it, else a mapping.

    A mapped name is the lowercased username with `-` as `_`, plus `_` and 12 hex characters of
    the username's SHA-256, so `a-b`, `a_b` and `A_b` get three different names.
    """
    if not _USERNAME.match(username):
        raise ValueError(f"not a valid username: {username!r}")
    if _KEPT.match(username) and not _SUFFIX.search(username):
        return username
    digest = hashlib.sha256(username.encode()).hexdigest()[:_HASH_CHARS]
    return f"{username.lower().replace('-', '_')}_{digest}"
