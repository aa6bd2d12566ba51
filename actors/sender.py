"""Sender shards: a small fixed set of actors hosting every token's delivery.

One pykka actor per token would cost an OS thread each, so each token's
delivery is a *virtual actor*: a `Delivery` object living in exactly one shard
(token -> shard by a stable hash), activated when the Dispatcher assigns the
token, evicted when it has a final outcome. A token in back-off is just an
entry in its shard's timer heap; when due, the shard asks the Dispatcher for a
credit, so back-off never blocks the shard and never delays another token.

Order of effects for every answer: decide (`Delivery.on_answer`), append the
events to the Journal, and only after COMMIT act on them (park, report, hand a
dead token to the Registry). A crash between the answer and the commit loses
only that one answer, which the resumed run sends again.

Every `Assign` or `Grant` costs the Dispatcher one credit and is answered by
exactly one `TokenDone` or `HaltReported`, which returns it. Messages between
the Dispatcher and a shard travel in batches (`Work`, `Reports`) and outcome
events go to the Journal in batches (`_Flush`): per-message overhead, not the
decisions, limited throughput when each token cost half a dozen messages.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import pykka

from actors.alarm import Alarm
from actors.delivery import Decision, Delivery, DeliveryPolicy, HaltInfo, Outcome
from actors.messages import failure, on_done, tell_quietly
from actors.registry import RegistryHandle
from events import types as ev
from events.journal import Journal
from events.store import TokenState
from relay import metrics
from relay.apns import ApnsResult, Verdict
from relay.apns.processes import NotificationClient
from relay.tokens import redact

log = logging.getLogger(__name__)


def shard_of(token: str, shards: int) -> int:
    """Stable across processes (unlike `hash()`), so a token always lands on the same shard."""
    return zlib.crc32(token.encode("ascii")) % shards


# --- messages to a shard ---------------------------------------------------------------

@dataclass(frozen=True)
class Assign:
    """A new token for this run, with its state from the log (a resumed run keeps it)."""

    state: TokenState


@dataclass(frozen=True)
class Grant:
    """A credit for a parked token that asked for one."""

    token: str


@dataclass(frozen=True)
class Work:
    """What one feed of the Dispatcher hands this shard, as one message."""

    items: tuple[Assign | Grant, ...]


@dataclass(frozen=True)
class _Answered:
    """Answers are waiting in the shard's answer list (one message for all of them)."""


@dataclass(frozen=True)
class _Outcome:
    """A decision on one token, waiting for its events to be committed."""

    token: str
    decision: Decision
    sent: bool
    status: int | None
    reason: str | None = None


@dataclass(frozen=True)
class _Flush:
    pass


@dataclass(frozen=True)
class _Recorded:
    outcomes: list[_Outcome]


@dataclass(frozen=True)
class _Tick:
    pass


# --- messages from a shard to the Dispatcher ---------------------------------------------

@dataclass(frozen=True)
class TokenDone:
    """The credit comes back. `outcome` is final, or RETRY (parked), or None (parked, not sent)."""

    token: str
    outcome: Outcome | None
    sent: bool
    status: int | None
    failed_events: int
    dead_decision: str | None = None  # for a dead token: the Registry's event type, if any
    reason: str | None = None  # APNs' reason, or why there was no answer (for the breaker)


@dataclass(frozen=True)
class CreditWanted:
    shard: int
    token: str


@dataclass(frozen=True)
class HaltReported:
    """APNs said configuration error or relay bug; the credit comes back with it."""

    token: str
    halt: HaltInfo
    status: int | None


@dataclass(frozen=True)
class Reports:
    """Everything one shard message produced for the Dispatcher, in order, as one message."""

    messages: tuple[TokenDone | CreditWanted | HaltReported, ...]


@dataclass(frozen=True)
class ShardFault:
    """Something that must not happen (the Journal refused an append): end the run."""

    error: BaseException


