"""Decorrelated-jitter back-off: bounds, growth and the injected random source."""

from __future__ import annotations

import random

import pytest

from relay.backoff import DecorrelatedJitter


class _Extremes(random.Random):
    """A random source that always answers the low or the high end of the range."""

    def __init__(self, high: bool) -> None:
        super().__init__()
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_first_delay_lies_between_base_and_base_times_factor() -> None:
    jitter = DecorrelatedJitter(2.0, 100.0, 2.5, random.Random(1))
    delays = [jitter.next_delay(None) for _ in range(500)]
    assert all(2.0 <= d <= 5.0 for d in delays)
    assert max(delays) - min(delays) > 2.0, "delays must be spread, not constant"


def test_upper_end_grows_geometrically_until_the_cap() -> None:
    jitter = DecorrelatedJitter(2.0, 40.0, 2.5, _Extremes(high=True))
    previous: float | None = None
    seen = []
    for _ in range(5):
        previous = jitter.next_delay(previous)
        seen.append(previous)
    assert seen == [5.0, 12.5, 31.25, 40.0, 40.0]


def test_lower_end_never_drops_below_base() -> None:
    jitter = DecorrelatedJitter(2.0, 40.0, 2.5, _Extremes(high=False))
    assert jitter.next_delay(30.0) == 2.0
    assert jitter.next_delay(0.1) == 2.0


def test_same_seed_same_sequence() -> None:
    a = DecorrelatedJitter(1.0, 60.0, 3.0, random.Random(7))
    b = DecorrelatedJitter(1.0, 60.0, 3.0, random.Random(7))
    pa: float | None = None
    pb: float | None = None
    for _ in range(10):
        pa, pb = a.next_delay(pa), b.next_delay(pb)
        assert pa == pb


def test_zero_base_gives_immediate_retries() -> None:
    assert DecorrelatedJitter(0.0, 0.0, 2.5).next_delay(None) == 0.0


@pytest.mark.parametrize(("base", "maximum", "factor"), [(-1, 5, 2), (5, 1, 2), (1, 5, 0.5)])
def test_nonsense_parameters_are_refused(base: float, maximum: float, factor: float) -> None:
    with pytest.raises(ValueError):
        DecorrelatedJitter(base, maximum, factor)
