"""The poll schedule (pure arithmetic; the clock and the sleep are injected).

Short at first, then longer, with jitter, up to a cap: ``Job.wait`` polls with it and the
backend retries transient ``sbatch`` errors with it. Tests pass a fake clock and sleep.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Optional

__all__ = ["Backoff"]


class Backoff:
    """Poll intervals: ``initial``, times ``factor`` each round, capped at ``cap``, with jitter.

    The jitter is multiplicative in ``[1 - jitter, 1]`` so the cap is never exceeded and
    ``cap * (1 - jitter)`` bounds the poll rate from above (15 s, 0.2: at most 5 per minute).
    """

    def __init__(self, initial: float = 0.5, factor: float = 1.5, cap: float = 15.0,
                 jitter: float = 0.2, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Optional[random.Random] = None) -> None:
        if initial <= 0 or factor < 1 or cap < initial or not 0 <= jitter < 1:
            raise ValueError("invalid backoff parameters")
        self.initial, self.factor, self.cap, self.jitter = initial, factor, cap, jitter
        self.clock, self._sleep = clock, sleep
        self.rng = rng or random.Random()
        self._next = initial

    def derive(self, initial: float, factor: float, jitter: Optional[float] = None) -> "Backoff":
        """Another schedule with the same cap, clock, sleep and random source."""
        return Backoff(initial=min(self.cap, initial), factor=factor, cap=self.cap,
                       jitter=self.jitter if jitter is None else jitter, clock=self.clock,
                       sleep=self._sleep, rng=self.rng)

    @property
    def at_cap(self) -> bool:
        """The next interval is the cap."""
        return self._next >= self.cap

    def pause(self, dt: float) -> None:
        """Sleep ``dt`` s on this schedule's sleep (for a caller that slices an interval)."""
        self._sleep(dt)

    def reset(self) -> None:
        """Back to the initial interval (something happened: poll soon again)."""
        self._next = self.initial

    def next_interval(self) -> float:
        base = self._next
        self._next = min(self.cap, self._next * self.factor)
        return base * (1.0 - self.jitter * self.rng.random())

    def sleep(self, deadline: Optional[float] = None) -> float:
        """Sleep the next interval (never past ``deadline``, a ``clock()`` value)."""
        dt = self.next_interval()
        if deadline is not None:
            dt = max(0.0, min(dt, deadline - self.clock()))
        if dt > 0:
            self._sleep(dt)
        return dt
