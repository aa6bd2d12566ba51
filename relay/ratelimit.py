"""Per-client token buckets for the device endpoints, in bounded memory.

Each client (an address) has a bucket of `burst` tokens refilled at `rate` per
second; a request takes one token or is refused with the time until one is
back. A bucket that has been idle long enough to be full again holds no
information (a fresh bucket is full too), so it is dropped: memory follows the
clients active in the last `burst / rate` seconds, not every address ever seen.
A hard cap (`max_clients`) bounds even that under a flood of distinct
addresses; the clients evicted by the cap are the least recently seen, and the
price is that they start again with a full bucket.

Not thread-safe: the API uses one limiter from its one event loop thread.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Enough for a busy public relay; at ~200 bytes per bucket this is ~20 MB at most.
DEFAULT_MAX_CLIENTS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float  # clock time of the last refill


class RateLimiter:
    """`acquire(client)` is 0.0 when the request may go ahead, else the seconds to wait."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate < 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be >= 0, burst and max_clients >= 1")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        # Least recently seen first, so idle clients are found at the front.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        """A rate of 0 turns limiting off."""
        return self.rate > 0

    def __len__(self) -> int:
        """Clients currently remembered (the memory the limiter holds)."""
        return len(self._buckets)

    def __contains__(self, client: str) -> bool:
        return client in self._buckets

    def acquire(self, client: str) -> float:
        if not self.enabled:
            return 0.0
        now = self._clock()
        self._evict_idle(now)
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self.max_clients:
                self._buckets.popitem(last=False)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        else:
            self._buckets.move_to_end(client)
            refill = (now - bucket.updated) * self.rate
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _evict_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely; amortised O(1) per call."""
        full_after = self.burst / self.rate
        while self._buckets:
            client, bucket = next(iter(self._buckets.items()))
            if now - bucket.updated < full_after:
                return
            del self._buckets[client]
