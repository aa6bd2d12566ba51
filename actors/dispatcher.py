"""The Dispatcher: drives one wakeup run from `run_started` to `run_finished`.

It owns the run's pace, not its tokens. The pace itself (credit window of
`wakeup.max_in_flight` sends, parked tokens' credit requests before new tokens,
keyset pages of due tokens, circuit-breaker admission, the run's counts) is the
plain class `actors.pace.RunPace`; this actor is its shell: it reads the pages
with the LogReader (retrying the database), tells the Sender shards their work,
appends the run's events, and wakes itself with an alarm for the breaker's
probe and database retries.

Several relays (relay/cluster.py): the run is started or joined through
`ClusterLog` (started once cluster-wide), and this process drives only the token
shards its `LeaseKeeper` holds, checked at every feed and every `LEASE_CHECK`
seconds: a shard newly held is paged from its start, a lost one is dropped, one
to give up (rebalancing) is paged no more and released once its sends are
answered. Every token goes out with its shard's epoch, which its outcome events
carry, so a process whose lease moved on cannot record them (fencing).

It also owns the run's end: once its shards are read and every token it took has
a final outcome, it asks `ClusterLog.finish`, which appends `run_finished` only
when no active token is left without one, whoever drove it; until then it reads
its shards again every `FINISH_POLL` seconds (for takeovers and tokens registered
behind a cursor). The run is left unfinished (for the next start to resume) when
a stop is requested or APNs reports a relay bug or configuration error, after
which `relay_halted` is appended and the halt reported to the owner.
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
from actors.pace import Cursor, ProgressCallback, RunPace, RunResult, ShardPages, counts
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
from relay import cluster, metrics
from relay.apns.processes import NotificationClient
from relay.backoff import DecorrelatedJitter
from relay.cluster import ClusterLog, LeaseKeeper, Leases
from relay.config import WakeupConfig
from relay.database import RetryPauses, first_line, is_transient

log = logging.getLogger(__name__)

LEASE_CHECK = 0.5  # seconds between looks at the leases while nothing else happens
FINISH_POLL = 1.0  # seconds between attempts to finish a run other processes still drive

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
    """The run's own event (relay_halted) is committed, or its append failed (`error`);
    run_started and run_finished are decided with the cluster (relay/cluster.py)."""

    what: str  # "halted"
    error: BaseException | None = None


class Dispatcher(pykka.ThreadingActor):
    def __init__(self, config: WakeupConfig, *, reader: LogReader, journal: Journal,
                 client: NotificationClient, registry: RegistryHandle, done: Future[RunResult],
                 keeper: LeaseKeeper, runs: ClusterLog, force: bool = True,
                 progress: ProgressCallback | None = None,
                 rng: random.Random | None = None,
                 apns: Mapping[str, str | None] | None = None) -> None:
        """`force`: start a run now, else only if one is due (`wakeup.interval` after the
        last started); either way an unfinished run is joined."""
        super().__init__()
        self._apns = apns  # where the run sends, recorded in run_started
        self._keeper, self._runs, self._force = keeper, runs, force
        self._leases: Leases | None = None
        self._waiting_to_finish = False
        self._config, self._reader, self._journal = config, reader, journal
        self._client, self._registry, self._done = client, registry, done
        self._progress_cb = progress
        self._policy = DeliveryPolicy(config.attempts, DecorrelatedJitter(
            config.backoff_base, config.backoff_max, config.backoff_factor, rng))
        shards = keeper.shards
        pages = ShardPages(self._read_page,
                           lambda shard: (cluster.shard_bounds(shard, shards)[0], ""),
                           lambda shard, token: (cluster.token_point(token), token))
        self._pace = RunPace(config.max_in_flight, CircuitBreaker(config.breaker_pause), pages)
        self._alarm = Alarm(lambda: tell_quietly(self.actor_ref, _Wake()), "dispatcher-alarm")
        self._shards: list[pykka.ActorRef[SenderShard]] = []

        self._base = RunResult(run=None, finished=False)  # the counts live in `_pace`
        self._started = False
        self._halt_recorded = False
        self._finish_again_at = 0.0
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
        self._keeper.driving = False
        self._stop_children()
        if not self._done.done():
            self._done.set_result(replace(self._result, stopped=True, drained=False))

    def on_failure(self, exception_type: type[BaseException] | None,
                   exception_value: BaseException | None,
                   traceback: TracebackType | None) -> None:
        """pykka skips on_stop after a failure: stop the shards here, and tell the owner."""
        self._keeper.driving = False
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
            if not self._started:
                if self._db_retry_at is not None:
                    self._begin()
            else:
                self._tick()
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

    # --- the shards this process drives ------------------------------------------------

    def _tick(self) -> None:
        """Every LEASE_CHECK seconds while the run is driven: another look at the run."""
        if self._done.done():
            return
        self._alarm.at(time.monotonic() + LEASE_CHECK)
        if self._waiting_to_finish and time.monotonic() >= self._finish_again_at:
            self._waiting_to_finish = False
            if self._pace.all_done:  # else shards came meanwhile: they are being read
                self._pace.pages.again()  # nothing of ours in flight or parked to repeat

    def _sync_leases(self) -> bool:
        """Drive the shards held now: new ones from their start, lost ones dropped, those
        to give up paged no more and released once their sends are answered. False while
        the leases have lapsed by this process's clock: nothing may be sent then."""
        leases = self._keeper.leases()
        pages, pace = self._pace.pages, self._pace
        if not leases.valid:
            if self._leases is None or self._leases.valid:
                log.warning("the shard leases lapsed (no renewal answered in time): no new "
                            "sends until a renewal says which shards are still ours")
            self._leases = leases
            return False
        if leases is not self._leases:
            self._leases = leases
            for shard, epoch in list(pages.epochs.items()):
                if leases.held.get(shard) != epoch:
                    log.warning("no longer driving shard %d: its lease was lost", shard)
                    pace.drop(shard)
            for shard, epoch in leases.held.items():
                if shard not in pages.epochs and shard not in leases.draining:
                    pages.drive(shard, epoch)
            for shard in leases.draining:
                pages.stop_paging(shard)
        drained = [s for s in leases.draining
                   if s in pages.epochs and pace.in_flight_in[s] <= 0]
        if drained:
            self._keeper.release(drained, cluster.WHY_REBALANCING)
            for shard in drained:
                pace.drop(shard)
        return True

    # --- the run -------------------------------------------------------------------------

    def _begin(self) -> None:
        """Join the unfinished run, else start a new one (if due, or forced)."""
        self._db_retry_at = None
        try:
            record, ours = self._runs.start_or_join(self._config.interval, force=self._force,
                                                    apns=self._apns)
        except psycopg.Error as exc:
            if not is_transient(exc):
                raise  # a bug, not an outage: the run fails (and the supervisor says so)
            self._retry_db("start the run", exc)
            return
        self._db_pauses.reset()
        if record is None:
            self._done.set_result(self._base)  # no run is due
            return
        self._base = RunResult(
            run=record.run, finished=False, resumed=not ours, tokens=record.tokens,
            delivered=record.delivered, failed=record.failed, abandoned=record.abandoned,
            dead=record.dead, unregistered=record.unregistered, kept=record.kept)
        self._pace.resume(self._base)
        if ours:
            metrics.DEVICES_REGISTERED.set(record.tokens)
            log.info("starting run %d over %d registered tokens", record.run, record.tokens,
                     extra={"run": record.run, "total": record.tokens})
        else:
            log.info("taking up unfinished run %d (%d tokens, %d already done)",
                     record.run, record.tokens, self._pace.done_at_start)
        self._take_up(record.run)

    def _take_up(self, run: int) -> None:
        self._started = True
        self._keeper.driving = True
        self._alarm.at(time.monotonic() + LEASE_CHECK)
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
        if message.what == "halted":
            self._halt_recorded = True
        self._feed()

    def _feed(self) -> None:
        """Grant credits: parked tokens that are due first, then new tokens from the page."""
        if not self._started:
            # Stopped while the database keeps the run from starting: nothing is in flight.
            if self._pace.stopping and self._db_retry_at is not None and not self._done.done():
                self._done.set_result(self._result)
            return
        if self._done.done():
            return
        if self._sync_leases():
            # One message per shard per feed, however many credits this feed hands out.
            work = self._pace.feed(len(self._shards))
            for shard, items in work.items():
                self._shards[shard].tell(Work(tuple(items)))
        resume_at = self._pace.breaker.resume_at
        if resume_at is not None:
            self._alarm.at(resume_at)
        self._maybe_end()

    def _read_page(self, shard: int, cursor: Cursor, limit: int) -> Sequence[TokenState] | None:
        assert self._base.run is not None
        if self._db_retry_at is not None and time.monotonic() < self._db_retry_at:
            return None  # the database failed a moment ago: wait for the alarm
        self._db_retry_at = None
        try:
            page = self._reader.due_tokens(
                self._base.run, cluster.shard_bounds(shard, self._keeper.shards), cursor, limit)
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
        self._pace.halt_reported(report.fence)
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
        if self._pace.all_done and not self._waiting_to_finish:
            self._finish()

    def _finish(self) -> None:
        """This process's part is done: the run finishes if every process's is."""
        run = self._base.run
        assert run is not None
        try:
            finish = self._runs.finish(run)
        except psycopg.Error as exc:
            self._retry_db("finish the run", exc)
            finish = cluster.Finish(False)
        if not finish.finished or finish.record is None:
            self._waiting_to_finish = True
            self._finish_again_at = time.monotonic() + FINISH_POLL
            return
        record = finish.record
        metrics.LAST_RUN_FINISHED.set_to_current_time()
        metrics.RUN_DURATION.observe(time.monotonic() - self._t0)
        if finish.by_us:
            metrics.RUNS.inc()
        self._result = replace(self._base, finished=True, tokens=record.tokens,
                               delivered=record.delivered, failed=record.failed,
                               abandoned=record.abandoned, dead=record.dead,
                               unregistered=record.unregistered, kept=record.kept)
        self._report_progress()
        log.info("run %s finished%s: %s", run, "" if finish.by_us else " (by another process)",
                 counts(self._result), extra={"run": run})
        self._done.set_result(self._result)

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

