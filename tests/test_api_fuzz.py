"""Generated requests against the device API on the real Journal and Registry.

Two generators, each with a server and database of its own: our own hypothesis strategies
(an oracle predicts every status), and schemathesis driven by the OpenAPI
document the server serves. Neither may ever see a 5xx, and afterwards every
2xx registration must be in the event log, with each token's last accepted
request deciding whether its last event registers or unregisters it.
"""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from api_stack import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Config, HttpConfig
from relay.tokens import InvalidToken, normalize_token

EXAMPLES = 2000
MAX_BODY = 4096
CONFIG = Config(http=HttpConfig(listen=("127.0.0.1", 0), rate_limit=0, max_body=MAX_BODY))
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))

HEX = "0123456789abcdefABCDEF"
# A small pool, so that registrations and unregistrations of one token interleave.
POOL = [f"{0xA0 + i:02X}" * (8 + i) for i in range(12)]


@pytest.fixture
def stack(dsn: str) -> Iterator[Stack]:
    # Per test, not per module: conftest stops every actor after each test.
    stack = Stack(dsn, CONFIG)
    yield stack
    stack.stop()


# --- our own generator, with an oracle --------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10,
)
valid_tokens = st.integers(8, 48).flatmap(lambda n: st.text(HEX, min_size=2 * n, max_size=2 * n))
tokenish = st.one_of(
    st.sampled_from(POOL), valid_tokens, st.text(HEX, max_size=600), st.text(max_size=80),
    st.integers(), st.none(), st.booleans(), st.floats(), st.lists(st.sampled_from(POOL)),
)
extra_fields = st.dictionaries(st.text(max_size=8).filter(lambda key: key != "token"),
                               json_values, min_size=1, max_size=3)
bodies = st.one_of(
    tokenish.map(lambda token: json.dumps({"token": token}).encode()),
    st.builds(lambda token, extra: json.dumps({"token": token, **extra}).encode(),
              tokenish, extra_fields),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=300),
    st.text(HEX, max_size=40).map(lambda token: f'{{"token": "{token}"'.encode()),
    st.integers(2000, 4000).map(lambda n: b'{"token": "' + b"ab" * n + b'"}'),
)
content_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/JSON", None,
    "text/plain", "application/x-www-form-urlencoded", "application/json-patch+json", "*/*",
])
device_requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/devices"), bodies, content_types),
    st.tuples(st.just("DELETE"), tokenish.map(lambda token: "/devices/" + quote(str(token),
                                                                                safe="")),
              st.just(b""), st.none()),
    st.tuples(st.sampled_from(["GET", "PUT", "PATCH"]),
              st.sampled_from(["/devices", f"/devices/{POOL[0]}"]), bodies, content_types),
)


def expected_post(body: bytes, content_type: str | None) -> tuple[int, str | None]:
    """What POST /devices must answer, and the stored token on success."""
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        return 415, None
    if len(body) > MAX_BODY:
        return 413, None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return 400, None
    if not isinstance(document, dict) or set(document) != {"token"}:
        return 400, None
    try:
        return 200, normalize_token(document["token"])
    except InvalidToken:
        return 400, None


class Connection:
    """One keep-alive connection, reopened whenever the server closes it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._address = address
        self._conn = http.client.HTTPConnection(*address, timeout=30)

    def request(self, method: str, path: str, body: bytes,
                content_type: str | None) -> tuple[int, Any]:
        headers = {} if content_type is None else {"Content-Type": content_type}
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body, headers)
                response = self._conn.getresponse()
                data = response.read()
                if response.getheader("Connection", "").lower() == "close":
                    self._conn.close()
                return response.status, (data, response.getheader("Content-Type", ""))
            except (http.client.HTTPException, ConnectionError):
                self._conn.close()  # the server closed the idle connection: retry once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def test_generated_device_requests_get_exactly_the_expected_answers(stack: Stack) -> None:
    connection = Connection(stack.server.bound_address)
    statuses: Counter[int] = Counter()

    @FUZZ_SETTINGS
    @given(request=device_requests)
    def check(request: tuple[str, str, bytes, str | None]) -> None:
        method, path, body, content_type = request
        status, (raw, answer_type) = connection.request(method, path, body, content_type)
        statuses[status] += 1
        assert status < 500, raw
        answer = json.loads(raw) if answer_type.startswith("application/json") else None
        if status >= 400:
            assert isinstance(answer, dict) and set(answer) == {"code", "hint"}, raw
        if method == "POST":
            expected, token = expected_post(body, content_type)
            assert status == expected, (raw, body[:200], content_type)
            if token is not None:
                assert answer == {"token": token, "active": True}
                stack.history.append(("register", token))
        elif method == "DELETE":
            if status == 200:
                assert answer["active"] is False
                stack.history.append(("unregister", normalize_token(answer["token"])))
            else:
                assert status in (400, 404), raw
        else:
            assert status == 405, raw

    check()
    assert sum(statuses.values()) >= EXAMPLES
    assert {200, 400, 405, 413, 415} <= set(statuses), statuses
    stack.assert_log_agrees_with_history()
