"""The APNs client: HTTP/2 over TLS, ES256 provider tokens, and the answer → verdict table."""

from __future__ import annotations

from relay.apns.client import ApnsClient
from relay.apns.reasons import Verdict, classify
from relay.apns.results import ApnsResult

__all__ = ["ApnsClient", "ApnsResult", "Verdict", "classify"]
