"""A wake-up call for an actor at a time: pykka has no timers.

Each shard and the Dispatcher own one `Alarm`: a single thread sleeping until
the earliest requested deadline, then calling `fire` (which `tell`s the actor a
message; the actor itself then decides what is due). One thread per owner, not
one per timer, so a million tokens in back-off cost no threads at all.

Every requested deadline fires, not only the earliest: an owner may ask for a
wake-up for two reasons (the breaker's resume and a database retry, say), and a
later one forgotten would leave its reason waiting for an event that may never
come. Deadlines that have passed together fire once.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable


class Alarm:
    def __init__(self, fire: Callable[[], None], name: str) -> None:
        self._fire = fire
        self._cond = threading.Condition()
        self._deadlines: list[float] = []  # a heap
        self._known: set[float] = set()  # the same deadlines, so a repeat costs nothing
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def at(self, deadline: float) -> None:
        """Fire at `deadline` (time.monotonic), whatever other deadlines are pending."""
        with self._cond:
            if deadline in self._known:
                return
            self._known.add(deadline)
            heapq.heappush(self._deadlines, deadline)
            if self._deadlines[0] == deadline:
                self._cond.notify()

    @property
    def pending(self) -> int:
        """How many deadlines wait to fire (for tests)."""
        with self._cond:
            return len(self._deadlines)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if not self._deadlines:
                        self._cond.wait()
                        continue
                    remaining = self._deadlines[0] - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopped:
                    return
                now = time.monotonic()
                while self._deadlines and self._deadlines[0] <= now:
                    self._known.discard(heapq.heappop(self._deadlines))
            self._fire()
