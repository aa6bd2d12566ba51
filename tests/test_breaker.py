"""Circuit breaker: trips on APNs-wide trouble only, pauses, probes, resumes."""

from __future__ import annotations

from actors.breaker import BreakerState, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: FakeClock, trip_after: int = 5) -> CircuitBreaker:
    return CircuitBreaker(60.0, trip_after=trip_after, clock=clock)


def _state(breaker: CircuitBreaker) -> BreakerState:
    """Read afresh each time (mypy would otherwise narrow the property after an assert)."""
    return breaker.state


def _trip(breaker: CircuitBreaker, n: int) -> None:
    for i in range(n):
        breaker.record(f"tok{i}", 503)


def test_many_distinct_tokens_failing_in_a_row_trip_it() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _trip(breaker, 4)
    assert _state(breaker) is BreakerState.CLOSED
    breaker.record("tok4", None)  # connection failure counts as trouble too
    assert _state(breaker) is BreakerState.OPEN
    assert not breaker.admit("other")
    assert breaker.resume_at == 1060.0


def test_one_tokens_5xx_among_healthy_answers_does_not_trip_it() -> None:
    breaker = _breaker(FakeClock())
    for round_ in range(100):
        breaker.record("sick", 500)
        for i in range(3):
            breaker.record(f"healthy{round_}-{i}", 200)
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.trips == 0


def test_the_same_token_failing_repeatedly_does_not_trip_it() -> None:
    breaker = _breaker(FakeClock())
    for _ in range(50):
        breaker.record("sick", 503)
    assert _state(breaker) is BreakerState.CLOSED


def test_a_rejection_is_a_healthy_answer_that_resets_the_streak() -> None:
    breaker = _breaker(FakeClock())
    _trip(breaker, 4)
    breaker.record("dead", 410)
    _trip(breaker, 4)
    assert _state(breaker) is BreakerState.CLOSED


def test_after_the_pause_one_probe_is_admitted_and_success_closes() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _trip(breaker, 5)
    clock.now += 59.9
    assert not breaker.admit("a")
    clock.now += 0.1
    assert _state(breaker) is BreakerState.HALF_OPEN
    assert breaker.admit("probe")
    assert not breaker.admit("second"), "only one probe at a time"
    breaker.record("late-answer-from-before", 200)  # not the probe: ignored
    assert _state(breaker) is BreakerState.HALF_OPEN
    breaker.record("probe", 200)
    assert _state(breaker) is BreakerState.CLOSED
    assert breaker.admit("anyone")


def test_a_failed_probe_opens_it_for_another_pause() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _trip(breaker, 5)
    clock.now += 60
    assert breaker.admit("probe")
    breaker.record("probe", 503)
    assert _state(breaker) is BreakerState.OPEN
    assert breaker.resume_at == clock.now + 60
    assert breaker.trips == 2


def test_a_voided_probe_lets_another_token_probe() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _trip(breaker, 5)
    clock.now += 60
    assert breaker.admit("not-due")
    breaker.void_probe("not-due")
    assert breaker.admit("due")


def test_answers_while_open_are_ignored() -> None:
    clock = FakeClock()
    breaker = _breaker(clock)
    _trip(breaker, 5)
    breaker.record("x", 200)
    assert _state(breaker) is BreakerState.OPEN
