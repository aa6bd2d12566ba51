"""The pace of one wakeup run: which token may be sent next, and the run's tally.

Plain logic, no threads and no database, so it is tested without either; the
Dispatcher actor is its shell (messages, the Journal, the alarm, the reads).

* The credit window: at most `max_in_flight` sends out at once. Every `Assign`
  or `Grant` handed out costs one credit; every `TokenDone` or halt returns it.
* The wanted queue: parked tokens (in back-off) that are due ask for a credit;
  they go before new tokens, so a retry is never starved by the rest of the run.
* The page cursor: new tokens come from keyset pages of due tokens (memory holds
  one page, never the registry); a page shorter than asked for is the last.
* Breaker admission: every credit passes the circuit breaker first, so pausing
  the breaker pauses all sending.
* The tally: delivered, failed attempts, abandoned, dead (unregistered, kept),
  answered sends; folded into a `RunResult` or a `Progress` when asked.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from actors.breaker import BreakerState, CircuitBreaker
from actors.delivery import HaltInfo, Outcome
from actors.sender import Assign, CreditWanted, Grant, TokenDone, shard_of
from events import types as ev
from events.store import TokenState

PAGE_SIZE = 500  # tokens per keyset page: one short query, a bounded slice of memory


@dataclass(frozen=True)
class RunResult:
    """What one call of the wakeup produced; `halted` set means: exit status 9."""

    run: int | None
    finished: bool
    resumed: bool = False
    tokens: int = 0
    delivered: int = 0
    failed: int = 0
    abandoned: int = 0
    dead: int = 0  # dead-token verdicts; of those:
    unregistered: int = 0  # unregistered
    kept: int = 0  # kept: the device registered again after APNs' verdict
    halted: HaltInfo | None = None
    stopped: bool = False  # a stop was requested: the run is left for the next start
    drained: bool = True  # False: the drain timed out with sends still unanswered


def counts(result: RunResult) -> str:
    """The run's counts, as a clause of a log line."""
    return (f"{result.tokens} tokens, {result.delivered} delivered, {result.failed} failed "
            f"attempts, {result.abandoned} abandoned, {result.dead} dead (unregistered "
            f"{result.unregistered}, kept {result.kept})")


def summary(result: RunResult) -> str:
    """How a call of the wakeup ended, as one sentence for the log (never a whole token)."""
    if result.run is None:
        return "stopped before the run started"
    if result.halted is not None:
        ended = f"halted ({result.halted.halt_class}: APNs answered {result.halted.reason})"
    elif result.finished:
        ended = "finished"
    elif result.stopped and not result.drained:
        ended = ("stopped with sends still unanswered (they are sent again when the run "
                 "is resumed at the next start)")
    elif result.stopped:
        ended = "stopped (it is resumed at the next start)"
    else:
        ended = "left unfinished (it is resumed at the next start)"
    return f"run {result.run} {ended}: {counts(result)}"


