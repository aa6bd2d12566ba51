"""One result path for every APNs client: what a send ended with, and who hears of it.

`ApnsClient` (connections in this process) and `ApnsProcessPool` (connections in child
processes) end every send the same way: `result_of` builds the `ApnsResult`, `settle`
tells the client's `SendListener` and resolves the caller's future. The metrics are one
such listener (`PrometheusListener`), as in Pushy's metrics listener; a child process's
client has the silent one, since the pool in the relay process hears of the same send
when its answer comes back: each send is counted once, where `/metrics` is served.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Any, Protocol

from relay import metrics
from relay.apns.reasons import Verdict, classify


@dataclass(frozen=True)
class ApnsResult:
    """APNs' answer to one notification, or why there was none (`status` None)."""

    token: str
    apns_id: str
    status: int | None
    reason: str | None
    verdict: Verdict
    timestamp_ms: int | None  # 410 only: when APNs saw the token die, ms since the epoch
    latency: float  # seconds from send() to this result
    received_at_ms: int


class SendListener(Protocol):
    """Hears what an APNs client does; called from the client's threads, must not block."""

    def in_flight(self, change: int) -> None:
        """Sends awaiting an answer went up or down by `change`."""

    def answered(self, result: ApnsResult) -> None:
        """A send ended (an answer, or why there was none): once per send."""

    def connections(self, change: int) -> None:
        """HTTP/2 connections open went up or down by `change`."""

    def provider_token_age(self, seconds: float) -> None:
        """The age of the provider token (JWT) in use."""


class PrometheusListener:
    """The relay's metrics: `relay_apns_sends_total{status,reason}` and the gauges."""

    def __init__(self) -> None:
        self._counters: dict[tuple[int | None, str | None], Any] = {}

    def in_flight(self, change: int) -> None:
        metrics.SENDS_IN_FLIGHT.inc(change)

    def answered(self, result: ApnsResult) -> None:
        key = (result.status, result.reason)
        counter = self._counters.get(key)
        if counter is None:  # labels() costs a lookup per call: once per (status, reason)
            counter = metrics.SENDS.labels(
                status="none" if result.status is None else str(result.status),
                reason=result.reason or "")
            self._counters[key] = counter
        counter.inc()

    def connections(self, change: int) -> None:
        metrics.APNS_CONNECTIONS.inc(change)

    def provider_token_age(self, seconds: float) -> None:
        metrics.JWT_AGE.set(seconds)


class SilentListener:
    """For a child process's client: its parent counts the sends."""

    def in_flight(self, change: int) -> None:
        pass

    def answered(self, result: ApnsResult) -> None:
        pass

    def connections(self, change: int) -> None:
        pass

    def provider_token_age(self, seconds: float) -> None:
        pass


def result_of(token: str, apns_id: str, *, started: float, status: int | None,
              reason: str | None, timestamp_ms: int | None,
              received_at_ms: int) -> ApnsResult:
    """The result of one send started at `started` (time.monotonic())."""
    return ApnsResult(token=token, apns_id=apns_id, status=status, reason=reason,
                      verdict=classify(status, reason), timestamp_ms=timestamp_ms,
                      latency=time.monotonic() - started, received_at_ms=received_at_ms)


def settle(future: concurrent.futures.Future[ApnsResult], result: ApnsResult,
           listener: SendListener) -> None:
    """End one send: the listener hears of it, and the caller's future gets it (unless
    the caller cancelled it)."""
    listener.answered(result)
    if future.set_running_or_notify_cancel():
        future.set_result(result)
