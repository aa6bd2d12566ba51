"""What every APNs answer means for the relay: THE table (docs/apns.md §3).

Each (status, reason) pair Apple documents maps to exactly one `Verdict`, in one
literal dict so a reader can check it against Apple's list line by line. The
class letters in the comments are those of docs/apns.md §3: a relay bug, b operator
configuration, c dead token, d transient.
"""

from __future__ import annotations

from enum import Enum


class Verdict(str, Enum):
    """What the relay does with an answer."""

    DELIVERED = "delivered"  # accepted by APNs (not proof of delivery)
    TRANSIENT = "transient"  # retry this token later, with back-off
    DEAD_TOKEN = "dead_token"  # unregister the token (subject to the re-registration rule)
    CONFIGURATION = "configuration"  # the operator must fix credentials/topic: halt
    RELAY_BUG = "relay_bug"  # our request was malformed: halt


REASONS: dict[tuple[int, str], Verdict] = {
    (400, "BadCollapseId"): Verdict.RELAY_BUG,  # a: we never send apns-collapse-id
    (400, "BadDeviceToken"): Verdict.DEAD_TOKEN,  # c: wrong environment or garbage; never halt
    (400, "BadExpirationDate"): Verdict.RELAY_BUG,  # a: we compute apns-expiration
    (400, "BadMessageId"): Verdict.RELAY_BUG,  # a: we generate apns-id
    (400, "BadPriority"): Verdict.RELAY_BUG,  # a: we always send 5
    (400, "BadTopic"): Verdict.CONFIGURATION,  # b: apns.topic is wrong
    (400, "DeviceTokenNotForTopic"): Verdict.DEAD_TOKEN,  # c: token of another app
    (400, "DuplicateHeaders"): Verdict.RELAY_BUG,  # a
    (400, "IdleTimeout"): Verdict.TRANSIENT,  # d: reconnect and resend
    (400, "InvalidPushType"): Verdict.RELAY_BUG,  # a: we always send background
    (400, "MissingDeviceToken"): Verdict.RELAY_BUG,  # a
    (400, "MissingTopic"): Verdict.RELAY_BUG,  # a: we always send apns-topic
    (400, "PayloadEmpty"): Verdict.RELAY_BUG,  # a
    (400, "TopicDisallowed"): Verdict.CONFIGURATION,  # b: key/team may not push to the topic
    (403, "BadCertificate"): Verdict.CONFIGURATION,  # b
    (403, "BadCertificateEnvironment"): Verdict.CONFIGURATION,  # b: apns.environment mismatch
    # d→a/b: the client mints a new JWT and retries once before answering; a repeat (or a
    # token too young to replace) means the clock or the key is wrong, so it reaches us as b.
    (403, "ExpiredProviderToken"): Verdict.CONFIGURATION,
    (403, "Forbidden"): Verdict.CONFIGURATION,  # b
    (403, "InvalidProviderToken"): Verdict.CONFIGURATION,  # b: wrong key, key id or team id
    (403, "MissingProviderToken"): Verdict.RELAY_BUG,  # a: we always send a JWT with token auth
    # a/b: the client retires the connection and retries once on a new one (docs/apns.md §3: "open
    # a new connection"); the relay signs with one configured key, so a repeat on a fresh
    # connection means APNs does not relate apns.key_id to apns.team_id: b.
    (403, "UnrelatedKeyIdInToken"): Verdict.CONFIGURATION,
    (403, "BadEnvironmentKeyIdInToken"): Verdict.CONFIGURATION,  # b: key of the other env
    (403, "BadEnvironmentKeyInToken"): Verdict.CONFIGURATION,  # b: the same, spelling seen [O]
    (404, "BadPath"): Verdict.RELAY_BUG,  # a
    (405, "MethodNotAllowed"): Verdict.RELAY_BUG,  # a
    (410, "ExpiredToken"): Verdict.DEAD_TOKEN,  # c
    (410, "Unregistered"): Verdict.DEAD_TOKEN,  # c: docs/apns.md §4 decides whether to unregister
    (413, "PayloadTooLarge"): Verdict.RELAY_BUG,  # a: our payload is fixed and small
    (429, "TooManyProviderTokenUpdates"): Verdict.RELAY_BUG,  # a: we re-minted the JWT too often
    (429, "TooManyRequests"): Verdict.TRANSIENT,  # d: retry this token after its back-off
    (500, "InternalServerError"): Verdict.TRANSIENT,  # d
    (503, "ServiceUnavailable"): Verdict.TRANSIENT,  # d
    (503, "Shutdown"): Verdict.TRANSIENT,  # d: reconnect and resend
}


def classify(status: int | None, reason: str | None) -> Verdict:
    """The verdict for one answer; `status=None` means no HTTP answer at all."""
    if status is None:
        return Verdict.TRANSIENT  # timeout, connection lost: nothing was decided
    if status == 200:
        return Verdict.DELIVERED
    if reason is not None:
        known = REASONS.get((status, reason))
        if known is not None:
            return known
    # Unknown reason [R]: 403 without a reason is a credential problem; 5xx is Apple's
    # trouble; any other answer means we sent something Apple does not accept.
    if status == 403 and not reason:
        return Verdict.CONFIGURATION
    if 500 <= status <= 599:
        return Verdict.TRANSIENT
    return Verdict.RELAY_BUG
