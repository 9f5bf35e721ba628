"""The base of the domain's msgspec Structs: frozen and keyword-only, said once for all."""

from __future__ import annotations

from functools import cache
from typing import Any, TypeVar, dataclass_transform

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class _FrozenMeta(msgspec.StructMeta):
    """Makes each new Struct frozen and keyword-only unless its class line says otherwise.

    msgspec inherits `frozen` but not `kw_only`; a StructMeta subclass is its way to give a
    family of Structs one default (msgspec/msgspec#841, resolved by #890).
    """

    def __new__(
        mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **config: Any
    ) -> _FrozenMeta:
        if namespace.get("__slots__") == tuple(namespace.get("__annotations__", ())):
            del namespace["__slots__"]  # what msgspec.defstruct passes a metaclass (msgspec#974)
        config = {"frozen": True, "kw_only": True, **config}
        return super().__new__(mcls, name, bases, namespace, **config)


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(msgspec.field,))
class Frozen(msgspec.Struct, metaclass=_FrozenMeta, frozen=True, kw_only=True):
    """A frozen, keyword-only Struct, and so is every subclass (type checkers are told too)."""


def from_fields(target: type[T], source: msgspec.Struct, /, **given: Any) -> T:
    """A `target` from the fields of `source` named like its own; `given` adds or wins."""
    names = _shared_fields(target, type(source), tuple(given))
    return target(**{name: getattr(source, name) for name in names}, **given)


@cache
def _shared_fields(
    target: type[msgspec.Struct], source: type[msgspec.Struct], given: tuple[str, ...]
) -> tuple[str, ...]:
    taken = set(source.__struct_fields__) - set(given)
    return tuple(name for name in target.__struct_fields__ if name in taken)
