"""Compares the methods and params a JSON-RPC client sends with a server's OpenRPC document.

The document is what the server answers to `rpc.discover` (open-rpc/spec, "Service Discovery
Method"): `methods` is a list of Method Objects (or Reference Objects into `components`), each
with a `name`, `params` (Content Descriptors: `name`, `required`, default false) and a
`paramStructure` of `by-name`, `by-position` or `either` (the default).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DISCOVER = "rpc.discover"


@dataclass(frozen=True, slots=True)
class ClientMethod:
    """A method the client calls: the params it always sends, those it sends only sometimes,
    and whether it copes with a server that lacks the method."""

    name: str
    always: frozenset[str] = frozenset()
    sometimes: frozenset[str] = frozenset()
    optional: bool = False

    @property
    def params(self) -> frozenset[str]:
        return self.always | self.sometimes


def interface_mismatches(document: Any, client: Iterable[ClientMethod]) -> list[str]:
    """Each way the client's calls disagree with `document`, in the client's method order."""
    if not isinstance(document, dict) or not isinstance(document.get("methods"), list):
        return ["the OpenRPC document has no `methods` list"]
    methods = {}
    for entry in document["methods"]:
        method = _resolve(document, entry)
        if isinstance(method, dict) and isinstance(method.get("name"), str):
            methods[method["name"]] = method
    mismatches: list[str] = []
    for wanted in client:
        method = methods.get(wanted.name)
        if method is None:
            if not wanted.optional:
                mismatches.append(f"no method `{wanted.name}`, which the client calls")
            continue
        mismatches += _param_mismatches(document, method, wanted)
    return mismatches


def _param_mismatches(
    document: dict[str, Any], method: dict[str, Any], wanted: ClientMethod
) -> list[str]:
    """How the params of one documented method disagree with what the client sends."""
    name = wanted.name
    if method.get("paramStructure") == "by-position" and wanted.params:
        return [f"`{name}` takes its params by position; the client sends them by name"]
    params = [_resolve(document, p) for p in method.get("params") or []]
    named = {p["name"]: p for p in params if isinstance(p, dict) and isinstance(p.get("name"), str)}
    out = [
        f"`{name}` has no param `{p}`, which the client sends"
        for p in sorted(wanted.params - named.keys())
    ]
    out += [
        f"`{name}` requires param `{p}`, which the client does not always send"
        for p, descriptor in sorted(named.items())
        if descriptor.get("required") is True and p not in wanted.always
    ]
    return out


def _resolve(document: dict[str, Any], node: Any) -> Any:
    """A Reference Object (`{"$ref": "#/components/…"}`) replaced by what it points at."""
    for _ in range(8):  # a chain of references, but never a loop
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str)):
            return node
        node = _pointer(document, node["$ref"])
    return None


def _pointer(document: dict[str, Any], ref: str) -> Any:
    """The value a local JSON pointer (`#/a/b`) names in `document`, or None."""
    if not ref.startswith("#/"):
        return None
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node
