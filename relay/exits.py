"""The exit statuses of every `python -m relay` command: the one table.

A service manager acts on them (restart on failure, never after a halt: systemd's
`RestartPreventExitStatus=9`), and scripts around `audit` and `check` read them, so each
number keeps its meaning across commands.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    OK = 0
    """Done; also a run drained by SIGTERM/SIGINT, and every `check` holding."""

    FAILURE = 1
    """Something was found wrong: `audit` found a mismatch, a `check` did not hold, or
    parts crashed faster than the supervisor may restart them (restart the process)."""

    USAGE = 2
    """Bad configuration or command-line usage, unusable credentials, or a runtime role
    that could rewrite the log although `database.owner_dsn` is set: fix, then start."""

    UNAVAILABLE = 3
    """The database could not be reached (for 30 s at start) or was lost during a
    command, so nothing was done or checked: try again."""

    HALTED = 9
    """APNs reported a relay bug or a configuration error (a `relay_halted` event in the
    log says which and why): an operator must act before the relay is started again."""
