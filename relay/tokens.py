"""Device tokens: what the relay accepts, and how it writes them in logs."""

from __future__ import annotations

import re

MIN_TOKEN_BYTES = 8
MAX_TOKEN_BYTES = 256
_HEX = re.compile(r"[0-9a-fA-F]+")


class InvalidToken(ValueError):
    """A device token the relay refuses; the message says exactly why."""


def normalize_token(value: object) -> str:
    """The token in lower-case hex, or `InvalidToken`.

    Apple says token length varies and must not be hard-coded, so we accept any
    even-length hex string of 8 to 256 bytes (docs/apns.md §8).
    """
    if not isinstance(value, str):
        raise InvalidToken(f"token must be a string of hex digits, got {type(value).__name__}")
    if not value:
        raise InvalidToken("token is empty")
    if not _HEX.fullmatch(value):
        raise InvalidToken("token must contain only hex digits 0-9 and a-f")
    if len(value) % 2:
        raise InvalidToken(f"token must have an even number of hex digits, got {len(value)}")
    size = len(value) // 2
    if not MIN_TOKEN_BYTES <= size <= MAX_TOKEN_BYTES:
        raise InvalidToken(
            f"token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes "
            f"({2 * MIN_TOKEN_BYTES} to {2 * MAX_TOKEN_BYTES} hex digits), got {size} bytes"
        )
    return value.lower()


def redact(token: str) -> str:
    """A short prefix for logs: enough to correlate, not enough to push to the device."""
    return token[:8] + "…"
