"""The Registry: the one owner of registrations.

It turns API calls into `device_registered` / `device_unregistered` events and
APNs dead-token verdicts into `device_unregistered` or `unregister_skipped`,
applying the re-registration rule (reference §4, issue 4): a verdict at time T
unregisters the token only if it was last registered at or before
T - `registry.clock_skew`; a registration after that means the device came back
(or its clock and Apple's disagree by a few seconds) and a spurious wake-up costs
nothing, whereas a wrong unregistration silences a device until it re-registers.

Why an overlay: the Journal commits asynchronously, so a registration accepted a
moment ago may not be visible to `LogReader.registration` yet. Every decision
runs on this actor's thread, which sees its own not-yet-committed events in
`_pending`; together with the committed state that makes ordering exact within
the process. Entries leave the overlay once committed (then the log has them).

Dead-token verdicts are not decided here but by the Journal, inside the append
transaction after the head lock (`Journal.append_decided`): a registration another
process commits meanwhile (a second relay, `relay wakeup` beside the supervisor) is
then either before the decision, and seen, or after it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pykka

from actors.delivery import DeadVerdict
from actors.replies import ReplyBook
from events import types as ev
from events.journal import Journal
from events.store import LogReader
from relay import metrics
from relay.config import RegistryConfig
from relay.database import RetryPauses
from relay.tokens import redact

log = logging.getLogger(__name__)

# Retry of registration reads while the database is unreachable (same policy as the Journal).
# The registered-devices gauge is re-counted from the devices projection at most this often
# (seconds) after a change: one count query instead of a read per registration.
GAUGE_REFRESH = 5.0


class DeviceRegistry(Protocol):
    """What the HTTP API needs: both futures resolve only after COMMIT."""

    def register(self, token: str) -> Future[None]: ...

    def unregister(self, token: str) -> Future[None]: ...


def decide_dead_token(verdict: DeadVerdict, *, active: bool, registered_at_ms: int | None,
                      clock_skew_ms: int, now_ms: int) -> ev.Event | None:
    """The event a dead-token verdict leads to; None when the token is not registered."""
    if not active:
        return None
    cutoff = verdict.verdict_at_ms - clock_skew_ms
    if registered_at_ms is None or registered_at_ms <= cutoff:
        return ev.device_unregistered(
            verdict.token, now_ms, verdict.cause, apple_timestamp_ms=verdict.apple_timestamp_ms,
            run=verdict.run, apns_id=verdict.apns_id)
    why = (f"registered at {ev.iso_ms(registered_at_ms)}, after APNs' verdict at "
           f"{ev.iso_ms(verdict.verdict_at_ms)} minus the clock skew allowance of "
           f"{clock_skew_ms} ms: the device registered again")
    return ev.unregister_skipped(
        verdict.token, now_ms, verdict.cause, verdict_at_ms=verdict.verdict_at_ms,
        registered_at_ms=registered_at_ms, why=why, run=verdict.run,
        apple_timestamp_ms=verdict.apple_timestamp_ms)


@dataclass(frozen=True)
class _Register:
    token: str
    reply: Future[None]


@dataclass(frozen=True)
class _Unregister:
    token: str
    reply: Future[None]


@dataclass(frozen=True)
class _Dead:
    verdict: DeadVerdict
    reply: Future[str | None]


@dataclass(frozen=True)
class _RefreshGauge:
    pass


@dataclass(frozen=True)
class _Committed:
    token: str
    seq: int


@dataclass
class _Pending:
    """This actor's latest event for a token that the Journal has not committed yet."""

    active: bool
    registered_at_ms: int | None
    seq: int
    commit: Future[None]


