"""Forgejo's username rule, the one definition every username of this service is checked by.

Forgejo refuses a username unless `modules/validation/helpers.go` `IsValidUsername` accepts it
(`^[\\da-zA-Z][-.\\w]*$` and not `[-._]{2,}|[-._]$`) and `models/user/user.go` `IsUsableUsername`
finds it neither among `reservedUsernames` nor matching a `reservedUserPatterns` entry, compared
in lower case (`models/db/name.go` `IsUsableName`); `modules/structs/admin_user.go` caps it at 40.
Dots, which Forgejo allows, are excluded here: a username is a NATS subject token.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

from core.errors import InvalidInput

USERNAME_MAX: Final = 40

# Letters and digits in runs joined by single `-` or `_`: starts and ends with a letter or a digit,
# never two of `-` `_` in a row. `\Z`, not `$`: `$` also matches before a final newline.
USERNAME_PATTERN: Final = r"^[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*\Z"
# What a user recorded before the rule above was enforced may be called: such a user stays
# reachable (read and decommissioned) though no new one is provisioned under that name.
USER_REF_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_-]*\Z"

# forgejo/forgejo models/user/user.go `reservedUsernames` (Forgejo 11/12, then older), lower case.
RESERVED_USERNAMES: Final = frozenset(
    {
        ".",
        "..",
        "-",
        ".well-known",
        "api",
        "metrics",
        "v2",
        "assets",
        "attachments",
        "avatar",
        "avatars",
        "repo-avatars",
        "captcha",
        "login",
        "org",
        "repo",
        "user",
        "admin",
        "explore",
        "issues",
        "pulls",
        "milestones",
        "notifications",
        "report_abuse",
        "favicon.ico",
        "manifest.json",
        "robots.txt",
        "sitemap.xml",
        "ssh_info",
        "swagger.v1.json",
        "ghost",
        "gitea-actions",
        "forgejo-actions",
        # Reserved by the same file before the list was cut (the forgejo snapshot 6a0d81d of the
        # DennisRasey/forgejo mirror: `gitea-actions` but no `forgejo-actions` yet); refused too,
        # so a user does not fail for good at `forge_user` on a Forgejo of that age.
        "commits",
        "debug",
        "error",
        "new",
        "raw",
        "search",
        "serviceworker.js",
    }
)
# forgejo/forgejo models/user/user.go `reservedUserPatterns`: `*` is a prefix or suffix wildcard.
RESERVED_USERNAME_PATTERNS: Final = ("*.keys", "*.gpg", "*.rss", "*.atom", "*.png")

_USERNAME = re.compile(USERNAME_PATTERN)
AT: Final = " - at `$.username`"
SHAPE_RULE: Final = (
    "username must be 1..40 letters, digits, `-` and `_`, start and end with a letter or a "
    "digit, and have no two of `-` `_` in a row"
)


def reserved_username(name: str) -> bool:
    """Whether Forgejo reserves `name`, compared as Forgejo does: trimmed and in lower case."""
    lower = name.strip().lower()
    if lower in RESERVED_USERNAMES:
        return True
    return any(
        (p[0] == "*" and lower.endswith(p[1:])) or (p[-1] == "*" and lower.startswith(p[:-1]))
        for p in RESERVED_USERNAME_PATTERNS
    )


def username_problem(name: str) -> str | None:
    """Why Forgejo (or a NATS subject) would refuse `name` as a username; None when it is fine."""
    if not 1 <= len(name) <= USERNAME_MAX or _USERNAME.match(name) is None:
        return SHAPE_RULE
    if reserved_username(name):
        return "username is one of the names Forgejo reserves (admin, api, explore, user, …)"
    return None


def check_username(name: str) -> None:
    """Raises InvalidInput, naming the field, when `name` is not a username Forgejo accepts."""
    problem = username_problem(name)
    if problem is not None:
        raise InvalidInput(problem + AT)


def _any_case(word: str) -> str:
    """An ECMA-262 pattern piece matching `word` (letters, digits, `-`, `_`) in any letter case."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# The reserved names as a JSON Schema `not`, for documents generated from the types (AsyncAPI):
# ECMA-262 has no inline case-insensitive flag, so each letter is a two-letter class.
RESERVED_JSON_SCHEMA: Final = {
    "not": {
        "pattern": "^(?:"
        + "|".join(_any_case(n) for n in sorted(RESERVED_USERNAMES) if _USERNAME.match(n))
        + ")$"
    }
}

Username = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=USERNAME_MAX,
        pattern=USERNAME_PATTERN,
        description=SHAPE_RULE + "; not one of the names Forgejo reserves.",
        extra_json_schema=RESERVED_JSON_SCHEMA,
    ),
]
UserRefName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=USERNAME_MAX, pattern=USER_REF_PATTERN)
]
