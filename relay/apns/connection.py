"""One HTTP/2 connection to APNs: h2's state machine driven by an asyncio protocol.

The connection knows streams, not policy: it opens a stream per request while
the pool says there is room, reports every answer, loss or refusal to its
owner (the client), and never decides what an answer means. What it guarantees:

- no stream is opened before the server's SETTINGS arrived, and never more than
  the server's SETTINGS_MAX_CONCURRENT_STREAMS are open; under token auth only
  one until the first 200 on this connection (Apple's rule, docs/apns.md §6);
- flow control is respected for request bodies;
- after GOAWAY no stream is opened, streams above `last_stream_id` go back to the
  owner to be re-sent elsewhere, and answers for the others are still read.
  h2 closes its state machine when it sees GOAWAY and would reject every later
  frame, losing those answers, so incoming bytes are split at the end of the
  GOAWAY frame and the rest is parsed here (`_receive_after_goaway`) with h2's
  own frame buffer and HPACK decoder;
- a connection that stays silent while a PING is outstanding is declared dead,
  so requests never wait on a socket that silently died.

One module past 500 lines, for one idea: one HTTP/2 connection's life, GOAWAY
included. The reading after GOAWAY must share the connection's HPACK decoder and its
streams, so it is not a module of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, GoAwayFrame, HeadersFrame, RstStreamFrame

from relay.apns.hpack_codec import HeaderDecoder, HeaderEncoder

log = logging.getLogger("relay.apns")

# Never keep more streams open on one connection than this, whatever the server allows.
# A hundred or so in flight already keep a core busy at local round-trip times (more
# measured no faster: BENCHMARKS.md), and Apple's higher limits only matter across long
# round trips, which more `apns.connections` serve better.
STREAM_CAP = 128

# The highest stream id a client may open (RFC 9113 §5.1.1: ids never wrap). A connection
# whose next id would pass `Http2Connection.last_stream_id` retires: it opens no more
# streams, its streams in flight are answered, and a new connection takes over.
MAX_STREAM_ID = 2**31 - 1

# How often h2 may walk its streams to forget closed ones (see `_CountingH2Connection`).
STREAM_CULL_INTERVAL = 256

_GOAWAY = 0x7
_FRAME_HEADER = 9
_PING_PAYLOAD = b"relay\x00\x00\x00"

Header = tuple[bytes, bytes]


class PendingRequest:
    """One notification on its way: queued, in flight, or done."""

    __slots__ = (
        "apns_id",
        "conn",
        "connection_retried",
        "deadline",
        "done",
        "future",
        "jwt",
        "jwt_retried",
        "started",
        "stream_id",
        "token",
        "transport_resends",
    )

    def __init__(self, token: str, apns_id: str, future: Any, started: float, deadline: float):
        self.token, self.apns_id, self.future = token, apns_id, future
        self.started, self.deadline = started, deadline
        self.done = False
        self.conn: Http2Connection | None = None  # set while a stream carries it
        self.stream_id = 0
        self.jwt: str | None = None  # the provider token this attempt was sent with
        self.jwt_retried = False  # ExpiredProviderToken: one renewal per request
        self.connection_retried = False  # UnrelatedKeyIdInToken: one new connection per request
        self.transport_resends = 0  # sent again after its connection or stream died


class ConnectionOwner(Protocol):
    """The pool's side of the conversation (see `relay.apns.client`)."""

    def headers_for(self, request: PendingRequest) -> list[Header]: ...
    def answered(self, conn: Http2Connection, request: PendingRequest, status: int,
                 body: bytes) -> None: ...
    def requeue(self, requests: list[PendingRequest]) -> None: ...
    def lost(self, requests: list[PendingRequest], reason: str) -> None: ...
    def capacity_changed(self, conn: Http2Connection) -> None: ...
    def draining(self, conn: Http2Connection) -> None: ...
    def closed(self, conn: Http2Connection) -> None: ...


class _Stream:
    __slots__ = ("body", "request", "status", "unsent")

    def __init__(self, request: PendingRequest, unsent: bytes) -> None:
        self.request = request
        self.status = 0
        self.body = b""
        self.unsent = unsent  # request body still held back by flow control


