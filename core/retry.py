"""The one retry policy: bounded tries, exponential backoff, optional jitter, per-step deadlines."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.contract import STEPS, DecommissionPart


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try again; per-step overrides name a step (or an effect).

    The VM reactor, the user manager's steps, a store that refuses a write, the views' runner,
    the SDK's requests, the dashboard's failure limiter, the SSH readiness poll and the
    JetStream idempotency keys' background tries all use it; `jitter=False` pauses exactly
    the ceiling (for a caller whose pauses must be foreseeable).
    """

    retries: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    deadline: float = 600.0
    deadlines: Mapping[str, float] = field(default_factory=dict)
    retries_by_step: Mapping[str, int] = field(default_factory=dict)
    jitter: bool = True

    def deadline_of(self, step: str) -> float:
        return self.deadlines.get(step, self.deadline)

    def tries_of(self, step: str = "") -> int:
        """How many tries a step gets in all: the first plus its retries."""
        return 1 + max(0, int(self.retries_by_step.get(step, self.retries)))

    def delay(self, failures: int) -> float:
        """The pause after `failures` failures in a row: doubling from `base_delay`, capped at
        `max_delay`, jittered between half and all of it."""
        doublings = min(max(0, failures - 1), 60)  # 2**60 passes any cap; no OverflowError
        ceiling = min(self.max_delay, self.base_delay * 2**doublings)
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


def step_policy(
    *,
    deadline: float,
    retries: int,
    base_delay: float,
    max_delay: float,
    deadlines: Mapping[str, float],
    retries_by_step: Mapping[str, float],
) -> RetryPolicy:
    """A RetryPolicy whose per-step overrides name real steps (ValueError otherwise)."""
    known: set[str] = {*STEPS, *DecommissionPart}
    for name in (*deadlines, *retries_by_step):
        if name not in known:
            raise ValueError(f"unknown step {name!r} in the step settings")
    return RetryPolicy(
        deadline=deadline,
        retries=retries,
        base_delay=base_delay,
        max_delay=max_delay,
        deadlines=dict(deadlines),
        retries_by_step={k: int(v) for k, v in retries_by_step.items()},
    )
