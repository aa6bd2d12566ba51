"""Replies carried in `tell` messages: resolved by the actor, or failed when it dies.

pykka answers an `ask` with ActorDeadError when the actor dies, but a future that
travels inside a `tell` message is ours: pykka drops the message (and the future
with it) when the actor dies with it still queued, or dies while handling it. Whoever
waits on that future waits forever; for the Dispatcher, whose credit comes back on a
reply, that stalls the run.

A `ReplyBook` belongs to one actor incarnation. The sender `track`s the reply before
the `tell`; the actor `release`s it once it handed the reply to whatever resolves it
(a Journal commit, say); on death the actor `close`s the book, which fails every
reply still in it. A reply tracked after the close fails at once, so no reply slips
between the death and the sender's next look at the actor.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any


class ActorDied(RuntimeError):
    """The actor that owed this reply died before it could give it."""


class ReplyBook:
    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._open: set[Future[Any]] = set()
        self._closed: str | None = None

    def track(self, reply: Future[Any]) -> None:
        """Before the `tell`: the actor owes `reply` from now on."""
        with self._lock:
            closed = self._closed
            if closed is None:
                self._open.add(reply)
        if closed is not None:
            _fail(reply, ActorDied(f"{self._owner} is not running ({closed})"))
            return
        reply.add_done_callback(self.release)

    def release(self, reply: Future[Any]) -> None:
        """The reply no longer depends on the actor (resolved, or handed on)."""
        with self._lock:
            self._open.discard(reply)

    def close(self, why: str) -> None:
        """The actor is dead: fail every reply it still owes, and every later one."""
        with self._lock:
            if self._closed is None:
                self._closed = why
            owed, self._open = self._open, set()
        for reply in owed:
            _fail(reply, ActorDied(f"{self._owner} stopped before answering ({why})"))

    @property
    def owed(self) -> int:
        with self._lock:
            return len(self._open)


def _fail(reply: Future[Any], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # resolved meanwhile: that answer stands
        reply.set_exception(error)
