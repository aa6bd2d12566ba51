"""The APNs client over real TLS + HTTP/2 against the simulator: every rule of issue 3."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import apns_fixtures
import pytest
from apns_fixtures import TOPIC, SimulatorFactory, metric_value, running_client, token

from relay.apns import ApnsClient, ApnsResult, Verdict
from relay.apns.client import (
    RECONNECT_BASE,
    RECONNECT_MAX,
    TRANSPORT_RESENDS,
    reconnect_delay,
)
from relay.apns.connection import STREAM_CULL_INTERVAL
from relay.config import ApnsConfig
from relay.simulator import Action, ApnsSimulator, ScriptedOutcome
from relay.simulator.credentials import CertificateAuthority, write_signing_key

simulator_factory = apns_fixtures.simulator_factory  # the fixture, visible to pytest here

WAIT = 20.0
MINUTE = 60.0


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def new_id() -> str:
    return str(uuid.uuid4())


def send_all(client: ApnsClient, tokens: list[str]) -> list[ApnsResult]:
    futures = [client.send(t, new_id()) for t in tokens]
    return [future.result(WAIT) for future in futures]


def test_a_notification_is_a_valid_background_push(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    clock = FakeClock()
    apns_id = new_id()
    with running_client(config, expiration=1800, clock=clock) as client:
        result = client.send(token(1), apns_id).result(WAIT)
    assert result.status == 200 and result.reason is None
    assert result.verdict is Verdict.DELIVERED
    assert (result.token, result.apns_id) == (token(1), apns_id)
    assert result.received_at_ms == int(clock.now * 1000)
    assert result.latency >= 0
    [request] = simulator.requests
    assert request.valid and request.answer == (200, None)
    assert request.header(":method") == "POST"
    assert request.header(":path") == f"/3/device/{token(1)}"
    assert request.header(":authority") == config.url.removeprefix("https://")
    assert request.header("apns-topic") == TOPIC
    assert request.header("apns-push-type") == "background"
    assert request.header("apns-priority") == "5"
    assert request.header("apns-id") == apns_id
    assert request.header("apns-expiration") == str(int(clock.now + 1800))
    assert (request.header("authorization") or "").startswith("bearer ey")
    assert request.body == b'{"aps":{"content-available":1}}'


def test_503_503_200_is_delivered_on_attempt_3(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(7), ScriptedOutcome.failures(2, 503, "ServiceUnavailable"))
    with running_client(config) as client:
        attempts = [client.send(token(7), "b3a5e0c4-7d1a-4c1e-9f3b-2a6d8e4f1c00").result(WAIT)
                    for _ in range(3)]
    assert [(r.status, r.reason, r.verdict) for r in attempts] == [
        (503, "ServiceUnavailable", Verdict.TRANSIENT),
        (503, "ServiceUnavailable", Verdict.TRANSIENT),
        (200, None, Verdict.DELIVERED),
    ]
    assert [r.answer for r in simulator.requests] == [
        (503, "ServiceUnavailable"), (503, "ServiceUnavailable"), (200, None)]
    assert simulator.connections_opened == 1, "errors do not cost the connection"


def test_dead_tokens_and_410_timestamps(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(400, "BadDeviceToken")])
    simulator.script(token(2), [ScriptedOutcome(410, "Unregistered", 1_700_000_000)])  # seconds
    simulator.script(token(3), [ScriptedOutcome(410, "Unregistered", 1_700_000_000_123)])
    simulator.script(token(4), [ScriptedOutcome(410, "ExpiredToken")])
    simulator.script(token(5), [ScriptedOutcome(429, "TooManyRequests")])
    with running_client(config) as client:
        results = send_all(client, [token(n) for n in range(1, 7)])
    assert [(r.status, r.reason, r.verdict, r.timestamp_ms) for r in results] == [
        (400, "BadDeviceToken", Verdict.DEAD_TOKEN, None),
        (410, "Unregistered", Verdict.DEAD_TOKEN, 1_700_000_000_000),
        (410, "Unregistered", Verdict.DEAD_TOKEN, 1_700_000_000_123),
        (410, "ExpiredToken", Verdict.DEAD_TOKEN, None),
        (429, "TooManyRequests", Verdict.TRANSIENT, None),
        (200, None, Verdict.DELIVERED, None),
    ]


def test_goaway_mid_run_loses_no_notification(simulator_factory: SimulatorFactory) -> None:
    # The GOAWAY arrives while streams are in flight; answers for streams up to its
    # last_stream_id arrive after it (h2 alone would drop them), the rest must be re-sent.
    simulator, config = simulator_factory(goaway_after=7, latency=0.02)
    tokens = [token(n) for n in range(60)]
    with running_client(config) as client:
        results = send_all(client, tokens)
    assert {r.token: r.verdict for r in results} == dict.fromkeys(tokens, Verdict.DELIVERED)
    processed = Counter(r.token for r in simulator.requests)
    assert processed == Counter(tokens), "each notification processed exactly once"
    assert simulator.connections_opened >= 60 // 7


def test_goaway_on_demand_and_answers_after_it(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(latency=0.2)
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        futures = [client.send(token(n), new_id()) for n in range(1, 30)]
        assert simulator.wait_for_requests(30, WAIT)
        simulator.send_goaway()  # all 29 were received: answered after the GOAWAY
        results = [f.result(WAIT) for f in futures]
        assert all(r.status == 200 for r in results)
        assert client.send(token(99), new_id()).result(WAIT).status == 200
    assert Counter(r.token for r in simulator.requests)[token(5)] == 1
    assert simulator.connections_opened == 2


def test_max_concurrent_streams_of_one_is_never_exceeded(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(max_concurrent_streams=1, latency=0.002)
    with running_client(config) as client:
        results = send_all(client, [token(n) for n in range(40)])
    assert all(r.verdict is Verdict.DELIVERED for r in results)
    assert simulator.stream_limit_violations == 0
    assert simulator.max_concurrent_seen == 1


def test_one_stream_until_the_first_200_then_the_servers_limit(
        simulator_factory: SimulatorFactory) -> None:
    # The simulator advertises 1000 but, like Apple, allows one stream on a token-auth
    # connection until a valid token was posted; a violation would end in GOAWAY.
    simulator, config = simulator_factory(latency=0.05)
    with running_client(config) as client:
        results = send_all(client, [token(n) for n in range(50)])
    assert all(r.verdict is Verdict.DELIVERED for r in results)
    assert simulator.stream_limit_violations == 0
    assert simulator.connections_opened == 1
    assert simulator.max_concurrent_seen > 1, "the limit was lifted after the first 200"


def test_stream_limit_changes_mid_connection(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(max_concurrent_streams=50, latency=0.02)
    with running_client(config) as client:
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(60)]))
        simulator.set_max_concurrent_streams(2)
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(60, 90)]))
        simulator.set_max_concurrent_streams(20)
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(90, 150)]))
    assert simulator.stream_limit_violations == 0
    assert simulator.connections_opened == 1


def test_flow_control_splits_the_body(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(initial_window_size=8)
    with running_client(config) as client:
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(5)]))
    assert all(r.body == b'{"aps":{"content-available":1}}' and r.valid
               for r in simulator.requests)


def test_a_withheld_reply_fails_within_the_deadline(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(config={"request_timeout": 0.5})
    simulator.script(token(1), [ScriptedOutcome(action=Action.WITHHOLD)])
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        result = client.send(token(1), new_id()).result(WAIT)
        assert (result.status, result.reason, result.verdict) == (None, "Timeout",
                                                                  Verdict.TRANSIENT)
        assert result.latency >= 0.5
        # The stream was reset, so the connection goes on.
        assert client.send(token(2), new_id()).result(WAIT).status == 200
    assert simulator.connections_opened == 1


def test_requests_beyond_the_limit_wait_and_time_out_not_vanish(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(max_concurrent_streams=1,
                                          config={"request_timeout": 0.5})
    simulator.script(token(1), [ScriptedOutcome(action=Action.WITHHOLD)])
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        blocked = client.send(token(1), new_id())
        queued = [client.send(token(n), new_id()) for n in range(2, 6)]
        assert blocked.result(WAIT).reason == "Timeout"
        # Queued behind the withheld stream, they share its deadline or get through after it.
        assert {f.result(WAIT).reason for f in queued} <= {"Timeout", None}
    assert simulator.stream_limit_violations == 0


def test_a_dropped_connection_resends_on_a_new_one_and_gives_up_after_a_few(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    drop = ScriptedOutcome(action=Action.DROP, delay=0.05)
    simulator.script(token(1), [drop])
    simulator.script(token(2), [drop] * (TRANSPORT_RESENDS + 1))
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        result = client.send(token(1), new_id()).result(WAIT)
        assert result.status == 200, "the transport failed, not the token: sent again"
        killer = client.send(token(2), new_id()).result(WAIT)
        assert (killer.status, killer.reason, killer.verdict) == (None, "ConnectionLost",
                                                                  Verdict.TRANSIENT)
        assert client.send(token(3), new_id()).result(WAIT).status == 200
    sent = Counter(r.token for r in simulator.requests)
    assert (sent[token(1)], sent[token(2)]) == (2, TRANSPORT_RESENDS + 1)
    assert simulator.connections_opened == TRANSPORT_RESENDS + 3
    ids = {r.header("apns-id") for r in simulator.requests if r.token == token(1)}
    assert ids == {result.apns_id}


def test_rst_stream(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    reset = ScriptedOutcome(action=Action.RESET)
    simulator.script(token(1), [reset])
    simulator.script(token(2), [ScriptedOutcome(status=0, action=Action.RESET)])  # REFUSED
    simulator.script(token(3), [reset] * (TRANSPORT_RESENDS + 1))
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        once = client.send(token(1), new_id()).result(WAIT)
        refused = client.send(token(2), new_id()).result(WAIT)
        always = client.send(token(3), new_id()).result(WAIT)
    assert once.status == 200, "a reset stream is the transport's fault: sent again"
    assert (always.status, always.reason, always.verdict) == (None, "StreamReset",
                                                              Verdict.TRANSIENT)
    assert refused.status == 200, "a refused stream was not processed: sent again"
    attempts = [r for r in simulator.requests if r.token == token(2)]
    assert len(attempts) == 2
    assert attempts[0].header("apns-id") == attempts[1].header("apns-id") == refused.apns_id
    assert simulator.connections_opened == 1, "a reset stream leaves its connection up"


def test_idle_connections_are_pinged(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(config={"idle_ping": 0.1})
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        assert simulator.ping_event.wait(WAIT)
        assert client.send(token(1), new_id()).result(WAIT).status == 200
    assert simulator.connections_opened == 1


def test_connections_are_reused_and_spread(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(config={"connections": 2}, latency=0.01)
    with running_client(config) as client:
        time.sleep(0.2)
        assert simulator.connections_opened == 0, "connections open lazily"
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(200)]))
        assert all(r.status == 200 for r in send_all(client, [token(n) for n in range(200)]))
    assert simulator.connections_opened == 2
    per_connection = Counter(r.connection for r in simulator.requests)
    assert len(per_connection) == 2 and min(per_connection.values()) > 20
    assert len({r.header("authorization") for r in simulator.requests}) == 1, (
        "one provider token for every connection")


def test_expired_provider_token_is_renewed_once(simulator_factory: SimulatorFactory) -> None:
    clock, apple = FakeClock(), FakeClock()
    simulator, config = simulator_factory(clock=apple)
    with running_client(config, clock=clock) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        # 25 minutes on our clock, 61 on Apple's: Apple finds the token expired.
        clock.now += 25 * MINUTE
        apple.now += 61 * MINUTE
        result = client.send(token(1), new_id()).result(WAIT)
    assert result.status == 200
    rejected, accepted = [r for r in simulator.requests if r.token == token(1)]
    assert rejected.answer == (403, "ExpiredProviderToken")
    assert accepted.answer == (200, None)
    assert rejected.header("authorization") != accepted.header("authorization")
    assert rejected.header("apns-id") == accepted.header("apns-id")


def test_repeated_expired_provider_token_is_a_configuration_error(
        simulator_factory: SimulatorFactory) -> None:
    clock = FakeClock()
    simulator, config = simulator_factory(clock=clock)
    simulator.script(token(1), [ScriptedOutcome(403, "ExpiredProviderToken")] * 2)
    with running_client(config, clock=clock) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        clock.now += 21 * MINUTE
        result = client.send(token(1), new_id()).result(WAIT)
        # A young token is not replaced at all: the clock or the key must be wrong.
        simulator.script(token(2), [ScriptedOutcome(403, "ExpiredProviderToken")])
        young = client.send(token(2), new_id()).result(WAIT)
    assert (result.status, result.reason, result.verdict) == (
        403, "ExpiredProviderToken", Verdict.CONFIGURATION)
    assert [r.token for r in simulator.requests].count(token(1)) == 2, "renewed exactly once"
    assert young.verdict is Verdict.CONFIGURATION
    assert [r.token for r in simulator.requests].count(token(2)) == 1
    tokens_used = {r.header("authorization") for r in simulator.requests}
    assert len(tokens_used) == 2


def test_jwt_is_never_reminted_within_20_minutes(simulator_factory: SimulatorFactory) -> None:
    # Client and "Apple" share a clock that jumps 3 minutes per send for 4 hours: Apple's
    # 60-minute (ExpiredProviderToken) and per-connection 20-minute
    # (TooManyProviderTokenUpdates) rules would show any mistake.
    clock = FakeClock()
    simulator, config = simulator_factory(clock=clock)
    with running_client(config, clock=clock) as client:
        for n in range(80):
            result = client.send(token(n), new_id()).result(WAIT)
            assert result.status == 200, result
            clock.now += 3 * MINUTE
    changes = [r.received_at for previous, r in zip(simulator.requests, simulator.requests[1:],
                                                    strict=False)
               if r.header("authorization") != previous.header("authorization")]
    first = simulator.requests[0].received_at
    assert len(changes) >= 4, "refreshed at least once an hour"
    gaps = [b - a for a, b in zip([first, *changes], changes, strict=False)]
    assert min(gaps) >= 20 * MINUTE
    assert max(gaps) <= 51 * MINUTE


def _certificate_config(simulator: ApnsSimulator, cert_file: Path, key_file: Path) -> ApnsConfig:
    return ApnsConfig(endpoint=simulator.url, ca_file=simulator.ca_file, topic=TOPIC,
                      cert_file=cert_file, cert_key_file=key_file)


def test_certificate_auth(tmp_path: Path, simulator_factory: SimulatorFactory) -> None:
    authority = CertificateAuthority(tmp_path)
    good = authority.issue_push_certificate("good", TOPIC)
    simulator, _ = simulator_factory(client_ca=authority.ca_file)
    with running_client(_certificate_config(simulator, good.cert_file, good.key_file)) as client:
        results = send_all(client, [token(n) for n in range(5)])
    assert all(r.verdict is Verdict.DELIVERED for r in results)
    assert all(r.header("authorization") is None for r in simulator.requests)
    assert simulator.stream_limit_violations == 0


@pytest.mark.parametrize(("bundle_id", "environments", "answer"), [
    ("org.example.other", ("production",), (400, "TopicDisallowed")),
    (TOPIC, ("sandbox",), (403, "BadCertificateEnvironment")),
    (None, ("production",), (403, "BadCertificate")),  # no bundle id in the subject
])
def test_certificate_auth_checks_topic_and_environment(
        tmp_path: Path, simulator_factory: SimulatorFactory, bundle_id: str | None,
        environments: tuple[str, ...], answer: tuple[int, str]) -> None:
    authority = CertificateAuthority(tmp_path)
    if bundle_id is None:
        cert = authority.issue("plain", TOPIC, client=True)
    else:
        cert = authority.issue_push_certificate("cert", bundle_id, environments)
    simulator, _ = simulator_factory(client_ca=authority.ca_file)
    with running_client(_certificate_config(simulator, cert.cert_file, cert.key_file)) as client:
        result = client.send(token(1), new_id()).result(WAIT)
    assert (result.status, result.reason, result.verdict) == (*answer, Verdict.CONFIGURATION)


@pytest.fixture
def http11_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server that only speaks HTTP/1.1 (ALPN), like a misconfigured endpoint."""
    authority = CertificateAuthority(tmp_path)
    cert = authority.issue("server", "localhost", hosts=("127.0.0.1",))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert_file, cert.key_file)
    context.set_alpn_protocols(["http/1.1"])
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(1)
                    tls.recv(1)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], authority.ca_file
    stop.set()
    thread.join()
    listener.close()


