"""The device API over real sockets: answers, errors, limits, and the registry contract.

Most tests use an in-process registry double (a thread applying requests to a
dict, which can be switched to "database down"); the tests at the end run the
real Journal and Registry on real PostgreSQL.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import schemathesis
from test_journal import Proxy

import relay
from actors.registry import RegistryHandle
from events.journal import Journal
from events.store import LogReader
from relay.api import ApiServer, openapi_document
from relay.config import ApnsConfig, Config, HttpConfig

TOKEN = "0A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8F9"
JSON = {"Content-Type": "application/json"}
BASE_CONFIG = Config(
    http=HttpConfig(listen=("127.0.0.1", 0), rate_limit=0),
    apns=ApnsConfig(topic="org.example.wallet", environment="sandbox"),
)


class ThreadRegistry:
    """A real DeviceRegistry double: its own thread 'commits' requests into a dict.

    `database_down()` makes the thread hold requests uncommitted (their futures
    stay pending) until `database_up()`, as a Journal does while PostgreSQL is away.
    """

    def __init__(self) -> None:
        self.active: dict[str, bool] = {}
        self.submitted: list[tuple[str, str]] = []
        self._changed = threading.Condition()
        self._committing = threading.Event()
        self._committing.set()
        self._queue: list[tuple[str, bool, Future[None]] | None] = []
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()
        self.fail_on_submit = False

    def register(self, token: str) -> Future[None]:
        return self._submit("register", token, True)

    def unregister(self, token: str) -> Future[None]:
        return self._submit("unregister", token, False)

    def _submit(self, op: str, token: str, active: bool) -> Future[None]:
        if self.fail_on_submit:
            raise RuntimeError("registry actor is dead")
        future: Future[None] = Future()
        with self._changed:
            self.submitted.append((op, token))
            self._queue.append((token, active, future))
            self._changed.notify_all()
        return future

    def wait_submitted(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.submitted) >= count, timeout=10)

    def database_down(self) -> None:
        self._committing.clear()

    def database_up(self) -> None:
        self._committing.set()

    def close(self) -> None:
        self.database_up()
        with self._changed:
            self._queue.append(None)
            self._changed.notify_all()
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue))
                item = self._queue.pop(0)
            if item is None:
                return
            self._committing.wait()
            token, active, future = item
            self.active[token] = active
            future.set_result(None)


class Health:
    def __init__(self) -> None:
        self.database = True
        self.worker = True
        self.broken = False

    def database_available(self) -> bool:
        if self.broken:
            raise RuntimeError("health source bug")
        return self.database

    def worker_alive(self) -> bool:
        return self.worker


class Client:
    """Plain http.client against a started server; one keep-alive connection per call site."""

    def __init__(self, address: tuple[str, int], source: str | None = None) -> None:
        self.address = address
        self._source = None if source is None else (source, 0)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, Any]:
        conn = http.client.HTTPConnection(*self.address, timeout=30,
                                          source_address=self._source)
        try:
            conn.request(method, path, body, headers or {})
            response = conn.getresponse()
            raw = response.read()
            content_type = response.getheader("Content-Type", "")
            data: Any = json.loads(raw) if content_type.startswith("application/json") else raw
            return response.status, response.headers, data
        finally:
            conn.close()

    def register(self, token: str, headers: dict[str, str] | None = None
                 ) -> tuple[int, http.client.HTTPMessage, Any]:
        return self.request("POST", "/devices", json.dumps({"token": token}),
                            {**JSON, **(headers or {})})

    def unregister(self, token: str, headers: dict[str, str] | None = None
                   ) -> tuple[int, http.client.HTTPMessage, Any]:
        return self.request("DELETE", f"/devices/{token}", headers=headers)


def assert_error(answer: tuple[int, http.client.HTTPMessage, Any], status: int,
                 code: str | None = None) -> dict[str, str]:
    got, headers, body = answer
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and set(body) >= {"code", "hint"}, body
    assert isinstance(body["code"], str) and body["hint"], body
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.fixture(scope="module")
def doubles() -> Iterator[tuple[ThreadRegistry, Health]]:
    registry = ThreadRegistry()
    yield registry, Health()
    registry.close()


@pytest.fixture(scope="module")
def shared(doubles: tuple[ThreadRegistry, Health]) -> Iterator[ApiServer]:
    registry, health = doubles
    server = ApiServer(BASE_CONFIG, registry, health)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def registry(doubles: tuple[ThreadRegistry, Health]) -> Iterator[ThreadRegistry]:
    yield doubles[0]
    doubles[0].database_up()
    doubles[0].fail_on_submit = False


@pytest.fixture
def health(doubles: tuple[ThreadRegistry, Health]) -> Iterator[Health]:
    health = doubles[1]
    yield health
    health.database = health.worker = True
    health.broken = False


@pytest.fixture
def client(shared: ApiServer) -> Client:
    return Client(shared.bound_address)


ServerFactory = Callable[..., tuple[ApiServer, ThreadRegistry, Health]]


@pytest.fixture
def make_server() -> Iterator[ServerFactory]:
    """A server of the test's own, with some http settings changed."""
    started: list[tuple[ApiServer, ThreadRegistry]] = []

    def make(**http: Any) -> tuple[ApiServer, ThreadRegistry, Health]:
        config = replace(BASE_CONFIG, http=replace(BASE_CONFIG.http, **http))
        registry, health = ThreadRegistry(), Health()
        server = ApiServer(config, registry, health)
        server.start()
        started.append((server, registry))
        return server, registry, health

    yield make
    for server, registry in started:
        server.stop()
        registry.close()


