"""A wake-up call for an actor at a time: pykka has no timers.

Each shard and the Dispatcher own one `Alarm`: a single thread sleeping until
the earliest requested deadline, then calling `fire` (which `tell`s the actor a
message; the actor itself then decides what is due). One thread per owner, not
one per timer, so a million tokens in back-off cost no threads at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Alarm:
    def __init__(self, fire: Callable[[], None], name: str) -> None:
        self._fire = fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
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
        """Fire at `deadline` (time.monotonic) unless an earlier deadline is already set."""
        with self._cond:
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
                self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._deadline is None:
                        self._cond.wait()
                        continue
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopped:
                    return
                self._deadline = None
            self._fire()