class _CountingH2Connection(H2Connection):  # type: ignore[misc]
    """h2's check of the server's stream limit, without its walk over every stream.

    Before opening a stream h2 counts the open ones by walking all of them (forgetting
    closed ones on the way): O(streams in flight) per request, a large CPU cost with a
    hundred in flight. The connection knows its open streams exactly (`count_open`: those
    opened and not yet answered, reset or cancelled; it resets a stream it stops
    following), so this is the only h2 behaviour changed, through h2's public property.
    Every STREAM_CULL_INTERVAL-th stream h2's own walk runs instead, to forget closed
    streams and to check that both counts agree; should they ever differ (a change in h2,
    or a path that leaves a stream open), the walk is used for every stream from then on,
    so h2 never lets more streams open than the server allows.
    """

    # h2 remembers how each closed stream ended, for frames that arrive after the close;
    # its default (65,536 per connection, ~8 MB) made the relay's memory grow over the
    # first 65k sends of a run. Late frames only concern streams closed a moment ago.
    MAX_CLOSED_STREAMS = 4096

    def __init__(self, config: H2Configuration, count_open: Callable[[], int],
                 label: str) -> None:
        super().__init__(config=config)
        self._count_open = count_open
        self._label = label
        self._counted = 0
        self.counts_agree = True

    @property
    def open_outbound_streams(self) -> int:
        self._counted += 1
        if self.counts_agree and self._counted % STREAM_CULL_INTERVAL:
            return self._count_open()
        walked = int(super().open_outbound_streams)
        own = self._count_open()
        if walked != own and self.counts_agree:
            self.counts_agree = False
            log.error("APNs connection %s: h2 counts %d open streams, the connection %d; "
                      "using h2's count from now on", self._label, walked, own)
        return max(walked, own)


def client_h2(count_open: Callable[[], int], label: str) -> H2Connection:
    """h2's client state machine as every APNs connection uses it (bench/h2_floor.py
    measures exactly this): the project's HPACK codec, no server push, and no header
    validation, since we build every header ourselves."""
    config = H2Configuration(
        client_side=True,
        header_encoding=None,
        # We build every header ourselves (lower-case, never-indexed where it matters),
        # so h2's per-request re-validation would only burn CPU.
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        # Only :status and the JSON body are read from answers (and APNs sends no cookies
        # for h2 to merge).
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )
    h2 = _CountingH2Connection(config, count_open, label)
    h2.encoder = HeaderEncoder()
    decoder = HeaderDecoder()
    decoder.max_header_list_size = h2.decoder.max_header_list_size
    h2.decoder = decoder
    h2.local_settings.enable_push = 0
    return h2