def test_alpn_h2_is_required(http11_server: tuple[int, Path]) -> None:
    port, ca_file = http11_server
    config = ApnsConfig(endpoint=f"https://127.0.0.1:{port}", ca_file=ca_file,
                        request_timeout=0.5)
    with running_client(_token_config(config, ca_file.parent)) as client:
        result = client.send(token(1), new_id()).result(WAIT)
        assert (result.status, result.reason) == (None, "Timeout")
        assert "ALPN" in (client.last_connect_error or "")


def _token_config(config: ApnsConfig, directory: Path) -> ApnsConfig:
    """`config` with token-auth credentials (for servers that never check them)."""
    key_file, _ = write_signing_key(directory, "KEYID12345")
    return dataclasses.replace(config, topic=TOPIC, key_file=key_file, key_id="KEYID12345",
                               team_id="TEAMID1234")


def test_untrusted_certificates_are_refused(simulator_factory: SimulatorFactory,
                                            tmp_path: Path) -> None:
    simulator, config = simulator_factory(config={"request_timeout": 1.0})
    other = CertificateAuthority(tmp_path)
    with running_client(dataclasses.replace(config, ca_file=other.ca_file)) as client:
        futures = [client.send(token(n), new_id()) for n in range(20)]
        assert {f.result(WAIT).reason for f in futures} == {"Timeout"}
        assert "certificate" in (client.last_connect_error or "")
        attempts = client.connections_opened
    assert simulator.requests == []
    # TLS handshakes that fail back off like refused connections: no tight loop.
    assert 1 <= attempts <= 6


