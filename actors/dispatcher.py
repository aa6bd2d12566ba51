"""The Dispatcher: drives one wakeup run from `run_started` to `run_finished`.

It owns the run's pace, not its tokens. The pace itself (credit window of
`wakeup.max_in_flight` sends, parked tokens' credit requests before new tokens,
keyset pages of due tokens, circuit-breaker admission, the run's counts) is the
plain class `actors.pace.RunPace`; this actor is its shell: it reads the pages
with the LogReader (retrying the database), tells the Sender shards their work,
appends the run's events, and wakes itself with an alarm for the breaker's
probe and database retries.

It also owns the run's end: the run finishes
when the pages are exhausted and every token taken has a final outcome; it is
left unfinished (for the next start to resume) when a stop is requested or APNs
reports a relay bug or configuration error, after which `relay_halted` is
appended and the halt reported to the owner.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import psycopg
import pykka

from actors.alarm import Alarm
from actors.breaker import CircuitBreaker
from actors.delivery import DeliveryPolicy
from actors.messages import on_done, tell_quietly
from actors.pace import ProgressCallback, RunPace, RunResult, counts
from actors.registry import RegistryHandle
from actors.sender import (
    CreditWanted,
    HaltReported,
    Reports,
    SenderShard,
    ShardFault,
    TokenDone,
    Work,
)
from events import types as ev
from events.journal import Journal
from events.store import LogReader, TokenState
from relay import metrics
from relay.apns.processes import NotificationClient
from relay.backoff import DecorrelatedJitter
from relay.config import WakeupConfig
from relay.database import RetryPauses, first_line, is_transient

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Drain:
    """Stop feeding; finish when the sends in flight are recorded."""


@dataclass(frozen=True)
class Snapshot:
    """Ask for the run's `RunResult` so far."""


@dataclass(frozen=True)
class _Begin:
    pass


@dataclass(frozen=True)
class _Wake:
    pass


@dataclass(frozen=True)
class _RunEventCommitted:
    """The run's own event (run_started, relay_halted or run_finished) is committed, or
    its append failed (`error`)."""

    what: str  # "started", "halted" or "finished"
    error: BaseException | None = None


