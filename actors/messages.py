"""The actors' message plumbing, in one place.

Actors hear of work done on other threads (a Journal commit, an APNs answer, a read of
the log) by messages told from callbacks. Two things every such callback needs:

* `tell_quietly`: the actor may have stopped meanwhile (a run ended, a shard was
  stopped), and a message to a stopped actor has no one to act on it: it is dropped,
  not raised into the thread that happened to resolve the future.
* `on_done`: a future's outcome split into its result or its error, where a
  cancellation counts as an error (a cancelled append must not read as a commit).

An unknown message is a bug in the sender: each actor passes it to pykka's default
`on_receive`, which logs it as a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

import pykka

log = logging.getLogger(__name__)

T = TypeVar("T")


def tell_quietly(ref: pykka.ActorRef[Any], message: object) -> None:
    """Tell `ref`, unless it has stopped: then the message is dropped."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        log.debug("dropped %s: its actor has stopped", type(message).__name__)


def failure(future: Future[Any]) -> BaseException | None:
    """The error `future` ended with (a cancellation is one), or None after a result."""
    return CancelledError() if future.cancelled() else future.exception()


def on_done(future: Future[T], on_result: Callable[[T], None],
            on_error: Callable[[BaseException], None]) -> None:
    """When `future` resolves, on whatever thread resolves it: `on_result(result)`, or
    `on_error(error)`."""

    def done(resolved: Future[T]) -> None:
        error = failure(resolved)
        if error is None:
            on_result(resolved.result())
        else:
            on_error(error)

    future.add_done_callback(done)