def test_reconnects_back_off(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more
    config = _token_config(ApnsConfig(endpoint=f"https://127.0.0.1:{port}",
                                      request_timeout=1.0), tmp_path)
    with running_client(config) as client:
        futures = [client.send(token(n), new_id()) for n in range(20)]
        assert {f.result(WAIT).reason for f in futures} == {"Timeout"}
        attempts = client.connections_opened
    # Back-off 0.1-0.2, 0.2-0.4, 0.4-0.8 s...: a handful in one second, not a tight loop.
    assert 1 <= attempts <= 6


def test_reconnect_delay_grows_and_is_capped() -> None:
    import random

    rng = random.Random(1)
    assert reconnect_delay(0, rng) == 0
    delays = [reconnect_delay(n, rng) for n in range(1, 20)]
    assert RECONNECT_BASE / 2 <= delays[0] <= RECONNECT_BASE
    assert all(d <= RECONNECT_MAX for d in delays)
    assert delays[-1] >= RECONNECT_MAX / 2


def test_close_resolves_everything(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(action=Action.WITHHOLD)])
    client = ApnsClient(config, expiration=3600)
    client.start()
    assert client.send(token(0), new_id()).result(WAIT).status == 200
    withheld = client.send(token(1), new_id())
    assert simulator.wait_for_requests(2, WAIT)
    client.close()
    assert withheld.result(WAIT).reason == "Closed"
    late = client.send(token(2), new_id()).result(WAIT)
    assert (late.reason, late.verdict) == ("Closed", Verdict.TRANSIENT)