def raw_exchange(address: tuple[str, int], data: bytes, *, timeout: float = 10) -> bytes:
    """Send bytes, read until the server closes or the timeout; for what http.client can't."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    return int(lines[0].split()[1]), headers, json.loads(body)


# --- POST /devices and DELETE /devices/<token> -----------------------------------------


def test_register_stores_the_token_in_lower_case(client: Client,
                                                 registry: ThreadRegistry) -> None:
    status, _, body = client.register(TOKEN)
    assert status == 200
    assert body == {"token": TOKEN.lower(), "active": True}
    assert registry.active[TOKEN.lower()] is True


def test_register_and_unregister_are_idempotent(client: Client,
                                                registry: ThreadRegistry) -> None:
    token = "ab" * 32
    assert [client.register(token)[0] for _ in range(3)] == [200, 200, 200]
    assert registry.active[token] is True
    for _ in range(3):
        status, _, body = client.unregister(token.upper())
        assert (status, body) == (200, {"token": token, "active": False})
    assert registry.active[token] is False
    status, _, body = client.unregister("cd" * 8)  # never registered: same answer
    assert (status, body) == (200, {"token": "cd" * 8, "active": False})


def test_the_answer_waits_for_the_commit(client: Client, registry: ThreadRegistry) -> None:
    token = "12" * 40
    registry.database_down()  # requests reach the registry but are not committed
    before = len(registry.submitted)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.register, token)
        registry.wait_submitted(before + 1)
        assert not answer.done()
        assert token not in registry.active
        registry.database_up()
        assert answer.result(timeout=10)[0] == 200
    assert registry.active[token] is True


@pytest.mark.parametrize("token, why", [
    ("abc", "even number"),
    ("zz" * 16, "only hex"),
    ("ab" * 7, "8 to 256 bytes"),
    ("ab" * 257, "8 to 256 bytes"),
    ("", "empty"),
    (12345678901234567890, "string"),
    (None, "string"),
    (["ab" * 16], "string"),
])
def test_register_refuses_bad_tokens_with_the_reason(client: Client, token: object,
                                                     why: str) -> None:
    answer = client.request("POST", "/devices", json.dumps({"token": token}), JSON)
    assert why in assert_error(answer, 400, "invalid_token")["hint"]


@pytest.mark.parametrize("path_token", ["abc", "zz" * 16, "ab" * 7, "ab" * 257, "%C3%A9" * 8])
def test_unregister_refuses_bad_tokens(client: Client, path_token: str) -> None:
    assert_error(client.request("DELETE", f"/devices/{path_token}"), 400, "invalid_token")


@pytest.mark.parametrize("body, code, hint", [
    (b'{"token": "abab', "malformed_json", "JSON"),
    (b"", "malformed_json", "JSON"),
    (b"\xff\xfe\x00", "malformed_json", "JSON"),
    (b'["abababababababababababababababab"]', "invalid_body", "object"),
    (b'"abababababababababababababababab"', "invalid_body", "object"),
    (b"null", "invalid_body", "object"),
    (b"{}", "invalid_body", "missing field: token"),
    (b'{"tok": "abababababababababababababababab"}', "invalid_body", "missing field"),
    (b'{"token": "abababababababababababababababab", "extra": 1}', "invalid_body", '"extra"'),
    (b'{"token": "abababababababababababababababab", "token": "cdcdcdcdcdcdcdcd"}',
     "invalid_body", "duplicate"),
])
def test_register_refuses_bad_bodies(client: Client, registry: ThreadRegistry,
                                     body: bytes, code: str, hint: str) -> None:
    before = len(registry.submitted)
    error = assert_error(client.request("POST", "/devices", body, JSON), 400, code)
    assert hint in error["hint"]
    assert len(registry.submitted) == before


def test_deeply_nested_json_is_a_client_error(client: Client, registry: ThreadRegistry) -> None:
    """2,000 nested arrays: a RecursionError before Python 3.13, a parsed array since; 400 both."""
    before = len(registry.submitted)
    error = assert_error(client.request("POST", "/devices", b"[" * 2000 + b"]" * 2000, JSON), 400)
    assert error["code"] in {"malformed_json", "invalid_body"}
    assert len(registry.submitted) == before


@pytest.mark.parametrize("headers", [
    {},
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/jsonx"},
])
def test_register_refuses_other_content_types(client: Client, headers: dict[str, str]) -> None:
    body = json.dumps({"token": TOKEN})
    assert_error(client.request("POST", "/devices", body, headers), 415, "unsupported_media_type")


def test_register_accepts_json_with_a_charset(client: Client) -> None:
    status, _, _ = client.register(TOKEN, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_a_body_over_max_body_is_refused_by_its_declared_length(client: Client) -> None:
    body = json.dumps({"token": "ab" * 256}) + " " * 4096
    assert_error(client.request("POST", "/devices", body, JSON), 413, "body_too_large")


def test_a_chunked_body_is_refused_while_reading_without_waiting_for_its_end(
        shared: ApiServer) -> None:
    # 5000 bytes in one chunk and the body never finished: the answer must come anyway,
    # so the server stopped reading at max_body instead of buffering to the end.
    chunk = b"x" * 5000
    request = (b"POST /devices HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(chunk):x}\r\n".encode() + chunk
               + b"\r\n")
    with socket.create_connection(shared.bound_address, timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            assert data, answer
            answer += data
    status, _, body = parse_raw(answer)
    assert (status, body["code"]) == (413, "body_too_large")


# --- routing errors, and JSON on every error -------------------------------------------


@pytest.mark.parametrize("path", ["/", "/device", "/devices/", "/devices/ab/cd", "/metrics/x"])
def test_unknown_paths_are_404_json(client: Client, path: str) -> None:
    assert_error(client.request("GET", path), 404, "not_found")


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/devices", "POST"),
    ("PUT", "/devices", "POST"),
    ("GET", f"/devices/{TOKEN}", "DELETE"),
    ("POST", f"/devices/{TOKEN}", "DELETE"),
    ("POST", "/config", "GET"),
    ("DELETE", "/health", "GET"),
])
def test_wrong_methods_are_405_with_allow(client: Client, method: str, path: str,
                                          allow: str) -> None:
    answer = client.request(method, path)
    assert_error(answer, 405, "method_not_allowed")
    assert answer[1]["Allow"] == allow


def test_requests_that_are_not_http_get_a_json_400(shared: ApiServer) -> None:
    status, headers, body = parse_raw(raw_exchange(shared.bound_address,
                                                   b"HELLO /devices WORLD\r\n\r\n"))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert body["code"] == "bad_request"


def test_oversized_headers_get_a_json_error(shared: ApiServer) -> None:
    request = b"GET /config HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    status, headers, body = parse_raw(raw_exchange(shared.bound_address, request))
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    assert set(body) == {"code", "hint"}


def test_an_internal_error_is_a_json_500(client: Client, health: Health) -> None:
    health.broken = True
    assert_error(client.request("GET", "/health"), 500, "internal_error")


# --- the database away: 503, never 2xx -------------------------------------------------


def test_database_unavailable_is_503_with_retry_after_and_nothing_submitted(
        client: Client, registry: ThreadRegistry, health: Health) -> None:
    health.database = False
    before = len(registry.submitted)
    for answer in (client.register(TOKEN), client.unregister(TOKEN)):
        assert_error(answer, 503, "database_unavailable")
        assert int(answer[1]["Retry-After"]) >= 1
    assert len(registry.submitted) == before


def test_a_commit_that_does_not_come_in_time_is_503(make_server: ServerFactory) -> None:
    server, registry, _ = make_server(request_timeout=0.2)
    registry.database_down()
    client = Client(server.bound_address)
    for answer in (client.register(TOKEN), client.unregister(TOKEN)):
        assert_error(answer, 503, "commit_timeout")
        assert int(answer[1]["Retry-After"]) >= 1
    assert registry.submitted == [("register", TOKEN.lower()), ("unregister", TOKEN.lower())]
    assert registry.active == {}


def test_a_registry_that_refuses_work_is_503(client: Client, registry: ThreadRegistry) -> None:
    registry.fail_on_submit = True
    assert_error(client.register(TOKEN), 503, "registry_unavailable")


# --- operator endpoints ------------------------------------------------------------------


def test_config_names_the_relay_and_what_it_serves(client: Client) -> None:
    status, _, body = client.request("GET", "/config")
    assert status == 200
    assert body == {"name": "apns-relay", "version": relay.__version__,
                    "topic": "org.example.wallet", "environment": "sandbox",
                    "endpoint": "https://api.sandbox.push.apple.com"}


def test_health_is_200_only_with_database_and_worker(client: Client, health: Health) -> None:
    status, _, body = client.request("GET", "/health")
    assert (status, body) == (200, {"status": "ok", "database": True, "worker": True})
    health.worker = False
    body = assert_error(client.request("GET", "/health"), 503, "unhealthy")
    assert (body["database"], body["worker"]) == (True, False)
    assert "worker" in body["hint"]
    health.database, health.worker = False, True
    body = assert_error(client.request("GET", "/health"), 503, "unhealthy")
    assert (body["database"], body["worker"]) == (False, True)
    assert "database" in body["hint"]


def test_metrics_are_prometheus_text_on_the_public_listener_by_default(client: Client) -> None:
    status, headers, body = client.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in ("relay_devices_registered", "relay_registrations_total",
                 "relay_apns_sends_in_flight", "relay_event_append_latency_seconds_bucket",
                 "relay_circuit_breaker_open"):
        assert name in text


def test_metrics_listen_moves_metrics_off_the_public_listener(
        make_server: ServerFactory) -> None:
    server, _, _ = make_server(metrics_listen=("127.0.0.1", 0))
    assert server.metrics_address is not None
    assert server.metrics_address != server.bound_address
    public, private = Client(server.bound_address), Client(server.metrics_address)
    assert_error(public.request("GET", "/metrics"), 404, "not_found")
    status, _, body = private.request("GET", "/metrics")
    assert status == 200 and b"relay_registrations_total" in body
    assert_error(private.register(TOKEN), 404, "not_found")
    assert public.register(TOKEN)[0] == 200


# --- the OpenAPI document -----------------------------------------------------------------


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in methods}


def test_the_served_document_is_the_shipped_valid_openapi_3(client: Client) -> None:
    status, _, served = client.request("GET", "/openapi.json")
    assert status == 200
    shipped = json.loads(openapi_document())
    assert served == shipped
    assert shipped == json.loads(
        (Path(relay.__file__).parent / "openapi.json").read_text(encoding="utf-8"))
    assert shipped["openapi"].startswith("3.")
    assert shipped["info"]["version"] == relay.__version__
    schemathesis.openapi.from_dict(shipped).validate()  # raises on any schema violation


def test_every_route_is_documented_and_every_documented_route_served(
        shared: ApiServer, make_server: ServerFactory) -> None:
    documented = documented_operations(json.loads(openapi_document()))
    assert shared.routes == documented
    split, _, _ = make_server(metrics_listen=("127.0.0.1", 0))
    assert split.routes == documented


def test_documented_operations_answer_over_the_wire(client: Client) -> None:
    for method, path in documented_operations(json.loads(openapi_document())):
        status, _, _ = client.request(method, path.replace("{token}", TOKEN),
                                      json.dumps({"token": TOKEN}), JSON)
        assert status not in (404, 405), (method, path)


# --- abuse: connections, slow clients, rate limits ---------------------------------------


def test_connections_beyond_max_connections_get_503_until_one_closes(
        make_server: ServerFactory) -> None:
    server, _, _ = make_server(max_connections=2)
    held = []
    for _ in range(2):  # two keep-alive connections, proven established by an answer
        conn = http.client.HTTPConnection(*server.bound_address, timeout=10)
        conn.request("GET", "/config")
        assert conn.getresponse().read()
        held.append(conn)
    status, headers, body = parse_raw(raw_exchange(server.bound_address,
                                                   b"GET /config HTTP/1.1\r\nHost: t\r\n\r\n"))
    assert (status, body["code"]) == (503, "overloaded")
    assert int(headers["retry-after"]) >= 1
    held.pop().close()
    deadline = time.monotonic() + 10  # the server sees the close asynchronously
    while Client(server.bound_address).request("GET", "/config")[0] != 200:
        assert time.monotonic() < deadline, "a freed slot was never reused"
    for conn in held:
        conn.close()


def test_a_slow_body_is_cut_off_with_408(make_server: ServerFactory) -> None:
    server, registry, _ = make_server(request_timeout=0.3)
    with socket.create_connection(server.bound_address, timeout=10) as sock:
        sock.sendall(b"POST /devices HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"token\": ")
        status, _, body = parse_raw(read_until_closed(sock))  # returns: the server closed
    assert (status, body["code"]) == (408, "request_timeout")
    assert registry.submitted == []


def test_silent_clients_and_unfinished_heads_are_disconnected(
        make_server: ServerFactory) -> None:
    server, _, _ = make_server(request_timeout=0.3)
    with socket.create_connection(server.bound_address, timeout=10) as silent:
        assert read_until_closed(silent) == b""
    with socket.create_connection(server.bound_address, timeout=10) as unfinished:
        unfinished.sendall(b"GET /config HTTP/1.1\r\nHost: t\r\nX-A: b")
        assert read_until_closed(unfinished) == b""


def test_device_requests_are_rate_limited_per_client_with_retry_after(
        make_server: ServerFactory) -> None:
    server, registry, _ = make_server(rate_limit=0.1, rate_burst=2)
    one = Client(server.bound_address, source="127.0.0.1")
    assert one.register(TOKEN)[0] == 200
    assert one.unregister(TOKEN)[0] == 200
    for answer in (one.register(TOKEN), one.unregister(TOKEN),
                   one.request("POST", "/devices", b"garbage", JSON)):
        assert_error(answer, 429, "rate_limited")
        assert int(answer[1]["Retry-After"]) >= 1
    assert len(registry.submitted) == 2
    assert one.request("GET", "/config")[0] == 200  # operator endpoints are not limited
    other = Client(server.bound_address, source="127.0.0.2")
    assert other.register(TOKEN)[0] == 200


def test_behind_a_proxy_the_last_hop_of_the_header_is_the_client(
        make_server: ServerFactory) -> None:
    server, _, _ = make_server(rate_limit=0.1, rate_burst=1, client_ip_header="X-Forwarded-For")
    client = Client(server.bound_address)

    def register_as(forwarded: str) -> int:
        return client.register(TOKEN, {"X-Forwarded-For": forwarded})[0]

    assert register_as("203.0.113.7") == 200
    # A client cannot escape its bucket by prepending addresses of its own.
    assert register_as("198.51.100.1, 203.0.113.7") == 429
    assert register_as("198.51.100.1,203.0.113.8") == 200
    assert client.register(TOKEN)[0] == 200  # no header: the peer address
    assert client.register(TOKEN)[0] == 429


# --- logs ------------------------------------------------------------------------------------


def test_full_tokens_never_reach_the_logs(client: Client, registry: ThreadRegistry,
                                          caplog: pytest.LogCaptureFixture) -> None:
    token = "fe" * 32
    with caplog.at_level(logging.DEBUG):
        client.register(token)
        client.unregister(token.upper())
        client.request("GET", f"/devices/{token}")
        registry.fail_on_submit = True
        client.register(token)
    assert any("relay.api" in record.name for record in caplog.records)
    assert token not in caplog.text.lower()
    assert token[:8] in caplog.text


# --- lifecycle ---------------------------------------------------------------------------------


def test_start_raises_when_the_address_is_taken(shared: ApiServer,
                                                doubles: tuple[ThreadRegistry, Health]) -> None:
    config = replace(BASE_CONFIG, http=replace(BASE_CONFIG.http, listen=shared.bound_address))
    with pytest.raises(OSError):
        ApiServer(config, *doubles).start()


def test_stop_closes_the_listener(make_server: ServerFactory) -> None:
    server, _, _ = make_server()
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(server.bound_address, timeout=5).close()


# --- real Journal + Registry on real PostgreSQL --------------------------------------------


class JournalHealth:
    """/health as the supervisor answers it, from the Journal alone (no wakeup worker)."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def database_available(self) -> bool:
        return self._journal.database_available

    def worker_alive(self) -> bool:
        return True


