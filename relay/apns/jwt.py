"""The ES256 provider token (JWT) that authenticates token-based APNs connections.

Apple rejects a token whose `iat` is more than an hour old (ExpiredProviderToken)
and one that changes more than once per 20 minutes on a connection
(TooManyProviderTokenUpdates), so minting per request or per connection is
wrong. One token per process serves every connection; it is re-minted after a
jittered 40-50 minutes, never sooner than 20 minutes after the last one, under
a lock so concurrent callers never mint twice (docs/apns.md §5).
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

Clock = Callable[[], float]

# Refresh policy (seconds). Apple: at most once per 20 min, at least once per 60 min.
MIN_TOKEN_LIFETIME = 20 * 60  # never re-mint sooner: TooManyProviderTokenUpdates
REFRESH_AFTER_MIN = 40 * 60  # re-mint after a random age in [MIN, MAX] so a fleet of
REFRESH_AFTER_MAX = 50 * 60  # relays does not refresh in lockstep, well before 60 min


class KeyFileError(ValueError):
    """The .p8 signing key cannot be used; the message says why."""


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key from an Apple `.p8` file (PEM, PKCS#8)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the APNs key file {str(path)!r}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{str(path)!r} is not an unencrypted PEM private key (Apple's .p8): {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{str(path)!r} is not a P-256 (ES256) key as APNs requires")
    return key


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWS requires."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json_b64(value: dict[str, object]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def make_jwt(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, issued_at: int) -> str:
    """`header.claims.signature` with the raw 64-byte r‖s signature (never DER)."""
    header = _json_b64({"alg": "ES256", "kid": key_id})
    signing_input = header + "." + _json_b64({"iss": team_id, "iat": issued_at})
    der = key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


class ProviderToken:
    """The process's current JWT, re-minted on schedule; thread-safe."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        *,
        clock: Clock = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._key, self._key_id, self._team_id = key, key_id, team_id
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._token: str | None = None
        self._issued_at = 0.0
        self._refresh_at = 0.0
        self.minted = 0  # how many tokens this process has made (for tests and logs)

    def current(self) -> str:
        """The token to send now, minted first if none exists or it is due for refresh."""
        token = self._token
        if token is not None and self._clock() < self._refresh_at:
            return token  # the hot path: no lock
        with self._lock:  # single flight: whoever waited here finds the fresh token
            if self._token is None or self._clock() >= self._refresh_at:
                self._mint()
            assert self._token is not None
            return self._token

    def renew_rejected(self, rejected: str) -> str | None:
        """After APNs answered ExpiredProviderToken for `rejected`: the token to retry with.

        None when a new token would break the 20-minute rule: then the token is young
        by our clock, so the clock or the key is wrong and a new one would not help.
        """
        with self._lock:
            if self._token != rejected:
                return self._token  # someone already renewed it (or it was refreshed)
            if self._clock() - self._issued_at < MIN_TOKEN_LIFETIME:
                return None
            self._mint()
            return self._token

    def age(self) -> float:
        """Seconds since the current token was minted (0 before the first)."""
        return 0.0 if self._token is None else max(0.0, self._clock() - self._issued_at)

    def _mint(self) -> None:
        now = self._clock()
        if self._token is not None and now - self._issued_at < MIN_TOKEN_LIFETIME:
            return  # invariant, whatever the caller thinks: never within 20 minutes
        self._token = make_jwt(self._key, self._key_id, self._team_id, int(now))
        self._issued_at = now
        self._refresh_at = now + self._rng.uniform(REFRESH_AFTER_MIN, REFRESH_AFTER_MAX)
        self.minted += 1


_shared: dict[tuple[str, str, str, Clock], ProviderToken] = {}
_shared_lock = threading.Lock()


def shared_provider_token(
    key_file: Path, key_id: str, team_id: str, *, clock: Clock = time.time
) -> ProviderToken:
    """The one ProviderToken of this process for these credentials.

    Apple counts token changes per connection, so several clients in one process
    (e.g. a restarted supervisor component) must share one token, not mint their own.
    """
    ident = (str(Path(key_file).resolve()), key_id, team_id, clock)
    with _shared_lock:
        provider = _shared.get(ident)
        if provider is None:
            provider = ProviderToken(load_signing_key(key_file), key_id, team_id, clock=clock)
            _shared[ident] = provider
        return provider
