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
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import pykka

from actors.delivery import DeadVerdict
from events import types as ev
from events.journal import Journal
from events.store import LogReader
from relay import metrics
from relay.config import RegistryConfig
from relay.database import RetryPauses
from relay.tokens import redact

log = logging.getLogger(__name__)

# The registered-devices gauge is re-counted from the devices projection at most this often
# (seconds) after a change: one count query instead of a read per registration.
GAUGE_REFRESH = 5.0
# Most requests from the API the Registry holds at once (in its mailbox, or waiting for a
# read of the log): beyond it `register`/`unregister` raise `RegistryBusy` (the API's 503
# with Retry-After) instead of queueing without bound while the database is slow or away.
MAILBOX_BOUND = 10_000


class RegistryBusy(RuntimeError):
    """The Registry holds MAILBOX_BOUND requests already; the caller should retry later."""


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
    reply: Future[None]

    @property
    def token(self) -> str:
        return self.verdict.token


_Request = _Register | _Unregister | _Dead
# (active, registered_at_ms) of a token
_TokenState = tuple[bool, "int | None"]


@dataclass(frozen=True)
class _ReadDone:
    token: str
    state: _TokenState | None  # None: the read failed (error says why)
    error: str = ""


@dataclass(frozen=True)
class _RetryReads:
    pass


@dataclass(frozen=True)
class _RefreshGauge:
    pass


@dataclass
class _Pending:
    """This actor's latest event for a token, as long as the Journal has not settled it."""

    active: bool
    registered_at_ms: int | None
    commit: Future[Any]


