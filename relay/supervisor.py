"""The supervisor: starts the parts in dependency order, runs wakeups, stops in reverse.

Order: Journal, Registry, APNs client, wakeup runner,
HTTP API; stopped in reverse. Two things can crash while the process runs: the
Registry actor, and a wakeup run (its Dispatcher or a Sender shard). Either is
restarted after a back-off that doubles with every recent restart; a restarted
run resumes from the log. Crashes that come faster than `RestartPolicy` allows
mean restarting the part does not help, so the process stops cleanly with status
1 and the service manager restarts it whole (state is rebuilt from the log in
seconds). The database being away is not a crash: it is waited out with jitter.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import psycopg

from actors import ProgressLogger, RegistryHandle, RunResult, WakeupRunner
from actors.pace import Progress, ProgressCallback
from events import checkpoint
from events.audit import audit_main, rebuild_main
from events.journal import Journal
from events.store import LogReader
from relay import NAME, environment, metrics, privilege
from relay.apns.client import credential_problem
from relay.apns.processes import ApnsProcessPool, NotificationClient, open_client
from relay.config import ApnsConfig, Config, ConfigError, check_open_files
from relay.database import DatabaseError, RetryPauses, connect

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_HALTED = 0, 1, 2, 3, 9
JOURNAL_STOP_TIMEOUT = 30.0
RUN_LOCK_KEY = 0x72756E73  # "runs"
# How often a process waiting for another's run lock asks again (and notices a stop).
RUN_LOCK_POLL = 0.5
# How often the holder checks that its lock's session is still there.
RUN_LOCK_CHECK = 1.0
# A check unanswered this long means the holder is cut off from the database: it stops
# sending as if the lock were lost (a dead TCP path can swallow a query for many minutes).
RUN_LOCK_SILENCE = 5.0
# The lock's session, as the server sees it: a holder whose packets stop arriving is
# probed after 10 s of silence, every 2 s, and dropped (releasing the lock) after 5 probes
# unanswered or 20 s of unacknowledged data: within ~20 s. That is longer than the holder
# takes to notice (RUN_LOCK_CHECK + RUN_LOCK_SILENCE), so the holder has stopped sending by
# the time another process can take the lock. No statement on it may take longer than 5 s.
RUN_LOCK_SESSION = (("statement_timeout", "5s"), ("tcp_keepalives_idle", "10"),
                    ("tcp_keepalives_interval", "2"), ("tcp_keepalives_count", "5"),
                    ("tcp_user_timeout", "20000"))
# The same from the holder's side (libpq's TCP keepalives), for the connection's own socket.
RUN_LOCK_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1,
                       "keepalives_count": 3}
# Beside the embedded database: ids of batches whose COMMIT was in doubt at a stop.
UNSETTLED_BATCHES = "unsettled-batches"
# The hard exit after SIGTERM/SIGINT comes this much before `wakeup.drain_timeout` runs out,
# so that the process is gone within it even counting the exit itself.
EXIT_MARGIN = 0.1


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


def freeze_startup_heap() -> None:
    """Exempt what start-up built (modules, configuration, parts) from garbage collection.

    Nearly all of it lives as long as the process, yet every full collection would walk
    it again with every thread paused: that pause was the API's p99 latency
    (bench/api_registrations.py, p99 about 90 ms before, 45 ms after).
    """
    gc.collect()
    gc.freeze()


@contextmanager
def running_parts(config: Config, dsn: str) -> Iterator[Parts]:
    """Journal, Registry, APNs client and runner, started in order and stopped in reverse."""
    with environment.apns(config) as apns_config:
        journal = Journal(dsn, unsettled=config.database.data_dir / UNSETTLED_BATCHES)
        journal.start()
        try:
            registry = RegistryHandle.start(journal, LogReader(dsn), config.registry)
            try:
                client = open_client(apns_config, expiration=config.wakeup.interval)
                client.start()
                try:
                    runner = WakeupRunner(config, dsn=dsn, journal=journal, client=client,
                                          registry=registry,
                                          apns_target=environment.apns_target(
                                              config, apns_config))
                    freeze_startup_heap()
                    yield Parts(journal, registry, client, runner, apns_config)
                finally:
                    client.close()
            finally:
                registry.stop()
        finally:
            journal.stop(JOURNAL_STOP_TIMEOUT)


@contextmanager
def run_lock(dsn: str, stopping: threading.Event,
             on_lost: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the database-wide run lock: one relay process drives a run at a time.

    Without it, `relay wakeup` started beside a supervisor in the middle of a run
    would resume that same run and send its tokens twice. A session-level advisory
    lock is released by PostgreSQL when the holder dies, so a crash never leaves it
    held. Yields False (run nothing) when `stopping` is set before the lock is ours.

    The session also ends when the database restarts, and the lock with it, while this
    process may still be driving its run. So the session is checked every
    RUN_LOCK_CHECK seconds, and `on_lost` is called (once, from another thread) when it
    is gone: the caller must stop sending (see `drive_run`).
    """
    conn = _take_run_lock(dsn, stopping)
    if conn is None:
        yield False
        return
    watch = _RunLockWatch(conn, on_lost) if on_lost is not None else None
    try:
        yield True
    finally:
        if watch is not None:
            watch.stop()
        # A session lost meanwhile (database restart) has released the lock already; one
        # that went silent may never answer again: it is dropped, not asked to unlock.
        if watch is None or not watch.lost:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK_KEY,))
        conn.close()


