"""The naive registration endpoint a user might write instead of the relay's API.

aiohttp, `POST /devices {"token": "<hex>"}`, one `INSERT ... ON CONFLICT` and COMMIT
per request over a pool of 16 psycopg connections, 200 after the COMMIT. Same
durability as the relay (synchronous_commit on), none of its event log.

    python -m bench.peers.naive_registrations --dsn DSN [--port 0]

Prints `listening on PORT` once it serves; the table is created if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg
from aiohttp import web

POOL_SIZE = 16
HEX = frozenset("0123456789abcdef")
SCHEMA = ("CREATE TABLE IF NOT EXISTS naive_devices "
           "(token text PRIMARY KEY, active boolean NOT NULL, registered_at_ms bigint NOT NULL)")
UPSERT = ("INSERT INTO naive_devices (token, active, registered_at_ms) VALUES (%s, true, %s) "
           "ON CONFLICT (token) DO UPDATE SET active = true, "
           "registered_at_ms = excluded.registered_at_ms")


class Pool:
    """A fixed set of connections handed out one request at a time."""

    def __init__(self, dsn: str, size: int) -> None:
        self._dsn, self._size = dsn, size
        self._idle: asyncio.Queue[psycopg.AsyncConnection[object]] = asyncio.Queue()

    async def open(self) -> None:
        for _ in range(self._size):
            self._idle.put_nowait(await psycopg.AsyncConnection.connect(self._dsn))

    async def register(self, token: str) -> None:
        conn = await self._idle.get()
        try:
            await conn.execute(UPSERT, (token, int(time.time() * 1000)))
            await conn.commit()
        except BaseException:
            await conn.rollback()
            raise
        finally:
            self._idle.put_nowait(conn)


async def _serve(dsn: str, port: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    pool = Pool(dsn, POOL_SIZE)
    await pool.open()

    async def register(request: web.Request) -> web.Response:
        try:
            token = json.loads(await request.read())["token"].lower()
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.json_response({"code": "invalid_body"}, status=400)
        if len(token) != 64 or not HEX.issuperset(token):
            return web.json_response({"code": "invalid_token"}, status=400)
        await pool.register(token)
        return web.json_response({"token": token, "active": True})

    app = web.Application()
    app.router.add_post("/devices", register)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=511)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"listening on {bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(_serve(args.dsn, args.port))


if __name__ == "__main__":
    main()
