"""The APNs client in child processes: `ApnsClient`'s interface, more than one core.

One relay process holds one GIL, and HTTP/2 framing, TLS and header coding take
most of its CPU per notification (the profile in BENCHMARKS.md). With
`apns.processes: N` the connections run in N child processes, each a plain
`ApnsClient` with its own `apns.connections` connections and its own provider
token; the relay process keeps every decision and every event. So crash resume
and exactly-once outcome recording are unchanged: a child only ever answers
"what did APNs say", and the parent's Sender shards record that, as before.

Wire between parent and child (multiprocessing pipes, pickled lists, one message
per burst in each direction): requests `(id, token, apns_id)`, answers
`(id, status, reason, timestamp_ms, received_at_ms)`; `None` asks a child to close
(it answers what is unanswered as `Closed`, then sends `None` back). A child
whose parent dies sees end-of-file and exits.

A child that dies is the transport's fault, as a dropped connection is: its
unanswered requests go to another child (or wait for one) without costing their
tokens an attempt, TRANSPORT_RESENDS times at most per request. The dead child
is started again by whoever watches the pool (`alive()` / `restart()`: the
supervisor, with its restart budget), so a child that keeps dying ends the relay
instead of failing every send forever. `send()` never waits for a child: with
none alive, requests queue in the parent until one is back.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from relay.apns.client import TRANSPORT_RESENDS, ApnsClient
from relay.apns.results import (
    ApnsResult,
    PrometheusListener,
    SilentListener,
    result_of,
    settle,
)
from relay.config import ApnsConfig

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 10.0  # seconds a child has to answer its last requests as `Closed`
LOST = "ChildProcessLost"  # the reason of answers dead children never gave

Request = tuple[int, str, str]  # id, token, apns_id
Answer = tuple[int, "int | None", "str | None", "int | None", int]


class NotificationClient(Protocol):
    """What the Sender shards need of an APNs client: `ApnsClient` or `ApnsProcessPool`."""

    def start(self) -> None: ...

    def send(self, token: str, apns_id: str) -> concurrent.futures.Future[ApnsResult]: ...

    def close(self) -> None: ...


def open_client(config: ApnsConfig, *, expiration: float) -> NotificationClient:
    """The client `apns.processes` asks for: in this process (0) or in child processes."""
    if config.processes == 0:
        return ApnsClient(config, expiration=expiration)
    return ApnsProcessPool(config, expiration=expiration, processes=config.processes)


@dataclass
class _SendInFlight:
    """A send handed to a child (or waiting for one) until its answer comes back."""

    token: str
    apns_id: str
    started: float
    future: concurrent.futures.Future[ApnsResult]
    resends: int = 0  # sent again after the child holding it died


@dataclass
class _Child:
    index: int
    process: Any = None  # multiprocessing's SpawnProcess
    conn: Connection | None = None
    alive: bool = False  # False between its death and its restart: sends go elsewhere
    exit_code: int | None = None  # how it last died
    pending: dict[int, _SendInFlight] = field(default_factory=dict)
    outgoing: list[Request] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)


class ApnsProcessPool:
    """`send(token, apns_id)` → future of `ApnsResult`; the sends run in child processes."""

    def __init__(self, config: ApnsConfig, *, expiration: float, processes: int) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self._config, self._expiration = config, expiration
        self._children = [_Child(i) for i in range(processes)]
        self._ids = itertools.count()
        self._turn = 0  # round robin over the children alive
        self._waiting: list[_SendInFlight] = []  # no child alive: sent when one is back
        self._lock = threading.Lock()  # pending, outgoing, and the writer's wake-up
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._listener = PrometheusListener()  # the children's sends are counted here
        self._context = multiprocessing.get_context("spawn")
        self._writer = threading.Thread(target=self._write, name="apns-pool-writer",
                                        daemon=True)

    def start(self) -> None:
        for child in self._children:
            self._spawn(child)
        self._writer.start()

    def alive(self) -> bool:
        """Every child is running (or the pool is closing)."""
        with self._lock:
            return self._closing or all(child.alive for child in self._children)

    def restart(self) -> None:
        """Start the dead children again; requests waiting for one go out."""
        for child in self._children:
            if not child.alive and not self._closing:
                child.closed.wait(CLOSE_TIMEOUT)  # its reader has answered for it
                self._spawn(child)

    @property
    def last_exit(self) -> str:
        """How the children that died last ended (for the operator's message)."""
        codes = [f"process {c.index}: exit code {c.exit_code}" for c in self._children
                 if c.exit_code is not None]
        return ", ".join(codes) or "none died"

    def _spawn(self, child: _Child) -> None:
        """Starts the process outside the lock: `send()` never waits for a process start."""
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=serve, args=(child_end, self._config, self._expiration),
            name=f"apns-sender-{child.index}", daemon=True)
        process.start()
        child_end.close()
        with self._lock:
            child.process, child.conn, child.alive = process, parent_end, True
            child.closed.clear()
            waiting, self._waiting = self._waiting, []
            for pending in waiting:
                self._assign(pending)
        threading.Thread(target=self._read, args=(child, parent_end),
                         name=f"apns-pool-reader-{child.index}", daemon=True).start()

    def send(self, token: str, apns_id: str) -> concurrent.futures.Future[ApnsResult]:
        """Queue one notification for a child; never blocks; the future always resolves."""
        future: concurrent.futures.Future[ApnsResult] = concurrent.futures.Future()
        pending = _SendInFlight(token, apns_id, time.monotonic(), future)
        with self._lock:
            if not self._closing:
                self._assign(pending)
                self._listener.in_flight(1)
                return future
        self._resolve(pending, (0, None, "Closed", None, _now_ms()))
        return future

    def _assign(self, pending: _SendInFlight) -> None:
        """To the next child alive, else to the waiting list (under the lock)."""
        children = self._children
        for step in range(len(children)):
            child = children[(self._turn + step) % len(children)]
            if child.alive:
                self._turn = (self._turn + step + 1) % len(children)
                request_id = next(self._ids)
                child.pending[request_id] = pending
                child.outgoing.append((request_id, pending.token, pending.apns_id))
                if len(child.outgoing) == 1:
                    self._wake.notify()
                return
        self._waiting.append(pending)

    def close(self) -> None:
        """Each child answers what it still holds as `Closed` and exits."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._writer.join(CLOSE_TIMEOUT)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for child in self._children:
            child.closed.wait(max(0.0, deadline - time.monotonic()))
            if child.process is not None:
                child.process.join(max(0.1, deadline - time.monotonic()))
                if child.process.is_alive():
                    child.process.kill()
            self._fail_pending(child, "Closed")
        with self._lock:
            waiting, self._waiting = self._waiting, []
        self._listener.in_flight(-len(waiting))
        for pending in waiting:
            self._resolve(pending, (0, None, "Closed", None, _now_ms()))

    # --- parent threads ------------------------------------------------------------------

    def _write(self) -> None:
        """Hands each child its queued requests, one pipe message per child and wake-up."""
        while True:
            with self._lock:
                while not self._closing and not any(c.outgoing for c in self._children):
                    self._wake.wait()
                batches = [(c, c.outgoing) for c in self._children if c.outgoing]
                for child, _ in batches:
                    child.outgoing = []
                closing = self._closing
            for child, batch in batches:
                self._to_child(child, batch)
            if closing:
                for child in self._children:
                    self._to_child(child, None)
                return

    @staticmethod
    def _to_child(child: _Child, message: list[Request] | None) -> None:
        if child.conn is None:
            return
        with contextlib.suppress(OSError):  # a dead child: its reader answers for it
            child.conn.send(message)

    def _read(self, child: _Child, conn: Connection) -> None:
        """Resolves a child's answers; a child that dies is started again (unless closing)."""
        try:
            while True:
                answers: list[Answer] | None = conn.recv()
                if answers is None:
                    break
                with self._lock:
                    taken = [(child.pending.pop(a[0], None), a) for a in answers]
                for pending, answer in taken:
                    if pending is not None:
                        self._listener.in_flight(-1)
                        self._resolve(pending, answer)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            if self._closing:
                self._fail_pending(child, "Closed")
            else:
                self._child_died(child)
            child.closed.set()

    def _child_died(self, child: _Child) -> None:
        """Its unanswered requests go to another child (or wait); it waits for `restart()`."""
        if child.process is not None:
            child.process.join(1.0)
            child.exit_code = child.process.exitcode
        lost: list[_SendInFlight] = []
        with self._lock:
            child.alive = False
            pending, child.pending, child.outgoing = child.pending, {}, []
            for request in pending.values():
                if request.resends < TRANSPORT_RESENDS:
                    request.resends += 1
                    self._assign(request)
                else:
                    lost.append(request)
        log.error("APNs sender process %d died (exit code %s) with %d sends unanswered; "
                  "they go to another process", child.index, child.exit_code, len(pending))
        self._listener.in_flight(-len(lost))
        for request in lost:
            self._resolve(request, (0, None, LOST, None, _now_ms()))

    def _fail_pending(self, child: _Child, reason: str) -> None:
        with self._lock:
            child.alive = False
            pending, child.pending, child.outgoing = child.pending, {}, []
        self._listener.in_flight(-len(pending))
        for request in pending.values():
            self._resolve(request, (0, None, reason, None, _now_ms()))

    def _resolve(self, pending: _SendInFlight, answer: Answer) -> None:
        _, status, reason, timestamp_ms, received_at_ms = answer
        result = result_of(pending.token, pending.apns_id, started=pending.started,
                           status=status, reason=reason, timestamp_ms=timestamp_ms,
                           received_at_ms=received_at_ms)
        settle(pending.future, result, self._listener)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- the child ---------------------------------------------------------------------------