class _RunLockWatch:
    """Asks the session holding the run lock whether it is still there, and gives each
    answer RUN_LOCK_SILENCE seconds: a session that errs or stays silent is lost."""

    def __init__(self, conn: psycopg.Connection[Any], on_lost: Callable[[], None]) -> None:
        self._conn, self._on_lost = conn, on_lost
        self._stopping = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._watch, name="run-lock-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(RUN_LOCK_CHECK):
            answered = threading.Event()
            errors: list[psycopg.Error] = []
            threading.Thread(target=self._check, args=(answered, errors), name="run-lock-check",
                             daemon=True).start()
            if answered.wait(RUN_LOCK_SILENCE) and not errors:
                continue
            why = _first_line(errors[0]) if errors else (
                f"no answer within {RUN_LOCK_SILENCE:.0f}s: cut off from the database")
            log.warning("lost the run lock with its database session (%s): draining "
                        "the run; it is taken up again once the lock is ours again", why)
            self.lost = True
            self._on_lost()
            return

    def _check(self, answered: threading.Event, errors: list[psycopg.Error]) -> None:
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            errors.append(exc)
        finally:
            answered.set()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def drive_run(dsn: str, runner: WakeupRunner, stopping: threading.Event,
              progress: ProgressCallback) -> RunResult | None:
    """Run (or resume) one wakeup under the run lock; None when stopped before the lock
    was ours. A lost lock drains the run (sends still in flight may be repeated by the
    next driver, as after a crash), then the lock is taken again and the run resumed,
    unless another process finished it meanwhile."""
    result: RunResult | None = None
    while True:
        lost: Future[None] = Future()
        with run_lock(dsn, stopping, on_lost=partial(lost.set_result, None)) as locked:
            if not locked:
                return result
            if result is not None and not _unfinished_run(dsn):
                log.info("run %s was finished by another relay process", result.run)
                return result
            result = runner.run_once(progress=progress, lost=lost)
        if (not lost.done() or result.finished or result.halted is not None
                or stopping.is_set()):
            return result


def _unfinished_run(dsn: str) -> bool:
    reader = LogReader(dsn)
    try:
        return reader.unfinished_run() is not None
    finally:
        reader.close()


def _take_run_lock(dsn: str, stopping: threading.Event) -> psycopg.Connection[Any] | None:
    """The connection holding the run lock; waits out the database and other holders."""
    pauses = RetryPauses()
    told = False
    while not stopping.is_set():
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = connect(dsn, autocommit=True, application_name="relay-run-lock",
                           **RUN_LOCK_KEEPALIVES)
            for name, value in RUN_LOCK_SESSION:
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
            while not stopping.is_set():
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()
                if row and row[0]:
                    held, conn = conn, None
                    return held
                if not told:
                    log.info("another relay process is running a wakeup; waiting for it to end")
                    told = True
                stopping.wait(RUN_LOCK_POLL)
        except psycopg.OperationalError as exc:
            delay = pauses.next()
            log.warning("cannot reach the database to start a run (%s); retrying in %.1fs",
                        _first_line(exc), delay)
            stopping.wait(delay)
        finally:
            if conn is not None:
                conn.close()
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _exit_status(result: RunResult) -> int:
    if result.halted is not None:
        halt = result.halted
        log.critical("HALTED (%s): APNs answered %s %s: %s", halt.halt_class, halt.status,
                     halt.reason, halt.message,
                     extra={"run": halt.run, "token": halt.token, "status": halt.status,
                            "reason": halt.reason, "halt_class": halt.halt_class})
        return EXIT_HALTED
    return EXIT_OK


