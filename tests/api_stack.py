"""The real relay stack for the API fuzz tests: Journal + Registry + ApiServer on PostgreSQL."""

from __future__ import annotations

from collections import Counter

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg import conninfo

from actors.registry import RegistryHandle
from events import checkpoint
from events.journal import Journal
from events.store import LogReader
from relay.api import ApiServer
from relay.cluster import ClusterView, LeaseKeeper
from relay.config import Config

# Requests arrive one at a time, so waiting for a batch to fill would only add latency.
SEQUENTIAL_MAX_DELAY = 0.0
# The fuzz tests send thousands of requests one by one. A COMMIT stays a commit
# (atomic, ordered, visible to readers) with this; only the wait for the WAL
# flush is skipped, i.e. durability across a server crash, which they do not test.
NO_FLUSH_WAIT = "-c synchronous_commit=off"


class Stack:
    """Journal + Registry + API on one database; `history` is every 2xx device answer."""

    def __init__(self, dsn: str, config: Config) -> None:
        self.dsn = dsn
        self.journal = Journal(conninfo.make_conninfo(dsn, options=NO_FLUSH_WAIT),
                               max_delay=SEQUENTIAL_MAX_DELAY)
        self.journal.start()
        self.registry = RegistryHandle.start(self.journal, LogReader(dsn), config.registry)
        # As the supervisor does at start: a log with its genesis, and a signed checkpoint.
        checkpoint.create_log(dsn)
        with psycopg.connect(dsn) as conn:
            taken = checkpoint.take(conn, Ed25519PrivateKey.generate())
        # A member of a cluster (of one), so that GET /cluster has shards to show.
        self.keeper = LeaseKeeper(dsn, config.cluster)
        self.keeper.start()
        self.server = ApiServer(config, self.registry, self, checkpoint=lambda: taken,
                                cluster=ClusterView(dsn, config.cluster.lease_ttl))
        self.server.start()
        self.base_url = "http://{}:{}".format(*self.server.bound_address)
        self.history: list[tuple[str, str]] = []

    def database_available(self) -> bool:
        return self.journal.database_available

    def worker_alive(self) -> bool:
        return True

    def stop(self) -> None:
        self.server.stop()
        self.keeper.stop()
        self.registry.stop(timeout=10)
        self.journal.stop(timeout=10)

    def assert_log_agrees_with_history(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT type, token FROM events WHERE type IN "
                "('device_registered', 'device_unregistered') ORDER BY position").fetchall()
        logged = Counter(token for kind, token in rows if kind == "device_registered")
        accepted = Counter(token for op, token in self.history if op == "register")
        assert accepted, "no registration was accepted: the generators are broken"
        missing = {token: n for token, n in accepted.items() if logged[token] < n}
        assert not missing, f"2xx registrations missing from the event log: {missing}"
        last_event = {token: kind for kind, token in rows}
        for token, op in dict((token, op) for op, token in self.history).items():
            expected = "device_registered" if op == "register" else "device_unregistered"
            assert last_event.get(token, "device_unregistered") == expected, token
