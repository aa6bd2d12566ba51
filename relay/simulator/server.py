"""The APNs simulator: a real HTTP/2 server over TLS that answers like Apple.

It checks every request against Apple's rules (`validation`), verifies provider
tokens against configured public keys (with Apple's 60-minute and per-connection
20-minute rules on a clock that tests can replace or speed up), enforces
SETTINGS_MAX_CONCURRENT_STREAMS (and, for token auth, one stream until a valid
token was posted) by GOAWAY, and records every request. Faults for tests: a
scripted outcome list per token, artificial latency, withheld answers, RST_STREAM,
dropped connections, GOAWAY after N streams or on demand, stream limits changed
mid-connection, a tiny flow-control window.

It runs its own asyncio loop on its own thread; the public methods are
thread-safe. See `relay/simulator/README.md` for operators.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame

from relay.apns.hpack_codec import HeaderDecoder, HeaderEncoder
from relay.simulator.credentials import CertificateAuthority
from relay.simulator.validation import (
    CertificateIdentity,
    ConnectionAuth,
    Request,
    TokenVerifier,
    check_certificate,
    check_request,
    check_token_and_headers,
)
from relay.tokens import redact

log = logging.getLogger("relay.simulator")

DEFAULT_MAX_STREAMS = 1000  # what Apple was seen to advertise (docs/apns.md §6)
MAX_HEADER_LIST_SIZE = 8000  # Apple's observed SETTINGS value
STREAM_CULL_INTERVAL = 256
# Received bytes parsed before the answers ready so far are written. APNs answers streams
# as it goes; answering a whole read at once (a client's batch of a hundred streams)
# would make client and server take turns instead of working at the same time.
ANSWER_SLICE = 16384
STREAM_LIMIT_MESSAGE = b'{"reason":"Maximum active streams violated for this endpoint."}'


class Action(str, Enum):
    """What the simulator does with a valid request that a script covers."""

    ANSWER = "answer"  # answer with status/reason
    WITHHOLD = "withhold"  # never answer (the client's deadline must fire)
    RESET = "reset"  # RST_STREAM (INTERNAL_ERROR, or REFUSED_STREAM if status is 0)
    DROP = "drop"  # close the TCP connection abruptly
    GOAWAY = "goaway"  # GOAWAY naming the previous stream as the last: this one unprocessed


@dataclass(frozen=True)
class ScriptedOutcome:
    """One answer in a token's script; scripts are consumed one entry per valid request."""

    status: int = 200
    reason: str | None = None
    timestamp_ms: int | None = None  # for 410; Unregistered gets "now" when omitted
    action: Action = Action.ANSWER
    delay: float = 0.0  # seconds before acting, on top of the simulator's latency

    @classmethod
    def failures(cls, count: int, status: int = 503,
                 reason: str = "ServiceUnavailable") -> list[ScriptedOutcome]:
        """`count` failures; the next request (script exhausted) is accepted."""
        return [cls(status, reason)] * count


@dataclass(frozen=True)
class RecordedRequest:
    """A request as received and what the simulator decided."""

    connection: int
    stream_id: int
    token: str | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    valid: bool
    answer: tuple[int, str | None] | None  # None: withheld, reset or dropped
    received_at: float  # simulator clock, epoch seconds

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)


