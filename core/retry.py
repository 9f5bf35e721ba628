"""The one retry policy: bounded tries, exponential backoff with jitter, a deadline per step."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try again; per-step overrides name a step (or an effect).

    The VM reactor, the user manager's steps and a store that refuses a write all use it.
    """

    retries: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    deadline: float = 600.0
    deadlines: Mapping[str, float] = field(default_factory=dict)
    retries_by_step: Mapping[str, int] = field(default_factory=dict)

    def deadline_of(self, step: str) -> float:
        return self.deadlines.get(step, self.deadline)

    def tries_of(self, step: str = "") -> int:
        """How many tries a step gets in all: the first plus its retries."""
        return 1 + max(0, int(self.retries_by_step.get(step, self.retries)))

    def delay(self, failures: int) -> float:
        """The pause after `failures` failures in a row: doubling from `base_delay`, jittered
        between half and all of it, capped at `max_delay`."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return random.uniform(ceiling / 2, ceiling)
