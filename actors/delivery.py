"""One token's delivery within one run: the decisions, free of threads and I/O.

A `Delivery` answers two questions for its Sender shard: may this token be sent
now, and, given APNs' answer, which events record the outcome and what happens
next (final, retry at a time, unregister, halt the relay). The shard persists
the events *before* acting, so the log always knows at least as much as memory.

Per run a token gets at most `wakeup.attempts` sends, all with the same
`apns-id` (so Apple's and our logs correlate one notification across retries).
A transient answer schedules the next attempt by `DecorrelatedJitter`; after the
last failed attempt the token is abandoned for this run and the run goes on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum

from events import types as ev
from relay.apns import ApnsResult, Verdict
from relay.backoff import DecorrelatedJitter

HALT_MESSAGES = {
    Verdict.CONFIGURATION: (
        "APNs rejected the relay's credentials or topic: a configuration error. "
        "Check apns.topic, apns.environment, apns.key_file, apns.key_id and apns.team_id."
    ),
    Verdict.RELAY_BUG: (
        "APNs rejected the request itself as malformed: a bug in the relay. "
        "Please report it with this message."
    ),
}


# A version-4 UUID from one 128-bit draw: keep the random bits, set version 4 and the
# RFC 4122 variant. `uuid.uuid4()` reads os.urandom per id, a system call per token;
# an apns-id only has to be unique, not secret. The module's generator is seeded from
# the OS and reseeded in a forked child, so processes never share a sequence.
_UUID4_KEEP = ((1 << 128) - 1) ^ (0xF000 << 64) ^ (0xC000 << 48)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_apns_id() -> str:
    """A fresh lower-case UUID (version 4), the form Apple requires for `apns-id`."""
    digits = "%032x" % (random.getrandbits(128) & _UUID4_KEEP | _UUID4_SET)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Outcome(str, Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    ABANDONED = "abandoned"
    DEAD = "dead"
    HALT = "halt"

    @property
    def final(self) -> bool:
        """The token is done for this run."""
        return self in (Outcome.DELIVERED, Outcome.ABANDONED, Outcome.DEAD)


@dataclass(frozen=True)
class HaltInfo:
    """Why the relay must stop: APNs said our requests or our credentials are wrong."""

    halt_class: str  # Verdict.RELAY_BUG.value or Verdict.CONFIGURATION.value
    reason: str | None
    status: int | None
    message: str
    run: int | None = None
    token: str | None = field(default=None, repr=False)  # logs show it redacted, never whole

    def event(self, at_ms: int) -> ev.Event:
        return ev.relay_halted(at_ms, halt_class=self.halt_class, reason=self.reason,
                               status=self.status, message=self.message, run=self.run,
                               token=self.token)


@dataclass(frozen=True)
class DeadVerdict:
    """APNs says the token is dead; the Registry decides whether to unregister it."""

    token: str
    cause: str  # Apple's reason, e.g. "Unregistered"
    verdict_at_ms: int  # T: Apple's 410 timestamp, else when the answer arrived
    apple_timestamp_ms: int | None
    run: int | None
    apns_id: str | None


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    events: tuple[ev.Event, ...]
    retry_at_ms: int | None = None
    dead: DeadVerdict | None = None
    halt: HaltInfo | None = None


@dataclass(frozen=True)
class DeliveryPolicy:
    """Per-run limits shared by every token's delivery."""

    attempts: int
    backoff: DecorrelatedJitter


class Delivery:
    """The state of one token in one run; resumable from the log's `TokenState`."""

    def __init__(self, run: int, token: str, policy: DeliveryPolicy, *, attempts: int = 0,
                 next_attempt_at_ms: int | None = None, apns_id: str | None = None,
                 fence: ev.Fence | None = None) -> None:
        self.run, self.token, self.policy = run, token, policy
        self.fence = fence  # the token shard and lease epoch its outcomes are sent under
        self.attempts = attempts
        self.next_attempt_at_ms = next_attempt_at_ms
        self.apns_id = apns_id or new_apns_id()
        self._previous_delay: float | None = None

    @property
    def exhausted(self) -> bool:
        """Every allowed attempt was used (possible on resume, e.g. after a halt)."""
        return self.attempts >= self.policy.attempts

    def due(self, now_ms: int) -> bool:
        return self.next_attempt_at_ms is None or self.next_attempt_at_ms <= now_ms

    def abandon(self, at_ms: int, last_reason: str | None = None) -> Decision:
        """Give up without another send: the attempts are used up."""
        return Decision(Outcome.ABANDONED, (ev.notification_abandoned(
            self.run, self.token, at_ms, attempts=self.attempts, apns_id=self.apns_id,
            last_reason=last_reason, fence=self.fence),))

    def on_answer(self, result: ApnsResult) -> Decision:
        """Decide on APNs' answer to one send and update the state to match."""
        self.attempts += 1
        at_ms = result.received_at_ms
        latency_ms = result.latency * 1000.0
        verdict = result.verdict
        if verdict is Verdict.DELIVERED:
            self.next_attempt_at_ms = None
            return Decision(Outcome.DELIVERED, (ev.notification_delivered(
                self.run, self.token, at_ms, attempt=self.attempts, apns_id=self.apns_id,
                status=result.status or 200, latency_ms=latency_ms, fence=self.fence),))

        retry_at: int | None = None
        if verdict is Verdict.TRANSIENT and not self.exhausted:
            delay = self.policy.backoff.next_delay(self._previous_delay)
            self._previous_delay = delay
            retry_at = at_ms + round(delay * 1000)
        self.next_attempt_at_ms = retry_at
        failed = ev.notification_failed(
            self.run, self.token, at_ms, attempt=self.attempts, apns_id=self.apns_id,
            status=result.status, reason=result.reason, verdict=verdict.value,
            apple_timestamp_ms=result.timestamp_ms, latency_ms=latency_ms,
            next_attempt_at_ms=retry_at, fence=self.fence)

        if verdict is Verdict.TRANSIENT:
            if retry_at is not None:
                return Decision(Outcome.RETRY, (failed,), retry_at_ms=retry_at)
            abandoned = self.abandon(at_ms, result.reason)
            return Decision(Outcome.ABANDONED, (failed, *abandoned.events))
        if verdict is Verdict.DEAD_TOKEN:
            dead = DeadVerdict(
                self.token, result.reason or "Unregistered",
                verdict_at_ms=at_ms if result.timestamp_ms is None else result.timestamp_ms,
                apple_timestamp_ms=result.timestamp_ms, run=self.run, apns_id=self.apns_id)
            return Decision(Outcome.DEAD, (failed,), dead=dead)
        halt = HaltInfo(verdict.value, result.reason, result.status,
                        f"{HALT_MESSAGES[verdict]} (APNs answered {result.status} "
                        f"{result.reason or 'without a reason'})",
                        run=self.run, token=self.token)
        return Decision(Outcome.HALT, (failed,), halt=halt)
