"""Event types: the facts the relay records, with the fields an auditor needs.

An `Event` is a type name plus a flat JSON object. The names are fixed (they
appear in the log and in every output); the constructors below are the only
place events are built, so each type's fields are visible in one file.
Times are ISO 8601 UTC strings with milliseconds (`2026-11-25T19:43:17.123Z`);
Apple's 410 timestamp is kept as Apple sent it, in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

DEVICE_REGISTERED = "device_registered"
DEVICE_UNREGISTERED = "device_unregistered"
UNREGISTER_SKIPPED = "unregister_skipped"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
NOTIFICATION_DELIVERED = "notification_delivered"
NOTIFICATION_FAILED = "notification_failed"
NOTIFICATION_ABANDONED = "notification_abandoned"
RELAY_HALTED = "relay_halted"
LOG_CREATED = "log_created"
SHARD_LEASED = "shard_leased"
SHARD_RELEASED = "shard_released"

EVENT_TYPES = frozenset({
    DEVICE_REGISTERED, DEVICE_UNREGISTERED, UNREGISTER_SKIPPED, RUN_STARTED, RUN_FINISHED,
    NOTIFICATION_DELIVERED, NOTIFICATION_FAILED, NOTIFICATION_ABANDONED, RELAY_HALTED,
    LOG_CREATED, SHARD_LEASED, SHARD_RELEASED,
})

# EVENT VERSIONS (upcasting). An event's shape never changes in the log; a new shape
# gets a version number in the field "v" (absent means version 1), and readers turn
# older shapes into the current one where they read them:
# - run_finished v1 carried one count, "unregistered", which counted the run's
#   dead-token verdicts. v2 carries "dead" (verdicts), "unregistered" (the run's
#   device_unregistered events) and "kept" (its unregister_skipped events). A v1
#   event is read as dead = its "unregistered"; the fold counts the other two from
#   the run's events (events/projection.py), as it does for v2.
# run_started gained an optional field, "apns" (the environment and endpoint the run
# sent to; environment "simulator" for the built-in simulator): absent means unknown.
# notification_delivered, notification_failed and notification_abandoned gained two
# optional fields together, "shard" and "epoch": the token's shard and the epoch of the
# lease its sender held (relay/cluster.py). Absent: written before shards existed.
RUN_FINISHED_VERSION = 2

# A token's shard and its lease's epoch, as outcome events carry them (None: unsharded).
Fence = tuple[int, int]

# Why a device was unregistered: by its own request through the API, or by an APNs verdict.
CAUSE_API = "api"
DEAD_TOKEN_REASONS = frozenset({"Unregistered", "ExpiredToken", "DeviceTokenNotForTopic",
                                "BadDeviceToken"})
UNREGISTER_CAUSES = DEAD_TOKEN_REASONS | {CAUSE_API}


@dataclass(frozen=True)
class Event:
    """One fact, not yet in the log."""

    type: str
    data: Mapping[str, Any]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# The last second `iso_ms` formatted, and its text up to the milliseconds: events are
# stamped thousands of times a second, and strftime was most of an event's encoding.
_iso_second: tuple[int, str] = (0, "1970-01-01T00:00:00.")


def iso_ms(epoch_ms: int) -> str:
    """`2026-11-25T19:43:17.123Z` for an epoch in milliseconds."""
    global _iso_second
    second, ms = divmod(epoch_ms, 1000)
    cached = _iso_second  # one read: other threads may replace it meanwhile
    if cached[0] != second:
        moment = datetime.fromtimestamp(second, tz=timezone.utc)
        cached = _iso_second = (second, moment.strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{cached[1]}{ms:03d}Z"


def parse_iso_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 time written by `iso_ms` (or any offset-aware one)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


def device_registered(token: str, at_ms: int) -> Event:
    return Event(DEVICE_REGISTERED, {"token": token, "at": iso_ms(at_ms)})


def device_unregistered(token: str, at_ms: int, cause: str, *,
                        apple_timestamp_ms: int | None = None, run: int | None = None,
                        apns_id: str | None = None) -> Event:
    return Event(DEVICE_UNREGISTERED, {
        "token": token, "at": iso_ms(at_ms), "cause": cause,
        "apple_timestamp_ms": apple_timestamp_ms, "run": run, "apns_id": apns_id,
    })


def unregister_skipped(token: str, at_ms: int, cause: str, *, verdict_at_ms: int,
                       registered_at_ms: int | None, why: str, run: int | None = None,
                       apple_timestamp_ms: int | None = None) -> Event:
    return Event(UNREGISTER_SKIPPED, {
        "token": token, "at": iso_ms(at_ms), "cause": cause, "run": run,
        "apple_timestamp_ms": apple_timestamp_ms, "verdict_at": iso_ms(verdict_at_ms),
        "registered_at": None if registered_at_ms is None else iso_ms(registered_at_ms),
        "why": why,
    })


def run_started(run: int, at_ms: int, tokens: int, *,
                apns: Mapping[str, str | None] | None = None) -> Event:
    """`apns`: {"environment", "endpoint"} the run sends to; environment "simulator"
    marks a run against the built-in simulator (nothing reached Apple)."""
    return Event(RUN_STARTED, {"run": run, "at": iso_ms(at_ms), "tokens": tokens,
                               "apns": None if apns is None else dict(apns)})


def run_finished(run: int, at_ms: int, *, tokens: int, delivered: int, failed: int,
                 abandoned: int, dead: int, unregistered: int, kept: int) -> Event:
    """`dead`: dead-token verdicts; of those, `unregistered` were unregistered and
    `kept` kept because the device registered again after APNs' verdict."""
    return Event(RUN_FINISHED, {
        "run": run, "at": iso_ms(at_ms), "tokens": tokens, "delivered": delivered,
        "failed": failed, "abandoned": abandoned, "dead": dead,
        "unregistered": unregistered, "kept": kept, "v": RUN_FINISHED_VERSION,
    })


