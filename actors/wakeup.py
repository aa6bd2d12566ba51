"""One wakeup run, as a plain call: the facade the supervisor and `relay wakeup` use.

`WakeupRunner.run_once()` starts the Dispatcher (which starts its Sender shards),
waits for the run to end, stops them and returns a `RunResult`. The long-lived
parts (Journal, APNs client, Registry) belong to the caller, so one relay process
runs many wakeups over one set of connections. `request_stop()` (from a signal
handler's thread, say) drains: no new sends, in-flight sends recorded, the run
left unfinished for the next start to resume, all within `wakeup.drain_timeout`.

Wiring by hand, as tests do (the relay's own start sequence is `Supervisor.running`
in relay/supervisor.py), in dependency order, stopped in reverse::

    journal = Journal(dsn, hold_limit=config.cluster.hold_limit); journal.start()
    registry = RegistryHandle.start(journal, LogReader(dsn), config.registry)
    client = open_client(config.apns, expiration=config.wakeup.interval); client.start()
    keeper = LeaseKeeper(dsn, config.cluster); keeper.start()  # this process's shards
    runner = WakeupRunner(config, dsn=dsn, journal=journal, client=client, registry=registry,
                          keeper=keeper)
    result = runner.run_once(ProgressLogger(config.wakeup.progress_interval))
    # result.halted is not None -> exit status 9; runner.request_stop() on SIGTERM/SIGINT
    keeper.stop()  # releases the shards, once the run has drained
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import pykka

from actors.delivery import HaltInfo
from actors.dispatcher import Dispatcher, Drain, Snapshot
from actors.pace import Progress, ProgressCallback, RunResult
from actors.registry import RegistryHandle
from events.journal import Journal
from events.store import LogReader
from relay.apns.processes import NotificationClient
from relay.cluster import ClusterLog, LeaseKeeper
from relay.config import Config

__all__ = ["HaltInfo", "Progress", "ProgressLogger", "RunResult", "WakeupRunner"]

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 1.0  # seconds to get the counts of a run whose drain timed out
# Of `wakeup.drain_timeout`, what the drain leaves for stopping the actors, the connections
# and the Journal, so that the process is gone within the timeout (they take ~0.1 s).
STOP_RESERVE = 0.5


class WakeupRunner:
    """Runs wakeups one at a time over the caller's Journal, APNs client and Registry."""

    def __init__(self, config: Config, *, dsn: str, journal: Journal, client: NotificationClient,
                 registry: RegistryHandle, keeper: LeaseKeeper, rng: random.Random | None = None,
                 apns_target: Mapping[str, str | None] | None = None) -> None:
        self._config, self._dsn, self._apns_target = config, dsn, apns_target
        self._keeper, self._runs = keeper, ClusterLog(dsn, config.cluster.hold_limit)
        self._journal, self._client, self._registry, self._rng = journal, client, registry, rng
        self._lock = threading.Lock()
        self._dispatcher: pykka.ActorRef[Dispatcher] | None = None
        self._stop: Future[None] = Future()

    def run_once(self, progress: ProgressCallback | None = None, *,
                 force: bool = True) -> RunResult:
        """Drive one wakeup (this process's shards of it) to its end, a halt, or a
        requested stop: the unfinished run, else a new one, started now if `force`d,
        else only if due (`run` None in the result when none is)."""
        if self._stop.done():
            return RunResult(run=None, finished=False, stopped=True)
        # Outcomes an earlier take-up appended (one whose drain timed out, say) must be in
        # the log before this one reads it, or their tokens would be sent again.
        settled = self._journal.barrier()
        waiting: list[Future[Any]] = [settled, self._stop]
        concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
        if not settled.done():
            return RunResult(run=None, finished=False, stopped=True)
        reader = LogReader(self._dsn)
        done: Future[RunResult] = Future()
        ref = Dispatcher.start(self._config.wakeup, reader=reader, journal=self._journal,
                               client=self._client, registry=self._registry, done=done,
                               keeper=self._keeper, runs=self._runs, force=force,
                               progress=progress, rng=self._rng, apns=self._apns_target)
        with self._lock:
            self._dispatcher = ref
            if self._stop.done():
                ref.tell(Drain())
        try:
            return self._wait(ref, done)
        finally:
            with self._lock:
                self._dispatcher = None
            if ref.is_alive():
                ref.stop(block=True)
            reader.close()

    def request_stop(self) -> None:
        """Drain the current run (and refuse to start another); safe from any thread."""
        with self._lock:
            if not self._stop.done():
                self._stop.set_result(None)
            if self._dispatcher is not None:
                with contextlib.suppress(pykka.ActorDeadError):
                    self._dispatcher.tell(Drain())

    @property
    def stop_requested(self) -> bool:
        return self._stop.done()

    def _wait(self, ref: pykka.ActorRef[Dispatcher], done: Future[RunResult]) -> RunResult:
        waiting: list[Future[Any]] = [done, self._stop]
        concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
        if done.done():
            return done.result()
        timeout = max(0.0, self._config.wakeup.drain_timeout - STOP_RESERVE)
        try:
            return done.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            log.warning("drain timed out after %.1fs with sends still unanswered; "
                        "the next start resends them", timeout)
            base = RunResult(run=None, finished=False)
            with contextlib.suppress(pykka.ActorDeadError, pykka.Timeout):
                answer = ref.ask(Snapshot(), timeout=SNAPSHOT_TIMEOUT)
                if isinstance(answer, RunResult):
                    base = answer
            return replace(base, stopped=True, drained=False)


class ProgressLogger:
    """A progress callback that logs sent/total, rate and ETA every `interval` seconds."""

    def __init__(self, interval: float, logger: logging.Logger = log) -> None:
        self._interval, self._log = interval, logger
        self._last: float | None = None
        self._last_line: tuple[int, int, int] | None = None  # (run, done, total) logged last

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        line = (progress.run, progress.done, progress.total)
        final = progress.done >= progress.total
        if self._last is not None and now - self._last < self._interval and not final:
            return
        if final and line == self._last_line:
            return  # the run's end is reported again when it is recorded: said once
        self._last, self._last_line = now, line
        eta = progress.eta
        self._log.info("run %d: %d/%d tokens done (dead %d: unregistered %d, kept %d), "
                       "%.1f tokens/s, ETA %s", progress.run, progress.done, progress.total,
                       progress.dead, progress.unregistered, progress.kept, progress.rate,
                       "unknown" if eta is None else f"{eta:.0f}s",
                       extra={"run": progress.run, "done": progress.done,
                              "total": progress.total, "dead": progress.dead,
                              "unregistered": progress.unregistered, "kept": progress.kept,
                              "rate": round(progress.rate, 1),
                              "eta_s": None if eta is None else round(eta)})

