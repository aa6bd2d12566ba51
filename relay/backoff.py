"""Decorrelated-jitter back-off: between one token's attempts within a run (the
`wakeup.backoff_*` settings), and between attempts to reach the database
(`relay.database.RetryPauses`).

The formula (the "decorrelated jitter" of the AWS architecture blog, with the
growth factor taken from `wakeup.backoff_factor` instead of a fixed 3):

    delay_1 = uniform(base, base * factor)            capped at `maximum`
    delay_n = uniform(base, delay_{n-1} * factor)     capped at `maximum`

Each delay is drawn afresh from the previous one, so tokens that failed
together (an APNs outage answers many at once) spread out instead of retrying
in lock-step, while the expected delay still grows geometrically. With the
defaults (15 min, 1 h, 2.5) the first retry falls between 15 and 37.5 minutes,
which respects Apple's "retry 5xx after 15 minutes" rule.

The previous delay is not in the event log, so a run resumed after a crash
starts the sequence over from `base` for later attempts; the already scheduled
next attempt (which *is* in the log) is kept.
"""

from __future__ import annotations

import random

# The random source of every jitter not given its own: seeding a new Random reads the
# system's entropy, which cost the Journal 2 % of its CPU when it made one per commit.
_SHARED = random.Random()


class DecorrelatedJitter:
    """Draws back-off delays (seconds); the random source is injectable for tests."""

    def __init__(self, base: float, maximum: float, factor: float,
                 rng: random.Random | None = None) -> None:
        if base < 0 or maximum < base or factor < 1:
            raise ValueError(f"need 0 <= base <= maximum and factor >= 1, got "
                             f"base={base}, maximum={maximum}, factor={factor}")
        self.base, self.maximum, self.factor = base, maximum, factor
        self._rng = rng or _SHARED

    def next_delay(self, previous: float | None) -> float:
        """The delay before the next attempt, given the delay before this one (None: first)."""
        start = self.base if previous is None else max(previous, self.base)
        upper = max(self.base, start * self.factor)
        return min(self.maximum, self._rng.uniform(self.base, upper))
