"""The provider token: its encoding, and Apple's refresh rules on an injectable clock."""

from __future__ import annotations

import base64
import itertools
import json
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.apns.jwt import (
    MIN_TOKEN_LIFETIME,
    REFRESH_AFTER_MAX,
    REFRESH_AFTER_MIN,
    KeyFileError,
    ProviderToken,
    load_signing_key,
    make_jwt,
    shared_provider_token,
)
from relay.simulator.credentials import write_signing_key

T0 = 1_700_000_000.0
MINUTE = 60.0
_KEY = ec.generate_private_key(ec.SECP256R1())  # for hypothesis, which runs without fixtures


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _decode(part: str) -> bytes:
    assert "=" not in part, "JWT parts carry no padding"
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _issued_at(jwt: str) -> int:
    return int(json.loads(_decode(jwt.split(".")[1]))["iat"])


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_jwt_has_apples_shape_and_a_raw_signature(key: ec.EllipticCurvePrivateKey) -> None:
    jwt = make_jwt(key, "KEYID12345", "TEAMID1234", 1_700_000_123)
    header, claims, signature = jwt.split(".")
    assert json.loads(_decode(header)) == {"alg": "ES256", "kid": "KEYID12345"}
    assert json.loads(_decode(claims)) == {"iss": "TEAMID1234", "iat": 1_700_000_123}
    raw = _decode(signature)
    assert len(raw) == 64, "r||s, never DER"
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))


def test_one_token_until_the_refresh_age(key: ec.EllipticCurvePrivateKey) -> None:
    clock = FakeClock()
    provider = ProviderToken(key, "KEYID12345", "TEAMID1234", clock=clock)
    first = provider.current()
    assert _issued_at(first) == int(T0)
    for minutes in (1, 19, 20, 39.9):
        clock.now = T0 + minutes * MINUTE
        assert provider.current() is first
    clock.now = T0 + REFRESH_AFTER_MAX
    second = provider.current()
    assert second != first and _issued_at(second) == int(clock.now)
    assert provider.minted == 2
    assert provider.age() == 0


def test_refresh_age_is_jittered_between_40_and_50_minutes(
        key: ec.EllipticCurvePrivateKey) -> None:
    ages = set()
    for _ in range(20):
        clock = FakeClock()
        provider = ProviderToken(key, "KEYID12345", "TEAMID1234", clock=clock)
        first = provider.current()
        clock.now = T0 + REFRESH_AFTER_MIN - 1
        assert provider.current() is first
        step = 0.0
        while provider.current() is first:
            step += 10
            clock.now = T0 + REFRESH_AFTER_MIN + step
        ages.add(step)
        assert REFRESH_AFTER_MIN + step <= REFRESH_AFTER_MAX + 10
    assert len(ages) > 1, "every relay refreshing at the same age would refresh in lockstep"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=30 * MINUTE), min_size=1, max_size=40),
       st.lists(st.booleans(), min_size=40, max_size=40))
def test_never_reminted_within_20_minutes(steps: list[float], rejections: list[bool]) -> None:
    """Whatever the sequence of uses and ExpiredProviderToken rejections, mints are 20+ min
    apart."""
    clock = FakeClock()
    provider = ProviderToken(_KEY, "KEYID12345", "TEAMID1234", clock=clock)
    issued = [_issued_at(provider.current())]
    for step, rejected in zip(steps, rejections, strict=False):
        clock.now += step
        token = provider.current()
        if rejected:
            token = provider.renew_rejected(token) or token
        if _issued_at(token) != issued[-1]:
            issued.append(_issued_at(token))
    assert all(b - a >= MIN_TOKEN_LIFETIME for a, b in itertools.pairwise(issued))


def test_renewal_after_rejection_respects_the_20_minute_floor(
        key: ec.EllipticCurvePrivateKey) -> None:
    clock = FakeClock()
    provider = ProviderToken(key, "KEYID12345", "TEAMID1234", clock=clock)
    first = provider.current()
    clock.now = T0 + 19 * MINUTE
    assert provider.renew_rejected(first) is None, "a young token is not replaced"
    clock.now = T0 + 21 * MINUTE
    renewed = provider.renew_rejected(first)
    assert renewed is not None and renewed != first
    assert provider.renew_rejected(first) == renewed, "a second rejection of the old token "
    "reuses the renewal instead of minting again"
    assert provider.minted == 2


def test_regeneration_is_single_flight(key: ec.EllipticCurvePrivateKey) -> None:
    clock = FakeClock()
    provider = ProviderToken(key, "KEYID12345", "TEAMID1234", clock=clock)
    provider.current()
    clock.now = T0 + REFRESH_AFTER_MAX + 1
    start = threading.Barrier(16)
    seen: list[str] = []

    def use() -> None:
        start.wait()
        seen.append(provider.current())

    threads = [threading.Thread(target=use) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert provider.minted == 2
    assert len(set(seen)) == 1


def test_shared_provider_token_is_one_per_process(tmp_path: Path) -> None:
    key_file, _ = write_signing_key(tmp_path, "KEYID12345")
    clock = FakeClock()
    first = shared_provider_token(key_file, "KEYID12345", "TEAMID1234", clock=clock)
    again = shared_provider_token(key_file, "KEYID12345", "TEAMID1234", clock=clock)
    assert first is again
    assert first.current() == again.current()


def test_key_file_must_be_a_p256_pkcs8_key(tmp_path: Path) -> None:
    good, _ = write_signing_key(tmp_path, "KEYID12345")
    assert isinstance(load_signing_key(good).curve, ec.SECP256R1)
    p384 = tmp_path / "p384.p8"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(KeyFileError, match="P-256"):
        load_signing_key(p384)
    garbage = tmp_path / "garbage.p8"
    garbage.write_text("not a key")
    with pytest.raises(KeyFileError, match="PEM"):
        load_signing_key(garbage)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_signing_key(tmp_path / "missing.p8")
