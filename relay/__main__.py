"""`python -m relay` (also `apns-relay`): the supervisor and the operator commands.

Exit statuses (`check` has its own, relay/check.py): 0 done (also after SIGTERM/SIGINT
drained a run); 1 the audit found a mismatch, a runtime failure, or crashes came faster
than the supervisor may restart them; 2 bad configuration or usage, or a runtime role that
could rewrite the log although database.owner_dsn is set; 3 the database could not be
reached (for 30 s at start) or was lost during a command, so nothing was checked;
9 APNs reported a relay bug or a configuration error (a `relay_halted` event says
which and why).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from relay import NAME, __version__
from relay.config import ConfigError, load_config

EXIT_USAGE = 2

log = logging.getLogger("relay")


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
        from events.audit import usage_status

        status = usage_status(command, rest)
        if status is not None:
            return status
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{NAME}: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from relay.logs import configure

    configure(config.logging)
    from relay.supervisor import run_command

    return run_command(command, config, rest)


if __name__ == "__main__":
    sys.exit(main())
