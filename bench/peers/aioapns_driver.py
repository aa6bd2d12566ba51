"""aioapns sending N background notifications to the simulator, as its users write it.

    python -m bench.peers.aioapns_driver -n N --endpoint https://127.0.0.1:PORT
        --ca-file CA --key-file KEY --key-id ID --team-id TEAM --topic TOPIC

One `APNs` client (token auth) with aioapns' default pool of 10 connections,
`--in-flight` requests at a time (default 1,000), fresh random tokens. Prints
`sent N ok M` at the end. Needs `pip install aioapns` (the bench installs it when
missing: it is no dependency of the relay).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import ssl
from urllib.parse import urlsplit

from aioapns import APNs, NotificationRequest, PushType
from aioapns.connection import APNsProductionClientProtocol

BACKGROUND = {"aps": {"content-available": 1}}


async def _send(args: argparse.Namespace) -> int:
    endpoint = urlsplit(args.endpoint)

    class Simulator(APNsProductionClientProtocol):  # type: ignore[misc]
        APNS_SERVER = endpoint.hostname
        APNS_PORT = endpoint.port or 443

    context = ssl.create_default_context(cafile=args.ca_file)
    context.set_alpn_protocols(["h2"])
    with open(args.key_file) as key_file:
        key = key_file.read()
    client = APNs(key=key, key_id=args.key_id, team_id=args.team_id,
                  topic=args.topic, ssl_context=context, max_connections=args.connections)
    client.pool.protocol_class = Simulator
    ok = 0
    window = asyncio.Semaphore(args.in_flight)

    async def one() -> None:
        nonlocal ok
        async with window:
            result = await client.send_notification(NotificationRequest(
                device_token=secrets.token_hex(32), message=BACKGROUND, priority=5,
                push_type=PushType.BACKGROUND))
        ok += result.is_successful

    tasks = [asyncio.ensure_future(one()) for _ in range(args.n)]
    await asyncio.gather(*tasks)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, required=True)
    for option in ("endpoint", "ca-file", "key-file", "key-id", "team-id", "topic"):
        parser.add_argument(f"--{option}", required=True)
    parser.add_argument("--in-flight", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10, help="aioapns' default")
    args = parser.parse_args()
    ok = asyncio.run(_send(args))
    print(f"sent {args.n} ok {ok}", flush=True)


if __name__ == "__main__":
    main()
