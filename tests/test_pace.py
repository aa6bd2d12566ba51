"""RunPace: the Dispatcher's credit window, wanted queue, pages, breaker admission and tally.

No PostgreSQL, no actors: pages come from a list, time from a fake clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from actors.breaker import CircuitBreaker
from actors.delivery import HaltInfo, Outcome
from actors.pace import RunPace, RunResult
from actors.sender import Assign, CreditWanted, Grant, TokenDone, shard_of
from events import types as ev
from events.store import TokenState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pages:
    """Due tokens `t00`, `t01`, ... read in keyset pages; records every read."""

    def __init__(self, count: int) -> None:
        self.tokens = [f"t{i:02d}" for i in range(count)]
        self.reads: list[tuple[str, int]] = []
        self.down = False  # the database fails: no page now

    def __call__(self, cursor: str, limit: int) -> Sequence[TokenState] | None:
        self.reads.append((cursor, limit))
        if self.down:
            return None
        after = [t for t in self.tokens if t > cursor][:limit]
        return [TokenState(t, 0, None, None) for t in after]


def _pace(window: int, *, page_size: int = 4, trip_after: int = 3,
          clock: FakeClock | None = None) -> RunPace:
    breaker = CircuitBreaker(60.0, trip_after=trip_after, clock=clock or FakeClock())
    return RunPace(window, breaker, page_size=page_size)


def _tokens(work: dict[int, list[Assign | Grant]]) -> list[str]:
    out: list[str] = []
    for items in work.values():
        for item in items:
            out.append(item.state.token if isinstance(item, Assign) else item.token)
    return sorted(out)


def _done(token: str, outcome: Outcome | None, status: int | None = 200, *,
          sent: bool = True, failed: int = 0, dead_decision: str | None = None) -> TokenDone:
    return TokenDone(token, outcome, sent, status, failed, dead_decision)


def test_the_window_hands_out_at_most_max_in_flight_and_a_done_token_returns_its_credit() -> None:
    pace, pages = _pace(3), Pages(10)
    assert _tokens(pace.feed(2, pages)) == ["t00", "t01", "t02"]
    assert pace.in_flight == 3 and pace.credits == 0
    assert pace.feed(2, pages) == {}
    pace.token_done(_done("t01", Outcome.DELIVERED))
    assert pace.in_flight == 2
    assert _tokens(pace.feed(2, pages)) == ["t03"]
    assert pace.in_flight == 3


def test_work_goes_to_each_tokens_shard() -> None:
    pace, pages = _pace(8, page_size=8), Pages(8)
    work = pace.feed(3, pages)
    for shard, items in work.items():
        for item in items:
            assert isinstance(item, Assign)
            assert shard_of(item.state.token, 3) == shard


def test_a_wanted_credit_goes_before_new_tokens() -> None:
    pace, pages = _pace(2), Pages(10)
    pace.feed(1, pages)
    pace.token_done(_done("t00", Outcome.RETRY, 503))  # parked: the credit comes back
    pace.want(CreditWanted(shard=1, token="t00"))
    pace.token_done(_done("t01", Outcome.DELIVERED))
    work = pace.feed(1, pages)
    assert work[1] == [Grant("t00")]
    assert _tokens(work) == ["t00", "t02"]


def test_pages_follow_the_cursor_and_a_short_page_is_the_last() -> None:
    pace, pages = _pace(100, page_size=4), Pages(10)
    assert len(_tokens(pace.feed(1, pages))) == 10
    assert pages.reads == [("", 4), ("t03", 4), ("t07", 4)]
    assert pace.exhausted and pace.cursor == "t09"
    pace.feed(1, pages)
    assert len(pages.reads) == 3  # nothing read after the last page


def test_an_exact_last_page_costs_one_empty_read() -> None:
    pace, pages = _pace(100, page_size=5), Pages(5)
    pace.feed(1, pages)
    assert pages.reads == [("", 5), ("t04", 5)]
    assert pace.exhausted


def test_no_page_now_stops_the_feed_and_the_next_feed_reads_again() -> None:
    pace, pages = _pace(10), Pages(3)
    pages.down = True
    assert pace.feed(1, pages) == {}
    assert pace.credits == 10 and not pace.exhausted
    pages.down = False
    assert _tokens(pace.feed(1, pages)) == ["t00", "t01", "t02"]
    assert pages.reads[-1] == ("", 4)  # the same cursor again


def test_an_open_breaker_admits_nothing_then_one_probe_whose_answer_closes_it() -> None:
    clock = FakeClock()
    pace, pages = _pace(3, trip_after=3, clock=clock), Pages(20)
    pace.feed(1, pages)
    changes = [pace.token_done(_done(t, Outcome.RETRY, 503)) for t in ("t00", "t01", "t02")]
    assert changes == [None, None, True]  # opened on the third distinct token
    assert pace.feed(1, pages) == {}
    assert pace.in_flight == 0
    clock.now += 60.0  # the pause is over: half open
    assert _tokens(pace.feed(1, pages)) == ["t03"]  # the probe, alone
    assert pace.token_done(_done("t03", Outcome.DELIVERED)) is False  # closed
    assert len(_tokens(pace.feed(1, pages))) == 3


def test_a_probe_that_did_not_send_lets_another_token_probe() -> None:
    clock = FakeClock()
    pace, pages = _pace(3, trip_after=3, clock=clock), Pages(20)
    pace.feed(1, pages)
    for t in ("t00", "t01", "t02"):
        pace.token_done(_done(t, Outcome.RETRY, 503))
    clock.now += 60.0
    assert _tokens(pace.feed(1, pages)) == ["t03"]
    assert pace.feed(1, pages) == {}  # one probe at a time
    assert pace.token_done(_done("t03", None, None, sent=False)) is None
    assert _tokens(pace.feed(1, pages)) == ["t04"]


def test_a_stop_hands_out_nothing_and_keeps_wanted_tokens_parked() -> None:
    pace, pages = _pace(5), Pages(10)
    pace.feed(1, pages)
    pace.stop()
    pace.token_done(_done("t00", Outcome.RETRY, 503))
    pace.want(CreditWanted(shard=0, token="t00"))
    assert pace.feed(1, pages) == {}
    assert pace.in_flight == 4


def test_a_halt_returns_its_credit_counts_a_failed_attempt_and_stops() -> None:
    pace, pages = _pace(2), Pages(10)
    pace.feed(1, pages)
    pace.halt_reported()
    assert pace.stopping and pace.failed == 1 and pace.in_flight == 1
    assert pace.feed(1, pages) == {}


def test_the_tally_counts_final_outcomes_and_dead_token_decisions() -> None:
    pace, pages = _pace(10), Pages(6)
    pace.feed(1, pages)
    pace.token_done(_done("t00", Outcome.DELIVERED))
    pace.token_done(_done("t01", Outcome.RETRY, 503, failed=1))
    pace.token_done(_done("t02", Outcome.ABANDONED, 503, failed=1))
    pace.token_done(_done("t03", Outcome.DEAD, 410, failed=1,
                          dead_decision=ev.DEVICE_UNREGISTERED))
    pace.token_done(_done("t04", Outcome.DEAD, 410, failed=1,
                          dead_decision=ev.UNREGISTER_SKIPPED))
    pace.token_done(_done("t05", Outcome.DEAD, 400, failed=1))
    assert (pace.delivered, pace.failed, pace.abandoned) == (1, 5, 1)
    assert (pace.dead, pace.unregistered, pace.kept) == (3, 1, 1)
    assert pace.sends == 6 and pace.active == 1  # t01 is parked, not done
    assert not pace.all_done
    pace.token_done(_done("t01", Outcome.DELIVERED))
    assert pace.all_done and pace.tokens == 6
    result = pace.tally(RunResult(run=7, finished=False, tokens=6))
    assert result == RunResult(run=7, finished=False, tokens=6, delivered=2, failed=5,
                               abandoned=1, dead=3, unregistered=1, kept=1)


def test_not_all_done_before_the_last_page_is_read() -> None:
    pace, pages = _pace(2, page_size=2), Pages(5)
    pace.feed(1, pages)
    for t in ("t00", "t01"):
        pace.token_done(_done(t, Outcome.DELIVERED))
    assert pace.active == 0 and not pace.all_done


def test_a_resumed_run_counts_on_from_the_log_and_its_progress_says_so() -> None:
    pace, pages = _pace(10), Pages(2)
    logged = RunResult(run=3, finished=False, resumed=True, tokens=5, delivered=2,
                       failed=4, abandoned=1, dead=0)
    pace.resume(logged)
    assert pace.done_at_start == 3
    pace.feed(1, pages)
    pace.token_done(_done("t00", Outcome.DELIVERED))
    progress = pace.progress(3, 5, elapsed=2.0)
    assert (progress.done, progress.total, progress.done_at_start) == (4, 5, 3)
    assert progress.rate == 0.5 and progress.sends == 1
    pace.token_done(_done("t01", Outcome.DELIVERED))
    assert pace.all_done and pace.tokens == 5


def test_progress_total_never_falls_below_done() -> None:
    pace, pages = _pace(10), Pages(3)
    pace.feed(1, pages)
    for t in ("t00", "t01", "t02"):
        pace.token_done(_done(t, Outcome.DELIVERED))
    assert pace.progress(1, 2, elapsed=1.0).total == 3  # registered during the run


def test_a_result_carries_the_halt() -> None:
    halt = HaltInfo(run=1, token="t00", status=403, reason="InvalidProviderToken",
                    halt_class="configuration", message="m")
    pace = _pace(1)
    result = pace.tally(RunResult(run=1, finished=False, halted=halt))
    assert result.halted is halt
