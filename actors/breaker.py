"""Circuit breaker: pause all sending while APNs itself is in trouble.

A 5xx (`InternalServerError`, `ServiceUnavailable`, `Shutdown`), a 429, or a
send with no HTTP answer because none came in time (APNs unreachable, no
connection could be made) is *trouble*. The loss of a connection or a stream is
not: the client sends those requests again on a fresh connection, and a loss
that still reaches here (a request that kept killing connections) says
something about that one request, not about APNs. One
such answer says little: Apple can fail one request among thousands. Many
*different* tokens failing in a row, with no healthy answer between them, says
APNs (or our path to it) is down, and retrying token by token would only burn
every token's attempts. So the breaker trips after `trip_after` consecutive
troubled answers from distinct tokens; any answer below 500 (even a rejection:
APNs answered, so it is up) resets the streak.

Tripped (OPEN), no send may start for `pause` seconds. Then (HALF_OPEN) one
probe send is admitted; a healthy answer closes the breaker, trouble opens it
for another pause. Answers to sends started before the trip do not count while
open: they describe the outage we already know about.

Plain class with an injectable monotonic clock, so it is tested without threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

# Distinct tokens that must fail in a row (no healthy answer between) to trip.
# Ten is far above what independent per-token 5xx produce by chance, and small
# next to the in-flight window, so an outage is caught early.
TRIP_AFTER_DISTINCT_TOKENS = 10


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Reasons of answers-without-status that describe one lost connection (or child process)
# rather than APNs: the client re-sent them already (relay.apns.client.TRANSPORT_RESENDS).
TRANSPORT_LOSSES = frozenset({"ConnectionLost", "StreamReset", "ChildProcessLost", "Closed"})


def is_trouble(status: int | None, reason: str | None = None) -> bool:
    """An answer that points at APNs (or the path to it) rather than at one token."""
    if status is None:
        return reason not in TRANSPORT_LOSSES
    return status >= 500 or status == 429


class CircuitBreaker:
    def __init__(self, pause: float, *, trip_after: int = TRIP_AFTER_DISTINCT_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if trip_after < 1:
            raise ValueError("trip_after must be at least 1")
        self.pause, self.trip_after, self._clock = pause, trip_after, clock
        self._state = BreakerState.CLOSED
        self._streak: set[str] = set()
        self._resume_at: float | None = None
        self._probe: str | None = None
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        """The state now; an expired pause reads as HALF_OPEN."""
        if self._state is BreakerState.OPEN and self._clock() >= (self._resume_at or 0.0):
            self._state, self._probe = BreakerState.HALF_OPEN, None
        return self._state

    @property
    def resume_at(self) -> float | None:
        """Clock time at which an open breaker admits its probe (None unless open)."""
        return self._resume_at if self.state is BreakerState.OPEN else None

    def admit(self, token: str) -> bool:
        """May a send for `token` start now? In HALF_OPEN the first caller becomes the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probe is None:
            self._probe = token
            return True
        return False

    def void_probe(self, token: str) -> None:
        """The admitted probe did not send after all (e.g. its token was not due yet)."""
        if self._probe == token:
            self._probe = None

    def record(self, token: str, status: int | None, reason: str | None = None) -> None:
        """Feed the HTTP status of one answered send (None: no answer, `reason` says why)."""
        state = self.state
        trouble = is_trouble(status, reason)
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN:
            if token != self._probe:
                return
            if status is None and not trouble:  # the probe's connection was lost: no verdict
                self._probe = None
                return
            if trouble:
                self._open()
            else:
                self._state, self._probe, self._resume_at = BreakerState.CLOSED, None, None
                self._streak.clear()
            return
        if not trouble:
            self._streak.clear()
            return
        self._streak.add(token)
        if len(self._streak) >= self.trip_after:
            self._open()

    def _open(self) -> None:
        self._state, self._probe = BreakerState.OPEN, None
        self._resume_at = self._clock() + self.pause
        self._streak.clear()
        self.trips += 1
