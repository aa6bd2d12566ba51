"""The APNs client facade: `send()` from any thread, a future per notification.

All network work happens on one private asyncio thread. `send()` only appends to
a queue and, when the queue was empty, wakes that thread once; the thread opens
up to `apns.connections` HTTP/2 connections lazily, hands queued requests to
whichever has free streams, and resolves each request's future exactly once:
with APNs' answer, or with status None (`Timeout` at `apns.request_timeout`
after `send()`, `ConnectionLost`, `StreamReset`, `Closed`), which `classify`
turns into TRANSIENT. Nothing is dropped: requests that do not fit wait, and
requests a GOAWAY left unprocessed are sent again on another connection.

One module past 500 lines, for one idea: the state of the client's event loop (the
queue, the connection slots and their reconnect back-off, the deadlines, the provider
token, the re-sends). But for the thread-safe `start`, `send` and `close`, every
method runs on that loop and changes that state; the
per-connection HTTP/2 work is connection.py, the result and its metrics results.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import random
import re
import ssl
import threading
import time
from collections import deque
from urllib.parse import urlsplit

from hpack import NeverIndexedHeaderTuple

from relay.apns.connection import (
    ConnectionOwner,
    Header,
    Http2Connection,
    PendingRequest,
    open_connection,
)
from relay.apns.jwt import (
    Clock,
    KeyFileError,
    ProviderToken,
    load_signing_key,
    shared_provider_token,
)
from relay.apns.results import (
    ApnsResult,
    PrometheusListener,
    SendListener,
    result_of,
    settle,
)
from relay.config import ApnsConfig
from relay.tokens import redact

log = logging.getLogger("relay.apns")

# The background wake-up every request carries (docs/apns.md §2).
BACKGROUND_PAYLOAD = b'{"aps":{"content-available":1}}'
# Reconnect back-off: Apple treats rapid reconnects as abuse (docs/apns.md §6). A connection
# that ends without answering anything counts as a failure; one answer resets the count.
RECONNECT_BASE = 0.2
RECONNECT_MAX = 60.0
# A 410 timestamp below this is in seconds, not milliseconds (docs/apns.md §4).
SECONDS_TIMESTAMP_LIMIT = 10**11
# How often the JWT age gauge is refreshed.
METRICS_INTERVAL = 5.0
# A request whose connection died under it (lost connection, RST_STREAM) is sent again on
# another connection without costing its token an attempt: the transport failed, not the
# token. This many times at most, so a request that itself kills connections ends.
TRANSPORT_RESENDS = 3
# A 410 timestamp past this (ms since the epoch: the end of year 9999) is not a date.
LATEST_TIMESTAMP_MS = 253_402_300_799_999


def reconnect_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait before the next connection attempt after `failures` in a row."""
    if failures <= 0:
        return 0.0
    ceiling = min(RECONNECT_MAX, RECONNECT_BASE * 2.0 ** (failures - 1))
    return ceiling * rng.uniform(0.5, 1.0)


def parse_error_body(body: bytes) -> tuple[str | None, int | None]:
    """(`reason`, 410 `timestamp` in ms) from an error body; defensive about both."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    reason = data.get("reason")
    raw = data.get("timestamp")
    timestamp: int | None = None
    if raw is not None:
        timestamp = _timestamp_ms(raw)
        if timestamp is None:
            log.warning("APNs sent a 410 timestamp that is not a time (%.40r); treating it "
                        "as absent", raw)
    return (reason if isinstance(reason, str) else None), timestamp


def _timestamp_ms(raw: object) -> int | None:
    """Milliseconds since the epoch from APNs' `timestamp` (seconds or ms), or None when
    it is not a finite, non-negative number that fits a date."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    ms = int(value) * 1000 if value < SECONDS_TIMESTAMP_LIMIT else int(value)
    return ms if ms <= LATEST_TIMESTAMP_MS else None


