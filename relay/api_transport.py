"""The device API's transport, under its endpoints (relay/api.py).

What every connection and every error answer gets, whatever the endpoint: error
answers as JSON `{"code", "hint"}` (from our handlers, aiohttp's router and its HTTP
parser alike), at most `http.max_connections` open connections per listener (those
over it get a fixed 503 and are closed, unparsed), and an access log that never
writes a whole token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from relay.tokens import redact

log = logging.getLogger("relay.api")

# What we suggest to clients when we (or the Registry's mailbox) are full.
RETRY_AFTER_OVERLOADED = 1
LISTEN_BACKLOG = 511


# --- error answers --------------------------------------------------------------------

# Codes for answers aiohttp produces itself; anything else gets `http_<status>`.
_CODES = {
    400: ("bad_request", "the request is not valid HTTP/1.1"),
    404: ("not_found", "no such path; the API is described at GET /openapi.json"),
    405: ("method_not_allowed", "method not allowed here; the Allow header lists those that are"),
    408: ("request_timeout", "the request did not arrive in time"),
    413: ("body_too_large", "the request body is too large"),
    414: ("uri_too_long", "the request line is too long"),
    431: ("headers_too_large", "the request headers are too large"),
    500: ("internal_error", "the relay failed to handle this request; it has been logged"),
}


def error_response(status: int, code: str, hint: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"code": code, "hint": hint}, status=status, headers=headers)


class ApiError(Exception):
    """An error answer decided by a handler; the middleware turns it into JSON."""

    def __init__(self, status: int, code: str, hint: str, *,
                 retry_after: int | None = None, close: bool = False) -> None:
        super().__init__(hint)
        self.status, self.code, self.hint = status, code, hint
        self.retry_after, self.close = retry_after, close

    def response(self) -> web.Response:
        headers = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        response = error_response(self.status, self.code, self.hint, headers)
        if self.close:
            response.force_close()
        return response


def default_error(status: int) -> tuple[str, str]:
    return _CODES.get(status, (f"http_{status}", f"HTTP {status}"))


def redacted_path(path: str) -> str:
    prefix = "/devices/"
    return prefix + redact(path[len(prefix):]) if path.startswith(prefix) else path


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as `{"code", "hint"}` JSON, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code, hint = default_error(exc.status)
        allow = exc.headers.get(hdrs.ALLOW)
        headers = None if allow is None else {"Allow": allow}
        if allow is not None:
            hint = f"{request.method[:16]} is not allowed here; allowed: {allow}"
        return error_response(exc.status, code, hint, headers)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, redacted_path(request.path))
        return error_response(500, *default_error(500))


# --- connections ----------------------------------------------------------------------


class AccessLog(AbstractAccessLogger):
    """aiohttp's default access log would write `DELETE /devices/<full token>`."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug("%s %s %s %d %.1fms", request.remote, request.method,
                          redacted_path(request.path), response.status, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


class _Handler(web.RequestHandler):
    """aiohttp's per-connection protocol, with JSON errors from its parser too."""

    def __init__(self, manager: web.Server, *, on_lost: Callable[[_Handler], None],
                 **options: Any) -> None:
        super().__init__(manager, **options)
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._on_lost(self)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # The exception text may quote the request line, i.e. a token: log its type only.
        log.debug("HTTP %d before routing from %s (%s)", status, request.remote,
                  type(exc).__name__ if exc else "no exception")
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is already on the wire")
        response = error_response(status, *default_error(status))
        response.force_close()
        return response


_OVERLOADED_BODY = json.dumps({
    "code": "overloaded",
    "hint": "too many open connections; retry shortly",
}).encode()
_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: " + str(RETRY_AFTER_OVERLOADED).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"Content-Length: " + str(len(_OVERLOADED_BODY)).encode() + b"\r\n\r\n" + _OVERLOADED_BODY
)


class _Refusal(asyncio.Protocol):
    """A connection over the limit: a fixed 503 (no parsing), then close.

    We half-close and wait briefly for the client's end rather than closing at
    once, because closing with the client's request unread makes the kernel send
    a reset that can destroy the 503 before the client reads it.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_OVERLOADED)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(RETRY_AFTER_OVERLOADED, transport.close)

    def data_received(self, data: bytes) -> None:
        """Ignored: the answer does not depend on it."""

    def eof_received(self) -> bool:
        return False  # close the transport


class GuardedSite(web.BaseSite):
    """A TCP listener that caps open connections and uses `_Handler`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *,
                 max_connections: int, handler_options: dict[str, Any]) -> None:
        super().__init__(runner, backlog=LISTEN_BACKLOG)
        self._host, self._port = host, port
        self._max_connections = max_connections
        self._handler_options = handler_options
        # Handlers created and not yet disconnected. Weak, so a protocol whose
        # connection never got made (accept failed) cannot leak a slot.
        self._open: weakref.WeakSet[_Handler] = weakref.WeakSet()

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sockets: tuple[socket.socket, ...] = getattr(self._server, "sockets", ())
        name = sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=True
        )

    def _protocol(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self._max_connections:
            return _Refusal()
        manager = self._runner.server
        assert manager is not None
        handler = _Handler(manager, on_lost=self._open.discard, **self._handler_options)
        self._open.add(handler)
        return handler