class ProgressBar:
    """A tqdm bar on the terminal for `relay wakeup`: tokens done of the run's total.

    While it shows, log lines are written through tqdm so they do not break the bar.
    """

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(unit="token", desc="wakeup")

    def __call__(self, progress: Progress) -> None:
        self._bar.total = progress.total
        self._bar.update(progress.done - self._bar.n)

    @contextmanager
    def showing(self) -> Iterator[None]:
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):
                yield
        finally:
            self._bar.close()


def wakeup_once(config: Config, dsn: str) -> int:
    """`python -m relay wakeup`: one run, retries included; 9 on a halt."""
    with running_parts(config, dsn) as parts:
        # The supervisor's watch, without its API and its worker: crashed parts are
        # restarted within the same budget, and too many crashes end the run.
        supervisor = Supervisor(config, dsn, parts)
        stopping = supervisor.stopping
        _install_signal_handlers(supervisor.stop, config.wakeup.drain_timeout)
        watch = threading.Thread(target=supervisor.watch, name="wakeup-watch", daemon=True)
        watch.start()
        bar = ProgressBar() if sys.stderr.isatty() else None
        progress: ProgressCallback = bar or ProgressLogger(config.wakeup.progress_interval)
        shown = bar.showing() if bar is not None else contextlib.nullcontext()
        with shown:
            result = drive_run(dsn, parts.runner, stopping, progress)
        escalated = supervisor.exit_status
        stopping.set()
        watch.join()
        if escalated != EXIT_OK:
            return escalated
        if result is None:
            log.info("wakeup: stopped before the run started")
            return EXIT_OK
        log.info("wakeup: %s", result)
        return _exit_status(result)


def _install_signal_handlers(on_signal: Callable[[], None], drain_timeout: float) -> None:
    """SIGTERM and SIGINT drain in-flight sends instead of killing them, within a deadline.

    The runner bounds the drain itself (`wakeup.drain_timeout` less a reserve for stopping
    the parts). The first signal also arms a hard deadline for everything after it, such
    as the Journal flushing to a database that has just gone away: at the drain timeout the
    process exits on the spot. That is as safe as a crash, which the log is built for:
    whatever is not committed by then is sent again at the next start, and no registration
    was acknowledged before its COMMIT.
    """
    armed = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining in-flight sends", signal.Signals(signum).name)
        if not armed.is_set():
            armed.set()
            deadline = threading.Timer(max(0.0, drain_timeout - EXIT_MARGIN), _exit_at_deadline,
                                       args=(drain_timeout,))
            deadline.daemon = True
            deadline.start()
        on_signal()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _exit_at_deadline(drain_timeout: float) -> None:
    log.warning("still stopping %.1fs after the signal (wakeup.drain_timeout): exiting now; "
                "what is not recorded is sent again at the next start", drain_timeout)
    for stream in (sys.stderr, sys.stdout):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_OK)


def print_checkpoint(config: Config, dsn: str) -> int:
    """`python -m relay checkpoint`: one signed checkpoint of the log's head, as JSON."""
    key = checkpoint.load_or_create_key(config.signing_key)
    with connect(dsn, application_name="relay-checkpoint") as conn:
        print(json.dumps(checkpoint.take(conn, key)))
    return EXIT_OK


class Checkpoints:
    """The supervisor's checkpoints: one after every run, written to
    `audit.checkpoint_dir` and kept for `GET /log/checkpoint`. A failure to take one is
    logged, never fatal: the next run takes another."""

    def __init__(self, config: Config, dsn: str) -> None:
        self._dsn, self._directory = dsn, config.checkpoint_dir
        self._key = checkpoint.load_or_create_key(config.signing_key)
        self._latest: dict[str, Any] | None = None

    def latest(self) -> dict[str, Any] | None:
        return self._latest

    def take(self) -> None:
        try:
            with connect(self._dsn, application_name="relay-checkpoint") as conn:
                taken = checkpoint.take(conn, self._key)
            path = checkpoint.write(self._directory, taken)
        except (psycopg.Error, OSError, checkpoint.CheckpointError) as exc:
            log.warning("no checkpoint after this run: %s", exc)
            return
        self._latest = taken
        log.info("checkpoint of position %d written to %s", taken["position"], path)