@pytest.fixture
def real_server(dsn: str) -> Iterator[ApiServer]:

    journal = Journal(dsn)
    journal.start()
    registry = RegistryHandle.start(journal, LogReader(dsn), BASE_CONFIG.registry)

    server = ApiServer(BASE_CONFIG, registry, JournalHealth(journal))
    server.start()
    yield server
    server.stop()
    registry.stop(timeout=10)
    journal.stop(timeout=10)


def test_a_2xx_registration_is_committed_to_the_event_log(real_server: ApiServer,
                                                          dsn: str) -> None:
    client = Client(real_server.bound_address)
    assert client.register(TOKEN)[0] == 200
    with psycopg.connect(dsn) as conn:  # no waiting: 200 means committed
        rows = conn.execute("SELECT type, token FROM events ORDER BY position").fetchall()
    assert rows == [("device_registered", TOKEN.lower())]
    assert client.unregister(TOKEN)[0] == 200
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT type, token FROM events ORDER BY position").fetchall()
    assert rows[1:] == [("device_unregistered", TOKEN.lower())]


def test_registrations_are_counted_in_metrics(real_server: ApiServer) -> None:
    client = Client(real_server.bound_address)

    def counter(name: str) -> float:
        text = client.request("GET", "/metrics")[2].decode()
        lines = [line for line in text.splitlines() if line.startswith(name + " ")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    registered = counter("relay_registrations_total")
    unregistered = counter('relay_unregistrations_total{cause="api"}')
    assert client.register("77" * 32)[0] == 200
    assert client.unregister("77" * 32)[0] == 200
    assert counter("relay_registrations_total") == registered + 1
    assert counter('relay_unregistrations_total{cause="api"}') == unregistered + 1


def test_a_full_registry_mailbox_is_503_with_retry_after(dsn: str) -> None:
    """Reads of the log cut off (a proxy), the one slot held by an unregistration waiting
    for its read: the next one is refused at once, not queued behind it."""
    proxy = Proxy(dsn)
    journal = Journal(dsn)
    journal.start()
    reader = LogReader(proxy.dsn)
    registry = RegistryHandle.start(journal, reader, BASE_CONFIG.registry, mailbox=1)

    server = ApiServer(BASE_CONFIG, registry, JournalHealth(journal))
    server.start()
    try:
        client = Client(server.bound_address)
        assert client.register(TOKEN)[0] == 200
        proxy.cut()
        held = registry.unregister(TOKEN)
        started = time.monotonic()
        answer = client.unregister("78" * 32)
        assert time.monotonic() - started < 1.0
        body = assert_error(answer, 503, "registry_busy")
        assert int(answer[1]["Retry-After"]) >= 1, body
        assert client.register("79" * 32)[0] == 200  # registrations never wait in it
        proxy.restore()
        held.result(10)
        assert client.unregister("78" * 32)[0] == 200
    finally:
        server.stop()
        registry.stop(timeout=10)
        journal.stop(timeout=10)
        reader.close()
        proxy.close()