class SenderShard(pykka.ThreadingActor):
    def __init__(self, index: int, run: int, dispatcher: pykka.ActorRef[Any],
                 client: NotificationClient, journal: Journal, registry: RegistryHandle,
                 policy: DeliveryPolicy) -> None:
        super().__init__()
        self._index, self._run, self._dispatcher = index, run, dispatcher
        self._client, self._journal, self._registry = client, journal, registry
        self._policy = policy
        self._deliveries: dict[str, Delivery] = {}
        self._parked: list[tuple[int, str]] = []  # heap of (next_attempt_at_ms, token)
        self._unrecorded: list[_Outcome] = []  # decided, to be appended at the next _Flush
        self._outbox: list[TokenDone | CreditWanted | HaltReported] = []
        # Answers arrive on the APNs client's thread; they queue here and only the first
        # of a burst costs an actor message (a pykka message per answer was a large share
        # of the shard's time: BENCHMARKS.md, "Figures behind choices in the code").
        self._answers: list[tuple[str, ApnsResult]] = []
        self._answers_lock = threading.Lock()
        self._alarm = Alarm(self._wake, name=f"sender-{index}-alarm")

    def on_start(self) -> None:
        self._alarm.start()

    def on_stop(self) -> None:
        self._alarm.stop()

    def on_failure(self, exception_type: type[BaseException] | None,
                   exception_value: BaseException | None,
                   traceback: TracebackType | None) -> None:
        """A shard bug must end the run loudly, not leave the Dispatcher waiting forever."""
        self._alarm.stop()
        if exception_value is not None:
            tell_quietly(self._dispatcher, ShardFault(exception_value))

    def _wake(self) -> None:
        tell_quietly(self.actor_ref, _Tick())

    def on_receive(self, message: Any) -> None:
        self._handle(message)
        if self._outbox:
            reports, self._outbox = tuple(self._outbox), []
            tell_quietly(self._dispatcher, Reports(reports))

    def _handle(self, message: Any) -> None:
        if isinstance(message, Work):
            for item in message.items:
                if isinstance(item, Assign):
                    self._assign(item.state)
                else:
                    self._grant(item.token)
        elif isinstance(message, _Answered):
            with self._answers_lock:
                answers, self._answers = self._answers, []
            for token, result in answers:
                self._answered(token, result)
        elif isinstance(message, _Flush):
            self._flush()
        elif isinstance(message, _Recorded):
            for outcome in message.outcomes:
                self._act(outcome)
        elif isinstance(message, _Tick):
            self._ask_for_due()
        else:
            super().on_receive(message)  # logged as unexpected

    def _grant(self, token: str) -> None:
        delivery = self._deliveries.get(token)
        if delivery is None:  # cannot happen: only parked tokens ask
            self._report(TokenDone(token, None, False, None, 0))
        else:
            self._send(delivery)

    def _assign(self, state: TokenState) -> None:
        delivery = Delivery(self._run, state.token, self._policy, attempts=state.attempts,
                            next_attempt_at_ms=state.next_attempt_at_ms, apns_id=state.apns_id)
        self._deliveries[state.token] = delivery
        now = ev.now_ms()
        if delivery.exhausted:
            self._record(delivery.token, delivery.abandon(now), sent=False, status=None)
        elif delivery.due(now):
            self._send(delivery)
        else:
            self._park(delivery)
            self._report(TokenDone(delivery.token, None, False, None, 0))

    def _send(self, delivery: Delivery) -> None:
        token = delivery.token
        sent = self._client.send(token, delivery.apns_id)

        on_done(sent, lambda result: self._take_answer(token, result),
                lambda error: self._take_answer(token, _client_failure(token, delivery, error)))

    def _take_answer(self, token: str, result: ApnsResult) -> None:
        """On the client's thread: queue the answer; the first of a burst wakes the shard.

        On the client's event loop the wake-up waits for `call_soon`, i.e. until the loop
        has handled everything it read from the socket at once: one actor message and one
        thread switch per read instead of per answer (waking the shard for every answer
        costs a GIL hand-over each; BENCHMARKS.md has what it cost). Anywhere else
        (a result given without the loop, a process pool's reader thread) it wakes at once.
        """
        with self._answers_lock:
            self._answers.append((token, result))
            first = len(self._answers) == 1
        if not first:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake_for_answers()
        else:
            loop.call_soon(self._wake_for_answers)

    def _wake_for_answers(self) -> None:
        tell_quietly(self.actor_ref, _Answered())

    def _answered(self, token: str, result: ApnsResult) -> None:
        delivery = self._deliveries[token]
        self._record(token, delivery.on_answer(result), sent=True, status=result.status,
                     reason=result.reason)

    def _record(self, token: str, decision: Decision, *, sent: bool, status: int | None,
                reason: str | None = None) -> None:
        """Persist first: `_act` runs only once the events are committed.

        Outcomes decided while answers keep arriving go to the Journal as one append: the
        `_Flush` told to ourselves queues behind the answers already in the inbox, so a
        busy shard batches by itself and an idle one appends at once.
        """
        self._unrecorded.append(_Outcome(token, decision, sent, status, reason))
        if len(self._unrecorded) == 1:
            self.actor_ref.tell(_Flush())

    def _flush(self) -> None:
        outcomes, self._unrecorded = self._unrecorded, []
        if not outcomes:
            return
        ref, dispatcher = self.actor_ref, self._dispatcher
        on_done(self._journal.append([e for o in outcomes for e in o.decision.events]),
                lambda _: tell_quietly(ref, _Recorded(outcomes)),
                lambda error: tell_quietly(dispatcher, ShardFault(error)))

    def _act(self, recorded: _Outcome) -> None:
        token, decision = recorded.token, recorded.decision
        failed = sum(1 for e in decision.events if e.type == ev.NOTIFICATION_FAILED)
        done = TokenDone(token, decision.outcome, recorded.sent, recorded.status, failed,
                         recorded.reason)
        if decision.outcome is Outcome.RETRY:
            self._park(self._deliveries[token])
            self._report(done)
            return
        del self._deliveries[token]
        if decision.halt is not None:
            self._report(HaltReported(token, decision.halt, recorded.status))
            return
        _outcome_counter(decision.outcome).inc()
        if decision.dead is None:
            self._report(done)
            return
        # The token is final for the run already; the credit returns once the Registry has
        # committed its decision, so a finished run never races its own unregistrations.
        dispatcher = self._dispatcher

        def decided(future: Future[str | None]) -> None:
            kind = None if failure(future) else future.result()
            if kind is not None:
                _outcome_label(_DECISION_LABELS[kind]).inc()
            tell_quietly(dispatcher, replace(done, dead_decision=kind))

        self._registry.dead_token(decision.dead).add_done_callback(decided)

    def _park(self, delivery: Delivery) -> None:
        due = delivery.next_attempt_at_ms or 0
        heapq.heappush(self._parked, (due, delivery.token))
        if self._parked[0] == (due, delivery.token):  # else an earlier wake-up covers it:
            # `_ask_for_due` sets the next one for whatever is then first in the heap
            self._alarm.at(time.monotonic() + max(0.0, (due - ev.now_ms()) / 1000))

    def _ask_for_due(self) -> None:
        now = ev.now_ms()
        while self._parked and self._parked[0][0] <= now:
            _, token = heapq.heappop(self._parked)
            if token in self._deliveries:
                self._report(CreditWanted(self._index, token))
        if self._parked:
            self._alarm.at(time.monotonic() + max(0.0, (self._parked[0][0] - now) / 1000))

    def _report(self, message: TokenDone | CreditWanted | HaltReported) -> None:
        self._outbox.append(message)


_OUTCOME_COUNTERS: dict[str, Any] = {}
# What became of a dead token, as relay_run_outcomes_total labels it (beside "dead").
_DECISION_LABELS = {ev.DEVICE_UNREGISTERED: "unregistered", ev.UNREGISTER_SKIPPED: "kept"}


def _outcome_label(label: str) -> Any:
    """The labelled counter, looked up once per label rather than once per token."""
    counter = _OUTCOME_COUNTERS.get(label)
    if counter is None:
        counter = _OUTCOME_COUNTERS[label] = metrics.RUN_OUTCOMES.labels(label)
    return counter


def _outcome_counter(outcome: Outcome) -> Any:
    return _outcome_label(outcome.value)


def _client_failure(token: str, delivery: Delivery, error: BaseException) -> ApnsResult:
    """The client promised a result, never an exception: treat one as a relay bug."""
    log.error("APNs client failed on %s: %r", redact(token), error, extra={"token": token})
    return ApnsResult(token=token, apns_id=delivery.apns_id, status=None,
                      reason=f"ClientError: {error!r}"[:200], verdict=Verdict.RELAY_BUG,
                      timestamp_ms=None, latency=0.0, received_at_ms=ev.now_ms())

