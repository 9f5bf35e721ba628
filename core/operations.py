"""What the transport hands to the application: an operation, its decoded request, its meta."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

# Header rules, whole-value like every pattern (`\Z`: `$` would also match before a final newline)
BEARER_PATTERN = r"^Bearer [^\x00-\x1f\x7f]+\Z"
IDEMPOTENCY_KEY_PATTERN = r"^[ -~]{1,128}\Z"
# Who sent a request ("dashboard op-3f2a", "cli alice@host", "sdk"): a short label, never a secret
ACTOR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._@:+/-]{0,63}\Z"


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """Per-request facts from the transport: never the token, never a secret."""

    operation: str
    request_id: str
    idempotency_key: str | None = None
    actor: str = ""


Handler = Callable[[Any, RequestMeta], Awaitable[bytes]]
"""Takes the decoded request and returns the encoded `result` (JSON) or raises a DomainError."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One endpoint of the contract: its request type and the handler that answers it."""

    name: str
    request: type[msgspec.Struct]
    handler: Handler
    mutates: bool = False
