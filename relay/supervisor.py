"""The supervisor: starts the parts in dependency order, runs wakeups, stops in reverse.

Order (DESIGN.md "Supervision"): Journal, Registry, APNs client, wakeup runner,
HTTP API; stopped in reverse. A crashed Registry is restarted with back-off;
restarts that come too fast end the process with a non-zero status so that the
service manager restarts it whole (state is rebuilt from the log in seconds).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from actors import ProgressLogger, RegistryHandle, RunResult, WakeupRunner
from actors.dispatcher import Progress
from events.audit import audit_main, rebuild_main
from events.journal import Journal
from events.store import LogReader
from relay import environment
from relay.apns import ApnsClient
from relay.config import Config
from relay.database import DatabaseError, connect

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_HALTED = 0, 1, 9
JOURNAL_STOP_TIMEOUT = 30.0
# More restarts than this within the window escalate to a process exit.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
RESTART_BACKOFF = 1.0
WATCH_INTERVAL = 1.0
RUN_LOCK_KEY = 0x72756E73  # "runs"


@dataclass
class Parts:
    """The running parts of one relay process."""

    journal: Journal
    registry: RegistryHandle
    client: ApnsClient
    runner: WakeupRunner


@contextmanager
def running_parts(config: Config, dsn: str) -> Iterator[Parts]:
    """Journal, Registry, APNs client and runner, started in order and stopped in reverse."""
    with environment.apns(config) as apns_config:
        journal = Journal(dsn)
        journal.start()
        try:
            registry = RegistryHandle.start(journal, LogReader(dsn), config.registry)
            try:
                client = ApnsClient(apns_config, expiration=config.wakeup.interval)
                client.start()
                try:
                    runner = WakeupRunner(config, dsn=dsn, journal=journal, client=client,
                                          registry=registry)
                    yield Parts(journal, registry, client, runner)
                finally:
                    client.close()
            finally:
                registry.stop()
        finally:
            journal.stop(JOURNAL_STOP_TIMEOUT)


@contextmanager
def run_lock(dsn: str) -> Iterator[None]:
    """Hold the database-wide run lock: one relay process drives a run at a time.

    Without it, `relay wakeup` started beside a supervisor in the middle of a run
    would resume that same run and send its tokens twice. A session-level advisory
    lock is released by PostgreSQL when the holder dies, so a crash never leaves it held.
    """
    with connect(dsn, autocommit=True) as conn:
        acquired = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()
        if not (acquired and acquired[0]):
            log.info("another relay process is running a wakeup; waiting for it to finish")
            conn.execute("SELECT pg_advisory_lock(%s)", (RUN_LOCK_KEY,))
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK_KEY,))


def _exit_status(result: RunResult) -> int:
    if result.halted is not None:
        halt = result.halted
        log.critical("HALTED (%s): APNs answered %s %s: %s", halt.halt_class, halt.status,
                     halt.reason, halt.message)
        return EXIT_HALTED
    return EXIT_OK


def _progress_bar() -> tuple[ProgressLogger | None, object]:
    """A tqdm bar on a terminal, else log lines."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(unit="token", desc="wakeup")

    def update(progress: Progress) -> None:
        bar.total = progress.total
        bar.update(progress.done - bar.n)

    return update, bar  # type: ignore[return-value]


def wakeup_once(config: Config, dsn: str) -> int:
    """`python -m relay wakeup`: one run, retries included; 9 on a halt."""
    with running_parts(config, dsn) as parts:
        _install_signal_handlers(parts.runner.request_stop)
        bar_callback, bar = _progress_bar()
        callback = bar_callback or ProgressLogger(config.wakeup.progress_interval)
        with run_lock(dsn):
            result = parts.runner.run_once(progress=callback)
        if bar is not None:
            bar.close()  # type: ignore[attr-defined]
        log.info("wakeup: %s", result)
        return _exit_status(result)


def _install_signal_handlers(on_signal: Callable[[], None]) -> None:
    """SIGTERM and SIGINT drain in-flight sends instead of killing them."""

    def handle(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: draining in-flight sends", signal.Signals(signum).name)
        on_signal()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


class Supervisor:
    """Serves the API and runs a wakeup at start and then every `wakeup.interval`."""

    def __init__(self, config: Config, dsn: str, parts: Parts) -> None:
        self.config, self.dsn, self.parts = config, dsn, parts
        self.stopping = threading.Event()
        self.exit_status = EXIT_OK
        self._worker = threading.Thread(target=self._wakeups, name="wakeup-worker", daemon=True)
        self._restarts: list[float] = []

    def database_available(self) -> bool:
        return self.parts.journal.database_available

    def worker_alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self) -> None:
        self.stopping.set()
        self.parts.runner.request_stop()

    def _wakeups(self) -> None:
        """One run at a time: the next starts `interval` after the previous one started."""
        progress = ProgressLogger(self.config.wakeup.progress_interval)
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                with run_lock(self.dsn):
                    result = self.parts.runner.run_once(progress=progress)
            except Exception:
                log.exception("wakeup run failed; retrying at the next interval")
            else:
                if result.halted is not None:
                    self.exit_status = _exit_status(result)
                    self.stopping.set()
                    return
            delay = self.config.wakeup.interval - (time.monotonic() - started)
            self.stopping.wait(max(0.0, delay))

    def _watch(self) -> None:
        """Restart a crashed Registry with back-off; too many restarts escalate."""
        while not self.stopping.wait(WATCH_INTERVAL):
            if self.parts.registry.alive():
                continue
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                log.critical("the Registry crashed %d times within %.0fs: exiting so the "
                             "service manager restarts the relay", MAX_RESTARTS, RESTART_WINDOW)
                self.exit_status = EXIT_FAILURE
                self.stop()
                return
            time.sleep(RESTART_BACKOFF * 2 ** len(self._restarts))
            log.warning("restarting the crashed Registry")
            self._restarts.append(now)
            self.parts.registry.restart()

    def run(self) -> int:
        from relay.api import ApiServer

        api = ApiServer(self.config, self.parts.registry, self)
        api.start()
        host, port = api.bound_address
        log.info("device API listening on http://%s:%d", host, port)
        try:
            self._worker.start()
            self._watch()
            self._worker.join(self.config.wakeup.drain_timeout + 5)
        finally:
            api.stop()
        return self.exit_status


def run_command(command: str, config: Config, rest: list[str]) -> int:
    """Run a CLI command against the configured (or embedded) database."""
    try:
        with environment.database(config) as dsn:
            if command == "migrate":
                log.info("migrations applied")
                return EXIT_OK
            if command == "audit":
                return audit_main(dsn, rest)
            if command == "rebuild":
                return rebuild_main(dsn, rest)
            if command == "wakeup":
                return wakeup_once(config, dsn)
            with running_parts(config, dsn) as parts:
                supervisor = Supervisor(config, dsn, parts)
                _install_signal_handlers(supervisor.stop)
                return supervisor.run()
    except DatabaseError as exc:
        log.critical("%s", exc)
        return EXIT_FAILURE
