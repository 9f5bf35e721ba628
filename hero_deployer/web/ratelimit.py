"""Slows down a client whose requests keep failing (wrong secrets, wrong tokens)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from core.retry import RetryPolicy

V = TypeVar("V")


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
        self._backoff = RetryPolicy(base_delay=base_delay, max_delay=max_delay, jitter=False)
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
            record.blocked_until = now + self._backoff.delay(excess)
        self._records[client] = record
        while len(self._records) > self._capacity:
            self._records.popitem(last=False)


class TenantLimiter:
    """Tenant failures counted per (address, attempted secret), under a higher per-address ceiling.

    Tenants behind one proxy share an address: one tenant repeating a wrong secret blocks only
    that secret from that address, while many different wrong secrets (guessing) hit the
    address's ceiling. A secret that has succeeded from an address (the last `remember` such
    pairs) passes the ceiling, so one tenant's guessing does not lock out another; a new secret
    over the ceiling waits. A listing that finds nothing counts as a failure, once per `window`
    seconds for the same pair, so guessing through the list is limited but reloading is not.
    Secrets are kept only as an HMAC under a key of this process.
    """

    def __init__(
        self,
        *,
        per_secret: FailureLimiter | None = None,
        per_address: FailureLimiter | None = None,
        remember: int = 10_000,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_secret = per_secret or FailureLimiter()
        self.per_address = per_address or FailureLimiter(allowance=50)
        self._key = secrets.token_bytes(32)
        self._remember = remember
        self._window = window
        self._clock = clock
        self._good: OrderedDict[str, None] = OrderedDict()
        self._empty: OrderedDict[str, float] = OrderedDict()

    def _pair(self, address: str, secret: str) -> str:
        digest = hmac.new(self._key, secret.encode("utf-8", "replace"), hashlib.sha256)
        return f"{address} {digest.hexdigest()[:32]}"

    def retry_after(self, address: str, secret: str) -> float:
        """Seconds this address must wait before trying `secret` again, 0 when it may."""
        pair = self._pair(address, secret)
        own = self.per_secret.retry_after(pair)
        if pair in self._good:
            return own
        return max(self.per_address.retry_after(address), own)

    def failed(self, address: str, secret: str) -> None:
        """Counts one failed attempt of `secret` from `address` against both limits."""
        self.per_address.failed(address)
        self.per_secret.failed(self._pair(address, secret))

    def succeeded(self, address: str, secret: str) -> None:
        """Remembers that `secret` proved itself from `address`: the ceiling no longer stops it."""
        _keep(self._good, self._pair(address, secret), None, self._remember)

    def found_nothing(self, address: str, secret: str) -> None:
        """Counts a listing that found no VMs as a failure, once per window for the same pair."""
        pair, now = self._pair(address, secret), self._clock()
        if pair in self._good:
            return
        counted = self._empty.get(pair)
        if counted is not None and now - counted < self._window:
            return
        _keep(self._empty, pair, now, self._remember)
        self.failed(address, secret)


def _keep(records: OrderedDict[str, V], key: str, value: V, capacity: int) -> None:
    """Puts `key` last in `records`, dropping the least recently put past `capacity`."""
    records.pop(key, None)
    records[key] = value
    while len(records) > capacity:
        records.popitem(last=False)