class Registry(pykka.ThreadingActor):
    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 stopping: threading.Event, replies: ReplyBook,
                 clock_ms: Callable[[], int] = ev.now_ms) -> None:
        super().__init__()
        self._journal, self._reader, self._replies = journal, reader, replies
        self._skew_ms = round(config.clock_skew * 1000)
        self._stopping, self._clock_ms = stopping, clock_ms
        self._pending: dict[str, _Pending] = {}
        self._seq = 0
        self._gauge_timer: threading.Timer | None = None

    def on_start(self) -> None:
        self._refresh_gauge()

    def on_stop(self) -> None:
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
        self._replies.close("stopped")

    def on_failure(self, exception_type: type[BaseException] | None,
                   exception_value: BaseException | None, traceback: Any) -> None:
        """Whoever waits on a reply this actor owes hears of the crash (a Sender shard's
        credit rides on it) instead of waiting forever."""
        if self._gauge_timer is not None:
            self._gauge_timer.cancel()
        self._replies.close(f"crashed: {exception_value!r}")

    def _refresh_gauge(self) -> None:
        """Count active devices in the projection: the gauge follows the log, not guesses."""
        self._gauge_timer = None
        try:
            metrics.DEVICES_REGISTERED.set(self._reader.active_count())
        except psycopg.Error as exc:
            log.warning("cannot count registered devices (%s); the gauge waits", exc)

    def _gauge_changes(self) -> None:
        if self._gauge_timer is None:
            ref = self.actor_ref
            self._gauge_timer = threading.Timer(
                GAUGE_REFRESH, lambda: _tell_quietly(ref, _RefreshGauge()))
            self._gauge_timer.daemon = True
            self._gauge_timer.start()

    def on_receive(self, message: Any) -> None:
        self._handle(message)
        reply = getattr(message, "reply", None)
        if reply is not None:  # handed to the Journal's commit, or answered
            self._replies.release(reply)

    def _handle(self, message: Any) -> None:
        if isinstance(message, _Register):
            self._register(message.token, message.reply)
        elif isinstance(message, _Unregister):
            self._unregister(message.token, message.reply)
        elif isinstance(message, _Dead):
            self._dead(message.verdict, message.reply)
        elif isinstance(message, _Committed):
            pending = self._pending.get(message.token)
            if pending is not None and pending.seq == message.seq:
                del self._pending[message.token]
            self._gauge_changes()  # after the commit, so the next count includes it
        elif isinstance(message, _RefreshGauge):
            self._refresh_gauge()

    def _register(self, token: str, reply: Future[None]) -> None:
        at_ms = self._clock_ms()
        commit = self._append(token, ev.device_registered(token, at_ms), True, at_ms)
        _chain(commit, reply, metrics.REGISTRATIONS.inc)

    def _unregister(self, token: str, reply: Future[None]) -> None:
        active, _ = self._state(token, retry=True) or (True, None)
        if not active:
            self._settle_like_pending(token, reply)
            return
        at_ms = self._clock_ms()
        commit = self._append(token, ev.device_unregistered(token, at_ms, ev.CAUSE_API),
                              False, None)
        _chain(commit, reply, lambda: _count_unregistration(ev.CAUSE_API))

    def _dead(self, verdict: DeadVerdict, reply: Future[str | None]) -> None:
        skew_ms, now_ms = self._skew_ms, self._clock_ms()

        def decide(active: bool, registered_at_ms: int | None) -> ev.Event | None:
            return decide_dead_token(verdict, active=active, registered_at_ms=registered_at_ms,
                                     clock_skew_ms=skew_ms, now_ms=now_ms)

        def decided(future: Future[ev.Event | None]) -> None:
            error = CancelledError() if future.cancelled() else future.exception()
            if error is not None:
                reply.set_exception(error)
                return
            event = future.result()
            if event is not None and event.type == ev.DEVICE_UNREGISTERED:
                log.info("unregistered %s: APNs says %s", redact(verdict.token), verdict.cause)
                _count_unregistration(verdict.cause)
            elif event is not None:
                log.info("kept %s despite APNs' %s: it registered again after the verdict",
                         redact(verdict.token), verdict.cause)
            reply.set_result(None if event is None else event.type)

        self._journal.append_decided(verdict.token, decide).add_done_callback(decided)

    def _state(self, token: str, *, retry: bool) -> tuple[bool, int | None] | None:
        """(active, registered_at_ms), own pending events first; None if unreadable."""
        pending = self._pending.get(token)
        if pending is not None:
            return pending.active, pending.registered_at_ms
        pauses = RetryPauses()
        while True:
            try:
                active, registered_at_ms = self._reader.registration(token)
                return bool(active), registered_at_ms
            except psycopg.Error as exc:
                if not retry or self._stopping.is_set():
                    return None
                delay = pauses.next()
                log.warning("cannot read the registration of %s (%s); retrying in %.1fs",
                            redact(token), exc, delay)
                if self._stopping.wait(delay):
                    return None

    def _settle_like_pending(self, token: str, reply: Future[None]) -> None:
        """Nothing to write, but answer only once what we already wrote is committed."""
        pending = self._pending.get(token)
        if pending is None:
            reply.set_result(None)
        else:
            _chain(pending.commit, reply, lambda: None)

    def _append(self, token: str, event: ev.Event, active: bool,
                registered_at_ms: int | None) -> Future[None]:
        self._seq += 1
        seq = self._seq
        commit = self._journal_commit(event)
        self._pending[token] = _Pending(active, registered_at_ms, seq, commit)
        ref = self.actor_ref
        commit.add_done_callback(lambda _: _tell_quietly(ref, _Committed(token, seq)))
        return commit

    def _journal_commit(self, event: ev.Event) -> Future[None]:
        done: Future[None] = Future()
        _chain(self._journal.append([event]), done, lambda: None)
        return done