def serve(conn: Connection, config: ApnsConfig, expiration: float) -> None:
    """A child's life: send what the parent asks, answer in bursts, exit with the parent."""
    # Silent: this process's metrics are never served; the parent counts each send.
    client = ApnsClient(config, expiration=expiration, listener=SilentListener())
    client.start()
    answers: list[Answer] = []
    wake = threading.Condition()
    done = threading.Event()

    def answered(request_id: int) -> Callable[[concurrent.futures.Future[ApnsResult]], None]:
        def callback(future: concurrent.futures.Future[ApnsResult]) -> None:
            result = future.result()
            with wake:
                answers.append((request_id, result.status, result.reason,
                                result.timestamp_ms, result.received_at_ms))
                if len(answers) == 1:
                    wake.notify()
        return callback

    def write() -> None:
        nonlocal answers
        while True:
            with wake:
                while not answers and not done.is_set():
                    wake.wait()
                batch, answers = answers, []
                finished = done.is_set() and not batch
            if finished:
                conn.send(None)
                return
            conn.send(batch)

    writer = threading.Thread(target=write, name="apns-child-writer", daemon=True)
    writer.start()
    try:
        while True:
            requests: list[Request] | None = conn.recv()
            if requests is None:
                break
            for request_id, token, apns_id in requests:
                client.send(token, apns_id).add_done_callback(answered(request_id))
    except (EOFError, OSError):
        client.close()
        os._exit(0)  # the parent is gone: nobody to answer
    client.close()  # unanswered requests resolve as `Closed` and are answered
    with wake:
        done.set()
        wake.notify()
    writer.join(CLOSE_TIMEOUT)
