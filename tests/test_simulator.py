"""The APNs simulator: Apple's rules, as plain functions and on the wire (raw h2 client)."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import apns_fixtures
import pytest
from apns_fixtures import TOPIC, SimulatorFactory, running_client, token
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded

from relay.apns.jwt import b64url, load_signing_key, make_jwt
from relay.config import ApnsConfig
from relay.simulator import ApnsSimulator, ScriptedOutcome, embedded_simulator
from relay.simulator.cli import parse_outcomes, spawn
from relay.simulator.credentials import Certificate, CertificateAuthority
from relay.simulator.outcomes import Action
from relay.simulator.validation import (
    CertificateIdentity,
    ConnectionAuth,
    ProviderClaims,
    Request,
    TokenVerifier,
    check_certificate,
    check_request,
    check_token_and_headers,
)

simulator_factory = apns_fixtures.simulator_factory  # the fixture, visible to pytest here

WAIT = 20.0
NOW = 1_700_000_000
GOOD = {
    ":method": "POST", ":scheme": "https", ":path": f"/3/device/{token(1)}",
    ":authority": "localhost", "apns-topic": TOPIC, "apns-push-type": "background",
    "apns-priority": "5", "apns-id": "4d3c2b1a-0f9e-4d8c-b7a6-958473625140",
    "apns-expiration": str(NOW + 3600),
}
BODY = b'{"aps":{"content-available":1}}'


def request(changes: dict[str, str | None] | None = None, body: bytes = BODY,
            extra: tuple[tuple[str, str], ...] = ()) -> Request:
    headers = {**GOOD, **(changes or {})}
    pairs = tuple((k, v) for k, v in headers.items() if v is not None) + extra
    return Request(pairs, body)


@pytest.mark.parametrize(("changes", "body", "extra", "expected"), [
    ({}, BODY, (), None),
    ({":method": "GET"}, BODY, (), (405, "MethodNotAllowed")),
    ({":path": "/2/device/abcd"}, BODY, (), (404, "BadPath")),
    ({":path": "/3/device/"}, BODY, (), (400, "MissingDeviceToken")),
    ({}, BODY, (("apns-topic", TOPIC),), (400, "DuplicateHeaders")),
])
def test_request_line_rules(changes: dict[str, str | None], body: bytes,
                            extra: tuple[tuple[str, str], ...],
                            expected: tuple[int, str] | None) -> None:
    assert check_request(request(changes, body, extra)) == expected


@pytest.mark.parametrize(("changes", "body", "expected"), [
    ({}, BODY, None),
    ({":path": "/3/device/xyz1"}, BODY, (400, "BadDeviceToken")),
    ({":path": "/3/device/abc"}, BODY, (400, "BadDeviceToken")),
    ({":path": "/3/device/abcd"}, BODY, (400, "BadDeviceToken")),  # 2 bytes: too short
    ({"apns-push-type": "wakeup"}, BODY, (400, "InvalidPushType")),
    ({"apns-priority": "10"}, BODY, (400, "BadPriority")),
    ({"apns-priority": "7"}, BODY, (400, "BadPriority")),
    ({"apns-id": "not-a-uuid"}, BODY, (400, "BadMessageId")),
    ({"apns-id": "4D3C2B1A-0F9E-4D8C-B7A6-958473625140"}, BODY, (400, "BadMessageId")),
    ({"apns-id": None}, BODY, None),
    ({"apns-expiration": "-1"}, BODY, (400, "BadExpirationDate")),
    ({"apns-expiration": "1.5"}, BODY, (400, "BadExpirationDate")),
    ({"apns-expiration": "0"}, BODY, None),
    ({"apns-collapse-id": "x" * 65}, BODY, (400, "BadCollapseId")),
    ({}, b"", (400, "PayloadEmpty")),
    ({}, b'{"aps":{"content-available":1},"pad":"' + b"x" * 4100 + b'"}',
     (413, "PayloadTooLarge")),
    ({}, b'{"aps":{"alert":"hi"}}', (400, "InvalidPushType")),
    ({}, b"[1]", (400, "BadPayload")),
    ({}, b'{"aps":{"content-available":1},"custom":2}', None),
])
def test_header_and_payload_rules(changes: dict[str, str | None], body: bytes,
                                  expected: tuple[int, str] | None) -> None:
    assert check_token_and_headers(request(changes, body)) == expected


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_token_verifier(key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier({"KEYID12345": ("TEAMID1234", key.public_key())})
    good = make_jwt(key, "KEYID12345", "TEAMID1234", NOW)
    assert verifier.verify(good) == ProviderClaims("KEYID12345", "TEAMID1234", NOW)
    assert verifier.verify(make_jwt(key, "OTHERKEY12", "TEAMID1234", NOW)) == (
        "InvalidProviderToken")
    assert verifier.verify(make_jwt(key, "KEYID12345", "OTHERTEAM1", NOW)) == (
        "InvalidProviderToken")
    other = ec.generate_private_key(ec.SECP256R1())
    assert verifier.verify(make_jwt(other, "KEYID12345", "TEAMID1234", NOW)) == (
        "InvalidProviderToken")
    header, claims, _ = good.split(".")
    der = key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    assert verifier.verify(f"{header}.{claims}.{b64url(der)}") == "InvalidProviderToken"
    hs256 = b64url(json.dumps({"alg": "HS256", "kid": "KEYID12345"}).encode())
    assert verifier.verify(f"{hs256}.{claims}.{good.split('.')[2]}") == "InvalidProviderToken"
    padded = base64.urlsafe_b64encode(b'{"alg":"ES256","kid":"KEYID12345"}').decode()
    assert "=" in padded or verifier.verify(f"{padded}.{claims}.x") == "InvalidProviderToken"
    assert verifier.verify("garbage") == "InvalidProviderToken"


def test_connection_token_rules(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier({"KEYID12345": ("TEAMID1234", key.public_key()),
                              "KEYID67890": ("TEAMID5678", other.public_key())})
    auth = ConnectionAuth(verifier)

    def bearer(k: ec.EllipticCurvePrivateKey, kid: str, team: str, iat: int) -> str:
        return "bearer " + make_jwt(k, kid, team, iat)

    first = bearer(key, "KEYID12345", "TEAMID1234", NOW)
    assert auth.check(None, NOW) == (403, "MissingProviderToken")
    assert auth.check("basic abc", NOW) == (403, "InvalidProviderToken")
    assert auth.check(bearer(key, "KEYID12345", "TEAMID1234", NOW - 3601), NOW) == (
        403, "ExpiredProviderToken")
    assert auth.check(first, NOW) is None
    assert auth.check(first, NOW + 3600) is None
    assert auth.check(first, NOW + 3601) == (403, "ExpiredProviderToken")
    assert auth.check(bearer(key, "KEYID12345", "TEAMID1234", NOW + 60), NOW + 19 * 60) == (
        429, "TooManyProviderTokenUpdates")
    assert auth.check(bearer(other, "KEYID67890", "TEAMID5678", NOW + 60), NOW + 21 * 60) == (
        403, "UnrelatedKeyIdInToken")
    assert auth.check(bearer(key, "KEYID12345", "TEAMID1234", NOW + 60), NOW + 21 * 60) is None


def test_a_token_is_verified_once_not_per_request(key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier({"KEYID12345": ("TEAMID1234", key.public_key())})
    bearer = "bearer " + make_jwt(key, "KEYID12345", "TEAMID1234", NOW)
    connections = [ConnectionAuth(verifier), ConnectionAuth(verifier)]
    for second in range(500):
        for auth in connections:
            assert auth.check(bearer, NOW + second) is None
    assert verifier.signatures_checked == 1
    # The age is still checked on every request.
    assert connections[0].check(bearer, NOW + 3601) == (403, "ExpiredProviderToken")


def test_certificate_identity_and_rules(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path)

    def identity(cert: Certificate) -> CertificateIdentity:
        return CertificateIdentity.from_der(x509.load_pem_x509_certificate(
            cert.cert_file.read_bytes()).public_bytes(serialization.Encoding.DER))

    both = identity(authority.issue_push_certificate("both", TOPIC, ("production", "sandbox")))
    assert both == CertificateIdentity(frozenset({TOPIC}), frozenset({"production", "sandbox"}))
    sandbox = identity(authority.issue_push_certificate("sandbox", TOPIC, ("sandbox",)))
    plain = identity(authority.issue("plain", TOPIC, client=True))
    assert plain == CertificateIdentity(frozenset(), frozenset())
    assert check_certificate(both, TOPIC, "production") == (None, TOPIC)
    assert check_certificate(both, None, "sandbox") == (None, TOPIC), "the default topic"
    assert check_certificate(both, "com.other", "production") == ((400, "TopicDisallowed"), None)
    assert check_certificate(sandbox, TOPIC, "production") == (
        (403, "BadCertificateEnvironment"), None)
    assert check_certificate(plain, TOPIC, "production") == ((403, "BadCertificate"), None)
    two = CertificateIdentity(frozenset({TOPIC, "com.other"}), frozenset({"production"}))
    assert check_certificate(two, None, "production") == ((400, "MissingTopic"), None)
    with pytest.raises(ValueError, match="environment"):
        ApnsSimulator(topic=TOPIC, environment="staging", workdir=tmp_path)


class _UncheckedH2(H2Connection):  # type: ignore[misc]
    """Lets the test open more streams than the server allows, to see it refuse them."""

    @property
    def open_outbound_streams(self) -> int:
        return 0


class RawClient:
    """A bare h2 client that sends whatever headers a test wants."""

    def __init__(self, simulator: ApnsSimulator) -> None:
        context = ssl.create_default_context(cafile=str(simulator.ca_file))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", simulator.port), timeout=WAIT)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.h2 = _UncheckedH2(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()
        self.sock.sendall(self.h2.data_to_send())
        self.answers: dict[int, tuple[int, str | None]] = {}
        self.bodies: dict[int, bytes] = {}
        self.goaway: ConnectionTerminated | None = None

    def open(self, headers: list[tuple[str, str]], body: bytes = BODY) -> int:
        stream_id: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers)
        self.h2.send_data(stream_id, body, end_stream=True)
        self.sock.sendall(self.h2.data_to_send())
        return stream_id

    def wait(self, stream_id: int) -> tuple[int, str | None]:
        while stream_id not in self.answers and self.goaway is None:
            data = self.sock.recv(65536)
            if not data:
                break
            for event in self.h2.receive_data(data):
                self._event(event)
            self.sock.sendall(self.h2.data_to_send())
        return self.answers.get(stream_id, (0, None))

    def _event(self, event: Any) -> None:
        if isinstance(event, ResponseReceived):
            self.bodies[event.stream_id] = b""
            status = dict(event.headers)[":status"]
            self.answers.setdefault(-event.stream_id, (int(status), None))
        elif isinstance(event, DataReceived):
            self.bodies[event.stream_id] += event.data
        elif isinstance(event, StreamEnded):
            status = self.answers.pop(-event.stream_id)[0]
            body = self.bodies.get(event.stream_id) or b"{}"
            self.answers[event.stream_id] = (status, json.loads(body).get("reason"))
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event

    def close(self) -> None:
        self.sock.close()


_jwts: dict[Path, str] = {}


def _headers(config: ApnsConfig, n: int = 1, **changes: str | None) -> list[tuple[str, str]]:
    """Valid headers for token `n`, one JWT per key (a new one per request is refused)."""
    assert config.key_file and config.key_id and config.team_id
    jwt = _jwts.get(config.key_file) or _jwts.setdefault(config.key_file, make_jwt(
        load_signing_key(config.key_file), config.key_id, config.team_id, int(time.time())))
    headers = {**GOOD, ":path": f"/3/device/{token(n)}", "authorization": f"bearer {jwt}",
               "apns-id": str(uuid.uuid4()), **changes}
    return [(k, v) for k, v in headers.items() if v is not None]


def test_wire_answers_follow_apples_rules(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    client = RawClient(simulator)
    try:
        assert client.wait(client.open(_headers(config))) == (200, None)
        assert client.wait(client.open(_headers(config, **{"apns-priority": "10"}))) == (
            400, "BadPriority")
        assert client.wait(client.open(_headers(config, **{"apns-topic": "com.other"}))) == (
            400, "TopicDisallowed")
        assert client.wait(client.open(_headers(config, **{"apns-topic": None}))) == (
            400, "MissingTopic")
        assert client.wait(client.open(_headers(config), b"x" * 5000)) == (
            413, "PayloadTooLarge")
        dup = [*_headers(config), ("apns-priority", "5")]
        assert client.wait(client.open(dup)) == (400, "DuplicateHeaders")
        simulator.script(token(9), [ScriptedOutcome(410, "Unregistered", 1_700_000_000_123)])
        assert client.wait(client.open(_headers(config, 9))) == (410, "Unregistered")
    finally:
        client.close()
    records = simulator.requests
    assert [r.valid for r in records] == [True, False, False, False, False, False, True]
    assert records[1].answer == (400, "BadPriority")
    assert records[-1].token == token(9)


def test_missing_provider_token(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    client = RawClient(simulator)
    try:
        assert client.wait(client.open(_headers(config, authorization=None))) == (
            403, "MissingProviderToken")
    finally:
        client.close()


def test_time_scale_ages_tokens(simulator_factory: SimulatorFactory) -> None:
    # A million times faster: the time to connect is already more than an hour.
    simulator, config = simulator_factory(time_scale=1e6)
    client = RawClient(simulator)
    try:
        assert client.wait(client.open(_headers(config))) == (403, "ExpiredProviderToken")
    finally:
        client.close()


def test_more_than_one_stream_before_a_valid_token_is_a_violation(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(latency=0.5)
    client = RawClient(simulator)
    try:
        first = client.open(_headers(config, 1))
        client.open(_headers(config, 2))
        client.wait(first)
        assert client.goaway is not None and client.goaway.error_code == 1  # PROTOCOL_ERROR
    finally:
        client.close()
    assert simulator.stream_limit_violations == 1


def test_exceeding_the_advertised_limit_is_a_violation(
        simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory(max_concurrent_streams=2)
    simulator.script(token(2), [ScriptedOutcome(action=Action.WITHHOLD)])
    simulator.script(token(3), [ScriptedOutcome(action=Action.WITHHOLD)])
    client = RawClient(simulator)
    try:
        assert client.wait(client.open(_headers(config, 1))) == (200, None)
        client.open(_headers(config, 2))
        client.open(_headers(config, 3))
        assert simulator.wait_for_requests(3, WAIT)
        assert simulator.stream_limit_violations == 0
        client.wait(client.open(_headers(config, 4)))
        assert client.goaway is not None
    finally:
        client.close()
    assert simulator.stream_limit_violations == 1
    assert simulator.max_concurrent_seen == 3


def test_scripts_are_consumed_in_order(simulator_factory: SimulatorFactory) -> None:
    simulator, config = simulator_factory()
    simulator.script(token(1), [ScriptedOutcome(500, "InternalServerError"),
                                ScriptedOutcome(429, "TooManyRequests")])
    with running_client(config) as client:
        answers = [client.send(token(1), str(uuid.uuid4())).result(WAIT).status
                   for _ in range(3)]
    assert answers == [500, 429, 200]


def test_embedded_simulator_works_and_cleans_up() -> None:
    simulator, config = embedded_simulator(TOPIC)
    try:
        assert config.credentials_given and config.url == simulator.url
        assert config.key_file is not None and config.key_file.stat().st_mode & 0o077 == 0
        with running_client(config) as client:
            assert client.send(token(1), str(uuid.uuid4())).result(WAIT).status == 200
    finally:
        simulator.stop()
    assert not simulator.workdir.exists()


def test_parse_outcomes() -> None:
    assert parse_outcomes("503:ServiceUnavailable,410:Unregistered:1700000000000,withhold,200"
                          ) == [ScriptedOutcome(503, "ServiceUnavailable"),
                                ScriptedOutcome(410, "Unregistered", 1_700_000_000_000),
                                ScriptedOutcome(action=Action.WITHHOLD),
                                ScriptedOutcome(200)]
    with pytest.raises(ValueError, match="STATUS"):
        parse_outcomes("soon")


def test_cli_serves_an_operators_configuration(tmp_path: Path) -> None:
    child, values = spawn(["--listen", "127.0.0.1:0", "--topic", TOPIC, "--generate-key",
                           "--workdir", str(tmp_path),
                           "--script", f"{token(2)}=410:Unregistered"], quiet_stderr=True)
    try:
        config = ApnsConfig(endpoint=values["endpoint"], ca_file=Path(values["ca_file"]),
                            topic=values["topic"], key_file=Path(values["key_file"]),
                            key_id=values["key_id"], team_id=values["team_id"])
        with running_client(config) as client:
            assert client.send(token(1), str(uuid.uuid4())).result(WAIT).status == 200
            assert client.send(token(2), str(uuid.uuid4())).result(WAIT).status == 410
    finally:
        child.terminate()
        assert child.wait(WAIT) == 0


def test_cli_tries_a_certificate_configuration(tmp_path: Path) -> None:
    authority = CertificateAuthority(tmp_path)
    sandbox = authority.issue_push_certificate("sandbox", TOPIC, ("sandbox",))
    production = authority.issue_push_certificate("production", TOPIC, ("production",))
    (tmp_path / "sim").mkdir()
    child, values = spawn(["--listen", "127.0.0.1:0", "--topic", TOPIC,
                           "--client-ca", str(authority.ca_file), "--environment", "sandbox",
                           "--workdir", str(tmp_path / "sim")], quiet_stderr=True)
    try:
        answers = []
        for cert in (sandbox, production):
            config = ApnsConfig(endpoint=values["endpoint"], ca_file=Path(values["ca_file"]),
                                topic=TOPIC, cert_file=cert.cert_file,
                                cert_key_file=cert.key_file)
            with running_client(config) as client:
                result = client.send(token(1), str(uuid.uuid4())).result(WAIT)
                answers.append((result.status, result.reason))
        assert answers == [(200, None), (403, "BadCertificateEnvironment")]
    finally:
        child.terminate()
        assert child.wait(WAIT) == 0
