"""What the simulator does with a request (scripted outcomes) and what it records of it.

The vocabulary tests and operators script the simulator with (`ScriptedOutcome`,
`Action`, `--script` on the command line) and read back (`RecordedRequest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Action(str, Enum):
    """What the simulator does with a valid request that a script covers."""

    ANSWER = "answer"  # answer with status/reason
    WITHHOLD = "withhold"  # never answer (the client's deadline must fire)
    RESET = "reset"  # RST_STREAM (INTERNAL_ERROR, or REFUSED_STREAM if status is 0)
    DROP = "drop"  # close the TCP connection abruptly
    GOAWAY = "goaway"  # GOAWAY naming the previous stream as the last: this one unprocessed


@dataclass(frozen=True)
class ScriptedOutcome:
    """One answer in a token's script; scripts are consumed one entry per valid request."""

    status: int = 200
    reason: str | None = None
    timestamp_ms: int | None = None  # for 410; Unregistered gets "now" when omitted
    action: Action = Action.ANSWER
    delay: float = 0.0  # seconds before acting, on top of the simulator's latency

    @classmethod
    def failures(cls, count: int, status: int = 503,
                 reason: str = "ServiceUnavailable") -> list[ScriptedOutcome]:
        """`count` failures; the next request (script exhausted) is accepted."""
        return [cls(status, reason)] * count


@dataclass(frozen=True)
class RecordedRequest:
    """A request as received and what the simulator decided."""

    connection: int
    stream_id: int
    token: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    valid: bool
    answer: tuple[int, str | None] | None  # None: withheld, reset or dropped
    received_at: float  # simulator clock, epoch seconds

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)
