"""The Registry: the one owner of registrations.

It turns API calls into `device_registered` / `device_unregistered` events and
APNs dead-token verdicts into `device_unregistered` or `unregister_skipped`,
applying the re-registration rule (docs/apns.md §4): a verdict at time T
unregisters the token only if it was last registered at or before
T - `registry.clock_skew`; a registration after that means the device came back
(or its clock and Apple's disagree by a few seconds) and a spurious wake-up costs
nothing, whereas a wrong unregistration silences a device until it re-registers.

Why an overlay: the Journal commits asynchronously, so a registration accepted a
moment ago may not be visible to `LogReader.registration` yet. `_Overlay` keeps the
latest event we appended per token until the Journal settles it, and its lock orders
every append about a token: a registration is appended under it by the caller's
thread (no hop through the actor: it depends on no state), a decision (unregister,
dead token) is taken and appended under it by the actor. A decision sees every
registration appended before it, and every later one lands after it in the log.

The actor never blocks: reads of the log run on a thread of its own and come back as
messages, a failed read is retried by a timed message. While a token's read is out,
later requests for that token wait behind it, other tokens do not; when it comes
back, an overlay entry appended after the read began wins over what it read.

Dead-token verdicts are not decided here but by the Journal, inside the append
transaction after the head lock (`Journal.append_decided`): a registration another
process commits meanwhile (a second relay, `relay wakeup` beside the supervisor) is
then either before the decision, and seen, or after it. Until that decision commits,
later requests for the token wait, then read what it decided.

Whatever reply the actor owes is in a `ReplyBook`: if the actor dies, every reply it
still owes fails at once (a Sender shard's credit rides on it) instead of never coming.

One module past 500 lines, for one idea: the order of every append about a token.
The handle (appends registrations under the overlay lock), the overlay and the actor
(decides under the same lock) keep that order together; apart, each would need the
others to be read.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Container
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import psycopg
import pykka

from actors.delivery import DeadVerdict
from actors.messages import failure, on_done, tell_quietly
from actors.replies import ReplyBook
from events import types as ev
from events.journal import Journal
from events.store import LogReader
from relay import metrics
from relay.config import RegistryConfig
from relay.database import RetryPauses, first_line, is_transient
from relay.tokens import redact

log = logging.getLogger(__name__)

# The registered-devices gauge is re-counted from the devices projection at most this often
# (seconds) after a change: one count query instead of a read per registration.
GAUGE_REFRESH = 5.0
# Settled overlay entries are dropped this often (seconds). Each holds its commit's future
# (a condition, a lock, callbacks): kept for a whole gauge period at a few thousand
# registrations a second, they made Python's full garbage collections pause the API for
# 100-150 ms, the p99 of a loaded device API.
OVERLAY_SWEEP = 0.5
# Most unregistrations the Registry holds at once (in its mailbox, or waiting for a read
# of the log): beyond it `unregister` raises `RegistryBusy` (the API's 503
# with Retry-After) instead of queueing without bound while the database is slow or away.
MAILBOX_BOUND = 10_000


class RegistryBusy(RuntimeError):
    """The Registry holds MAILBOX_BOUND requests already; the caller should retry later."""


class DeviceRegistry(Protocol):
    """What the HTTP API needs: both futures resolve only after COMMIT."""

    def register(self, token: str) -> Future[Any]: ...

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
class _Unregister:
    token: str
    reply: Future[None]


@dataclass(frozen=True)
class _Dead:
    verdict: DeadVerdict
    reply: Future[str | None]  # the type of the event decided (None: nothing written)

    @property
    def token(self) -> str:
        return self.verdict.token


_Request = _Unregister | _Dead
# (active, registered_at_ms) of a token
_TokenState = tuple[bool, "int | None"]


@dataclass(frozen=True)
class _ReadDone:
    token: str
    state: _TokenState | None  # None: the read failed (error says why)
    error: psycopg.Error | None = None


@dataclass(frozen=True)
class _RetryReads:
    pass


@dataclass(frozen=True)
class _ReadAgain:
    """A dead-token decision about `token` is settled: read what it decided."""

    token: str


@dataclass(frozen=True)
class _RefreshGauge:
    pass


class _SweepOverlay:
    pass


class _Unsettled(NamedTuple):
    """Our latest event for a token, until the Journal settles it."""

    active: bool
    registered_at_ms: int | None
    commit: Future[Any]
    seq: int


class _Overlay:
    """The latest event appended per token while uncommitted, and the lock that orders
    appends (see the module docstring). Shared by the handle and its actors."""

    def __init__(self, journal: Journal) -> None:
        self.lock = threading.RLock()  # the actor hands a verdict on while holding it
        self._journal = journal
        self._pending: dict[str, _Unsettled] = {}
        self.seq = 0  # appends so far: a read remembers it to spot later appends
        self.changed = False  # appended since the gauge was last counted

    def append(self, event: ev.Event, state: _TokenState) -> Future[Any]:
        """Append the event of `state` (hold `lock`)."""
        commit = self._journal.append([event])
        self.seq += 1
        self._pending[event.data["token"]] = _Unsettled(*state, commit, self.seq)
        self.changed = True
        return commit

    def live(self, token: str) -> _Unsettled | None:
        """The token's entry while its commit is unsettled (hold `lock`)."""
        pending = self._pending.get(token)
        return pending if pending is not None and not pending.commit.done() else None

    def since(self, token: str, seq: int) -> _Unsettled | None:
        """The token's entry if appended after `seq`, settled or not (hold `lock`)."""
        pending = self._pending.get(token)
        return pending if pending is not None and pending.seq > seq else None

    def entries(self) -> int:
        """Entries held, settled or not (for tests and debugging)."""
        with self.lock:
            return len(self._pending)

    def sweep(self, keep: Container[str]) -> bool:
        """Drop settled entries (the log has them) except `keep`'s; True if some are not."""
        with self.lock:
            self._pending = {token: p for token, p in self._pending.items()
                             if token in keep or not p.commit.done()}
            return any(not p.commit.done() for p in self._pending.values())


