"""The device API: aiohttp on its own thread and event loop.

Endpoints (documented in `relay/openapi.json`, served at `GET /openapi.json`):

- `POST /devices` `{"token": "<hex>"}` → 200 `{"token": ..., "active": true}`
- `DELETE /devices/<token>` → 200 `{"token": ..., "active": false}`

  Both are idempotent and answer 200 (not 201/204): a repeat is the same state,
  and the registry does not tell whether the token was new. They answer only
  after the registry's future resolved, i.e. after the event's COMMIT. While the
  database is unreachable, or the commit does not come within a short bound,
  the answer is 503 with `Retry-After`, never 2xx; also (`registry_busy`) when
  the Registry already holds as many unregistrations as it may.
- `GET /config`, `GET /health` (200 healthy, 503 not), `GET /metrics`
  (Prometheus text; only on `http.metrics_listen` when that is set),
  `GET /openapi.json`.

Every error answer, whatever produced it (our handlers, aiohttp's router, its
HTTP parser, the connection limit), has a JSON body `{"code": ..., "hint": ...}`;
that, the connection limit and the redacted access log are the transport under
these endpoints, relay/api_transport.py.

Abuse: at most `http.max_connections` open connections per listener (more are
answered 503 and closed); a request's head must arrive within
`http.request_timeout` of the connection opening (or of the previous answer),
and its body within `http.request_timeout` of the head (else 408, closed);
bodies are read up to `http.max_body` and no further (413). `POST`/`DELETE
/devices` are rate limited per client (`relay.ratelimit`). With
`http.client_ip_header` set, the client is the *last* address in that header:
the one our trusted proxy appended (earlier ones are whatever the client sent).

The registration counters (`relay_registrations_total`,
`relay_unregistrations_total{cause="api"}`) are kept by the Registry, which
alone knows whether a request changed anything; the API only serves them.

Tokens never appear in full in logs: the access log (logger `relay.api.access`,
DEBUG) and every message here redact them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any, NoReturn, Protocol

import psycopg
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from actors.registry import RegistryBusy
from relay import NAME, __version__
from relay.api_transport import (
    RETRY_AFTER_OVERLOADED,
    AccessLog,
    ApiError,
    GuardedSite,
    error_response,
    json_errors,
)
from relay.config import ApnsConfig, Config
from relay.metrics import REGISTRY
from relay.ratelimit import RateLimiter
from relay.tokens import InvalidToken, normalize_token, redact

log = logging.getLogger(__name__)
access_log = logging.getLogger("relay.api.access")

# --- policy --------------------------------------------------------------------------
# The longest we hold a device request waiting for its COMMIT (also capped by
# http.request_timeout). The Journal retries a lost database for up to 30 s per
# attempt; a client is better served by a prompt 503 and its own retry.
COMMIT_WAIT_CAP = 5.0
# What we suggest to clients when the database is unavailable (when we are full:
# relay.api_transport.RETRY_AFTER_OVERLOADED).
RETRY_AFTER_UNAVAILABLE = 5
# After an answer, how long we keep draining an unread request body so the
# connection can be reused (e.g. after a 413), before closing it instead.
LINGER_CAP = 1.0
# In-flight requests get this long to finish at stop() before connections are cut.
SHUTDOWN_GRACE = 5.0
# A client key from a proxy header is an address; longer values are cut so a
# misbehaving proxy cannot make the rate limiter hold kilobytes per client.
CLIENT_KEY_MAX = 64
JSON_TYPE = "application/json"
DEVICE_FIELDS = frozenset({"token"})
START_TIMEOUT = 30.0


class DeviceRegistry(Protocol):
    """What the API needs from the Registry (`actors.registry.RegistryHandle`)."""

    def register(self, token: str) -> concurrent.futures.Future[Any]: ...

    def unregister(self, token: str) -> concurrent.futures.Future[Any]: ...


class HealthSource(Protocol):
    def database_available(self) -> bool: ...

    def worker_alive(self) -> bool: ...


# --- the application ------------------------------------------------------------------


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ApiError(400, "invalid_body", "duplicate field in a JSON object")
    return dict(pairs)


# One decoder for every body: json.loads with a hook builds a new one per call.
_BODY_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _field_list(names: set[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(json.dumps(name[:32]) for name in shown) + (", …" if len(names) > 3 else "")


class _Api:
    """The request handlers; all run on the API's event loop thread."""

    def __init__(self, config: Config, registry: DeviceRegistry, health: HealthSource,
                 openapi: bytes, served: dict[str, Any],
                 checkpoint: Callable[[], dict[str, Any] | None],
                 cluster: Callable[[], dict[str, Any]] | None) -> None:
        self._registry, self._health, self._served = registry, health, served
        self._checkpoint, self._cluster = checkpoint, cluster
        self._http = config.http
        self._openapi = openapi
        self._limiter = RateLimiter(self._http.rate_limit, self._http.rate_burst)
        self._commit_wait = min(self._http.request_timeout, COMMIT_WAIT_CAP)
        self._waits: _CommitWaits | None = None  # made on the loop, at the first request

    def public_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_post("/devices", self.register)
        app.router.add_delete("/devices/{token}", self.unregister)
        app.router.add_get("/config", self.config, allow_head=False)
        app.router.add_get("/health", self.health, allow_head=False)
        app.router.add_get("/openapi.json", self.openapi, allow_head=False)
        app.router.add_get("/log/checkpoint", self.log_checkpoint, allow_head=False)
        app.router.add_get("/cluster", self.cluster, allow_head=False)
        if self._http.metrics_listen is None:
            app.router.add_get("/metrics", self.metrics, allow_head=False)
        return app

    def metrics_app(self) -> web.Application:
        app = self._new_app()
        app.router.add_get("/metrics", self.metrics, allow_head=False)
        return app

    def _new_app(self) -> web.Application:
        return web.Application(middlewares=[json_errors], client_max_size=self._http.max_body)

    # --- device endpoints ---

    async def register(self, request: web.Request) -> web.Response:
        self._rate_limit(request)
        token = await self._token_from_body(request)
        await self._committed(self._registry.register, token)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("registered %s", redact(token))
        # A valid token is lower-case hex: nothing to escape, no encoder to run.
        return web.Response(body=b'{"token": "%s", "active": true}' % token.encode(),
                            content_type=JSON_TYPE)

    async def unregister(self, request: web.Request) -> web.Response:
        self._rate_limit(request)
        token = self._valid_token(request.match_info["token"])
        await self._committed(self._registry.unregister, token)
        log.debug("unregistered %s", redact(token))
        return web.json_response({"token": token, "active": False})

    def _rate_limit(self, request: web.Request) -> None:
        wait = self._limiter.acquire(self._client(request))
        if wait > 0:
            raise ApiError(429, "rate_limited",
                           f"at most {self._http.rate_limit:g} device requests per second "
                           f"(burst {self._http.rate_burst}) per client",
                           retry_after=max(1, math.ceil(wait)))

    def _client(self, request: web.Request) -> str:
        header = self._http.client_ip_header
        if header:
            values = request.headers.getall(header, [])
            if values:
                last_hop = values[-1].rsplit(",", 1)[-1].strip()
                if last_hop:
                    return last_hop[:CLIENT_KEY_MAX]
        return request.remote or "unknown"

    async def _token_from_body(self, request: web.Request) -> str:
        if request.content_type != JSON_TYPE:
            raise ApiError(415, "unsupported_media_type",
                           f"send the body as {JSON_TYPE}, e.g. {{\"token\": \"<hex>\"}}")
        body = await self._read_body(request)
        try:
            document = _BODY_DECODER.decode(body.decode("utf-8-sig"))  # a BOM is ignored
        except (ValueError, RecursionError):  # UnicodeDecodeError included
            raise ApiError(400, "malformed_json", "the body is not valid UTF-8 JSON") from None
        if not isinstance(document, dict):
            raise ApiError(400, "invalid_body", "the body must be a JSON object "
                           "with one field, token")
        if "token" not in document:
            raise ApiError(400, "invalid_body", "missing field: token")
        extra = set(document) - DEVICE_FIELDS
        if extra:
            raise ApiError(400, "invalid_body", f"unexpected field(s): {_field_list(extra)}; "
                           "the only field is token")
        return self._valid_token(document["token"])

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused as soon as it exceeds http.max_body (never buffered beyond)."""
        limit = self._http.max_body
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(limit)
        # Fast path: a small body usually arrives with its head, so nothing to wait for.
        first = request.content.read_nowait(limit + 1)
        if len(first) > limit:
            raise _too_large(limit)
        if request.content.at_eof():
            return first
        chunks: list[bytes] = [first]
        size = len(first)

        async def read() -> None:
            nonlocal size
            while chunk := await request.content.read(limit + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)

        try:
            await asyncio.wait_for(read(), self._http.request_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout",
                           f"the body did not arrive within {self._http.request_timeout:g}s",
                           close=True) from None
        return b"".join(chunks)

    @staticmethod
    def _valid_token(value: object) -> str:
        try:
            return normalize_token(value)
        except InvalidToken as exc:
            raise ApiError(400, "invalid_token", str(exc)) from None

    async def _committed(self, action: Callable[[str], concurrent.futures.Future[Any]],
                         token: str) -> None:
        """Hand the token to the registry and wait for the COMMIT, boundedly."""
        if not self._health.database_available():
            self._unavailable("database_unavailable", "the event log's database is unreachable")
        try:
            commit = action(token)
        except RegistryBusy:
            raise ApiError(503, "registry_busy", "the registry holds as many requests as it "
                           "may; retry shortly", retry_after=RETRY_AFTER_OVERLOADED) from None
        except Exception:
            log.exception("registry refused %s", redact(token))
            self._unavailable("registry_unavailable", "the registry is not running")
        if self._waits is None:
            self._waits = _CommitWaits(asyncio.get_running_loop(), self._commit_wait)
        try:
            await self._waits.wait(commit)
        except asyncio.TimeoutError:
            log.warning("no commit within %gs for %s", self._commit_wait, redact(token))
            self._unavailable("commit_timeout",
                              f"not committed within {self._commit_wait:g}s; retry")
        except Exception:
            log.exception("registry failed on %s", redact(token))
            self._unavailable("registry_unavailable", "the registry failed to record this")

    @staticmethod
    def _unavailable(code: str, hint: str) -> NoReturn:
        raise ApiError(503, code, hint, retry_after=RETRY_AFTER_UNAVAILABLE)

    # --- operator endpoints ---

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(self._served)

    async def log_checkpoint(self, request: web.Request) -> web.Response:
        latest = self._checkpoint()
        if latest is None:
            return error_response(503, "no_checkpoint", "no checkpoint yet: the relay "
                                  "signs one after every wakeup run",
                                  headers={hdrs.RETRY_AFTER: str(RETRY_AFTER_UNAVAILABLE)})
        return web.json_response(latest)

    async def cluster(self, request: web.Request) -> web.Response:
        """The live relay processes, their shards and lease ages, read from the database
        off the event loop."""
        if self._cluster is None:
            self._unavailable("no_cluster", "this relay does not take part in a cluster")
        try:
            view = await asyncio.get_running_loop().run_in_executor(None, self._cluster)
        except psycopg.Error:
            self._unavailable("database_unavailable", "the database does not answer; retry")
        return web.json_response(view)

    async def health(self, request: web.Request) -> web.Response:
        database, worker = self._health.database_available(), self._health.worker_alive()
        if database and worker:
            return web.json_response({"status": "ok", "database": True, "worker": True})
        problems = [p for p, ok in (("database unreachable", database),
                                    ("wakeup worker not running", worker)) if not ok]
        return web.json_response(
            {"code": "unhealthy", "hint": "; ".join(problems), "status": "unhealthy",
             "database": database, "worker": worker},
            status=503, headers={hdrs.RETRY_AFTER: str(RETRY_AFTER_UNAVAILABLE)},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY),
                            headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=JSON_TYPE)


class _CommitWaits:
    """Awaits registry futures on the API's loop, waking the loop once per burst.

    The futures resolve on the Journal's thread, a whole batch at a time. Waking the
    loop for each (`call_soon_threadsafe`: a write to its self-pipe and a GIL hand-over)
    was a large share of the API's CPU under load; here the first resolution of a burst
    schedules one call that settles every waiter resolved so far.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._lock = threading.Lock()
        self._resolved: list[tuple[asyncio.Future[None], concurrent.futures.Future[Any]]] = []
        # Waiters in deadline order (one timeout for all), and one timer for the earliest:
        # a timer per request (made, then cancelled) was a tenth of the API thread's time.
        self._deadlines: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, commit: concurrent.futures.Future[Any]) -> None:
        """Await `commit` for at most the timeout without ever cancelling it."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():  # answered: forget them as we go
            deadlines.popleft()
        deadlines.append((self._loop.time() + self._timeout, waiter))
        if self._timer is None:
            self._arm()
        commit.add_done_callback(lambda done: self._resolve(waiter, done))
        await waiter

    def _arm(self) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].done():
            deadlines.popleft()
        if deadlines:
            self._timer = self._loop.call_at(deadlines[0][0], self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _expire(deadlines.popleft()[1])
        self._arm()

    def _resolve(self, waiter: asyncio.Future[None],
                 done: concurrent.futures.Future[Any]) -> None:
        """Any thread."""
        with self._lock:
            first = not self._resolved
            self._resolved.append((waiter, done))
        if first and not self._loop.is_closed():  # closed: the server stopped, nobody waits
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            resolved, self._resolved = self._resolved, []
        for waiter, done in resolved:
            if waiter.done():
                continue
            error = concurrent.futures.CancelledError() if done.cancelled() else done.exception()
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the body is limited to {limit} bytes")


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


def openapi_document() -> bytes:
    """The OpenAPI 3 description shipped as package data."""
    return resources.files("relay").joinpath("openapi.json").read_bytes()


class ApiServer:
    """The API's listeners on a thread of their own, so no actor ever waits on a socket."""

    def __init__(self, config: Config, registry: DeviceRegistry, health: HealthSource, *,
                 apns: ApnsConfig | None = None, simulated: bool = False,
                 checkpoint: Callable[[], dict[str, Any] | None] | None = None,
                 cluster: Callable[[], dict[str, Any]] | None = None) -> None:
        """`apns`: the APNs settings in use, when not `config.apns` (the built-in simulator's,
        then `simulated`): what `GET /config` reports. `checkpoint`: the latest signed
        checkpoint of the log, for `GET /log/checkpoint`. `cluster`: reads the live
        processes and their leases (blocking; run off the loop), for `GET /cluster`."""
        self._config = config
        served = apns or config.apns
        self._api = _Api(config, registry, health, openapi_document(), {
            "name": NAME, "version": __version__, "topic": served.topic,
            "environment": "simulator" if simulated else served.environment,
            "endpoint": served.url}, checkpoint or (lambda: None), cluster)
        self.bound_address: tuple[str, int] = config.http.listen
        self.metrics_address: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._routes: frozenset[tuple[str, str]] = frozenset()

    @property
    def routes(self) -> frozenset[tuple[str, str]]:
        """(method, path) of every route served, on any listener: kept equal to the OpenAPI doc."""
        return self._routes

    def start(self) -> None:
        """Bind and serve; raises (e.g. `OSError`) if a listener cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("ApiServer already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name="relay-api", daemon=True)
        self._thread.start()
        try:
            started.result(timeout=START_TIMEOUT)
        except BaseException:
            self._thread.join(timeout=SHUTDOWN_GRACE)
            raise
        log.info("device API listening on http://%s:%d", *self.bound_address)
        if self.metrics_address is not None:
            log.info("metrics on http://%s:%d/metrics", *self.metrics_address)

    def stop(self) -> None:
        """Stop listening, let in-flight requests finish (briefly), close connections."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has already ended
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=SHUTDOWN_GRACE + 5)

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        asyncio.run(self._serve(started))

    async def _serve(self, started: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        http = self._config.http
        handler_options: dict[str, Any] = {
            "loop": self._loop,
            # Covers the wait for a request head, from the connection's opening or
            # the previous answer: slow or silent clients are cut off.
            "keepalive_timeout": http.request_timeout,
            "lingering_time": min(http.request_timeout, LINGER_CAP),
            "access_log_class": AccessLog,
            "access_log": access_log,
        }
        runners: list[web.AppRunner] = []
        try:
            apps = [(self._api.public_app(), http.listen)]
            if http.metrics_listen is not None:
                apps.append((self._api.metrics_app(), http.metrics_listen))
            addresses = []
            for app, (host, port) in apps:
                runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE)
                runners.append(runner)
                await runner.setup()
                site = GuardedSite(runner, host, port, max_connections=http.max_connections,
                                    handler_options=handler_options)
                await site.start()
                addresses.append(site.address)
            self._routes = frozenset(
                (route.method, route.resource.canonical)
                for app, _ in apps for route in app.router.routes() if route.resource is not None
            )
            self.bound_address = addresses[0]
            self.metrics_address = addresses[1] if len(addresses) > 1 else None
        except BaseException as exc:
            for runner in reversed(runners):
                await runner.cleanup()
            started.set_exception(exc)
            return
        started.set_result(None)
        await self._stopping.wait()
        for runner in reversed(runners):
            await runner.cleanup()
