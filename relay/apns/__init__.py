"""The APNs client: HTTP/2 over TLS, ES256 provider tokens, and the answer → verdict table."""

from __future__ import annotations

from relay.apns.client import ApnsClient, ApnsResult
from relay.apns.reasons import Verdict, classify

__all__ = ["ApnsClient", "ApnsResult", "Verdict", "classify"]