class Registry(pykka.ThreadingActor):
    """Unregistrations and dead-token verdicts: the decisions that need a token's state."""

    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 overlay: _Overlay, slots: threading.BoundedSemaphore, replies: ReplyBook,
                 clock_ms: Callable[[], int] = ev.now_ms) -> None:
        super().__init__()
        self._journal, self._reader, self._overlay = journal, reader, overlay
        self._replies = replies
        self._skew_ms = round(config.clock_skew * 1000)
        self._slots, self._clock_ms = slots, clock_ms
        # Tokens whose read is out or due: overlay.seq when it began, requests behind it.
        self._waiting: dict[str, tuple[int, list[_Request]]] = {}
        self._unread: list[str] = []  # failed reads, retried at the retry timer
        self._pauses = RetryPauses()
        self._reads: ThreadPoolExecutor | None = None
        self._gauge_timer: threading.Timer | None = None
        self._sweep_timer: threading.Timer | None = None
        self._retry_timer: threading.Timer | None = None

    def on_start(self) -> None:
        self._reads = ThreadPoolExecutor(1, thread_name_prefix="registry-read")
        self._overlay.changed = True
        self._refresh_gauge()
        self._sweep_overlay()

    def on_stop(self) -> None:
        self._close("stopped")

    def on_failure(self, exception_type: type[BaseException] | None,
                   exception_value: BaseException | None, traceback: Any) -> None:
        """Whoever waits on a reply this actor owes hears of the crash instead of waiting
        forever."""
        self._close(f"crashed: {exception_value!r}")

    def _close(self, why: str) -> None:
        for timer in (self._gauge_timer, self._sweep_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        if self._reads is not None:
            self._reads.shutdown(wait=False, cancel_futures=True)
        ended = RuntimeError(f"the registry {why} before reading the token's state")
        for _, requests in self._waiting.values():
            for request in requests:
                self._finished(request)
                with contextlib.suppress(InvalidStateError):
                    request.reply.set_exception(ended)
        self._waiting.clear()
        self._replies.close(why)  # and every reply still in its mailbox

    def on_receive(self, message: Any) -> None:
        if isinstance(message, (_Unregister, _Dead)):
            self._take(message)
        elif isinstance(message, _ReadDone):
            self._read_done(message)
        elif isinstance(message, _ReadAgain):
            self._read(message.token)
        elif isinstance(message, _RetryReads):
            self._retry_timer = None
            unread, self._unread = self._unread, []
            for token in unread:
                self._read(token)
        elif isinstance(message, _RefreshGauge):
            self._gauge_timer = None
            self._refresh_gauge()
        elif isinstance(message, _SweepOverlay):
            self._sweep_overlay()
        else:
            super().on_receive(message)  # logged as unexpected

    # --- requests ---

    def _take(self, request: _Request) -> None:
        token = request.token
        waiting = self._waiting.get(token)
        if waiting is not None:
            waiting[1].append(request)  # behind the read: order per token is kept
            return
        if isinstance(request, _Dead):
            self._dead(request)
            return
        with self._overlay.lock:
            pending = self._overlay.live(token)
            if pending is not None:
                self._decide(request, (pending.active, pending.registered_at_ms))
                return
            self._waiting[token] = (self._overlay.seq, [request])
        self._read(token)

    def _decide(self, request: _Unregister, state: _TokenState) -> _TokenState:
        """Act on one unregistration given the token's state (hold the overlay's lock);
        returns the state after it."""
        self._finished(request)
        active, _ = state
        if not active:
            self._settle_like_pending(request)
            return state
        event = ev.device_unregistered(request.token, self._clock_ms(), ev.CAUSE_API)
        _chain(self._overlay.append(event, (False, None)), request.reply,
               lambda: _count_unregistration(ev.CAUSE_API))
        return False, None

    def _dead(self, request: _Dead) -> None:
        """Hand the re-registration rule to the Journal, which decides it under the head
        lock; later requests for the token wait for that decision, then read it."""
        self._finished(request)
        verdict, reply = request.verdict, request.reply
        skew_ms, now_ms = self._skew_ms, self._clock_ms()

        def decide(active: bool, registered_at_ms: int | None) -> ev.Event | None:
            return decide_dead_token(verdict, active=active, registered_at_ms=registered_at_ms,
                                     clock_skew_ms=skew_ms, now_ms=now_ms)

        ref = self.actor_ref

        def decided(future: Future[ev.Event | None]) -> None:
            _answer_dead(verdict, future, reply)
            tell_quietly(ref, _ReadAgain(verdict.token))

        with self._overlay.lock:
            self._waiting[verdict.token] = (self._overlay.seq, [])
            commit = self._journal.append_decided(verdict.token, decide)
        commit.add_done_callback(decided)

    def _finished(self, request: _Request) -> None:
        """The request leaves the Registry's hands (answered, or handed to the Journal):
        its slot is free again, and a crash of the actor no longer concerns it."""
        self._replies.release(request.reply)
        if isinstance(request, _Unregister):
            self._slots.release()

    def _settle_like_pending(self, request: _Unregister) -> None:
        """Nothing to write, but answer only once what we already wrote is committed."""
        pending = self._overlay.live(request.token)
        if pending is None:
            request.reply.set_result(None)
        else:
            _chain(pending.commit, request.reply, lambda: None)

    # --- reads, off the actor ---

    def _read(self, token: str) -> None:
        assert self._reads is not None
        ref, reader = self.actor_ref, self._reader

        def read() -> None:
            try:
                state = reader.registration(token)
            except psycopg.Error as exc:
                tell_quietly(ref, _ReadDone(token, None, exc))
            else:
                tell_quietly(ref, _ReadDone(token, state))

        with contextlib.suppress(RuntimeError):  # shut down: the actor is stopping
            self._reads.submit(read)

    def _read_done(self, message: _ReadDone) -> None:
        if message.state is None:
            assert message.error is not None
            if not is_transient(message.error):
                self._refuse(message.token, message.error)
                return
            self._unread.append(message.token)
            if self._retry_timer is None:
                delay = self._pauses.next()
                log.warning("cannot read the registration of %s (%s); retrying in %.1fs",
                            redact(message.token), first_line(message.error), delay)
                self._retry_timer = self._timer(delay, _RetryReads())
            return
        self._pauses.reset()
        began, requests = self._waiting.pop(message.token, (0, []))
        with self._overlay.lock:
            later = self._overlay.since(message.token, began)
            state = message.state if later is None else (later.active, later.registered_at_ms)
            for i, request in enumerate(requests):
                if isinstance(request, _Dead):  # decided by the Journal: the rest wait again
                    self._dead(request)
                    self._waiting[message.token][1].extend(requests[i + 1:])
                    break
                state = self._decide(request, state)

    def _refuse(self, token: str, error: psycopg.Error) -> None:
        """The database refused the read itself (a bug, not an outage): retrying would
        fail the same way, so the requests waiting on it fail with the error."""
        log.error("cannot read the registration of %s: the database refused the query (%s)",
                  redact(token), first_line(error))
        _, requests = self._waiting.pop(token, (0, []))
        for request in requests:
            self._finished(request)
            with contextlib.suppress(InvalidStateError):
                request.reply.set_exception(error)

    def _sweep_overlay(self) -> None:
        """Drop settled entries, except those of tokens whose read is out."""
        self._sweep_timer = self._timer(OVERLAY_SWEEP, _SweepOverlay())
        self._overlay.sweep(self._waiting)

    # --- the registered-devices gauge ---

    def _refresh_gauge(self) -> None:
        """Count active devices in the projection (off the actor) if anything was appended
        since the last count: the gauge follows the log, not guesses."""
        self._gauge_timer = self._timer(GAUGE_REFRESH, _RefreshGauge())
        if not self._overlay.changed:
            return
        # Settled entries are dropped; with some still unsettled, count again next time.
        self._overlay.changed = self._overlay.sweep(self._waiting)
        assert self._reads is not None
        reader = self._reader

        def count() -> None:
            try:
                metrics.DEVICES_REGISTERED.set(reader.active_count())
            except psycopg.Error as exc:
                if not is_transient(exc):
                    log.error("cannot count registered devices: the database refused the "
                              "query (%s)", first_line(exc))
                    return  # counted again after the next change, not every few seconds
                self._overlay.changed = True
                log.warning("cannot count registered devices (%s); the gauge waits",
                            first_line(exc))

        with contextlib.suppress(RuntimeError):
            self._reads.submit(count)

    def _timer(self, delay: float, message: object) -> threading.Timer:
        ref = self.actor_ref
        timer = threading.Timer(delay, lambda: tell_quietly(ref, message))
        timer.daemon = True
        timer.start()
        return timer



def _chain(source: Future[Any], target: Future[None], on_success: Callable[[], None]) -> None:
    """Resolve `target` when `source` does (same error), running `on_success` first."""

    def succeeded(_: Any) -> None:
        on_success()
        target.set_result(None)

    on_done(source, succeeded, target.set_exception)


def _answer_dead(verdict: DeadVerdict, decided: Future[ev.Event | None],
                 reply: Future[str | None]) -> None:
    """Log and count what the Journal decided, then answer with the event's type."""
    error = failure(decided)
    if error is not None:
        reply.set_exception(error)
        return
    event = decided.result()
    if event is not None and event.type == ev.DEVICE_UNREGISTERED:
        log.info("unregistered %s: APNs says %s", redact(verdict.token), verdict.cause)
        _count_unregistration(verdict.cause)
    elif event is not None:
        log.info("kept %s despite APNs' %s: it registered again after the verdict",
                 redact(verdict.token), verdict.cause)
    reply.set_result(None if event is None else event.type)


def _count_unregistration(cause: str) -> None:
    metrics.UNREGISTRATIONS.labels(cause).inc()


def _count_registration(commit: Future[Any]) -> None:
    if not commit.cancelled() and commit.exception() is None:
        metrics.REGISTRATIONS.inc()


class RegistryHandle:
    """The DeviceRegistry implementation: thread-safe, returns concurrent futures.

    The handle outlives its actor: after a crash the supervisor calls `restart()` and
    everyone holding the handle (the HTTP API, the Sender shards) reaches the new actor.
    The overlay belongs to the handle, so the new actor sees what the old one appended.

    `unregister` raises `RegistryBusy` when `mailbox` requests are already in the actor's
    hands; dead-token verdicts are always taken (the run's window of credit bounds them),
    and a registration never waits in the actor.
    """

    def __init__(self, journal: Journal, reader: LogReader, config: RegistryConfig, *,
                 clock_ms: Callable[[], int] = ev.now_ms, mailbox: int = MAILBOX_BOUND) -> None:
        self._journal, self._reader, self._config = journal, reader, config
        self._clock_ms, self._mailbox = clock_ms, mailbox
        self._overlay = _Overlay(journal)
        self._slots = threading.BoundedSemaphore(mailbox)
        self._replies = ReplyBook("the registry")
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
        self._replies = ReplyBook("the registry")
        self._ref = Registry.start(self._journal, self._reader, self._config,
                                   overlay=self._overlay, slots=self._slots,
                                   replies=self._replies, clock_ms=self._clock_ms)

    def register(self, token: str) -> Future[Any]:
        """Appended at once, in the caller's thread; resolves after COMMIT."""
        if not self.alive():
            failed: Future[Any] = Future()
            failed.set_exception(RuntimeError("the registry is not running"))
            return failed
        overlay = self._overlay
        with overlay.lock:
            at_ms = self._clock_ms()
            commit = overlay.append(ev.device_registered(token, at_ms), (True, at_ms))
        commit.add_done_callback(_count_registration)
        return commit

    def unregister(self, token: str) -> Future[None]:
        return self._send(_Unregister(token, Future()), bounded=True)

    def dead_token(self, verdict: DeadVerdict) -> Future[str | None]:
        """Unregister or keep a token APNs called dead; resolves after the decision is
        committed, with the type of the event written (None: the token was not registered)."""
        request = _Dead(verdict, Future())
        self._send(request, bounded=False)
        return request.reply

    def alive(self) -> bool:
        return self._ref is not None and self._ref.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests; requests already accepted are in the Journal's hands
        (those still waiting for a read of the log fail)."""
        if self._ref is not None and self._ref.is_alive():
            self._ref.stop(block=True, timeout=timeout)

    def _send(self, request: _Request, *, bounded: bool) -> Future[Any]:
        ref, slots, replies = self._ref, self._slots, self._replies
        if bounded and not slots.acquire(blocking=False):
            raise RegistryBusy(f"the registry holds {self._mailbox} requests already")
        try:
            if ref is None:
                raise pykka.ActorDeadError("never started")
            replies.track(request.reply)  # failed if the actor dies before it answers
            ref.tell(request)
        except pykka.ActorDeadError as exc:
            if bounded:
                slots.release()
            with contextlib.suppress(InvalidStateError):  # failed by the book already
                request.reply.set_exception(RuntimeError(f"the registry is not running: {exc}"))
        return request.reply
