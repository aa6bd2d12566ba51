"""`python -m relay` (also `apns-relay`): the command line, and what each command runs.

`run` (the default) is the supervisor (relay/supervisor.py); `wakeup` one run under
the supervisor's watch, with a progress bar on a terminal; `audit` and `rebuild` replay
the log (events/audit.py); `check` the readiness checks (relay/check.py); `simulator`
the APNs simulator. Exit statuses: relay/exits.py, one table for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

import psycopg

from actors import ProgressLogger
from actors.pace import Progress, ProgressCallback, summary
from events import checkpoint
from events.audit import audit_main, rebuild_main, usage_status
from relay import NAME, __version__, environment, privilege
from relay.apns.client import credential_problem
from relay.config import Config, ConfigError, check_open_files, load_config
from relay.database import DatabaseError, connect, is_transient
from relay.exits import ExitStatus
from relay.runlock import drive_run
from relay.supervisor import Supervisor, exit_status_of

log = logging.getLogger("relay")

# The hard exit after SIGTERM/SIGINT comes this much before `wakeup.drain_timeout` runs out,
# so that the process is gone within it even counting the exit itself.
EXIT_MARGIN = 0.1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay",
        description="Event-sourced APNs wake-up relay. With no command: run the supervisor "
        "(device API + a wakeup at start and every wakeup.interval).",
    )
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="YAML configuration (default: $RELAY_CONFIG, else embedded defaults)")
    parser.add_argument("--version", action="version", version=f"{NAME} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="run the supervisor (the default)")
    commands.add_parser("wakeup", help="run one wakeup over all registered tokens, then exit")
    commands.add_parser("audit", help="replay the event log (see `audit --help`)", add_help=False)
    commands.add_parser("rebuild", help="rebuild the cached state tables from the event log",
                        add_help=False)
    commands.add_parser("migrate", help="apply the database migrations, then exit")
    commands.add_parser("check", help="check the configuration, the database and the APNs "
                        "credentials without notifying anyone (see `check --help`)",
                        add_help=False)
    commands.add_parser("checkpoint", help="print one signed checkpoint of the event log "
                        "(JSON), to keep outside the database")
    commands.add_parser("simulator", help="run the APNs simulator (see `simulator --help`)",
                        add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    command = args.command or "run"
    if rest and command not in ("audit", "rebuild", "simulator", "check"):
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if command == "check":
        from relay.check import check_main

        return check_main(args.config, rest)
    if command == "simulator":
        from relay.simulator.cli import main as simulator_main

        return simulator_main(rest)
    if command in ("audit", "rebuild"):
        status = usage_status(command, rest)
        if status is not None:
            return status
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{NAME}: configuration error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    from relay.logs import configure

    configure(config.logging)
    return run_command(command, config, rest)


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
    # The supervisor's watch, without its API and its worker: crashed parts are
    # restarted within the same budget, and too many crashes end the run.
    supervisor = Supervisor(config, dsn)
    stopping = supervisor.stopping
    _install_signal_handlers(supervisor.stop, config.wakeup.drain_timeout)
    with supervisor.running(serve=False) as parts:
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
        if escalated != ExitStatus.OK:
            return escalated
        if result is None:
            log.info("wakeup: stopped before the run started")
            return ExitStatus.OK
        log.info("wakeup: %s", summary(result))
        return exit_status_of(result)


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
    os._exit(ExitStatus.OK)


def print_checkpoint(config: Config, dsn: str) -> int:
    """`python -m relay checkpoint`: one signed checkpoint of the log's head, as JSON."""
    key = checkpoint.load_or_create_key(config.signing_key)
    with connect(dsn, application_name="relay-checkpoint") as conn:
        print(json.dumps(checkpoint.take(conn, key)))
    return ExitStatus.OK


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
                return ExitStatus.OK
            if command == "checkpoint":
                return print_checkpoint(config, dsn)
            if command == "wakeup":
                return wakeup_once(config, dsn)
            supervisor = Supervisor(config, dsn)
            _install_signal_handlers(supervisor.stop, config.wakeup.drain_timeout)
            with supervisor.running(serve=True):
                return supervisor.run()
    except privilege.PrivilegeError as exc:
        log.critical("%s", exc)
        return ExitStatus.USAGE
    except checkpoint.CheckpointError as exc:
        log.critical("%s", exc)
        return ExitStatus.USAGE
    except ConfigError as exc:  # found at start: the credentials, the open-file limit
        print(f"{NAME}: configuration error: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except DatabaseError as exc:
        log.critical("%s", exc)
        return ExitStatus.UNAVAILABLE
    except psycopg.Error as exc:  # lost during a command (audit, rebuild)
        if not is_transient(exc):
            raise
        log.critical("lost the database: %s", exc)
        return ExitStatus.UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
