"""The supervisor: the relay process's parts, started in order, watched, stopped in reverse.

One start sequence (`Supervisor.running`): the APNs endpoint, Journal, Registry, APNs
client, wakeup runner, then the wakeup worker and the device API; stopped in reverse.
Three things can crash while the process runs: the Registry actor, the Journal's writer
(or an APNs sender process), and a wakeup run (its Dispatcher or a Sender shard). Each
is restarted after a back-off that doubles with every recent restart; a restarted run
resumes from the log. Crashes that come faster than `RestartPolicy` allows mean
restarting the part does not help, so the process stops cleanly with status 1 and the
service manager restarts it whole (state is rebuilt from the log in seconds). The
database being away is not a crash: it is waited out with jitter.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from actors import ProgressLogger, RegistryHandle, RunResult, WakeupRunner
from events import checkpoint
from events.journal import Journal
from events.store import LogReader
from relay import environment, metrics
from relay.apns.processes import ApnsProcessPool, NotificationClient, open_client
from relay.cluster import ClusterLog, ClusterView, LeaseKeeper
from relay.config import ApnsConfig, Config
from relay.database import first_line, is_transient
from relay.exits import ExitStatus

log = logging.getLogger(__name__)

JOURNAL_STOP_TIMEOUT = 30.0
# Beside the embedded database: ids of batches whose COMMIT was in doubt at a stop.
UNSETTLED_BATCHES = "unsettled-batches"
# How often an idle process asks the log whether a run is due or was started elsewhere.
JOIN_POLL = 1.0


@dataclass(frozen=True)
class RestartPolicy:
    """How crashes are met: restart with back-off, or give up when they come too fast.

    `max_restarts` restarts within `window` seconds are allowed, across all parts
    (as an OTP supervisor's intensity and period); the next crash in the window
    ends the process. The pause before a restart is `backoff` doubled for each
    restart still in the window, so a part that crashes at once is not spun.
    """

    max_restarts: int = 5
    window: float = 60.0
    backoff: float = 1.0
    check_every: float = 1.0  # how often the Registry's liveness is checked


class RestartBudget:
    """The restarts within the policy's window: the pause before the next one, or None."""

    def __init__(self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy, self._clock = policy, clock
        self._restarts: list[float] = []

    def next_pause(self) -> float | None:
        """Account for one restart: its pause, or None when the budget is spent."""
        now = self._clock()
        policy = self._policy
        self._restarts = [t for t in self._restarts if now - t < policy.window]
        if len(self._restarts) >= policy.max_restarts:
            return None
        pause = policy.backoff * 2.0 ** len(self._restarts)
        self._restarts.append(now)
        return pause


@dataclass
class Parts:
    """The running parts of one relay process."""

    journal: Journal
    registry: RegistryHandle
    client: NotificationClient
    runner: WakeupRunner
    apns: ApnsConfig  # the APNs settings in use: the configured ones or the simulator's
    keeper: LeaseKeeper  # this process's leases on token shards


YOUNG_COLLECTION_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Exempt what start-up built (modules, configuration, parts) from garbage collection.

    Nearly all of it lives as long as the process, yet every full collection would walk
    it again with every thread paused, and that pause set the API's p99 latency
    (BENCHMARKS.md, "Figures behind choices in the code"). Young collections then run
    every YOUNG_COLLECTION_THRESHOLD allocations instead of 700: a registration or a
    notification leaves few survivors, and collecting a tenth as often gave the device
    API about 5 % more registrations per second in alternating runs (BENCHMARKS.md,
    issue 14, fourth round).
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def exit_status_of(result: RunResult) -> ExitStatus:
    """HALTED after a halt (logged for the operator: what APNs said, what to check)."""
    if result.halted is not None:
        halt = result.halted
        log.critical("HALTED (%s): APNs answered %s %s: %s", halt.halt_class, halt.status,
                     halt.reason, halt.message,
                     extra={"run": halt.run, "token": halt.token, "status": halt.status,
                            "reason": halt.reason, "halt_class": halt.halt_class})
        return ExitStatus.HALTED
    return ExitStatus.OK


class Supervisor:
    """Restarts crashed parts, runs a wakeup at start and then every `wakeup.interval`.

    Runs happen one after another on one worker thread; every relay process on the
    database joins the run in progress, started once cluster-wide (relay/cluster.py).
    `running()` is the process's one start sequence.
    """

    def __init__(self, config: Config, dsn: str, policy: RestartPolicy | None = None) -> None:
        self.config, self.dsn = config, dsn
        self.policy = policy or RestartPolicy()
        self.stopping = threading.Event()
        self.exit_status = ExitStatus.OK
        self._parts: Parts | None = None
        self._budget = RestartBudget(self.policy)
        self._budget_lock = threading.Lock()
        self._worker = threading.Thread(target=self._wakeups, name="wakeup-worker", daemon=True)
        metrics.WAKEUP_INTERVAL.set(config.wakeup.interval)
        metrics.BREAKER_PAUSE.set(config.wakeup.breaker_pause)
        metrics.LAST_RUN_FINISHED.set_to_current_time()  # an overdue run counts from here
        self.checkpoints = checkpoint.Checkpoints(dsn, config.checkpoint_dir,
                                                  config.signing_key)

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the relay's parts are not running")
        return self._parts

    @contextmanager
    def running(self, *, serve: bool) -> Iterator[Parts]:
        """Start the parts in order; stop them in reverse, in this one place.

        The order: the APNs endpoint (the built-in simulator when no credentials are
        configured), the Journal, the Registry, the APNs client, the lease keeper (this
        process's token shards, released at the stop once the run has drained) and the
        wakeup runner;
        then, when serving (`python -m relay`, not `relay wakeup`), the wakeup worker and
        the device API. Each part's stop is pushed as soon as it has started, so a
        failed start stops exactly what had started, in reverse.
        """
        config, dsn = self.config, self.dsn
        with contextlib.ExitStack() as started:
            apns = started.enter_context(environment.apns(config))
            journal = Journal(dsn, unsettled=config.database.data_dir / UNSETTLED_BATCHES,
                              hold_limit=config.cluster.hold_limit)
            journal.start()
            started.callback(journal.stop, JOURNAL_STOP_TIMEOUT)
            registry = RegistryHandle.start(journal, LogReader(dsn), config.registry)
            started.callback(registry.stop)
            client = open_client(apns, expiration=config.wakeup.interval)
            client.start()
            started.callback(client.close)
            keeper = LeaseKeeper(dsn, config.cluster)
            keeper.start()
            started.callback(keeper.stop)
            runner = WakeupRunner(config, dsn=dsn, journal=journal, client=client,
                                  registry=registry, keeper=keeper,
                                  apns_target=environment.apns_target(config, apns))
            self._parts = Parts(journal, registry, client, runner, apns, keeper)
            if self.stopping.is_set():
                runner.request_stop()  # stopped (a signal) while starting
            freeze_startup_heap()
            if serve:
                self.checkpoints.take()  # served from the start, renewed after every run
                self._worker.start()
                started.callback(self._stop_worker)
                from relay.api import ApiServer

                api = ApiServer(config, registry, self, apns=apns,
                                simulated=not config.apns.credentials_given,
                                checkpoint=self.checkpoints.latest,
                                cluster=ClusterView(dsn, config.cluster.lease_ttl))
                api.start()  # it logs the addresses it listens on
                started.callback(api.stop)
            yield self._parts

    def _stop_worker(self) -> None:
        self.stop()
        self._worker.join(self.config.wakeup.drain_timeout + 5)

    def database_available(self) -> bool:
        """False also while the Journal's writer is down: the log cannot be written."""
        journal = self.parts.journal
        return journal.database_available and journal.alive()

    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        """Drain and stop (SIGTERM, SIGINT); safe from any thread."""
        self.stopping.set()
        if self._parts is not None:
            self._parts.runner.request_stop()

    def _pause_before_restart(self, what: str, then: str) -> bool:
        """After `what` failed: wait out its restart pause (the budget's); False when the
        budget is spent (a stop with status 1: crashing too fast) or the supervisor
        stopped meanwhile."""
        with self._budget_lock:
            pause = self._budget.next_pause()
        if pause is None:
            policy = self.policy
            log.critical("%s crashed once more after %d restarts within %.0fs: exiting so "
                         "that the service manager restarts the relay", what,
                         policy.max_restarts, policy.window)
            self.exit_status = ExitStatus.FAILURE
            self.stop()
            return False
        log.warning("%s in %.1fs", then, pause)
        return not self.stopping.wait(pause)

    def _wakeups(self) -> None:
        """One run at a time, cluster-wide: the next starts `interval` after the previous
        one started (by the log), in whichever process finds it due first; the others
        join it."""
        progress = ProgressLogger(self.config.wakeup.progress_interval)
        runs = ClusterLog(self.dsn, self.config.cluster.hold_limit)
        try:
            self._drive(runs, progress)
        finally:
            runs.close()

    def _drive(self, runs: ClusterLog, progress: ProgressLogger) -> None:
        interval = self.config.wakeup.interval
        while not self.stopping.is_set():
            try:
                due = runs.next_due(interval)
            except psycopg.Error as exc:
                if is_transient(exc):  # the database is away: ask again
                    log.warning("cannot ask the log whether a run is due (%s)", first_line(exc))
                    due = JOIN_POLL
                else:  # refused (a privilege taken away, a broken schema): as a crash
                    log.error("the log refused to say whether a run is due: %s",
                              first_line(exc))
                    if not self._pause_before_restart("the wakeup schedule", "asking again"):
                        return
                    continue
            if due > 0:
                self.stopping.wait(min(due, JOIN_POLL))
                continue
            try:
                result = self.parts.runner.run_once(progress, force=False)
            except Exception:
                log.exception("the wakeup run crashed")
                if not self._pause_before_restart("the wakeup run", "resuming the wakeup run"):
                    return
                continue
            if result.run is None:
                continue  # none was due after all (another process's finished meanwhile)
            self.checkpoints.take()
            if result.halted is not None:
                self.exit_status = exit_status_of(result)
                self.stop()
                return

    def watch(self) -> None:
        """Restart a crashed Registry, Journal writer or APNs sender process with back-off;
        too many restarts (of any, counted together) escalate."""
        watched: list[tuple[str, Any]] = [("the Registry", self.parts.registry),
                                          ("the Journal's writer", self.parts.journal)]
        client = self.parts.client
        if isinstance(client, ApnsProcessPool):
            watched.append(("an APNs sender process", client))
        while not self.stopping.wait(self.policy.check_every):
            for what, part in watched:
                if part.alive():
                    continue
                if part is client:
                    what = f"{what} ({client.last_exit})"
                if not self._pause_before_restart(what, f"{what} crashed; restarting it"):
                    return
                part.restart()

    def run(self) -> int:
        """Watch the parts `running(serve=True)` started until stopped, halted or
        escalated; the exit status once the worker has drained its run."""
        self.watch()
        self._stop_worker()
        return self.exit_status