class Dispatcher(pykka.ThreadingActor):
    def __init__(self, config: WakeupConfig, *, reader: LogReader, journal: Journal,
                 client: NotificationClient, registry: RegistryHandle, done: Future[RunResult],
                 progress: ProgressCallback | None = None,
                 rng: random.Random | None = None,
                 apns: Mapping[str, str | None] | None = None) -> None:
        super().__init__()
        self._apns = apns  # where the run sends, recorded in run_started
        self._config, self._reader, self._journal = config, reader, journal
        self._client, self._registry, self._done = client, registry, done
        self._progress_cb = progress
        self._policy = DeliveryPolicy(config.attempts, DecorrelatedJitter(
            config.backoff_base, config.backoff_max, config.backoff_factor, rng))
        self._pace = RunPace(config.max_in_flight, CircuitBreaker(config.breaker_pause))
        self._alarm = Alarm(lambda: tell_quietly(self.actor_ref, _Wake()), "dispatcher-alarm")
        self._shards: list[pykka.ActorRef[SenderShard]] = []

        self._base = RunResult(run=None, finished=False)  # the counts live in `_pace`
        self._started = False
        self._halt_recorded = False
        self._finishing = False
        self._db_pauses = RetryPauses()
        self._db_retry_at: float | None = None
        self._t0 = time.monotonic()

    @property
    def _result(self) -> RunResult:
        return self._pace.tally(self._base)

    @_result.setter
    def _result(self, result: RunResult) -> None:
        self._base = result
        self._pace.count_from(result)

    # --- life cycle ----------------------------------------------------------------------

    def on_start(self) -> None:
        self._alarm.start()
        self.actor_ref.tell(_Begin())

    def on_stop(self) -> None:
        self._stop_children()
        if not self._done.done():
            self._done.set_result(replace(self._result, stopped=True, drained=False))

    def on_failure(self, exception_type: type[BaseException] | None,
                   exception_value: BaseException | None,
                   traceback: TracebackType | None) -> None:
        """pykka skips on_stop after a failure: stop the shards here, and tell the owner."""
        self._stop_children()
        if not self._done.done() and exception_value is not None:
            self._done.set_exception(exception_value)

    def _stop_children(self) -> None:
        self._alarm.stop()
        for shard in self._shards:
            with contextlib.suppress(pykka.ActorDeadError):
                shard.stop(block=False)
        for shard in self._shards:
            with contextlib.suppress(pykka.ActorDeadError):
                shard.stop(block=True)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Snapshot):
            return self._result
        if isinstance(message, Reports):
            for report in message.messages:
                self._take_report(report)
        elif isinstance(message, (TokenDone, CreditWanted, HaltReported)):
            self._take_report(message)
        elif isinstance(message, ShardFault):
            self._fail(message.error)
            return None
        elif isinstance(message, Drain):
            if not self._pace.stopping:
                log.info("stop requested: no new sends; waiting for %d in flight",
                         self._pace.in_flight)
            self._pace.stop()
            self._result = replace(self._result, stopped=True)
        elif isinstance(message, _Begin):
            self._begin()
        elif isinstance(message, _RunEventCommitted):
            self._committed(message)
            return None
        elif isinstance(message, _Wake):
            if not self._started and self._db_retry_at is not None:
                self._begin()
        else:
            return super().on_receive(message)  # logged as unexpected
        self._feed()
        return None

    def _take_report(self, report: TokenDone | CreditWanted | HaltReported) -> None:
        if isinstance(report, TokenDone):
            self._token_done(report)
        elif isinstance(report, CreditWanted):
            self._pace.want(report)
        else:
            self._halt(report)

    # --- the run -------------------------------------------------------------------------

    def _begin(self) -> None:
        """Resume the unfinished run, else start a new one."""
        self._db_retry_at = None
        try:
            unfinished = self._reader.unfinished_run()
            if unfinished is None:
                run = self._reader.next_run_number()
                tokens = self._reader.active_count()
        except psycopg.Error as exc:
            if not is_transient(exc):
                raise  # a bug, not an outage: the run fails (and the supervisor says so)
            self._retry_db("start the run", exc)
            return
        self._db_pauses.reset()
        if unfinished is not None:
            self._base = RunResult(
                run=unfinished.run, finished=False, resumed=True, tokens=unfinished.tokens,
                delivered=unfinished.delivered, failed=unfinished.failed,
                abandoned=unfinished.abandoned, dead=unfinished.dead,
                unregistered=unfinished.unregistered, kept=unfinished.kept)
            self._pace.resume(self._base)
            log.info("resuming unfinished run %d (%d tokens, %d already done)",
                     unfinished.run, unfinished.tokens, self._pace.done_at_start)
            self._take_up(unfinished.run)
            return
        metrics.DEVICES_REGISTERED.set(tokens)
        self._result = RunResult(run=run, finished=False, tokens=tokens)
        log.info("starting run %d over %d registered tokens", run, tokens,
                 extra={"run": run, "total": tokens})
        self._append([ev.run_started(run, ev.now_ms(), tokens, apns=self._apns)], "started")

    def _take_up(self, run: int) -> None:
        self._started = True
        metrics.BREAKER_OPEN.set(0)  # a new breaker, closed
        self._t0 = time.monotonic()
        self._shards = [
            SenderShard.start(i, run, self.actor_ref, self._client, self._journal,
                              self._registry, self._policy)
            for i in range(self._config.senders)
        ]
        self._report_progress()

    def _committed(self, message: _RunEventCommitted) -> None:
        if message.error is not None:
            self._fail(message.error)
            return
        if message.what == "started":
            assert self._result.run is not None
            self._take_up(self._result.run)
        elif message.what == "halted":
            self._halt_recorded = True
        elif message.what == "finished":
            metrics.RUNS.inc()
            metrics.LAST_RUN_FINISHED.set_to_current_time()
            metrics.RUN_DURATION.observe(time.monotonic() - self._t0)
            self._result = replace(self._result, finished=True)
            self._report_progress()
            log.info("run %s finished: %s", self._result.run, counts(self._result),
                     extra={"run": self._result.run})
            self._done.set_result(self._result)
            return
        self._feed()

    def _feed(self) -> None:
        """Grant credits: parked tokens that are due first, then new tokens from the page."""
        if not self._started:
            # Stopped while the database keeps the run from starting: nothing is in flight.
            if self._pace.stopping and self._db_retry_at is not None and not self._done.done():
                self._done.set_result(self._result)
            return
        if self._finishing or self._done.done():
            return
        # One message per shard per feed, however many credits this feed hands out.
        work = self._pace.feed(len(self._shards), self._read_page)
        for shard, items in work.items():
            self._shards[shard].tell(Work(tuple(items)))
        resume_at = self._pace.breaker.resume_at
        if resume_at is not None:
            self._alarm.at(resume_at)
        self._maybe_end()

    def _read_page(self, cursor: str, limit: int) -> Sequence[TokenState] | None:
        assert self._base.run is not None
        if self._db_retry_at is not None and time.monotonic() < self._db_retry_at:
            return None  # the database failed a moment ago: wait for the alarm
        self._db_retry_at = None
        try:
            page = self._reader.due_tokens(self._base.run, cursor, limit)
        except psycopg.Error as exc:
            if not is_transient(exc):
                raise
            self._retry_db("read due tokens", exc)
            return None
        self._db_pauses.reset()
        return page

    def _retry_db(self, what: str, exc: Exception) -> None:
        delay = self._db_pauses.next()
        log.warning("cannot %s (%s); retrying in %.1fs", what, first_line(exc), delay)
        self._db_retry_at = time.monotonic() + delay
        self._alarm.at(self._db_retry_at)

    def _token_done(self, done: TokenDone) -> None:
        is_open = self._pace.token_done(done)
        if is_open is not None:
            self._breaker_changed(is_open)
        if done.outcome is not None and done.outcome.final:
            self._report_progress()

    def _breaker_changed(self, is_open: bool) -> None:
        if is_open:
            log.warning("APNs is in trouble (many tokens failing at once): pausing all sends "
                        "for %.0fs, then probing", self._config.breaker_pause)
        else:
            log.info("APNs answered the probe: resuming sends")
        metrics.BREAKER_OPEN.set(1 if is_open else 0)
        if is_open:
            metrics.BREAKER_OPENED_AT.set_to_current_time()

    def _halt(self, report: HaltReported) -> None:
        self._pace.halt_reported()
        if self._base.halted is not None:
            return
        halt = report.halt
        log.error("halting the relay: %s", halt.message,
                  extra={"run": halt.run, "token": halt.token, "status": halt.status,
                         "reason": halt.reason, "halt_class": halt.halt_class})
        self._base = replace(self._base, halted=halt)
        self._append([halt.event(ev.now_ms())], "halted")

    def _maybe_end(self) -> None:
        if self._pace.stopping:
            halt_pending = self._base.halted is not None and not self._halt_recorded
            if self._pace.in_flight == 0 and not halt_pending and not self._done.done():
                self._report_progress()
                self._done.set_result(self._result)
            return
        if self._pace.all_done and not self._finishing:
            self._finishing = True
            run = self._base.run
            assert run is not None
            self._base = replace(self._base, tokens=self._pace.tokens)
            result = self._result
            self._append([ev.run_finished(
                run, ev.now_ms(), tokens=result.tokens, delivered=result.delivered,
                failed=result.failed, abandoned=result.abandoned, dead=result.dead,
                unregistered=result.unregistered, kept=result.kept)], "finished")

    def _append(self, events: list[ev.Event], what: str) -> None:
        ref = self.actor_ref
        on_done(self._journal.append(events),
                lambda _: tell_quietly(ref, _RunEventCommitted(what)),
                lambda error: tell_quietly(ref, _RunEventCommitted(what, error)))

    def _fail(self, error: BaseException) -> None:
        log.error("wakeup run %s failed: %s (%s)", self._result.run, first_line(error),
                  type(error).__name__,
                  extra={"run": self._result.run})
        if not self._done.done():
            self._done.set_exception(error)

    def _report_progress(self) -> None:
        """Called at take-up and on every final outcome: consumers throttle as they like."""
        run = self._base.run
        if self._progress_cb is None or run is None:
            return
        self._progress_cb(self._pace.progress(run, self._base.tokens,
                                              time.monotonic() - self._t0))