class Registry(pykka.ThreadingActor):
    """Never blocks: reads of the log run on a thread of their own and come back as
    messages; a failed read is retried by a timed message. While a token's read is
    out, later requests for that token wait behind it (in order), other tokens do not.
    """

    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 slots: threading.BoundedSemaphore,
                 clock_ms: Callable[[], int] = ev.now_ms) -> None:
        super().__init__()
        self._journal, self._reader = journal, reader
        self._skew_ms = round(config.clock_skew * 1000)
        self._slots, self._clock_ms = slots, clock_ms
        self._pending: dict[str, _Pending] = {}
        self._waiting: dict[str, list[_Request]] = {}  # tokens whose read is out or due
        self._unread: list[str] = []  # failed reads, retried at the retry timer
        self._pauses = RetryPauses()
        self._reads: ThreadPoolExecutor | None = None
        self._gauge_timer: threading.Timer | None = None
        self._retry_timer: threading.Timer | None = None

    def on_start(self) -> None:
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="registry-read")
        self._refresh_gauge()

    def on_stop(self) -> None:
        for timer in (self._gauge_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        if self._reads is not None:
            self._reads.shutdown(wait=False, cancel_futures=True)
        stopped = RuntimeError("the registry stopped before reading the token's state")
        for requests in self._waiting.values():
            for request in requests:
                self._finished(request)
                request.reply.set_exception(stopped)
        self._waiting.clear()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, (_Register, _Unregister, _Dead)):
            self._take(message)
        elif isinstance(message, _ReadDone):
            self._read_done(message)
        elif isinstance(message, _RetryReads):
            self._retry_timer = None
            unread, self._unread = self._unread, []
            for token in unread:
                self._read(token)
        elif isinstance(message, _RefreshGauge):
            self._gauge_timer = None
            self._refresh_gauge()

    # --- requests ---

    def _take(self, request: _Request) -> None:
        token = request.token
        waiting = self._waiting.get(token)
        if waiting is not None:
            waiting.append(request)  # behind the read: order per token is kept
        elif isinstance(request, _Register):
            self._decide(request, None)  # a registration does not depend on the state
        elif (pending := self._overlay(token)) is not None:
            self._decide(request, (pending.active, pending.registered_at_ms))
        else:
            self._waiting[token] = [request]
            self._read(token)

    def _overlay(self, token: str) -> _Pending | None:
        """Our latest event for the token while uncommitted; once settled the log decides."""
        pending = self._pending.get(token)
        if pending is not None and pending.commit.done():
            del self._pending[token]
            return None
        return pending

    def _decide(self, request: _Request, state: _TokenState | None) -> _TokenState | None:
        """Act on one request given the token's state; returns the state after it."""
        self._finished(request)
        if isinstance(request, _Register):
            at_ms = self._clock_ms()
            self._append(request, ev.device_registered(request.token, at_ms), (True, at_ms),
                         metrics.REGISTRATIONS.inc)
            return True, at_ms
        active, registered_at_ms = state or (True, None)
        if isinstance(request, _Unregister):
            if not active:
                self._settle_like_pending(request)
                return state
            event = ev.device_unregistered(request.token, self._clock_ms(), ev.CAUSE_API)
            self._append(request, event, (False, None),
                         lambda: _count_unregistration(ev.CAUSE_API))
            return False, None
        return self._dead(request, active, registered_at_ms, state)

    def _dead(self, request: _Dead, active: bool, registered_at_ms: int | None,
              state: _TokenState | None) -> _TokenState | None:
        verdict = request.verdict
        event = decide_dead_token(verdict, active=active, registered_at_ms=registered_at_ms,
                                  clock_skew_ms=self._skew_ms, now_ms=self._clock_ms())
        if event is None:
            self._settle_like_pending(request)
            return state
        if event.type == ev.DEVICE_UNREGISTERED:
            log.info("unregistering %s: APNs says %s", redact(verdict.token), verdict.cause)
            self._append(request, event, (False, None),
                         lambda: _count_unregistration(verdict.cause))
            return False, None
        log.info("keeping %s despite APNs' %s: it registered again after the verdict",
                 redact(verdict.token), verdict.cause)
        _chain(self._journal.append([event]), request.reply, lambda: None)
        return state

    def _finished(self, request: _Request) -> None:
        """The request leaves the Registry's hands: its slot is free again."""
        if not isinstance(request, _Dead):
            self._slots.release()

    def _settle_like_pending(self, request: _Request) -> None:
        """Nothing to write, but answer only once what we already wrote is committed."""
        pending = self._overlay(request.token)
        if pending is None:
            request.reply.set_result(None)
        else:
            _chain(pending.commit, request.reply, lambda: None)

    def _append(self, request: _Request, event: ev.Event, state: _TokenState,
                on_success: Callable[[], None]) -> None:
        commit = self._journal.append([event])
        self._pending[request.token] = _Pending(*state, commit)
        _chain(commit, request.reply, on_success)
        self._gauge_changes()

    # --- reads, off the actor ---

    def _read(self, token: str) -> None:
        assert self._reads is not None
        ref, reader = self.actor_ref, self._reader

        def read() -> None:
            try:
                state = reader.registration(token)
            except psycopg.Error as exc:
                _tell_quietly(ref, _ReadDone(token, None, str(exc).strip() or repr(exc)))
            else:
                _tell_quietly(ref, _ReadDone(token, state))

        with contextlib.suppress(RuntimeError):  # shut down: the actor is stopping
            self._reads.submit(read)

    def _read_done(self, message: _ReadDone) -> None:
        if message.state is None:
            self._unread.append(message.token)
            if self._retry_timer is None:
                delay = self._pauses.next()
                log.warning("cannot read the registration of %s (%s); retrying in %.1fs",
                            redact(message.token), message.error.splitlines()[0], delay)
                self._retry_timer = self._timer(delay, _RetryReads())
            return
        self._pauses.reset()
        state: _TokenState | None = message.state
        for request in self._waiting.pop(message.token, []):
            state = self._decide(request, state)

    # --- the registered-devices gauge ---

    def _refresh_gauge(self) -> None:
        """Count active devices in the projection (off the actor): the gauge follows the
        log, not guesses. Settled overlay entries are dropped meanwhile."""
        self._pending = {t: p for t, p in self._pending.items() if not p.commit.done()}
        if self._pending:  # not all committed yet: count again once they are
            self._gauge_changes()
        assert self._reads is not None
        reader = self._reader

        def count() -> None:
            try:
                metrics.DEVICES_REGISTERED.set(reader.active_count())
            except psycopg.Error as exc:
                log.warning("cannot count registered devices (%s); the gauge waits", exc)

        with contextlib.suppress(RuntimeError):
            self._reads.submit(count)

    def _gauge_changes(self) -> None:
        if self._gauge_timer is None:
            self._gauge_timer = self._timer(GAUGE_REFRESH, _RefreshGauge())

    def _timer(self, delay: float, message: object) -> threading.Timer:
        ref = self.actor_ref
        timer = threading.Timer(delay, lambda: _tell_quietly(ref, message))
        timer.daemon = True
        timer.start()
        return timer


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

    `register` and `unregister` raise `RegistryBusy` when `mailbox` requests are already
    in the actor's hands; dead-token verdicts are always taken (the run's window of
    credit bounds them).
    """

    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 clock_ms: Callable[[], int] = ev.now_ms, mailbox: int = MAILBOX_BOUND) -> None:
        self._journal, self._reader, self._config = journal, reader, config
        self._clock_ms, self._mailbox = clock_ms, mailbox
        self._slots = threading.BoundedSemaphore(mailbox)
        self._ref: pykka.ActorRef[Registry] | None = None

    @classmethod
    def start(cls, journal: Journal, reader: LogReader, config: RegistryConfig, *,
              clock_ms: Callable[[], int] = ev.now_ms,
              mailbox: int = MAILBOX_BOUND) -> RegistryHandle:
        """Start the Registry actor; the Journal must already be started."""
        handle = cls(journal, reader, config, clock_ms=clock_ms, mailbox=mailbox)
        handle.restart()
        return handle

    def restart(self) -> None:
        """Start the actor again if it is not running (after a crash, or a stop)."""
        if self._ref is not None and self._ref.is_alive():
            return
        # Fresh slots: those of requests lost with a crashed actor would never come back.
        self._slots = threading.BoundedSemaphore(self._mailbox)
        self._ref = Registry.start(self._journal, self._reader, self._config,
                                   slots=self._slots, clock_ms=self._clock_ms)

    def register(self, token: str) -> Future[None]:
        return self._send(_Register(token, Future()), bounded=True)

    def unregister(self, token: str) -> Future[None]:
        return self._send(_Unregister(token, Future()), bounded=True)

    def dead_token(self, verdict: DeadVerdict) -> Future[None]:
        """Unregister or keep a token APNs called dead; resolves after the decision is committed."""
        return self._send(_Dead(verdict, Future()), bounded=False)

    def alive(self) -> bool:
        return self._ref is not None and self._ref.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests; requests already accepted are in the Journal's hands
        (those still waiting for a read of the log fail)."""
        if self._ref is not None and self._ref.is_alive():
            self._ref.stop(block=True, timeout=timeout)

    def _send(self, request: _Request, *, bounded: bool) -> Future[None]:
        ref, slots = self._ref, self._slots
        if bounded and not slots.acquire(blocking=False):
            raise RegistryBusy(f"the registry holds {self._mailbox} requests already")
        try:
            if ref is None:
                raise pykka.ActorDeadError("never started")
            ref.tell(request)
        except pykka.ActorDeadError as exc:
            if bounded:
                slots.release()
            request.reply.set_exception(RuntimeError(f"the registry is not running: {exc}"))
        return request.reply