# A topic is the app's bundle id, maybe with a suffix such as `.voip` (docs/apns.md §2).
_TOPIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def credential_problem(config: ApnsConfig) -> tuple[str, str] | None:
    """(key, what is wrong) with the credentials, topic or TLS files; None when usable.

    Everything `ApnsClient` reads at construction, read once in the parent process at
    start: with `apns.processes` the clients live in child processes, and a child that
    cannot even start would only crash, restart and fail every send as transient.
    """
    if config.topic is None:
        return "apns.topic", "required to send notifications"
    if not _TOPIC.fullmatch(config.topic):
        return "apns.topic", (f"{config.topic!r} is not a bundle id (letters, digits, "
                              "'.', '-' and '_')")
    if config.key_file is not None:
        try:
            load_signing_key(config.key_file)
        except KeyFileError as exc:
            return "apns.key_file", str(exc)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if config.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(config.ca_file))
        except (ssl.SSLError, OSError, ValueError) as exc:
            return "apns.ca_file", f"{str(config.ca_file)!r} holds no usable CA certificate: {exc}"
    if config.cert_file is not None:
        key = str(config.cert_key_file) if config.cert_key_file else None
        try:
            context.load_cert_chain(str(config.cert_file), key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            return "apns.cert_file", (f"{str(config.cert_file)!r} with its key "
                                      f"{key!r} is not a usable client certificate: {exc}")
    return None


class _Slot:
    """One of the `apns.connections` places a connection can occupy."""

    __slots__ = ("conn", "connecting", "failures", "index", "not_before", "retry")

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: Http2Connection | None = None
        self.connecting = False
        self.failures = 0
        self.not_before = 0.0
        self.retry: asyncio.TimerHandle | None = None


class ApnsClient(ConnectionOwner):
    """Sends background notifications; thread-safe; see the module docstring."""

    def __init__(self, config: ApnsConfig, *, expiration: float, clock: Clock = time.time,
                 provider: ProviderToken | None = None,
                 listener: SendListener | None = None) -> None:
        if config.topic is None:
            raise ValueError("apns.topic is required to send notifications")
        url = urlsplit(config.url)
        if url.scheme != "https" or not url.hostname:
            raise ValueError(f"APNs endpoint must be https://host[:port], got {config.url!r}")
        self._config = config
        self._host, self._port = url.hostname, url.port or 443
        self._authority = url.netloc.encode()
        self._topic = config.topic.encode()
        self._expiration = expiration
        self._clock = clock
        self._provider: ProviderToken | None = provider
        if provider is None and config.token_auth:
            assert config.key_file and config.key_id and config.team_id
            self._provider = shared_provider_token(config.key_file, config.key_id,
                                                   config.team_id, clock=clock)
        if self._provider is None and config.cert_file is None:
            raise ValueError("APNs credentials missing: set apns.key_file (token auth) "
                             "or apns.cert_file (certificate auth)")
        self._context = self._tls_context(config)
        self._rng = random.Random()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="apns-client", daemon=True)
        self._incoming: deque[PendingRequest] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._closed = False
        self._started = False
        # Loop-thread state.
        self._pending: deque[PendingRequest] = deque()  # waiting for a stream
        self._deadlines: deque[PendingRequest] = deque()  # every live request, oldest first
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._slots = [_Slot(i) for i in range(config.connections)]
        self._draining: set[Http2Connection] = set()
        # Hears of every send and connection: the relay's metrics, unless given another
        # (a child process's client is silent: its parent counts; relay.apns.results).
        self._listener: SendListener = listener or PrometheusListener()
        self._bearer: tuple[str, Header] = ("", (b"", b""))  # the JWT and its header
        self._request_line: tuple[Header, ...] = (
            (b":method", b"POST"), (b":scheme", b"https"), (b":authority", self._authority))
        self._constant_headers: tuple[Header, ...] = (
            (b"apns-topic", self._topic), (b"apns-push-type", b"background"),
            (b"apns-priority", b"5"))
        self._opened = 0
        self.last_connect_error: str | None = None  # for operators: why no connection

    @staticmethod
    def _tls_context(config: ApnsConfig) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # system CAs
        if config.ca_file is not None:
            context.load_verify_locations(cafile=str(config.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        if config.cert_file is not None:
            key = str(config.cert_key_file) if config.cert_key_file else None
            context.load_cert_chain(str(config.cert_file), key)
        return context

    # --- the public, thread-safe API ---------------------------------------------------

    def start(self) -> None:
        """Start the I/O thread; connections open when the first notification is sent."""
        if self._started:
            return
        self._started = True
        self._thread.start()
        self._loop.call_soon_threadsafe(self._update_metrics)

    def send(self, token: str, apns_id: str) -> concurrent.futures.Future[ApnsResult]:
        """Queue one background notification; never blocks; the future always resolves."""
        future: concurrent.futures.Future[ApnsResult] = concurrent.futures.Future()
        now = time.monotonic()
        request = PendingRequest(token, apns_id, future, now, now + self._config.request_timeout)
        with self._wake_lock:
            if self._closed:
                wake = False
            else:
                self._incoming.append(request)
                wake = not self._wake_pending
                self._wake_pending = True
        if self._closed:
            self._finish(request, None, "Closed")
        elif wake:
            self._loop.call_soon_threadsafe(self._take_incoming)
        return future

    def close(self) -> None:
        """Close every connection; unanswered notifications resolve as `Closed`."""
        with self._wake_lock:
            if self._closed:
                return
            self._closed = True
        if self._started and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._shutdown)
            self._thread.join()
        else:
            self._shutdown_pending()
            self._loop.close()

    @property
    def connections_opened(self) -> int:
        """How many connections this client has opened so far (for tests and logs)."""
        return self._opened

    # --- loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    def _shutdown(self) -> None:
        for conn in self._connections():
            in_flight = conn.take_all()
            self._listener.in_flight(-len(in_flight))
            for request in in_flight:
                self._finish(request, None, "Closed")
            conn.abort()
        self._shutdown_pending()
        for slot in self._slots:
            if slot.retry is not None:
                slot.retry.cancel()
        self._loop.call_soon(self._loop.stop)

    def _shutdown_pending(self) -> None:
        with self._wake_lock:
            incoming, self._incoming = list(self._incoming), deque()
        for request in [*self._pending, *incoming]:
            self._finish(request, None, "Closed")
        self._pending.clear()

    def _take_incoming(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        incoming, pending, deadlines = self._incoming, self._pending, self._deadlines
        while incoming:
            request = incoming.popleft()
            pending.append(request)
            deadlines.append(request)
        self._arm_deadlines()
        self._dispatch()

    def _connections(self) -> list[Http2Connection]:
        live = [slot.conn for slot in self._slots if slot.conn is not None]
        return live + list(self._draining)

    def _dispatch(self) -> None:
        """Give waiting requests to connections with free streams; open connections if needed."""
        pending = self._pending
        while pending and pending[0].done:
            pending.popleft()
        if not pending:
            return
        ready = [s.conn for s in self._slots if s.conn is not None and s.conn.capacity() > 0]
        if ready:
            room = [conn.capacity() for conn in ready]
            touched = set()
            index = 0
            while pending and ready:
                request = pending.popleft()
                if request.done:
                    continue
                index %= len(ready)
                conn = ready[index]
                touched.add(conn)
                room[index] -= 1
                if not self._submit(conn, request) or room[index] <= 0:
                    del ready[index], room[index]
                else:
                    index += 1
            for conn in touched:
                conn.flush()
        if pending:
            self._ensure_connections()

    def _submit(self, conn: Http2Connection, request: PendingRequest) -> bool:
        try:
            conn.submit(request)
        except Exception:  # a bug or a dead connection: never lose the request
            log.exception("APNs connection %s: could not open a stream", conn.label)
            request.conn = None
            self._pending.appendleft(request)
            conn.abort()
            return False
        self._listener.in_flight(1)
        if conn.retired:  # out of stream ids: its slot goes to a new connection
            self._loop.call_soon(self.draining, conn)
            return False
        return True

    def _ensure_connections(self) -> None:
        now = self._loop.time()
        for slot in self._slots:
            if slot.conn is not None or slot.connecting:
                continue
            if now >= slot.not_before:
                slot.connecting = True
                self._loop.create_task(self._connect(slot))
            elif slot.retry is None:
                slot.retry = self._loop.call_at(slot.not_before, self._retry_slot, slot)

    def _retry_slot(self, slot: _Slot) -> None:
        slot.retry = None
        self._dispatch()

    async def _connect(self, slot: _Slot) -> None:
        self._opened += 1
        label = f"#{self._opened}({self._host}:{self._port})"
        try:
            conn = await open_connection(
                lambda: Http2Connection(
                    self, token_auth=self._provider is not None,
                    idle_ping=self._config.idle_ping, ping_timeout=self._config.connect_timeout,
                    body=BACKGROUND_PAYLOAD, label=label,
                ),
                self._host, self._port, self._context, self._config.connect_timeout,
            )
        except (OSError, ssl.SSLError, ConnectionError, asyncio.TimeoutError) as exc:
            slot.connecting = False
            self._failed(slot, _describe(exc))
            self._dispatch()
            return
        slot.connecting = False
        if self._closed:
            conn.abort()
            return
        if conn.closed:
            self._failed(slot, "connection closed right after set-up")
            self._dispatch()
            return
        slot.conn = conn
        self.last_connect_error = None
        self._listener.connections(1)
        log.info("APNs connection %s open", label)
        self._dispatch()

    def _failed(self, slot: _Slot, why: str) -> None:
        slot.failures += 1
        delay = reconnect_delay(slot.failures, self._rng)
        slot.not_before = self._loop.time() + delay
        self.last_connect_error = why
        log.error("APNs connection to %s:%d failed: %s (attempt %d, next in %.1fs)",
                  self._host, self._port, why, slot.failures, delay)

    # --- ConnectionOwner ---------------------------------------------------------------

    def headers_for(self, request: PendingRequest) -> list[Header]:
        headers: list[Header] = [
            *self._request_line,
            # Per-request values stay out of APNs' small HPACK table (docs/apns.md §1).
            NeverIndexedHeaderTuple(b":path", b"/3/device/" + request.token.encode()),
            *self._constant_headers,
            NeverIndexedHeaderTuple(
                b"apns-expiration", b"%d" % int(self._clock() + self._expiration)
            ),
            NeverIndexedHeaderTuple(b"apns-id", request.apns_id.encode()),
        ]
        if self._provider is not None:
            jwt = self._provider.current()
            if self._bearer[0] is not jwt:
                self._bearer = (jwt, NeverIndexedHeaderTuple(b"authorization",
                                                             b"bearer " + jwt.encode()))
            request.jwt = jwt
            headers.append(self._bearer[1])
        return headers

    def answered(self, conn: Http2Connection, request: PendingRequest, status: int,
                 body: bytes) -> None:
        self._listener.in_flight(-1)
        if status == 200:
            self._finish(request, 200, None)
            return
        reason, timestamp = parse_error_body(body)
        if reason == "ExpiredProviderToken" and self._retry_expired_jwt(request):
            return
        if reason == "UnrelatedKeyIdInToken" and self._retry_on_new_connection(conn, request):
            return
        self._finish(request, status, reason, timestamp)

    def _retry_on_new_connection(self, conn: Http2Connection, request: PendingRequest) -> bool:
        """UnrelatedKeyIdInToken: APNs bound this connection to another team at its first
        push (docs/apns.md §5), so the connection is retired and the request tried once more
        on a new one. A repeat there reaches the caller (the table's class b)."""
        if request.connection_retried:
            return False
        request.connection_retried = True
        self._pending.appendleft(request)
        if not conn.retired:
            log.warning("APNs answered UnrelatedKeyIdInToken on connection %s: moving to a "
                        "new connection", conn.label)
            conn.retire()
            self.draining(conn)  # frees the slot: a new connection opens and dispatches
        else:
            self._dispatch()
        return True

    def _retry_expired_jwt(self, request: PendingRequest) -> bool:
        """ExpiredProviderToken: a new JWT and one more try, if the 20-minute rule allows."""
        if self._provider is None or request.jwt is None or request.jwt_retried:
            return False
        renewed = self._provider.renew_rejected(request.jwt)
        if renewed is None:
            log.error("APNs says the provider token is expired, but it is only %.0fs old: "
                      "check the system clock (and apns.key_id/team_id)", self._provider.age())
            return False
        log.warning("APNs answered ExpiredProviderToken; retrying %s with a new token",
                    redact(request.token))
        request.jwt_retried = True
        self._pending.appendleft(request)
        self._dispatch()
        return True

    def requeue(self, requests: list[PendingRequest]) -> None:
        self._listener.in_flight(-len(requests))
        self._pending.extendleft(reversed([r for r in requests if not r.done]))
        self._dispatch()

    def lost(self, requests: list[PendingRequest], reason: str) -> None:
        """The connection or the stream died under these requests: send them again on
        another connection (TRANSPORT_RESENDS times at most, within their deadline)."""
        self._listener.in_flight(-len(requests))
        again = []
        for request in requests:
            if request.done:
                continue
            request.transport_resends += 1
            if request.transport_resends > TRANSPORT_RESENDS:
                log.warning("APNs: %s lost its connection %d times in a row; giving up on "
                            "this attempt", redact(request.token), request.transport_resends)
                self._finish(request, None, reason)
            else:
                again.append(request)
        if again:
            self._pending.extendleft(reversed(again))
            self._dispatch()

    def capacity_changed(self, conn: Http2Connection) -> None:
        if self._pending:
            self._dispatch()

    def draining(self, conn: Http2Connection) -> None:
        for slot in self._slots:
            if slot.conn is conn:
                slot.conn = None
                self._draining.add(conn)
                if not conn.answered_any:
                    self._failed(slot, "GOAWAY before any answer")
        self._dispatch()

    def closed(self, conn: Http2Connection) -> None:
        known = conn in self._draining
        self._draining.discard(conn)
        for slot in self._slots:
            if slot.conn is conn:
                slot.conn = None
                known = True
                if not conn.answered_any and not self._closed:
                    self._failed(slot, "connection closed before any answer")
        if known:
            self._listener.connections(-1)
            log.info("APNs connection %s closed", conn.label)
        if not self._closed:
            self._dispatch()

    # --- results -------------------------------------------------------------------

    def _finish(self, request: PendingRequest, status: int | None, reason: str | None,
                timestamp_ms: int | None = None) -> None:
        if request.done:
            return
        request.done = True
        if request.conn is not None:
            request.conn.cancel(request)
            self._listener.in_flight(-1)
        result = result_of(request.token, request.apns_id, started=request.started,
                           status=status, reason=reason, timestamp_ms=timestamp_ms,
                           received_at_ms=int(self._clock() * 1000))
        future, request.future = request.future, None
        settle(future, result, self._listener)

    def _arm_deadlines(self) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0].done:
            deadlines.popleft()
        if deadlines and self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(deadlines[0].deadline, self._expire)

    def _expire(self) -> None:
        """Resolve every request whose deadline passed as `Timeout` (all share one timeout,
        so the queue is in deadline order and one timer serves them all)."""
        self._deadline_timer = None
        now = self._loop.time()
        deadlines = self._deadlines
        expired = False
        while deadlines and (deadlines[0].done or deadlines[0].deadline <= now):
            request = deadlines.popleft()
            if not request.done:
                expired = True
                self._finish(request, None, "Timeout")
        self._arm_deadlines()
        if expired:
            self._dispatch()

    def _update_metrics(self) -> None:
        if self._provider is not None:
            self._listener.provider_token_age(self._provider.age())
        self._loop.call_later(METRICS_INTERVAL, self._update_metrics)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out (apns.connect_timeout)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message} (see apns.ca_file)"
    return str(exc) or type(exc).__name__
