"""The local grid's test controls: the next calls of an operation fail, or every call does."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from core.ports import BackendError, BackendUnavailable

OPERATIONS = frozenset(
    {
        "list_nodes",
        "deploy_vm",
        "get_vm",
        "start_vm",
        "stop_vm",
        "restart_vm",
        "delete_vm",
        "deploy_gateway",
        "delete_gateway",
    }
)


@dataclass(slots=True)
class _Failure:
    message: str
    retryable: bool


@dataclass(slots=True)
class Faults:
    """Failures a test has asked for, by operation, and whether the grid is unavailable."""

    failures: dict[str, deque[_Failure]] = field(default_factory=dict)
    unavailable: bool = False

    def fail_next(self, operation: str, message: str, *, retryable: bool, times: int) -> None:
        """Makes the next `times` calls of `operation` raise BackendError(message)."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; one of {sorted(OPERATIONS)}")
        queue = self.failures.setdefault(operation, deque())
        queue.extend(_Failure(message, retryable) for _ in range(times))

    def check(self, operation: str) -> None:
        """Raises what was asked for a call of `operation`, once per failure asked."""
        if self.unavailable:
            raise BackendUnavailable("local grid is unavailable")
        if self.failures:
            queue = self.failures.get(operation)
            if queue:
                failure = queue.popleft()
                if not queue:
                    del self.failures[operation]
                raise BackendError(failure.message, retryable=failure.retryable)