def upcast_run_finished(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A run_finished of any version in the current shape; a v1 event's "unregistered"
    (dead-token verdicts) becomes "dead", and its "unregistered" and "kept" are None
    (not recorded: counted from the run's events by whoever folds them)."""
    if data.get("v", 1) >= RUN_FINISHED_VERSION:
        return data
    upcast = dict(data)
    upcast.update(dead=data["unregistered"], unregistered=None, kept=None,
                  v=RUN_FINISHED_VERSION)
    return upcast


def log_created(at_ms: int, genesis: bytes) -> Event:
    """The first event of a log: 32 random bytes that make its chain, and so every
    checkpoint of it, its own (events/checkpoint.py)."""
    return Event(LOG_CREATED, {"at": iso_ms(at_ms), "genesis": genesis.hex()})


def _fenced(data: dict[str, Any], fence: Fence | None) -> dict[str, Any]:
    if fence is not None:
        data["shard"], data["epoch"] = fence
    return data


def notification_delivered(run: int, token: str, at_ms: int, *, attempt: int, apns_id: str,
                           status: int, latency_ms: float, fence: Fence | None = None) -> Event:
    return Event(NOTIFICATION_DELIVERED, _fenced({
        "run": run, "token": token, "at": iso_ms(at_ms), "attempt": attempt,
        "apns_id": apns_id, "status": status, "latency_ms": round(latency_ms, 3),
    }, fence))


def notification_failed(run: int, token: str, at_ms: int, *, attempt: int, apns_id: str,
                        status: int | None, reason: str | None, verdict: str,
                        apple_timestamp_ms: int | None, latency_ms: float,
                        next_attempt_at_ms: int | None, fence: Fence | None = None) -> Event:
    """One failed attempt; `next_attempt_at` is None when no retry follows."""
    return Event(NOTIFICATION_FAILED, _fenced({
        "run": run, "token": token, "at": iso_ms(at_ms), "attempt": attempt,
        "apns_id": apns_id, "status": status, "reason": reason, "verdict": verdict,
        "apple_timestamp_ms": apple_timestamp_ms, "latency_ms": round(latency_ms, 3),
        "next_attempt_at": None if next_attempt_at_ms is None else iso_ms(next_attempt_at_ms),
    }, fence))


def notification_abandoned(run: int, token: str, at_ms: int, *, attempts: int, apns_id: str,
                           last_reason: str | None, fence: Fence | None = None) -> Event:
    return Event(NOTIFICATION_ABANDONED, _fenced({
        "run": run, "token": token, "at": iso_ms(at_ms), "attempts": attempts,
        "apns_id": apns_id, "last_reason": last_reason,
    }, fence))


def fence_of(data: Mapping[str, Any]) -> Fence | None:
    """The (shard, epoch) an outcome event was sent under, or None."""
    epoch = data.get("epoch")
    return None if epoch is None else (data["shard"], epoch)


def shard_leased(at_ms: int, *, process: str, host: str, shard: int, epoch: int,
                 took_from: str | None) -> Event:
    """`process` holds `shard` from now, at `epoch`; `took_from`: the holder whose lease
    had expired (a takeover), None when the shard was free."""
    return Event(SHARD_LEASED, {"at": iso_ms(at_ms), "process": process, "host": host,
                                "shard": shard, "epoch": epoch, "took_from": took_from})


def shard_released(at_ms: int, *, process: str, host: str, shard: int, epoch: int,
                   why: str) -> Event:
    """`process` gave `shard` up (`why`: "stopping" or "rebalancing"), its sends drained."""
    return Event(SHARD_RELEASED, {"at": iso_ms(at_ms), "process": process, "host": host,
                                  "shard": shard, "epoch": epoch, "why": why})


def relay_halted(at_ms: int, *, halt_class: str, reason: str | None, status: int | None,
                 message: str, run: int | None = None, token: str | None = None) -> Event:
    """`halt_class` is `relay_bug` or `configuration` (the APNs classes that stop the relay)."""
    return Event(RELAY_HALTED, {
        "at": iso_ms(at_ms), "halt_class": halt_class, "reason": reason, "status": status,
        "message": message, "run": run, "token": token,
    })