class ApnsSimulator:
    """See the module docstring; `start()` before use, `stop()` after."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        topic: str,
        environment: str = "production",
        keys: dict[str, tuple[str, EllipticCurvePublicKey]] | None = None,
        clock: Callable[[], float] | None = None,
        time_scale: float = 1.0,
        max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
        initial_window_size: int = 65535,
        goaway_after: int | None = None,
        latency: float = 0.0,
        client_ca: Path | None = None,
        record_limit: int | None = None,
        log_requests: bool = False,
        workdir: Path | None = None,
    ) -> None:
        self.host, self._requested_port = host, port
        if environment not in ("production", "sandbox"):
            raise ValueError(f"environment must be production or sandbox, not {environment!r}")
        self.topic = topic
        self.environment = environment  # what certificates must allow (certificate auth)
        self._verifier = TokenVerifier(keys or {})
        self._token_auth_configured = bool(keys)
        if clock is None:
            base, start = time.time(), time.monotonic()

            def clock() -> float:
                return base + (time.monotonic() - start) * time_scale

        self.clock = clock
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.goaway_after = goaway_after
        self.latency = latency
        self._client_ca = client_ca
        self.log_requests = log_requests
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="apns-sim-"))
        self._ca = CertificateAuthority(self.workdir)
        self.ca_file = self._ca.ca_file
        self._server_cert = self._ca.issue(
            "server", "apns-relay simulator", hosts=tuple(dict.fromkeys(
                (host, "127.0.0.1", "localhost", "::1")))
        )
        self._scripts: dict[str, deque[ScriptedOutcome]] = {}
        self._burst: deque[ScriptedOutcome] = deque()  # the next answers, whatever the token
        self._lock = threading.Lock()
        self._recorded_cond = threading.Condition(self._lock)
        self._records: deque[RecordedRequest] = deque(maxlen=record_limit)
        self._recorded_total = 0
        self._connections: set[_ServerConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        # Observations for tests (written on the simulator thread only).
        self.connections_opened = 0
        self.max_concurrent_seen = 0
        self.stream_limit_violations = 0
        self.pings_received = 0
        self.ping_event = threading.Event()

    # --- life cycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> None:
        """Listen (raises if the address is taken); returns once connections are accepted."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="apns-simulator",
                                        daemon=True)
        self._thread.start()
        ready.result()

    def stop(self) -> None:
        """Close every connection and the listener; remove generated files."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._shutdown)
            thread.join()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ApnsSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(loop.create_server(
                lambda: _ServerConnection(self), self.host, self._requested_port,
                ssl=self._tls_context()))
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        self._loop.call_soon(self._loop.stop)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._server_cert.cert_file, self._server_cert.key_file)
        context.set_alpn_protocols(["h2"])
        if self._client_ca is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cafile=str(self._client_ca))
        return context

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the simulator thread and wait for it."""
        loop = self._loop
        if loop is None or not loop.is_running():
            fn()
            return

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), loop).result()

    # --- configuration and faults (thread-safe) -------------------------------------------

    def add_key(self, key_id: str, team_id: str, public_key: EllipticCurvePublicKey) -> None:
        """Accept provider tokens signed by this key for this team."""
        self._call(lambda: self._verifier.add_key(key_id, team_id, public_key))
        self._token_auth_configured = True

    def script(self, token: str, outcomes: Iterable[ScriptedOutcome]) -> None:
        """Answer this token's next valid requests with `outcomes`, then accept it."""
        with self._lock:
            self._scripts[token.lower()] = deque(outcomes)

    def burst(self, outcomes: Iterable[ScriptedOutcome]) -> None:
        """Answer the next valid requests, whatever their token, with `outcomes` (before any
        token's own script): an APNs-wide fault such as a burst of 503 or 429."""
        with self._lock:
            self._burst.extend(outcomes)

    def set_max_concurrent_streams(self, limit: int) -> None:
        """New SETTINGS_MAX_CONCURRENT_STREAMS for new and open connections."""
        def apply() -> None:
            self.max_concurrent_streams = limit
            for conn in self._connections:
                conn.update_stream_limit(limit)

        self._call(apply)

    def send_goaway(self, reason: str = "Shutdown") -> None:
        """GOAWAY on every connection; streams already received are still answered."""
        def apply() -> None:
            for conn in list(self._connections):
                conn.goaway(None, reason)

        self._call(apply)

    def drop_connections(self) -> None:
        """Abort every TCP connection without a word, as a dying network does."""
        def apply() -> None:
            for conn in list(self._connections):
                conn.abort()

        self._call(apply)

    # --- observations -----------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (the last `record_limit` if set)."""
        with self._lock:
            return list(self._records)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` requests were recorded in total."""
        with self._recorded_cond:
            return self._recorded_cond.wait_for(lambda: self._recorded_total >= count, timeout)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # --- called from connections (simulator thread) --------------------------------------

    def _next_outcome(self, token: str) -> ScriptedOutcome | None:
        with self._lock:
            if self._burst:
                return self._burst.popleft()
            script = self._scripts.get(token.lower())
            if not script:
                return None
            return script.popleft()

    def _record(self, record: RecordedRequest) -> None:
        with self._recorded_cond:
            self._records.append(record)
            self._recorded_total += 1
            self._recorded_cond.notify_all()
        if self.log_requests:
            answer = "no answer" if record.answer is None else " ".join(
                str(part) for part in record.answer if part is not None)
            log.info("connection %d stream %d token %s -> %s", record.connection,
                     record.stream_id, redact(record.token or "-"), answer)


class _ServerH2(H2Connection):  # type: ignore[misc]
    """h2 walks every stream to count open ones on each new stream (O(n) per request).
    The connection enforces the limit itself, in event order (`_request_received`); h2's
    walk, which also forgets closed streams, runs only every STREAM_CULL_INTERVAL."""

    _opened = 0

    @property
    def open_inbound_streams(self) -> int:
        self._opened += 1
        if self._opened % STREAM_CULL_INTERVAL == 0:
            return int(super().open_inbound_streams)
        return 0


class _ServerConnection(asyncio.Protocol):
    """One client connection, on the simulator thread."""

    def __init__(self, sim: ApnsSimulator) -> None:
        self.sim = sim
        self.number = 0
        # h2's generic header checks and normalisation cost CPU for nothing here:
        # `validation` checks what Apple checks, and the simulator builds its answers'
        # headers itself.
        self.h2 = _ServerH2(H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=False, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.h2.encoder = HeaderEncoder()
        decoder = HeaderDecoder()
        decoder.max_header_list_size = self.h2.decoder.max_header_list_size
        self.h2.decoder = decoder
        self.transport: asyncio.Transport | None = None
        self.auth = ConnectionAuth(sim._verifier)
        self.certificate: CertificateIdentity | None = None  # certificate auth, if any
        self.token_posted = False  # a request with a valid token was posted
        self.active: set[int] = set()  # streams received and not yet answered or reset
        self.limit = sim.max_concurrent_streams  # as acknowledged by the client
        self.streams: dict[int, tuple[list[tuple[str, str]], bytearray]] = {}
        self.opened = 0
        self.goaway_last: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            log.warning("client did not negotiate h2 via ALPN; closing")
            transport.abort()
            return
        der = ssl_object.getpeercert(binary_form=True)
        if der:  # read once: what it allows holds for the connection
            self.certificate = CertificateIdentity.from_der(der)
        sim = self.sim
        sim.connections_opened += 1
        self.number = sim.connections_opened
        sim._connections.add(self)
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: sim.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: sim.initial_window_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        })
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.sim._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        for start in range(0, len(data), ANSWER_SLICE):
            self._receive(data[start:start + ANSWER_SLICE])
            if self.closed:
                return
            self.flush()
        self._close_if_drained()

    def _receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except TooManyStreamsError as exc:
            self._violation(str(exc))
            return
        except (H2Error, ValueError) as exc:
            log.warning("connection %d: protocol error from the client: %s", self.number, exc)
            self.flush()
            self.abort()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request_received(event.stream_id, event.headers or [])
            elif isinstance(event, DataReceived):
                entry = self.streams.get(event.stream_id)
                if entry is not None:
                    entry[1].extend(event.data or b"")
                if event.stream_id in self.h2.streams:
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0,
                                                      event.stream_id)
            elif isinstance(event, StreamEnded):
                self._process(event.stream_id or 0)
            elif isinstance(event, StreamReset):
                self.active.discard(event.stream_id or 0)
                self.streams.pop(event.stream_id or 0, None)
            elif isinstance(event, SettingsAcknowledged):
                changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
                if changed is not None:
                    self.limit = changed.new_value
            elif isinstance(event, PingReceived):
                self.sim.pings_received += 1
                self.sim.ping_event.set()
            elif isinstance(event, ConnectionTerminated):
                self.close()
            if self.closed:
                return

    # --- requests -------------------------------------------------------------------

    def _request_received(self, stream_id: int, raw: Iterable[Any]) -> None:
        if self.goaway_last is not None and stream_id > self.goaway_last:
            return  # not processed: the client must send it again elsewhere
        self.active.add(stream_id)
        sim = self.sim
        sim.max_concurrent_seen = max(sim.max_concurrent_seen, len(self.active))
        if len(self.active) > self.limit:
            self._violation(f"{len(self.active)} streams open, the limit is {self.limit}")
            return
        if self._token_auth() and not self.token_posted and len(self.active) > 1:
            self._violation("more than one stream before a request with a valid token")
            return
        headers = [(bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
                   for name, value in raw]
        self.streams[stream_id] = (headers, bytearray())
        self.opened += 1
        if sim.goaway_after is not None and self.opened == sim.goaway_after:
            self.goaway(stream_id, "Shutdown")

    def _token_auth(self) -> bool:
        return self.certificate is None

    def _process(self, stream_id: int) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is None:
            return
        sim = self.sim
        request = Request(tuple(entry[0]), bytes(entry[1]))
        now = sim.clock()
        error = check_request(request)
        authenticated = False
        topic = request.get("apns-topic")
        if error is None and self.certificate is not None:
            error, topic = check_certificate(self.certificate, topic, sim.environment)
        elif error is None:
            error = self.auth.check(request.get("authorization"), now)
            authenticated = error is None
        if error is None:
            if not topic:
                error = (400, "MissingTopic")
            elif topic != sim.topic:
                error = (400, "TopicDisallowed")
        if error is None:
            error = check_token_and_headers(request)
        token = request.token()
        outcome: ScriptedOutcome | None
        if error is not None:
            outcome = ScriptedOutcome(error[0], error[1])
        else:
            outcome = sim._next_outcome(token or "") or ScriptedOutcome()
        answer = (outcome.status, outcome.reason) if outcome.action == Action.ANSWER else None
        sim._record(RecordedRequest(self.number, stream_id, token, request.headers, request.body,
                                    error is None, answer, now))
        apns_id = request.get("apns-id") or str(uuid.uuid4())
        delay = sim.latency + outcome.delay
        if delay > 0:
            assert sim._loop is not None
            sim._loop.call_later(delay, self._act, stream_id, outcome, apns_id, now,
                                 authenticated)
        else:  # data_received flushes
            self._act(stream_id, outcome, apns_id, now, authenticated, flush=False)

    def _act(self, stream_id: int, outcome: ScriptedOutcome, apns_id: str, now: float,
             authenticated: bool, flush: bool = True) -> None:
        if self.closed or stream_id not in self.active:
            return
        try:
            if outcome.action == Action.ANSWER:
                self._answer(stream_id, outcome, apns_id, now)
                # Apple lifts its one-stream limit once a request with a valid token was
                # answered; we wait for the answer, to catch clients that do not.
                self.token_posted = self.token_posted or authenticated
            elif outcome.action == Action.RESET:
                code = ErrorCodes.REFUSED_STREAM if outcome.status == 0 else (
                    ErrorCodes.INTERNAL_ERROR)
                self.h2.reset_stream(stream_id, code)
                self.active.discard(stream_id)
            elif outcome.action == Action.DROP:
                self.abort()
                return
            elif outcome.action == Action.GOAWAY:
                self.goaway(stream_id - 2 if stream_id > 2 else 0, outcome.reason or "Shutdown")
        except H2Error as exc:  # e.g. the client reset the stream meanwhile
            log.debug("connection %d stream %d: %s", self.number, stream_id, exc)
            self.active.discard(stream_id)
        if flush:
            self.flush()
            self._close_if_drained()

    def _answer(self, stream_id: int, outcome: ScriptedOutcome, apns_id: str,
                now: float) -> None:
        # apns-id is unique per answer: kept out of the HPACK table, as the client does.
        headers = [(b":status", str(outcome.status).encode()),
                   NeverIndexedHeaderTuple(b"apns-id", apns_id.encode())]
        self.active.discard(stream_id)
        if outcome.status == 200:
            self.h2.send_headers(stream_id, headers, end_stream=True)
            return
        error: dict[str, object] = {"reason": outcome.reason or ""}
        if outcome.status == 410:
            timestamp = outcome.timestamp_ms
            if timestamp is None and outcome.reason == "Unregistered":
                timestamp = int(now * 1000)
            if timestamp is not None:
                error["timestamp"] = timestamp
        body = json.dumps(error).encode() if outcome.reason is not None else b""
        headers.append((b"content-type", b"application/json; charset=utf-8"))
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)

    # --- connection-level faults -----------------------------------------------------------

    def goaway(self, last_stream_id: int | None, reason: str,
               error_code: int = ErrorCodes.NO_ERROR) -> None:
        """Send GOAWAY and keep answering streams up to `last_stream_id`.

        The frame is written past h2 (which would otherwise close its state machine and
        refuse to answer anything more) so that the client sees what Apple does: answers
        for the processed streams arriving after the GOAWAY."""
        if self.closed or self.transport is None:
            return
        if last_stream_id is None:
            last_stream_id = self.h2.highest_inbound_stream_id
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        frame.additional_data = json.dumps({"reason": reason}).encode()
        self.transport.write(frame.serialize())
        self.goaway_last = last_stream_id
        for stream_id in [s for s in self.active if s > last_stream_id]:
            self.active.discard(stream_id)
            self.streams.pop(stream_id, None)
        self._close_if_drained()

    def update_stream_limit(self, limit: int) -> None:
        if self.closed:
            return
        self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: limit})
        self.flush()

    def _violation(self, why: str) -> None:
        self.sim.stream_limit_violations += 1
        log.error("connection %d: stream limit violated (%s); GOAWAY", self.number, why)
        self.flush()
        if self.transport is not None and not self.closed:
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = ErrorCodes.PROTOCOL_ERROR
            frame.additional_data = STREAM_LIMIT_MESSAGE
            self.transport.write(frame.serialize())
        self.close()

    def _close_if_drained(self) -> None:
        if self.goaway_last is not None and not self.active and not self.closed:
            self.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.sim._connections.discard(self)
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.sim._connections.discard(self)
            self.transport.abort()
