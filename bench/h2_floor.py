"""The CPU floor that h2 sets under the relay's APNs client, against node-apn's whole process.

The relay keeps `h2` (pure Python) for HTTP/2. This measures only the h2 calls the
relay's connection makes for one background notification, in the relay's own h2
configuration (`relay.apns.connection.client_h2`: the project's HPACK codec, no header
validation): open a stream and send the headers, send the body, take the bytes to send,
then parse the server's answer (`:status 200` and `apns-id`) and its events. No socket,
no TLS, no event loop, no futures, no event log: everything else the relay does per
notification costs more on top. The server side is h2 too, in the same process, and
its time is not counted.

In the same run, node-apn (bench/peers/node_apn_driver.js: its whole process, TLS and
its HTTP/2 in C included) sends the same number of background notifications to the
project's simulator. The ratio printed is h2's floor / node-apn's CPU per notification:
above 1, no relay built on h2 can spend less CPU per notification than node-apn.

    python bench/h2_floor.py [-n 100000] [--in-flight 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded
from h2.settings import SettingCodes, Settings
from hpack import NeverIndexedHeaderTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers.__main__ import _install_peers, node_apn
from relay.apns.connection import client_h2

BODY = b'{"aps":{"content-available":1}}'
# A provider token of the size the relay sends (ES256 JWT: header, claims, signature).
BEARER = b"bearer " + b"e" * 36 + b"." + b"c" * 60 + b"." + b"s" * 86


def _server() -> H2Connection:
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.local_settings = Settings(
        client=False, initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    server.initiate_connection()
    return server


def _answer(server: H2Connection, data: bytes) -> bytes:
    """The server's side of a round: every request it completes answered 200 (settings
    and their acknowledgements need nothing more)."""
    for event in server.receive_data(data):
        if isinstance(event, DataReceived):
            server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            server.send_headers(event.stream_id, [(b":status", b"200"),
                                                  (b"apns-id", str(uuid.uuid4()).encode())],
                                end_stream=True)
    return bytes(server.data_to_send())


def h2_floor(count: int, in_flight: int) -> float:
    """Client CPU seconds spent in h2 for `count` notifications, `in_flight` at a time."""
    open_streams: set[int] = set()
    client, server = client_h2(lambda: len(open_streams), "bench"), _server()
    client.initiate_connection()
    server_bytes = _answer(server, client.data_to_send())
    client.receive_data(server_bytes)
    server.receive_data(client.data_to_send())  # the settings' acknowledgement
    request_line = ((b":method", b"POST"), (b":scheme", b"https"),
                    (b":authority", b"api.push.apple.com"))
    constant = ((b"apns-topic", b"org.example.wallet"), (b"apns-push-type", b"background"),
                (b"apns-priority", b"5"))
    authorization = NeverIndexedHeaderTuple(b"authorization", BEARER)
    tokens = [os.urandom(32).hex().encode() for _ in range(in_flight)]
    spent, sent, answered = 0.0, 0, 0
    while answered < count:
        ids = [str(uuid.uuid4()).encode() for _ in range(min(in_flight, count - sent))]
        started = time.process_time()
        for token, apns_id in zip(tokens, ids, strict=False):  # the last round: fewer ids
            stream_id = client.get_next_available_stream_id()
            client.send_headers(stream_id, [
                *request_line, NeverIndexedHeaderTuple(b":path", b"/3/device/" + token),
                *constant, NeverIndexedHeaderTuple(b"apns-expiration", b"1796000000"),
                NeverIndexedHeaderTuple(b"apns-id", apns_id), authorization])
            window = client.local_flow_control_window(stream_id)
            assert window >= len(BODY) and client.max_outbound_frame_size >= len(BODY)
            client.send_data(stream_id, BODY, end_stream=True)
            open_streams.add(stream_id)
        data = client.data_to_send()
        spent += time.process_time() - started
        sent += len(ids)
        answers = _answer(server, data)
        started = time.process_time()
        for event in client.receive_data(answers):
            if isinstance(event, ResponseReceived):
                assert dict(event.headers)[b":status"] == b"200"
            elif isinstance(event, StreamEnded):
                open_streams.discard(event.stream_id)
                answered += 1
        server.receive_data(client.data_to_send())  # window updates, if any
        spent += time.process_time() - started
    assert not open_streams
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="notifications")
    parser.add_argument("--in-flight", type=int, default=100,
                        help="streams open at once (the relay keeps up to 128)")
    args = parser.parse_args(argv)
    _install_peers()
    print(f"N = {args.n:,}; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    floor = h2_floor(args.n, args.in_flight) / args.n * 1e6
    print(f"h2 alone, the relay's calls and configuration: {floor:.1f} us CPU per notification")
    with tempfile.TemporaryDirectory(prefix="relay-h2-floor-") as tmp:
        node = node_apn(args.n, Path(tmp))
    print(f"node-apn, its whole process: {node.cpu_us:.1f} us CPU per notification "
          f"({node.rate:,.0f}/s)")
    print(f"h2's floor / node-apn's CPU: {floor / node.cpu_us:.2f}x "
          "(above 1: a relay on h2 cannot spend less CPU than node-apn)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