class Http2Connection(asyncio.Protocol):
    """An APNs connection; all methods run on the client's event-loop thread."""

    last_stream_id = MAX_STREAM_ID  # lower in tests, to reach the end of the ids quickly

    def __init__(self, owner: ConnectionOwner, *, token_auth: bool, idle_ping: float,
                 ping_timeout: float, body: bytes, label: str) -> None:
        self._owner = owner
        self._token_auth = token_auth
        self._idle_ping, self._ping_timeout = idle_ping, ping_timeout
        self._body = body
        self.label = label
        self._streams: dict[int, _Stream] = {}
        self._h2 = client_h2(lambda: len(self._streams), label)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self._server_limit = 0  # 0 until the server's SETTINGS arrived
        self.confirmed = not token_auth  # a 200 lifts token auth's limit of one stream
        self.answered_any = False
        self.closed = False
        self.goaway_last: int | None = None
        self.retired = False  # no new streams here; closed once the last one is answered
        self._last_activity = self._loop.time()
        self._ping_deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._scan_skip = 0  # bytes of the current frame not yet seen
        self._scan_carry = b""  # a frame header split across reads
        self._scan_in_goaway = False
        self._after_goaway: FrameBuffer | None = None

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn != "h2":
            self._fail_ready(ConnectionError(
                f"the server did not negotiate HTTP/2 (ALPN offered 'h2', got {alpn!r}); "
                "APNs speaks only HTTP/2: check apns.endpoint"
            ))
            transport.abort()
            return
        self._h2.initiate_connection()
        self.flush()
        self._arm_timer(self._idle_ping)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self._ping_deadline = None  # any frame shows the peer is alive
        try:
            if self._after_goaway is not None:
                self._receive_after_goaway(data)
            else:
                end = self._goaway_end(data)
                if end < 0:
                    self._handle(self._h2.receive_data(data))
                else:
                    self._handle(self._h2.receive_data(data[:end]))
                    self._after_goaway = FrameBuffer(server=False)
                    self._after_goaway.max_frame_size = self._h2.max_inbound_frame_size
                    self._receive_after_goaway(data[end:])
        except (H2Error, ValueError) as exc:
            # h2 raises its own errors; hyperframe and hpack raise ValueError subclasses.
            log.warning("APNs connection %s: protocol error from the server: %s", self.label, exc)
            self.flush()
            self.abort()
            return
        self.flush()
        if not self.closed:
            self._owner.capacity_changed(self)
            if (self.goaway_last is not None or self.retired) and not self._streams:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._fail_ready(ConnectionError(f"connection closed during set-up ({exc or 'EOF'})"))
        streams, self._streams = self._streams, {}
        if streams:
            log.warning("APNs connection %s lost with %d requests in flight",
                        self.label, len(streams))
            for stream in streams.values():
                stream.request.conn = None
            self._owner.lost([s.request for s in streams.values()], "ConnectionLost")
        self._owner.closed(self)

    # --- the owner's side -----------------------------------------------------------

    def capacity(self) -> int:
        """How many more streams may be opened now."""
        if self.closed or self.retired or self.goaway_last is not None or not self._server_limit:
            return 0
        limit = self._server_limit if self.confirmed else 1
        return min(limit, STREAM_CAP) - len(self._streams)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    def submit(self, request: PendingRequest) -> None:
        """Open a stream for `request`; the owner checked `capacity()` first."""
        stream_id = self._h2.get_next_available_stream_id()
        self._h2.send_headers(stream_id, self._owner.headers_for(request))
        stream = _Stream(request, self._body)
        self._streams[stream_id] = stream
        request.conn, request.stream_id = self, stream_id
        self._send_body(stream_id, stream)
        if stream_id + 2 > self.last_stream_id:
            log.info("APNs connection %s used its last stream id: a new connection takes over",
                     self.label)
            self.retired = True

    def cancel(self, request: PendingRequest) -> None:
        """The request's deadline passed: stop waiting and free its stream."""
        stream = self._streams.pop(request.stream_id, None)
        request.conn = None
        if stream is None or self.closed:
            return
        if self.goaway_last is None:
            self._h2.reset_stream(request.stream_id, ErrorCodes.CANCEL)
            self.flush()
        if (self.goaway_last is not None or self.retired) and not self._streams:
            self.close()
            return
        # Silence from the server may mean a dead socket: a PING tells within ping_timeout.
        self._send_ping()

    def retire(self) -> None:
        """Open no more streams here (APNs bound this connection to another key's team);
        the streams in flight are still answered, then the connection closes."""
        self.retired = True

    def take_all(self) -> list[PendingRequest]:
        """Forget every stream (the client is closing) and return their requests."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.request.conn = None
        return [stream.request for stream in streams.values()]

    def flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self.closed:
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # --- h2 events -------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, ResponseReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.status = _status_of(event.headers)
            elif isinstance(event, DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream.body += event.data
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                self._complete(event.stream_id)
            elif isinstance(event, StreamReset):
                self._reset(event.stream_id, event.error_code)
            elif isinstance(event, WindowUpdated):
                self._resume_bodies(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                limit = self._h2.remote_settings.max_concurrent_streams
                self._server_limit = limit
                if not self.ready.done():
                    self.ready.set_result(None)
                elif SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings:
                    log.info("APNs connection %s: server allows %d concurrent streams",
                             self.label, limit)
            elif isinstance(event, PingAckReceived):
                self._ping_deadline = None
            elif isinstance(event, ConnectionTerminated):
                self._goaway(event.last_stream_id or 0, event.error_code or 0,
                             event.additional_data)

    def _complete(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return  # cancelled after its deadline; the late answer has no one to go to
        stream.request.conn = None
        self.answered_any = True
        if stream.unsent and self.goaway_last is None:
            # Answered before flow control let the whole body out (RFC 9113 §8.1): end the
            # stream, or it would stay half-open and count against the server's limit.
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        if stream.status == 200:
            self.confirmed = True
        self._owner.answered(self, stream.request, stream.status, stream.body)

    def _reset(self, stream_id: int, error_code: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        stream.request.conn = None
        if error_code == ErrorCodes.REFUSED_STREAM:
            # RFC 9113 §8.7: a refused stream was not processed; safe to send again.
            self._owner.requeue([stream.request])
        else:
            log.warning("APNs connection %s: stream %d reset by the server (error %s)",
                        self.label, stream_id, error_code)
            self._owner.lost([stream.request], "StreamReset")

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        window = self._h2.local_flow_control_window(stream_id)
        size = min(window, len(stream.unsent), self._h2.max_outbound_frame_size)
        if size == len(stream.unsent):
            self._h2.send_data(stream_id, stream.unsent, end_stream=True)
            stream.unsent = b""
        elif size > 0:
            self._h2.send_data(stream_id, stream.unsent[:size])
            stream.unsent = stream.unsent[size:]

    def _resume_bodies(self, stream_id: int) -> None:
        if self.goaway_last is not None:
            return
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None and stream.unsent:
                self._send_body(stream_id, stream)
            return
        for sid, stream in list(self._streams.items()):
            if stream.unsent:
                self._send_body(sid, stream)

    def _goaway(self, last_stream_id: int, error_code: int, data: bytes | None) -> None:
        self.goaway_last = last_stream_id
        reason = _reason_of(data or b"") or (data or b"").decode("utf-8", "replace")
        log.warning("APNs connection %s: GOAWAY (error %s, last stream %d, %s); "
                    "new requests go to a new connection", self.label, error_code,
                    last_stream_id, reason or "no reason")
        unprocessed = [sid for sid in self._streams if sid > last_stream_id]
        retry = []
        for sid in unprocessed:
            stream = self._streams.pop(sid)
            stream.request.conn = None
            retry.append(stream.request)
        self._owner.draining(self)
        if retry:
            self._owner.requeue(retry)

    # --- after GOAWAY: read the remaining answers ourselves ----------------------------

    def _goaway_end(self, data: bytes) -> int:
        """Offset just past a GOAWAY frame ending in `data`, else -1 (tracks frame bounds)."""
        size = len(data)
        pos = self._scan_skip
        if pos > size:
            self._scan_skip = pos - size
            return -1
        self._scan_skip = 0
        if self._scan_in_goaway:
            self._scan_in_goaway = False
            return pos
        shift = 0
        if self._scan_carry:
            shift = len(self._scan_carry)
            data = self._scan_carry + data
            self._scan_carry = b""
            size = len(data)
        while pos + _FRAME_HEADER <= size:
            end = pos + _FRAME_HEADER + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2])
            if data[pos + 3] == _GOAWAY:
                if end <= size:
                    return end - shift
                self._scan_in_goaway = True
                self._scan_skip = end - size
                return -1
            pos = end
        if pos > size:
            self._scan_skip = pos - size
        else:
            self._scan_carry = bytes(data[pos:])
        return -1

    def _receive_after_goaway(self, data: bytes) -> None:
        buffer = self._after_goaway
        assert buffer is not None
        buffer.add_data(data)
        for frame in buffer:
            stream = self._streams.get(frame.stream_id)
            if isinstance(frame, HeadersFrame):
                headers = self._h2.decoder.decode(bytes(frame.data), raw=True)
                if stream is not None and not stream.status:
                    stream.status = _status_of(headers)
                if "END_STREAM" in frame.flags:
                    self._complete(frame.stream_id)
            elif isinstance(frame, DataFrame):
                if stream is not None:
                    stream.body += bytes(frame.data)
                if "END_STREAM" in frame.flags:
                    self._complete(frame.stream_id)
            elif isinstance(frame, RstStreamFrame):
                self._reset(frame.stream_id, frame.error_code)
            elif isinstance(frame, GoAwayFrame) and frame.last_stream_id < (self.goaway_last or 0):
                self._goaway(frame.last_stream_id, frame.error_code, frame.additional_data)

    # --- liveness ------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self._loop.time()
        if self._ping_deadline is not None:
            if now >= self._ping_deadline:
                log.warning("APNs connection %s: no answer to PING within %.1fs; reconnecting",
                            self.label, self._ping_timeout)
                self.abort()
            else:
                self._arm_timer(self._ping_deadline - now)
        elif now - self._last_activity >= self._idle_ping:
            self._send_ping()
        else:
            self._arm_timer(self._last_activity + self._idle_ping - now)

    def _send_ping(self) -> None:
        if self._ping_deadline is not None or self.closed or self.goaway_last is not None:
            return
        self._h2.ping(_PING_PAYLOAD)
        self.flush()
        self._ping_deadline = self._loop.time() + self._ping_timeout
        if self._timer is not None:
            self._timer.cancel()
        self._arm_timer(self._ping_timeout)

    def _fail_ready(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # mark retrieved: the opener may have given up already


def _status_of(headers: Iterable[Any]) -> int:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _reason_of(body: bytes) -> str | None:
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


async def open_connection(
    factory: Callable[[], Http2Connection], host: str, port: int, context: ssl.SSLContext,
    timeout: float,
) -> Http2Connection:
    """Connect, handshake TLS (ALPN h2) and wait for the server's SETTINGS, all within `timeout`."""
    loop = asyncio.get_running_loop()

    async def establish() -> Http2Connection:
        _, conn = await loop.create_connection(factory, host, port, ssl=context,
                                               server_hostname=host)
        try:
            await conn.ready
        except BaseException:
            conn.abort()
            raise
        return conn

    return await asyncio.wait_for(establish(), timeout)


