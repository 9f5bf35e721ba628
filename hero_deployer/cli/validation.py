"""msgspec's validation messages as sentences, derived from the contract's request types.

The service answers `Expected \\`str\\` matching regex '…' - at \\`$.name\\``; the CLI shows
`name: use 1 to 64 letters, digits, '.', '_' or '-'`, from the field's own constraints. The wire
message stays as it is; this is the CLI's reading of it.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from core.registry import OPERATIONS

# field → how the CLI spells it (`--cpu` for cpu_count); filled as the parser adds the flags
LABELS: Final[dict[str, str]] = {}

_AT = re.compile(r"^(?P<text>.*) - at `\$\.(?P<field>\w+)`\Z", re.S)
_CLASS_RUN = re.compile(r"\[(?P<chars>[^\]^][^\]]*)\](?P<count>[+*]?)")
_RANGES: Final = {"A-Z": "upper-case letter", "a-z": "lower-case letter", "0-9": "digit"}


def readable(message: str) -> str:
    """`message` as a sentence when it is msgspec's about a field the CLI knows; else itself."""
    match = _AT.match(message)
    if match is None:
        return message
    field = match["field"]
    if not match["text"].startswith("Expected `"):  # the service's own sentence: it names it
        return str(match["text"])
    kind = request_fields().get(field)
    if kind is None:
        return message
    rule = rule_of(kind) or "not a value it accepts (see --help)"
    return f"{LABELS.get(field, field)}: {rule}"


@functools.cache
def request_fields() -> dict[str, mi.Type]:
    """Every field of every request type of the contract, by name (a name means one thing)."""
    fields: dict[str, mi.Type] = {}
    for op in OPERATIONS:
        info = mi.type_info(op.request)
        if isinstance(info, mi.StructType):
            for f in info.fields:  # the first is the strictest: provision's username
                fields.setdefault(f.name, f.type)
    return fields


def field_type(struct: type[Any], name: str) -> tuple[mi.Type, Any]:
    """The field's inspected type (None dropped from a union) and its default (None if none)."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    found = next(f for f in info.fields if f.name == name)
    default = None if found.default is msgspec.NODEFAULT else found.default
    return _without_none(found.type), default


def bounds(kind: mi.Type) -> str:
    """An int field's bounds as `1 to 64`, empty when it has none."""
    kind = _without_none(kind)
    if isinstance(kind, mi.IntType) and kind.ge is not None and kind.le is not None:
        return f"{kind.ge} to {kind.le}"
    return ""


def rule_of(kind: mi.Type) -> str | None:
    """What a value of `kind` must be, as a sentence; None when it cannot be said plainly."""
    kind = _without_none(kind)
    if isinstance(kind, mi.Metadata):
        described = (kind.extra_json_schema or {}).get("description")
        if isinstance(described, str):  # "username must be …": the rule without its subject
            return "must " + described.split(" must ", 1)[-1].rstrip(".")
        kind = kind.type
    if isinstance(kind, mi.IntType):
        if kind.ge is not None and kind.le is not None:
            return f"use a whole number from {kind.ge} to {kind.le}"
        return f"use a whole number of at least {kind.ge}" if kind.ge is not None else None
    if isinstance(kind, mi.StrType):
        return _string_rule(kind)
    return None


def _string_rule(kind: mi.StrType) -> str | None:
    if kind.min_length and kind.max_length:
        size = f"{kind.min_length} to {kind.max_length}"
    elif kind.max_length:
        size = f"at most {kind.max_length}"
    else:
        size = f"at least {kind.min_length or 0}"
    if kind.pattern is None:
        return f"use {size} characters"
    chars = describe_pattern(kind.pattern)
    return f"use {size} {chars}" if chars else None


def describe_pattern(pattern: str) -> str | None:
    """`^[A-Za-z0-9._-]+\\Z` as "letters, digits, '.', '_' or '-'"; None for other shapes.

    Two shapes are said: one class repeated, and a first character then a class repeated.
    """
    body = pattern.removeprefix("^").removesuffix("\\Z")
    runs = list(_CLASS_RUN.finditer(body))
    if "".join(m[0] for m in runs) != body:
        return None
    if len(runs) == 1 and runs[0]["count"] == "+":
        return _class(runs[0]["chars"])
    if len(runs) == 2 and runs[0]["count"] == "" and runs[1]["count"] == "*":
        first, rest = _class(runs[0]["chars"], one=True), _class(runs[1]["chars"])
        return f"{rest}, starting with {first}"
    return None


def _class(chars: str, *, one: bool = False) -> str:
    """A bracket expression's members in words ("letters, digits or '-'"; `one`: "a letter")."""
    words: list[str] = []
    for span, word in _RANGES.items():
        if span in chars:
            words.append(word)
            chars = chars.replace(span, "")
    if {"upper-case letter", "lower-case letter"} <= set(words):
        words = ["letter"] + [w for w in words if not w.endswith("case letter")]
    words = [f"a {w}" if one else f"{w}s" for w in words]
    words += [f"'{c}'" for c in chars.replace("\\", "")]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _without_none(kind: mi.Type) -> mi.Type:
    if isinstance(kind, mi.UnionType):
        members = [t for t in kind.types if not isinstance(t, mi.NoneType)]
        if len(members) == 1:
            return members[0]
    return kind
