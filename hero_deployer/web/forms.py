"""Input rules of the dashboard's forms, taken from the core types rather than copied."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, get_args

import msgspec
import msgspec.inspect

from hero_deployer.sdk.schemas import ecma_pattern

# In an HTML `pattern` (compiled with the v flag) a literal "-" at either end of a class must be
# escaped: https://html.spec.whatwg.org/multipage/input.html#the-pattern-attribute
_EDGE_DASH: Final = re.compile(r"(?<=\[)-|(?<=\[\^)-|(?<!\\)-(?=\])")


def conforms(value: str, kind: Any) -> bool:
    """True when the whole of `value` is a valid `kind` (a core string type)."""
    if not value.isprintable():  # no trailing newline or other control character, whatever `$`
        return False
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return False
    return True


def _meta(kind: Any) -> msgspec.Meta:
    return next(arg for arg in get_args(kind)[1:] if isinstance(arg, msgspec.Meta))


def html_pattern(kind: Any) -> str:
    """The `pattern` attribute for `kind`: its core pattern in the form browsers compile."""
    pattern = _meta(kind).pattern
    return _EDGE_DASH.sub(r"\\-", ecma_pattern(pattern)) if pattern else ""


def max_length(kind: Any) -> int:
    """The `maxlength` attribute for `kind`."""
    return _meta(kind).max_length or 0


@dataclass(frozen=True, slots=True)
class NumberField:
    """A number input of a form, its bounds and default read from a core request type."""

    name: str
    label: str
    minimum: int
    maximum: int
    default: int


def number_fields(request: type[msgspec.Struct], labels: dict[str, str]) -> list[NumberField]:
    """The fields of `request` named in `labels`, with the bounds and defaults core gives them."""
    info = msgspec.inspect.type_info(request)
    assert isinstance(info, msgspec.inspect.StructType)
    found = {}
    for field in info.fields:
        kind = field.type
        if field.name in labels and isinstance(kind, msgspec.inspect.IntType):
            assert kind.ge is not None and kind.le is not None and isinstance(field.default, int)
            found[field.name] = NumberField(
                field.name, labels[field.name], kind.ge, kind.le, field.default
            )
    return [found[name] for name in labels]