def _tell_quietly(ref: pykka.ActorRef[Any], message: object) -> None:
    with contextlib.suppress(pykka.ActorDeadError):  # stopped meanwhile: overlay gone too
        ref.tell(message)


def _chain(source: Future[Any], target: Future[None], on_success: Callable[[], None]) -> None:
    """Resolve `target` when `source` does (same error), running `on_success` first."""

    def forward(done: Future[Any]) -> None:
        error = CancelledError() if done.cancelled() else done.exception()
        if error is not None:
            target.set_exception(error)
            return
        on_success()
        target.set_result(None)

    source.add_done_callback(forward)


def _count_unregistration(cause: str) -> None:
    metrics.UNREGISTRATIONS.labels(cause).inc()


class RegistryHandle:
    """The DeviceRegistry implementation: thread-safe, returns concurrent futures.

    The handle outlives its actor: after a crash the supervisor calls `restart()` and
    everyone holding the handle (the HTTP API, the Sender shards) reaches the new actor.
    The new actor's overlay starts empty, which is exact: whatever the old one appended
    is in the Journal's hands and visible to `LogReader` once committed.
    """

    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 clock_ms: Callable[[], int] = ev.now_ms) -> None:
        self._journal, self._reader, self._config = journal, reader, config
        self._clock_ms = clock_ms
        self._stopping = threading.Event()
        self._replies = ReplyBook("the registry")
        self._ref: pykka.ActorRef[Registry] | None = None

    @classmethod
    def start(cls, journal: Journal, reader: LogReader, config: RegistryConfig, *,
              clock_ms: Callable[[], int] = ev.now_ms) -> RegistryHandle:
        """Start the Registry actor; the Journal must already be started."""
        handle = cls(journal, reader, config, clock_ms=clock_ms)
        handle.restart()
        return handle

    def restart(self) -> None:
        """Start the actor again if it is not running (after a crash, or a stop)."""
        if self._ref is not None and self._ref.is_alive():
            return
        self._stopping = threading.Event()
        self._replies = ReplyBook("the registry")
        self._ref = Registry.start(self._journal, self._reader, self._config,
                                   stopping=self._stopping, replies=self._replies,
                                   clock_ms=self._clock_ms)

    def register(self, token: str) -> Future[None]:
        return self._send(lambda reply: _Register(token, reply))

    def unregister(self, token: str) -> Future[None]:
        return self._send(lambda reply: _Unregister(token, reply))

    def dead_token(self, verdict: DeadVerdict) -> Future[str | None]:
        """Unregister or keep a token APNs called dead; resolves after the decision is
        committed, with the type of the event written (None: the token was not registered)."""
        reply: Future[str | None] = Future()
        try:
            if self._ref is None:
                raise pykka.ActorDeadError("never started")
            self._ref.tell(_Dead(verdict, reply))
        except pykka.ActorDeadError as exc:
            reply.set_exception(RuntimeError(f"the registry is not running: {exc}"))
        return reply

    def alive(self) -> bool:
        return self._ref is not None and self._ref.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests; requests already accepted are in the Journal's hands."""
        self._stopping.set()
        if self._ref is not None and self._ref.is_alive():
            self._ref.stop(block=True, timeout=timeout)

    def _send(self, build: Callable[[Future[None]], object]) -> Future[None]:
        reply: Future[None] = Future()
        ref = self._ref
        try:
            if ref is None:
                raise pykka.ActorDeadError("never started")
            self._replies.track(reply)  # failed if the actor dies before it answers
            ref.tell(build(reply))
        except pykka.ActorDeadError as exc:
            with contextlib.suppress(InvalidStateError):  # failed by the book already
                reply.set_exception(RuntimeError(f"the registry is not running: {exc}"))
        return reply
