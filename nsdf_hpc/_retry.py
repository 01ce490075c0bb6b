"""When and how long to wait before trying a registry again (pure: no I/O, no sleeping).

Used by the registry client (:mod:`.registry`, our own HTTP calls) and by the image service
for a runtime's own pull step. Exponential backoff with "full jitter" (AWS architecture blog,
"Exponential Backoff And Jitter"): attempt *n* waits a uniform random time in
``[0, min(cap, base * 2**(n-1))]``, so that many clients that failed together do not come
back together; a server's ``Retry-After`` is honoured when it asks for longer, up to
``max_retry_after`` (beyond that, waiting is pointless for an interactive pull: give up now).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

#: HTTP statuses worth another attempt: throttled, or the server (or a proxy) failed
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all (1 = no retry); waits are capped at ``cap`` s each."""

    attempts: int = 4
    base: float = 1.0
    cap: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: Optional[float] = None,
              rng: Optional[random.Random] = None) -> Optional[float]:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), or None when no
        attempt is left or the server asks to wait longer than ``max_retry_after``."""
        if attempt >= self.attempts:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        ceiling = min(self.cap, self.base * (2 ** (attempt - 1)))
        wait = (rng or random).uniform(0.0, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    def max_total_wait(self, retry_after: float = 0.0) -> float:
        """The longest all the waits can add up to (for messages and tests)."""
        return sum(max(min(self.cap, self.base * 2 ** (n - 1)), min(retry_after, self.max_retry_after))
                   for n in range(1, self.attempts))


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """A ``Retry-After`` header in seconds from ``now`` (a Unix time): either delta-seconds
    ("120") or an HTTP date ("Wed, 21 Oct 2015 07:28:00 GMT"); None when absent or unreadable.
    A date in the past means "now" (0)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        import email.utils   # noqa: PLC0415 (only for an HTTP-date Retry-After)
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)
