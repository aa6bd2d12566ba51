"""The per-client token bucket: rate, burst, Retry-After, and bounded memory."""

from __future__ import annotations

import pytest

from relay.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_refused_with_the_wait_until_the_next_token() -> None:
    clock = Clock()
    limiter = RateLimiter(2.0, 3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)


def test_refused_requests_do_not_consume_tokens() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    assert limiter.acquire("a") == 0.0
    for _ in range(10):
        assert limiter.acquire("a") > 0
    clock.now += 1.0
    assert limiter.acquire("a") == 0.0


def test_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(10.0, 2, clock=clock)
    limiter.acquire("a")
    clock.now += 0.05  # half a token back: 1.5 tokens
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.05)
    clock.now += 3600
    assert [limiter.acquire("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.acquire("a") > 0


def test_clients_have_separate_buckets() -> None:
    limiter = RateLimiter(1.0, 1, clock=Clock())
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert limiter.acquire("b") == 0.0


def test_a_rate_of_zero_turns_limiting_off_and_remembers_nobody() -> None:
    limiter = RateLimiter(0.0, 1, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.acquire(f"c{i}") == 0.0 for i in range(1000))
    assert all(limiter.acquire("same") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_idle_clients_are_forgotten_once_their_bucket_would_be_full() -> None:
    clock = Clock()
    limiter = RateLimiter(10.0, 5, clock=clock)  # full again 0.5 s after the last request
    for i in range(1000):
        limiter.acquire(f"client-{i}")
    assert len(limiter) == 1000
    clock.now += 0.4
    limiter.acquire("late")
    assert len(limiter) == 1001
    clock.now += 0.1
    limiter.acquire("late")
    assert len(limiter) == 1  # only the client seen within the refill time remains


def test_an_evicted_idle_client_gets_the_same_answer_as_a_remembered_one() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 2, clock=clock)
    limiter.acquire("a")
    limiter.acquire("a")
    clock.now += 2.0
    limiter.acquire("b")  # triggers eviction of "a", whose bucket is full again
    assert len(limiter) == 1
    assert [limiter.acquire("a") for _ in range(3)][:2] == [0.0, 0.0]


def test_memory_is_capped_under_a_flood_of_distinct_clients() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 1, max_clients=100, clock=clock)
    for i in range(10_000):
        limiter.acquire(f"flood-{i}")
        assert len(limiter) <= 100
    # The cap evicts the least recently seen: a client active just now keeps its state.
    assert "flood-9999" in limiter and "flood-0" not in limiter
    assert limiter.acquire("flood-9999") > 0


def test_active_clients_are_not_evicted_while_idle_ones_are() -> None:
    clock = Clock()
    limiter = RateLimiter(1.0, 1, clock=clock)
    limiter.acquire("busy")
    limiter.acquire("idle")
    clock.now += 0.9
    limiter.acquire("busy")  # refused, but seen: stays
    clock.now += 0.2
    limiter.acquire("other")
    # "idle" refilled (1.1 s > 1 s) and was dropped; "busy" was touched 0.2 s ago.
    assert "busy" in limiter and "other" in limiter
    assert "idle" not in limiter


@pytest.mark.parametrize("rate, burst, max_clients", [(-1.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)])
def test_nonsense_settings_are_refused(rate: float, burst: int, max_clients: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_clients=max_clients)
