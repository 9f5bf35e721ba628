"""The contract's JSON Schemas, from its msgspec types, with patterns in ECMA-262 form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from core.events import Event, EventOut
from core.registry import Op

Json = dict[str, Any]

_ECMA_ANCHORS: Final = {"A": "^", "Z": "$"}


def ecma_pattern(pattern: str) -> str:
    """The ECMA-262 form of a whole-value Python pattern (`\\A` and `\\Z` become `^` and `$`).

    JSON Schema patterns are ECMA-262, where `$` without the m flag matches only at the end and
    `\\Z` does not exist; Python's `$` also matches before a final newline, hence `\\Z` in ours.
    """
    out: list[str] = []
    chars = iter(pattern)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        out.append(_ECMA_ANCHORS.get(escaped, char + escaped))
    return "".join(out)


def _ecma_patterns(node: Any) -> Any:
    """A copy of a JSON Schema with every `pattern` in its ECMA-262 form."""
    if isinstance(node, dict):
        return {
            k: ecma_pattern(v) if k == "pattern" and isinstance(v, str) else _ecma_patterns(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


def schemas(operations: Sequence[Op], events: Sequence[type[Event]], ref: str) -> Json:
    """Every request, result and event type's schema by name; `ref` prefixes a reference."""
    types: list[Any] = [EventOut]
    for op in operations:
        types += [op.request, op.result]
    types += list(events)
    _, components = msgspec.json.schema_components(
        list(dict.fromkeys(types)), ref_template=ref + "{name}"
    )
    for event in events:
        _untagged(components[event.__name__], mi.type_info(event))
    return dict(sorted(_ecma_patterns(components).items()))


def _untagged(schema: Json, info: mi.Type) -> None:
    """Drops the tag from an event's schema: `data` holds the fields, the envelope the type."""
    if isinstance(info, mi.StructType) and info.tag_field is not None:
        schema["properties"].pop(info.tag_field, None)
        if "required" in schema:
            schema["required"] = [n for n in schema["required"] if n != info.tag_field]
