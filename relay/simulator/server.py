"""The APNs simulator: a real HTTP/2 server over TLS that answers like Apple.

It checks every request against Apple's rules (`validation`), verifies provider
tokens against configured public keys (with Apple's 60-minute and per-connection
20-minute rules on a clock that tests can replace or speed up), enforces
SETTINGS_MAX_CONCURRENT_STREAMS (and, for token auth, one stream until a valid
token was posted) by GOAWAY, and records every request. Faults for tests: a
scripted outcome list per token, artificial latency, withheld answers, RST_STREAM,
dropped connections, GOAWAY after N streams or on demand, stream limits changed
mid-connection, a tiny flow-control window.

It runs its own asyncio loop on its own thread; the public methods are
thread-safe. Each client connection is a `ServerConnection` (connection.py); the
scripts and records are `outcomes.py`. See `relay/simulator/README.md` for operators.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from relay.simulator.connection import ServerConnection
from relay.simulator.credentials import CertificateAuthority
from relay.simulator.outcomes import RecordedRequest, ScriptedOutcome
from relay.simulator.validation import (
    TokenVerifier,
)
from relay.tokens import redact

log = logging.getLogger("relay.simulator")

DEFAULT_MAX_STREAMS = 1000  # what Apple was seen to advertise (docs/apns.md §6)


class ApnsSimulator:
    """See the module docstring; `start()` before use, `stop()` after."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        topic: str,
        environment: str = "production",
        keys: dict[str, tuple[str, EllipticCurvePublicKey]] | None = None,
        clock: Callable[[], float] | None = None,
        time_scale: float = 1.0,
        max_concurrent_streams: int = DEFAULT_MAX_STREAMS,
        initial_window_size: int = 65535,
        goaway_after: int | None = None,
        latency: float = 0.0,
        client_ca: Path | None = None,
        record_limit: int | None = None,
        log_requests: bool = False,
        workdir: Path | None = None,
    ) -> None:
        self.host, self._requested_port = host, port
        if environment not in ("production", "sandbox"):
            raise ValueError(f"environment must be production or sandbox, not {environment!r}")
        self.topic = topic
        self.environment = environment  # what certificates must allow (certificate auth)
        self._verifier = TokenVerifier(keys or {})
        self._token_auth_configured = bool(keys)
        if clock is None:
            base, start = time.time(), time.monotonic()

            def clock() -> float:
                return base + (time.monotonic() - start) * time_scale

        self.clock = clock
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        self.goaway_after = goaway_after
        self.latency = latency
        self._client_ca = client_ca
        self.log_requests = log_requests
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="apns-sim-"))
        self._ca = CertificateAuthority(self.workdir)
        self.ca_file = self._ca.ca_file
        self._server_cert = self._ca.issue(
            "server", "apns-relay simulator", hosts=tuple(dict.fromkeys(
                (host, "127.0.0.1", "localhost", "::1")))
        )
        self._scripts: dict[str, deque[ScriptedOutcome]] = {}
        self._burst: deque[ScriptedOutcome] = deque()  # the next answers, whatever the token
        self._lock = threading.Lock()
        self._recorded_cond = threading.Condition(self._lock)
        self._records: deque[RecordedRequest] = deque(maxlen=record_limit)
        self._recorded_total = 0
        self._connections: set[ServerConnection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0
        # Observations for tests (written on the simulator thread only).
        self.connections_opened = 0
        self.max_concurrent_seen = 0
        self.stream_limit_violations = 0
        self.pings_received = 0
        self.ping_event = threading.Event()

    # --- life cycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> None:
        """Listen (raises if the address is taken); returns once connections are accepted."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="apns-simulator",
                                        daemon=True)
        self._thread.start()
        ready.result()

    def stop(self) -> None:
        """Close every connection and the listener; remove generated files."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(self._shutdown)
            thread.join()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ApnsSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(loop.create_server(
                lambda: ServerConnection(self), self.host, self._requested_port,
                ssl=self._tls_context()))
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def _shutdown(self) -> None:
        assert self._loop is not None
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        self._loop.call_soon(self._loop.stop)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self._server_cert.cert_file, self._server_cert.key_file)
        context.set_alpn_protocols(["h2"])
        if self._client_ca is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cafile=str(self._client_ca))
        return context

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the simulator thread and wait for it."""
        loop = self._loop
        if loop is None or not loop.is_running():
            fn()
            return

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), loop).result()

    # --- configuration and faults (thread-safe) -------------------------------------------

    def add_key(self, key_id: str, team_id: str, public_key: EllipticCurvePublicKey) -> None:
        """Accept provider tokens signed by this key for this team."""
        self._call(lambda: self._verifier.add_key(key_id, team_id, public_key))
        self._token_auth_configured = True

    def script(self, token: str, outcomes: Iterable[ScriptedOutcome]) -> None:
        """Answer this token's next valid requests with `outcomes`, then accept it."""
        with self._lock:
            self._scripts[token.lower()] = deque(outcomes)

    def burst(self, outcomes: Iterable[ScriptedOutcome]) -> None:
        """Answer the next valid requests, whatever their token, with `outcomes` (before any
        token's own script): an APNs-wide fault such as a burst of 503 or 429."""
        with self._lock:
            self._burst.extend(outcomes)

    def set_max_concurrent_streams(self, limit: int) -> None:
        """New SETTINGS_MAX_CONCURRENT_STREAMS for new and open connections."""
        def apply() -> None:
            self.max_concurrent_streams = limit
            for conn in self._connections:
                conn.update_stream_limit(limit)

        self._call(apply)

    def send_goaway(self, reason: str = "Shutdown") -> None:
        """GOAWAY on every connection; streams already received are still answered."""
        def apply() -> None:
            for conn in list(self._connections):
                conn.goaway(None, reason)

        self._call(apply)

    def drop_connections(self) -> None:
        """Abort every TCP connection without a word, as a dying network does."""
        def apply() -> None:
            for conn in list(self._connections):
                conn.abort()

        self._call(apply)

    # --- observations -----------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far (the last `record_limit` if set)."""
        with self._lock:
            return list(self._records)

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` requests were recorded in total."""
        with self._recorded_cond:
            return self._recorded_cond.wait_for(lambda: self._recorded_total >= count, timeout)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # --- called from connections (simulator thread) --------------------------------------

    def _next_outcome(self, token: str) -> ScriptedOutcome | None:
        with self._lock:
            if self._burst:
                return self._burst.popleft()
            script = self._scripts.get(token.lower())
            if not script:
                return None
            return script.popleft()

    def _record(self, record: RecordedRequest) -> None:
        with self._recorded_cond:
            self._records.append(record)
            self._recorded_total += 1
            self._recorded_cond.notify_all()
        if self.log_requests:
            answer = "no answer" if record.answer is None else " ".join(
                str(part) for part in record.answer if part is not None)
            log.info("connection %d stream %d token %s -> %s", record.connection,
                     record.stream_id, redact(record.token or "-"), answer)
