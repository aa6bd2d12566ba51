"""The answer → verdict table against the §3 table of docs/apns.md, row by row."""

from __future__ import annotations

import pytest

from relay.apns.client import parse_error_body
from relay.apns.reasons import REASONS, Verdict, classify

A, B, C, D = Verdict.RELAY_BUG, Verdict.CONFIGURATION, Verdict.DEAD_TOKEN, Verdict.TRANSIENT

# Transcribed from docs/apns.md §3 (class column; where it offers two, the
# choice the relay makes, explained in reasons.py).
REFERENCE = [
    (400, "BadCollapseId", A),
    (400, "BadDeviceToken", C),
    (400, "BadExpirationDate", A),
    (400, "BadMessageId", A),
    (400, "BadPriority", A),
    (400, "BadTopic", B),
    (400, "DeviceTokenNotForTopic", C),
    (400, "DuplicateHeaders", A),
    (400, "IdleTimeout", D),
    (400, "InvalidPushType", A),
    (400, "MissingDeviceToken", A),
    (400, "MissingTopic", A),
    (400, "PayloadEmpty", A),
    (400, "TopicDisallowed", B),
    (403, "BadCertificate", B),
    (403, "BadCertificateEnvironment", B),
    (403, "ExpiredProviderToken", B),  # only after the client's one renewal
    (403, "Forbidden", B),
    (403, "InvalidProviderToken", B),
    (403, "MissingProviderToken", A),
    (403, "UnrelatedKeyIdInToken", B),
    (403, "BadEnvironmentKeyIdInToken", B),
    (403, "BadEnvironmentKeyInToken", B),
    (404, "BadPath", A),
    (405, "MethodNotAllowed", A),
    (410, "ExpiredToken", C),
    (410, "Unregistered", C),
    (413, "PayloadTooLarge", A),
    (429, "TooManyProviderTokenUpdates", A),
    (429, "TooManyRequests", D),
    (500, "InternalServerError", D),
    (503, "ServiceUnavailable", D),
    (503, "Shutdown", D),
]


@pytest.mark.parametrize(("status", "reason", "verdict"), REFERENCE)
def test_every_reference_reason_has_its_class(status: int, reason: str, verdict: Verdict) -> None:
    assert classify(status, reason) is verdict


def test_the_table_is_exactly_the_reference() -> None:
    assert {(s, r) for s, r, _ in REFERENCE} == set(REASONS)
    assert len(REFERENCE) == len(REASONS)


def test_a_dead_token_never_halts() -> None:
    assert classify(400, "BadDeviceToken") not in (Verdict.RELAY_BUG, Verdict.CONFIGURATION)


@pytest.mark.parametrize(("status", "reason", "verdict"), [
    (200, None, Verdict.DELIVERED),
    (None, "Timeout", Verdict.TRANSIENT),
    (None, "ConnectionLost", Verdict.TRANSIENT),
    (400, "SomethingNew", Verdict.RELAY_BUG),
    (410, "SomethingNew", Verdict.RELAY_BUG),
    (400, None, Verdict.RELAY_BUG),
    (403, "SomethingNew", Verdict.RELAY_BUG),
    (403, None, Verdict.CONFIGURATION),
    (403, "", Verdict.CONFIGURATION),
    (500, "SomethingNew", Verdict.TRANSIENT),
    (502, None, Verdict.TRANSIENT),
    (503, "SomethingNew", Verdict.TRANSIENT),
    (429, "Unregistered", Verdict.RELAY_BUG),  # a known reason under the wrong status
    (302, None, Verdict.RELAY_BUG),
])
def test_unknown_answers_follow_the_last_rule(status: int | None, reason: str | None,
                                              verdict: Verdict) -> None:
    assert classify(status, reason) is verdict


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"reason":"Unregistered","timestamp":1700000000123}', ("Unregistered", 1700000000123)),
    (b'{"reason":"Unregistered","timestamp":1700000000}', ("Unregistered", 1700000000000)),
    (b'{"reason":"Unregistered","timestamp":"1700000000123"}', ("Unregistered", 1700000000123)),
    (b'{"reason":"Unregistered","timestamp":-5}', ("Unregistered", None)),
    (b'{"reason":"Unregistered","timestamp":"soon"}', ("Unregistered", None)),
    (b'{"reason":"Unregistered","timestamp":true}', ("Unregistered", None)),
    (b'{"reason":"BadDeviceToken"}', ("BadDeviceToken", None)),
    (b'{"reason":42}', (None, None)),
    (b"[]", (None, None)),
    (b"not json", (None, None)),
    (b"", (None, None)),
])
def test_error_bodies_are_parsed_defensively(body: bytes,
                                             expected: tuple[str | None, int | None]) -> None:
    assert parse_error_body(body) == expected