def test_metrics_are_updated(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(410, "Unregistered")])

    delivered = metric_value("relay_apns_sends_total", {"status": "200", "reason": ""})
    unregistered = metric_value("relay_apns_sends_total",
                                {"status": "410", "reason": "Unregistered"})
    with running_client(config) as client:
        send_all(client, [token(0), token(1)])
        assert metric_value("relay_apns_connections") >= 1
    assert metric_value("relay_apns_sends_total", {"status": "200", "reason": ""}) == delivered + 1
    assert metric_value("relay_apns_sends_total",
                  {"status": "410", "reason": "Unregistered"}) == unregistered + 1
    assert metric_value("relay_apns_sends_in_flight") == 0


def test_send_is_thread_safe(simulator_factory: SimulatorFactory) -> None:
    _, config = simulator_factory()
    results: list[ApnsResult] = []
    lock = threading.Lock()
    with running_client(config) as client:
        def sender(base: int) -> None:
            futures = [client.send(token(base + n), new_id()) for n in range(100)]
            done = [f.result(WAIT) for f in futures]
            with lock:
                results.extend(done)

        threads = [threading.Thread(target=sender, args=(1000 * i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 400 and all(r.status == 200 for r in results)
    assert len({r.token for r in results}) == 400


def test_unrelated_key_id_moves_to_a_new_connection_once(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(403, "UnrelatedKeyIdInToken")])
    simulator.script(token(2), [ScriptedOutcome(403, "UnrelatedKeyIdInToken")] * 2)
    with running_client(config) as client:
        assert client.send(token(0), new_id()).result(WAIT).status == 200
        moved = client.send(token(1), new_id()).result(WAIT)
        repeated = client.send(token(2), new_id()).result(WAIT)
    assert (moved.status, moved.verdict) == (200, Verdict.DELIVERED)
    first, second = [r for r in simulator.requests if r.token == token(1)]
    assert (first.connection, second.connection) == (1, 2), "retried on a new connection"
    assert first.header("apns-id") == second.header("apns-id")
    assert (repeated.status, repeated.reason, repeated.verdict) == (
        403, "UnrelatedKeyIdInToken", Verdict.CONFIGURATION)
    assert [r.connection for r in simulator.requests if r.token == token(2)] == [2, 3]
    assert simulator.connections_opened == 3


def test_unknown_reasons_follow_the_tables_last_line(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(400, "SomethingNew")])
    simulator.script(token(2), [ScriptedOutcome(503, "SomethingNew")])
    simulator.script(token(3), [ScriptedOutcome(403)])  # no body at all
    with running_client(config) as client:
        results = send_all(client, [token(1), token(2), token(3)])
    assert [(r.status, r.reason, r.verdict) for r in results] == [
        (400, "SomethingNew", Verdict.RELAY_BUG),
        (503, "SomethingNew", Verdict.TRANSIENT),
        (403, None, Verdict.CONFIGURATION),
    ]


def test_connect_timeout(tmp_path: Path) -> None:
    # A server that accepts TCP but never speaks TLS: set-up must give up at connect_timeout.
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        config = _token_config(ApnsConfig(
            endpoint=f"https://127.0.0.1:{silent.getsockname()[1]}", request_timeout=2.0,
            connect_timeout=0.3), tmp_path)
        with running_client(config) as client:
            started = time.monotonic()
            result = client.send(token(1), new_id()).result(WAIT)
            assert result.reason == "Timeout"
            assert time.monotonic() - started < WAIT
            assert "apns.connect_timeout" in (client.last_connect_error or "")
            assert client.connections_opened >= 2, "gave up and tried again"
    finally:
        silent.close()


def test_stream_counts_agree_with_h2_under_faults(simulator_factory: SimulatorFactory,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The client counts its open streams itself instead of h2's walk over all of them; h2's
    # walk still runs every STREAM_CULL_INTERVAL streams and would log a disagreement.
    # Every request's deadline runs from its submission, and all 600 are submitted at once
    # while the withheld ones hold up to 12 of the 20 streams: the deadline leaves a loaded
    # machine room to answer the rest (at 1 s, 13 more timed out once in CI).
    simulator, config = simulator_factory(max_concurrent_streams=20, latency=0.002,
                                          config={"request_timeout": 4.0})
    for n in range(10, 600, 50):
        simulator.script(token(n), [ScriptedOutcome(action=Action.RESET)])
        simulator.script(token(n + 1), [ScriptedOutcome(action=Action.WITHHOLD)])
        simulator.script(token(n + 2), [ScriptedOutcome(status=0, action=Action.RESET)])
    with caplog.at_level("ERROR", logger="relay.apns"), running_client(config) as client:
        results = send_all(client, [token(n) for n in range(600)])
    # A reset stream is sent again (and delivered); a withheld one times out.
    assert Counter(r.reason for r in results) == {None: 588, "Timeout": 12}
    assert STREAM_CULL_INTERVAL < 600
    assert not [r for r in caplog.records if "open streams" in r.getMessage()]
    assert simulator.stream_limit_violations == 0
