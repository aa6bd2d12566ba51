"""Per-token delivery decisions: which events record an answer, and what follows."""

from __future__ import annotations

import random

from actors.delivery import Delivery, DeliveryPolicy, Outcome
from events import types as ev
from relay.apns import ApnsResult, Verdict
from relay.backoff import DecorrelatedJitter

RUN = 7
TOKEN = "ab" * 32
NOW = 1_800_000_000_000


class _High(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def _policy(attempts: int = 3) -> DeliveryPolicy:
    return DeliveryPolicy(attempts, DecorrelatedJitter(2.0, 100.0, 2.0, _High()))


def _answer(delivery: Delivery, status: int | None, reason: str | None, verdict: Verdict, *,
            at: int = NOW, timestamp_ms: int | None = None) -> ApnsResult:
    return ApnsResult(token=delivery.token, apns_id=delivery.apns_id, status=status,
                      reason=reason, verdict=verdict, timestamp_ms=timestamp_ms, latency=0.012,
                      received_at_ms=at)


def test_delivered_is_final_with_one_event() -> None:
    delivery = Delivery(RUN, TOKEN, _policy())
    decision = delivery.on_answer(_answer(delivery, 200, None, Verdict.DELIVERED))
    assert decision.outcome is Outcome.DELIVERED and decision.outcome.final
    [event] = decision.events
    assert event.type == ev.NOTIFICATION_DELIVERED
    assert event.data["attempt"] == 1 and event.data["apns_id"] == delivery.apns_id
    assert event.data["latency_ms"] == 12.0


def test_transient_failures_back_off_then_abandon_after_the_last_attempt() -> None:
    delivery = Delivery(RUN, TOKEN, _policy(attempts=3))
    apns_id = delivery.apns_id
    first = delivery.on_answer(_answer(delivery, 503, "ServiceUnavailable", Verdict.TRANSIENT))
    assert first.outcome is Outcome.RETRY
    assert first.retry_at_ms == NOW + 4000  # uniform(2, 2*2) at its top
    assert [e.type for e in first.events] == [ev.NOTIFICATION_FAILED]
    assert first.events[0].data["next_attempt_at"] == ev.iso_ms(NOW + 4000)
    assert not delivery.due(NOW + 3999) and delivery.due(NOW + 4000)

    second = delivery.on_answer(_answer(delivery, None, "Timeout", Verdict.TRANSIENT,
                                        at=NOW + 5000))
    assert second.outcome is Outcome.RETRY
    assert second.retry_at_ms == NOW + 5000 + 8000  # grows from the previous delay

    last = delivery.on_answer(_answer(delivery, 500, "InternalServerError", Verdict.TRANSIENT,
                                      at=NOW + 20_000))
    assert last.outcome is Outcome.ABANDONED and last.retry_at_ms is None
    assert [e.type for e in last.events] == [ev.NOTIFICATION_FAILED, ev.NOTIFICATION_ABANDONED]
    assert last.events[0].data["next_attempt_at"] is None
    assert last.events[0].data["attempt"] == 3
    assert last.events[1].data["attempts"] == 3
    assert last.events[1].data["last_reason"] == "InternalServerError"
    assert {e.data["apns_id"] for e in (*first.events, *second.events, *last.events)} == {apns_id}


def test_dead_token_with_apples_timestamp_uses_it_as_verdict_time() -> None:
    delivery = Delivery(RUN, TOKEN, _policy())
    decision = delivery.on_answer(_answer(delivery, 410, "Unregistered", Verdict.DEAD_TOKEN,
                                          timestamp_ms=NOW - 60_000))
    assert decision.outcome is Outcome.DEAD and decision.outcome.final
    [event] = decision.events
    assert event.type == ev.NOTIFICATION_FAILED
    assert event.data["verdict"] == "dead_token" and event.data["next_attempt_at"] is None
    assert event.data["apple_timestamp_ms"] == NOW - 60_000
    assert decision.dead is not None
    assert decision.dead.verdict_at_ms == NOW - 60_000
    assert decision.dead.cause == "Unregistered" and decision.dead.run == RUN


def test_dead_token_without_timestamp_uses_the_answer_time() -> None:
    delivery = Delivery(RUN, TOKEN, _policy())
    decision = delivery.on_answer(_answer(delivery, 400, "BadDeviceToken", Verdict.DEAD_TOKEN))
    assert decision.dead is not None
    assert decision.dead.verdict_at_ms == NOW and decision.dead.apple_timestamp_ms is None
    assert decision.dead.cause == "BadDeviceToken"


def test_configuration_error_halts_with_a_clear_message() -> None:
    delivery = Delivery(RUN, TOKEN, _policy())
    decision = delivery.on_answer(_answer(delivery, 403, "InvalidProviderToken",
                                          Verdict.CONFIGURATION))
    assert decision.outcome is Outcome.HALT and not decision.outcome.final
    assert decision.halt is not None
    assert decision.halt.halt_class == "configuration"
    assert "InvalidProviderToken" in decision.halt.message
    assert "apns.key_id" in decision.halt.message
    halted = decision.halt.event(NOW)
    assert halted.type == ev.RELAY_HALTED and halted.data["run"] == RUN
    assert [e.data["verdict"] for e in decision.events] == ["configuration"]


def test_relay_bug_halts() -> None:
    delivery = Delivery(RUN, TOKEN, _policy())
    decision = delivery.on_answer(_answer(delivery, 400, "BadPriority", Verdict.RELAY_BUG))
    assert decision.halt is not None and decision.halt.halt_class == "relay_bug"
    assert "bug" in decision.halt.message


def test_resumed_delivery_keeps_apns_id_schedule_and_attempt_count() -> None:
    apns_id = "0f0e0d0c-0000-4000-8000-000000000001"
    delivery = Delivery(RUN, TOKEN, _policy(attempts=3), attempts=2,
                        next_attempt_at_ms=NOW + 1000, apns_id=apns_id)
    assert not delivery.due(NOW) and delivery.due(NOW + 1000)
    decision = delivery.on_answer(_answer(delivery, 503, "ServiceUnavailable", Verdict.TRANSIENT,
                                          at=NOW + 1000))
    assert decision.outcome is Outcome.ABANDONED
    assert decision.events[0].data["attempt"] == 3
    assert decision.events[0].data["apns_id"] == apns_id


def test_exhausted_on_resume_is_abandoned_without_a_send() -> None:
    delivery = Delivery(RUN, TOKEN, _policy(attempts=2), attempts=2)
    assert delivery.exhausted
    decision = delivery.abandon(NOW)
    assert decision.outcome is Outcome.ABANDONED
    assert [e.type for e in decision.events] == [ev.NOTIFICATION_ABANDONED]


def test_fresh_deliveries_get_distinct_canonical_apns_ids() -> None:
    ids = {Delivery(RUN, TOKEN, _policy()).apns_id for _ in range(100)}
    assert len(ids) == 100
    assert all(i == i.lower() and len(i) == 36 for i in ids)
