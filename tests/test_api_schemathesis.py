"""Schemathesis against the OpenAPI document the server serves, on the real Journal and Registry.

Positive and negative cases for every documented operation, validated by
schemathesis' checks (no server error, documented status codes, content types
and response schemas, schema-violating data rejected, valid data accepted).
Afterwards every 2xx registration must be in the event log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from api_stack import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from relay.config import Config, HttpConfig

EXAMPLES = 2000
HEX = "0123456789abcdefABCDEF"

# The document's Token also has a pattern; generating from the pattern is correct but
# ~10x slower than drawing even-length hex directly, which keeps this file under a minute.
schemathesis.openapi.format("apns-device-token", st.integers(8, 256).flatmap(
    lambda size: st.text(HEX, min_size=2 * size, max_size=2 * size)))
CONFIG = Config(http=HttpConfig(listen=("127.0.0.1", 0), rate_limit=0))


@pytest.fixture
def stack(dsn: str) -> Iterator[Stack]:
    stack = Stack(dsn, CONFIG)
    yield stack
    stack.stop()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(stack: Stack) -> None:
    # Refusing a too-large body (413) is a correct rejection of schema-violating data.
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": [400, 404, 405, 413, 415]}}})
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json", config=config)
    session = requests.Session()
    statuses: Counter[tuple[str, int]] = Counter()

    def run(cases: st.SearchStrategy[schemathesis.Case], examples: int) -> None:
        # One hypothesis run per operation and mode: many short runs generate much
        # faster than one long run over the union.
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=stack.base_url, session=session)
            statuses[(f"{case.method} {case.path}", response.status_code)] += 1
            assert response.status_code < 500
            if response.status_code == 200 and case.path.startswith("/devices"):
                body = response.json()
                stack.history.append(("register" if body["active"] else "unregister",
                                      body["token"]))

        check()

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/devices"):
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run(operation.as_strategy(generation_mode=mode), EXAMPLES // 4)
        else:
            run(operation.as_strategy(), 10)

    device_requests = sum(n for (label, _), n in statuses.items() if "/devices" in label)
    assert device_requests >= EXAMPLES
    for label in ("GET /config", "GET /health", "GET /metrics"):
        assert statuses[(label, 200)], statuses
    assert statuses[("POST /devices", 200)] and statuses[("POST /devices", 400)], statuses
    assert statuses[("DELETE /devices/{token}", 200)], statuses
    assert statuses[("DELETE /devices/{token}", 400)], statuses
    assert requests.get(f"{stack.base_url}/health", timeout=10).status_code == 200
    stack.assert_log_agrees_with_history()