@dataclass(frozen=True)
class Progress:
    """For progress bars and logs: tokens done (final outcome) of `total` in this run."""

    run: int
    done: int
    total: int
    sends: int  # answered sends in this process
    elapsed: float  # seconds since this process took up the run
    done_at_start: int = 0  # already done when a resumed run was taken up
    dead: int = 0  # dead-token verdicts so far, of which
    unregistered: int = 0  # unregistered
    kept: int = 0  # and kept (registered again)

    @property
    def rate(self) -> float:
        """Tokens finished per second in this process."""
        return (self.done - self.done_at_start) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None until there is a rate)."""
        rate = self.rate
        return max(0, self.total - self.done) / rate if rate > 0 else None


ProgressCallback = Callable[[Progress], None]

# Reads the next keyset page: (cursor, limit) -> the tokens after `cursor`, or None when
# no page can be had now (the database failed a moment ago; the caller retries later).
PageReader = Callable[[str, int], Sequence[TokenState] | None]


class RunPace:
    """The credit window, wanted queue, page cursor, breaker admission and tally of one run."""

    def __init__(self, max_in_flight: int, breaker: CircuitBreaker, *,
                 page_size: int = PAGE_SIZE) -> None:
        self.max_in_flight, self.breaker, self.page_size = max_in_flight, breaker, page_size
        self.credits = max_in_flight
        self._page: deque[TokenState] = deque()
        self.cursor = ""
        self.exhausted = False  # the last page has been read
        self._wanted: deque[CreditWanted] = deque()
        self.active = 0  # tokens taken in this process without a final outcome yet
        self.taken = 0  # tokens taken from the pages in this process
        self.stopping = False  # no more credits: a stop or a halt
        # The counters change with every token: plain ints, folded into a RunResult only
        # when one is asked for (a dataclasses.replace per token was a large share of the
        # Dispatcher's time: BENCHMARKS.md, "Figures behind choices in the code").
        self.sends = 0  # answered sends in this process
        self.delivered = self.failed = self.abandoned = 0
        self.dead = self.unregistered = self.kept = 0
        self.done_at_start = 0  # tokens with a final outcome when a resumed run was taken up

    @property
    def in_flight(self) -> int:
        return self.max_in_flight - self.credits

    @property
    def done(self) -> int:
        """Tokens of the run with a final outcome (including those done before a resume)."""
        return self.delivered + self.abandoned + self.dead

    @property
    def tokens(self) -> int:
        """The run's tokens once every page is read: those done before a resume, and taken."""
        return self.done_at_start + self.taken

    @property
    def all_done(self) -> bool:
        """Every page read and every token taken has a final outcome: the run can finish."""
        return self.exhausted and not self._page and self.active == 0

    # --- the tally -----------------------------------------------------------------------

    def resume(self, result: RunResult) -> None:
        """Take up the counts of a run left unfinished (from the log)."""
        self.count_from(result)
        self.done_at_start = self.done

    def count_from(self, result: RunResult) -> None:
        self.delivered, self.failed = result.delivered, result.failed
        self.abandoned, self.dead = result.abandoned, result.dead
        self.unregistered, self.kept = result.unregistered, result.kept

    def tally(self, base: RunResult) -> RunResult:
        """`base` with this run's counts."""
        return replace(base, delivered=self.delivered, failed=self.failed,
                       abandoned=self.abandoned, dead=self.dead,
                       unregistered=self.unregistered, kept=self.kept)

    def progress(self, run: int, tokens: int, elapsed: float) -> Progress:
        done = self.done
        return Progress(run, done, max(tokens, done), self.sends, elapsed, self.done_at_start,
                        self.dead, self.unregistered, self.kept)

    # --- credits -------------------------------------------------------------------------

    def want(self, wanted: CreditWanted) -> None:
        """A parked token is due; once stopping, it stays parked (the run is left)."""
        if not self.stopping:
            self._wanted.append(wanted)

    def stop(self) -> None:
        """No more credits; the sends in flight still come back."""
        self.stopping = True

    def feed(self, shards: int, read_page: PageReader) -> dict[int, list[Assign | Grant]]:
        """Hand out credits, wanted tokens first, then new ones: the work for each shard.

        Stops at the end of the credits, at a breaker that admits nothing, or when no page
        can be read now."""
        work: dict[int, list[Assign | Grant]] = {}
        while self.credits > 0 and not self.stopping:
            if self._wanted:
                if not self.breaker.admit(self._wanted[0].token):
                    break
                wanted = self._wanted.popleft()
                self.credits -= 1
                work.setdefault(wanted.shard, []).append(Grant(wanted.token))
                continue
            if not self._page and not self.exhausted:
                page = read_page(self.cursor, self.page_size)
                if page is None:
                    break
                self._add_page(page)
            if not self._page:
                break
            if not self.breaker.admit(self._page[0].token):
                break
            state = self._page.popleft()
            self.credits -= 1
            self.active += 1
            self.taken += 1
            work.setdefault(shard_of(state.token, shards), []).append(Assign(state))
        return work

    def _add_page(self, page: Sequence[TokenState]) -> None:
        if len(page) < self.page_size:
            self.exhausted = True
        if page:
            self.cursor = page[-1].token
            self._page.extend(page)

    def token_done(self, done: TokenDone) -> bool | None:
        """A credit comes back with a token's answer. Returns the breaker's new state when
        it opened (True) or closed (False) on this answer, else None."""
        self.credits += 1
        changed: bool | None = None
        if done.sent:
            self.sends += 1
            was_open = self.breaker.state is not BreakerState.CLOSED
            self.breaker.record(done.token, done.status, done.reason)
            is_open = self.breaker.state is not BreakerState.CLOSED
            if is_open != was_open:
                changed = is_open
        else:
            self.breaker.void_probe(done.token)
        self.failed += done.failed_events
        if done.outcome is None or not done.outcome.final:
            return changed
        self.active -= 1
        if done.outcome is Outcome.DELIVERED:
            self.delivered += 1
        elif done.outcome is Outcome.ABANDONED:
            self.abandoned += 1
        else:
            self.dead += 1
            if done.dead_decision == ev.DEVICE_UNREGISTERED:
                self.unregistered += 1
            elif done.dead_decision == ev.UNREGISTER_SKIPPED:
                self.kept += 1
        return changed

    def halt_reported(self) -> None:
        """A halting answer: its credit comes back, as a failed attempt, and no more go out."""
        self.credits += 1
        self.failed += 1
        self.stopping = True
