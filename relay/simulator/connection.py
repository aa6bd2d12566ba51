"""One client connection to the simulator: h2 driven by an asyncio protocol, on the
simulator's thread.

It reads requests, checks them (`validation`), enforces the stream limits by GOAWAY,
records each request on the simulator, and answers, or acts out a scripted fault
(withhold, RST_STREAM, drop, GOAWAY). The simulator (relay/simulator/server.py) owns the
listening socket, the configuration, the scripts and the record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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
from relay.simulator.outcomes import Action, RecordedRequest, ScriptedOutcome
from relay.simulator.validation import (
    CertificateIdentity,
    ConnectionAuth,
    Request,
    check_certificate,
    check_request,
    check_token_and_headers,
)

if TYPE_CHECKING:
    from relay.simulator.server import ApnsSimulator

log = logging.getLogger("relay.simulator")

MAX_HEADER_LIST_SIZE = 8000  # Apple's observed SETTINGS value
STREAM_CULL_INTERVAL = 256
# Received bytes parsed before the answers ready so far are written. APNs answers streams
# as it goes; answering a whole read at once (a client's batch of a hundred streams)
# would make client and server take turns instead of working at the same time.
ANSWER_SLICE = 16384
STREAM_LIMIT_MESSAGE = b'{"reason":"Maximum active streams violated for this endpoint."}'


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


class ServerConnection(asyncio.Protocol):
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
