"""Slows down a client whose requests keep failing (wrong secrets, wrong tokens)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Record:
    failures: float
    updated: float
    blocked_until: float = 0.0


class FailureLimiter:
    """Per-client failure counts that decay; past `allowance` each failure blocks for longer.

    A client with `failures` over the allowance is blocked for
    `base_delay * 2 ** (failures - allowance - 1)` seconds (at most `max_delay`); the count
    decays by one every `decay` seconds, so an honest typo costs nothing.
    """

    def __init__(
        self,
        *,
        allowance: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        decay: float = 60.0,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._allowance = allowance
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._decay = decay
        self._capacity = capacity
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """Seconds the client must still wait, 0 when it may go ahead."""
        record = self._records.get(client)
        if record is None:
            return 0.0
        return max(0.0, record.blocked_until - self._clock())

    def failed(self, client: str) -> None:
        """Counts one failure of `client`; blocks it once it is over the allowance."""
        now = self._clock()
        record = self._records.pop(client, None) or _Record(failures=0.0, updated=now)
        record.failures = max(0.0, record.failures - (now - record.updated) / self._decay) + 1
        record.updated = now
        excess = round(record.failures) - self._allowance
        if excess > 0:
            delay = min(self._base_delay * 2 ** (excess - 1), self._max_delay)
            record.blocked_until = now + delay
        self._records[client] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)


class TenantLimiter:
    """Tenant failures counted per (address, attempted secret), under a higher per-address ceiling.

    Tenants behind one proxy share an address: one tenant repeating a wrong secret blocks only
    that secret from that address, while many different wrong secrets (guessing) hit the
    address's ceiling. Secrets are kept only as an HMAC under a key of this process.
    """

    def __init__(
        self,
        *,
        per_secret: FailureLimiter | None = None,
        per_address: FailureLimiter | None = None,
    ) -> None:
        self.per_secret = per_secret or FailureLimiter()
        self.per_address = per_address or FailureLimiter(allowance=50)
        self._key = secrets.token_bytes(32)

    def _pair(self, address: str, secret: str) -> str:
        digest = hmac.new(self._key, secret.encode("utf-8", "replace"), hashlib.sha256)
        return f"{address} {digest.hexdigest()[:32]}"

    def retry_after(self, address: str, secret: str) -> float:
        """Seconds this address must wait before trying `secret` again, 0 when it may."""
        return max(
            self.per_address.retry_after(address),
            self.per_secret.retry_after(self._pair(address, secret)),
        )

    def failed(self, address: str, secret: str) -> None:
        """Counts one failed attempt of `secret` from `address` against both limits."""
        self.per_address.failed(address)
        self.per_secret.failed(self._pair(address, secret))