class Supervisor:
    """Serves the API, runs a wakeup at start and then every `wakeup.interval`, restarts crashes.

    Runs happen one after another on one worker thread, so a run still in progress
    is never started twice by this process; `run_lock` covers other processes.
    """

    def __init__(self, config: Config, dsn: str, parts: Parts,
                 policy: RestartPolicy | None = None) -> None:
        self.config, self.dsn, self.parts = config, dsn, parts
        self.policy = policy or RestartPolicy()
        self.stopping = threading.Event()
        self.exit_status = EXIT_OK
        self._budget = RestartBudget(self.policy)
        self._budget_lock = threading.Lock()
        self._worker = threading.Thread(target=self._wakeups, name="wakeup-worker", daemon=True)
        metrics.WAKEUP_INTERVAL.set(config.wakeup.interval)
        metrics.BREAKER_PAUSE.set(config.wakeup.breaker_pause)
        metrics.LAST_RUN_FINISHED.set_to_current_time()  # an overdue run counts from here
        self.checkpoints = Checkpoints(config, dsn)

    def database_available(self) -> bool:
        """False also while the Journal's writer is down: the log cannot be written."""
        journal = self.parts.journal
        return journal.database_available and journal.alive()

    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        """Drain and stop (SIGTERM, SIGINT); safe from any thread."""
        self.stopping.set()
        self.parts.runner.request_stop()

    def _restart_pause(self, what: str) -> float | None:
        """The pause before restarting `what`; None (and a stop with status 1) when too fast."""
        with self._budget_lock:
            pause = self._budget.next_pause()
        if pause is None:
            policy = self.policy
            log.critical("%s crashed once more after %d restarts within %.0fs: exiting so "
                         "that the service manager restarts the relay", what,
                         policy.max_restarts, policy.window)
            self.exit_status = EXIT_FAILURE
            self.stop()
        return pause

    def _wakeups(self) -> None:
        """One run at a time: the next starts `interval` after the previous one started."""
        progress = ProgressLogger(self.config.wakeup.progress_interval)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                result = drive_run(self.dsn, self.parts.runner, self.stopping, progress)
            except Exception:
                log.exception("the wakeup run crashed")
                pause = self._restart_pause("the wakeup run")
                if pause is None:
                    return
                log.warning("resuming the wakeup run in %.1fs", pause)
                self.stopping.wait(pause)
                continue
            if result is not None:
                self.checkpoints.take()
            if result is not None and result.halted is not None:
                self.exit_status = _exit_status(result)
                self.stop()
                return
            delay = self.config.wakeup.interval - (time.monotonic() - started)
            self.stopping.wait(max(0.0, delay))

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
                pause = self._restart_pause(what)
                if pause is None:
                    return
                log.warning("%s crashed; restarting it in %.1fs", what, pause)
                if self.stopping.wait(pause):
                    return
                part.restart()

    def run(self) -> int:
        """Serve until stopped, halted or escalated; returns the exit status."""
        from relay.api import ApiServer

        self.checkpoints.take()  # served from the start, renewed after every run
        api = ApiServer(self.config, self.parts.registry, self, apns=self.parts.apns,
                        simulated=not self.config.apns.credentials_given,
                        checkpoint=self.checkpoints.latest)
        api.start()  # it logs the addresses it listens on
        try:
            self._worker.start()
            self.watch()
            self._worker.join(self.config.wakeup.drain_timeout + 5)
        finally:
            api.stop()
        return self.exit_status


def run_command(command: str, config: Config, rest: list[str]) -> int:
    """Run a CLI command against the configured (or embedded) database."""
    try:
        if command == "run":
            check_open_files(config)
        if command in ("run", "wakeup") and config.apns.credentials_given:
            problem = credential_problem(config.apns)
            if problem is not None:
                raise ConfigError(config.source, *problem)
        with environment.database_access(config) as access:
            dsn = access.dsn
            if command == "audit":
                return audit_main(dsn, rest, signing_key=config.signing_key,
                                  warnings=access.warnings, interval=config.wakeup.interval)
            if command == "rebuild":
                return rebuild_main(dsn, rest)
            if checkpoint.create_log(dsn):
                log.info("created the event log (its first event, log_created, holds "
                         "its genesis value)")
            if command == "migrate":
                log.info("migrations applied")
                return EXIT_OK
            if command == "checkpoint":
                return print_checkpoint(config, dsn)
            if command == "wakeup":
                return wakeup_once(config, dsn)
            with running_parts(config, dsn) as parts:
                supervisor = Supervisor(config, dsn, parts)
                _install_signal_handlers(supervisor.stop, config.wakeup.drain_timeout)
                return supervisor.run()
    except privilege.PrivilegeError as exc:
        log.critical("%s", exc)
        return EXIT_USAGE
    except checkpoint.CheckpointError as exc:
        log.critical("%s", exc)
        return EXIT_USAGE
    except ConfigError as exc:  # found at start: the credentials, the open-file limit
        print(f"{NAME}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseError as exc:
        log.critical("%s", exc)
        return EXIT_UNAVAILABLE
    except psycopg.OperationalError as exc:  # lost during a command (audit, rebuild)
        log.critical("lost the database: %s", exc)
        return EXIT_UNAVAILABLE
