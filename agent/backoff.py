"""Bounded exponential backoff with full jitter.

Thousands of agents losing the same collector must not come back in lockstep:
each delay is drawn uniformly from [base/2, base], base doubling up to a cap.
The random source is injectable so tests assert the schedule, not wait for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(
        self,
        initial_s: float = 0.5,
        maximum_s: float = 60.0,
        multiplier: float = 2.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < initial_s <= maximum_s:
            raise ValueError("backoff needs 0 < initial_s <= maximum_s")
        if multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1 (delays must not shrink), got {multiplier}")
        self._initial = initial_s
        self._maximum = maximum_s
        self._multiplier = multiplier
        self._rand = rand
        self._base = initial_s
        self.attempts = 0

    def next_delay(self, cap_s: float | None = None) -> float:
        """The delay before the next attempt; grows until reset(). ``cap_s`` bounds this one
        delay (and the growth behind it) lower than the maximum."""
        ceiling = self._maximum if cap_s is None else min(cap_s, self._maximum)
        base = min(self._base, ceiling)
        self._base = min(ceiling, self._base * self._multiplier)
        self.attempts += 1
        return base / 2 + self._rand() * base / 2

    def reset(self) -> None:
        self._base = self._initial
        self.attempts = 0
