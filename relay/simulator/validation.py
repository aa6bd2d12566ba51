"""Apple's rules for one request, as plain functions (docs/apns.md §2, §5).

The simulator answers the way APNs does when a request breaks a rule; the order
of the checks is ours (Apple does not document it). `BadPayload` (JSON that is
not an object) is not one of Apple's documented reasons: the relay's table
treats it, like any unknown 4xx, as a relay bug.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from relay.simulator.credentials import ENVIRONMENT_OIDS

MAX_PAYLOAD = 4096  # bytes, for every push type the relay sends
JWT_MAX_AGE = 3600  # seconds: older `iat` is ExpiredProviderToken
JWT_MIN_CHANGE_INTERVAL = 1200  # seconds: faster changes on a connection are rejected
PUSH_TYPES = frozenset({"alert", "background", "complication", "controls", "fileprovider",
                        "liveactivity", "location", "mdm", "pushtotalk", "voip", "widgets"})
PRIORITIES = frozenset({"1", "5", "10"})
MAX_COLLAPSE_ID = 64
MIN_TOKEN_BYTES, MAX_TOKEN_BYTES = 8, 256

_PATH = re.compile(r"^/3/device/(.*)$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_DIGITS = re.compile(r"^[0-9]+$")

Error = tuple[int, str]


@dataclass(frozen=True)
class Request:
    """A request as the server saw it: headers in arrival order, names lower-case."""

    headers: tuple[tuple[str, str], ...]
    body: bytes
    by_name: dict[str, str] = field(init=False, repr=False, compare=False)
    device_token: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", dict(self.headers))  # the first of repeats wins
        if len(self.by_name) < len(self.headers):
            object.__setattr__(self, "by_name", {})
            for name, value in self.headers:
                self.by_name.setdefault(name, value)
        match = _PATH.match(self.by_name.get(":path") or "")
        object.__setattr__(self, "device_token", match.group(1) if match else None)

    def get(self, name: str) -> str | None:
        return self.by_name.get(name)

    @property
    def repeated(self) -> bool:
        return len(self.by_name) < len(self.headers)

    def token(self) -> str | None:
        """The device token in `:path`, None if the path is not /3/device/..."""
        return self.device_token


def check_request(request: Request) -> Error | None:
    """The first rule (other than authentication and topic) the request breaks, if any."""
    if request.get(":method") != "POST":
        return 405, "MethodNotAllowed"
    token = request.token()
    if token is None:
        return 404, "BadPath"
    if not token:
        return 400, "MissingDeviceToken"
    if request.repeated:
        return 400, "DuplicateHeaders"
    return None


def check_token_and_headers(request: Request) -> Error | None:
    """Token shape, push type, priority, apns-id, expiration, collapse id and payload."""
    token = request.token() or ""
    if (not _HEX.match(token) or len(token) % 2
            or not MIN_TOKEN_BYTES <= len(token) // 2 <= MAX_TOKEN_BYTES):
        return 400, "BadDeviceToken"
    push_type = request.get("apns-push-type")
    if push_type is not None and push_type not in PUSH_TYPES:
        return 400, "InvalidPushType"
    priority = request.get("apns-priority")
    if priority is not None and (priority not in PRIORITIES
                                 or (push_type == "background" and priority == "10")):
        return 400, "BadPriority"
    apns_id = request.get("apns-id")
    if apns_id is not None and not _UUID.match(apns_id):
        return 400, "BadMessageId"
    expiration = request.get("apns-expiration")
    if expiration is not None and not _DIGITS.match(expiration):
        return 400, "BadExpirationDate"
    collapse_id = request.get("apns-collapse-id")
    if collapse_id is not None and len(collapse_id.encode()) > MAX_COLLAPSE_ID:
        return 400, "BadCollapseId"
    return check_payload(request.body, push_type)


@functools.lru_cache(maxsize=64)
def check_payload(body: bytes, push_type: str | None) -> Error | None:
    """The payload rules; cached, as a relay sends the same few bytes in every request."""
    if not body:
        return 400, "PayloadEmpty"
    if len(body) > MAX_PAYLOAD:
        return 413, "PayloadTooLarge"
    try:
        payload = json.loads(body)
    except ValueError:
        return 400, "BadPayload"
    if not isinstance(payload, dict):
        return 400, "BadPayload"
    if push_type == "background" and payload.get("aps") != {"content-available": 1}:
        # A background push carries only content-available: 1 in `aps` (docs/apns.md §2).
        return 400, "InvalidPushType"
    return None


@dataclass(frozen=True)
class CertificateIdentity:
    """What a TLS client certificate allows (docs/apns.md §5, certificate auth): the topics
    (the subject's UID, Apple's bundle id) and the environments named by its extensions."""

    topics: frozenset[str]
    environments: frozenset[str]

    @classmethod
    def from_der(cls, der: bytes) -> CertificateIdentity:
        certificate = x509.load_der_x509_certificate(der)
        topics = frozenset(str(attribute.value) for attribute
                           in certificate.subject.get_attributes_for_oid(NameOID.USER_ID))
        present = {extension.oid for extension in certificate.extensions}
        environments = frozenset(name for name, oid in ENVIRONMENT_OIDS.items()
                                 if oid in present)
        return cls(topics, environments)


def check_certificate(identity: CertificateIdentity, topic: str | None,
                      environment: str) -> tuple[Error | None, str | None]:
    """(error, the request's topic): certificate auth's rules; with no `apns-topic`, the
    certificate's only topic is the default."""
    if not identity.topics:
        return (403, "BadCertificate"), None
    if environment not in identity.environments:
        return (403, "BadCertificateEnvironment"), None
    if not topic:
        if len(identity.topics) != 1:
            return (400, "MissingTopic"), None
        topic = next(iter(identity.topics))
    if topic not in identity.topics:
        return (400, "TopicDisallowed"), None
    return None, topic


@dataclass(frozen=True)
class ProviderClaims:
    key_id: str
    team_id: str
    issued_at: int


def _b64url_decode(text: str) -> bytes:
    if "=" in text:
        raise ValueError("padding is not allowed in a JWT")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenVerifier:
    """Checks provider tokens against the configured keys, for every connection of the
    simulator; caches the verdict by token string (until a key is added), because a
    verified signature stays verified and an ECDSA verification is costly per request."""

    CACHE_SIZE = 1024

    def __init__(self, keys: dict[str, tuple[str, ec.EllipticCurvePublicKey]]) -> None:
        self._keys = dict(keys)
        self._cache: dict[str, ProviderClaims | str] = {}
        self.signatures_checked = 0  # for tests: ECDSA verifications done

    def add_key(self, key_id: str, team_id: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._keys[key_id] = (team_id, public_key)
        self._cache.clear()  # tokens refused for an unknown kid may be valid now

    def verify(self, jwt: str) -> ProviderClaims | str:
        """The token's claims, or the reason APNs would give for refusing it."""
        cached = self._cache.get(jwt)
        if cached is None:
            cached = self._verify(jwt)
            if len(self._cache) >= self.CACHE_SIZE:
                self._cache.clear()
            self._cache[jwt] = cached
        return cached

    def _verify(self, jwt: str) -> ProviderClaims | str:
        try:
            header_b64, claims_b64, signature_b64 = jwt.split(".")
            header = json.loads(_b64url_decode(header_b64))
            claims = json.loads(_b64url_decode(claims_b64))
            signature = _b64url_decode(signature_b64)
        except (ValueError, binascii.Error):
            return "InvalidProviderToken"
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "InvalidProviderToken"
        if header.get("alg") != "ES256" or not isinstance(header.get("kid"), str):
            return "InvalidProviderToken"
        entry = self._keys.get(header["kid"])
        issued_at = claims.get("iat")
        if (entry is None or claims.get("iss") != entry[0] or isinstance(issued_at, bool)
                or not isinstance(issued_at, int)):
            return "InvalidProviderToken"
        if len(signature) != 64:  # raw r‖s; a DER signature is a classic encoding bug
            return "InvalidProviderToken"
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))
        self.signatures_checked += 1
        try:
            entry[1].verify(der, f"{header_b64}.{claims_b64}".encode("ascii"),
                            ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return "InvalidProviderToken"
        return ProviderClaims(header["kid"], entry[0], issued_at)


class ConnectionAuth:
    """Apple's per-connection token rules: team bound at the first push, one token change
    per 20 minutes, and tokens older than an hour refused.

    The connection's accepted token is kept with its `iat`: a request carrying it again
    (nearly every request) costs a string comparison and the age check, as APNs checks
    the token per connection, not its signature per request (docs/apns.md §5)."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier
        self.team_id: str | None = None
        self.token: str | None = None
        self.token_since = 0.0
        self._issued_at = 0

    def check(self, authorization: str | None, now: float) -> Error | None:
        if not authorization:
            return 403, "MissingProviderToken"
        scheme, _, jwt = authorization.partition(" ")
        if scheme.lower() != "bearer" or not jwt:
            return 403, "InvalidProviderToken"
        if jwt == self.token:
            return None if now - self._issued_at <= JWT_MAX_AGE else (
                403, "ExpiredProviderToken")
        claims = self._verifier.verify(jwt)
        if isinstance(claims, str):
            return 403, claims
        if now - claims.issued_at > JWT_MAX_AGE:
            return 403, "ExpiredProviderToken"
        if self.team_id is not None and claims.team_id != self.team_id:
            return 403, "UnrelatedKeyIdInToken"
        if self.token is not None and now - self.token_since < JWT_MIN_CHANGE_INTERVAL:
            return 429, "TooManyProviderTokenUpdates"
        self.team_id = claims.team_id
        self.token, self.token_since, self._issued_at = jwt, now, claims.issued_at
        return None
