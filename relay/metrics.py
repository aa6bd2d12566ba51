"""Prometheus metrics: one home for every series the relay exports at `GET /metrics`.

Components import the objects below and update them; the HTTP API only renders
`REGISTRY`. A dedicated registry (not the global default) keeps tests that build
several relays in one process from colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

DEVICES_REGISTERED = Gauge(
    "relay_devices_registered", "Devices currently registered (active).", registry=REGISTRY
)
REGISTRATIONS = Counter(
    "relay_registrations", "Accepted device registrations.", registry=REGISTRY
)
UNREGISTRATIONS = Counter(
    "relay_unregistrations", "Device unregistrations by cause.", ["cause"], registry=REGISTRY
)
SENDS = Counter(
    "relay_apns_sends", "APNs answers by HTTP status and reason.", ["status", "reason"],
    registry=REGISTRY,
)
SENDS_IN_FLIGHT = Gauge(
    "relay_apns_sends_in_flight", "Notifications sent and not yet answered.", registry=REGISTRY
)
APNS_CONNECTIONS = Gauge(
    "relay_apns_connections", "Open HTTP/2 connections to APNs.", registry=REGISTRY
)
JWT_AGE = Gauge(
    "relay_apns_jwt_age_seconds", "Age of the provider token (JWT) in use.", registry=REGISTRY
)
RUN_DURATION = Histogram(
    "relay_run_duration_seconds", "Duration of wakeup runs.",
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400), registry=REGISTRY,
)
RUN_OUTCOMES = Counter(
    "relay_run_outcomes", "Final per-token outcomes of wakeup runs.", ["outcome"],
    registry=REGISTRY,
)
RUNS = Counter("relay_runs", "Wakeup runs finished.", registry=REGISTRY)
APPEND_LATENCY = Histogram(
    "relay_event_append_latency_seconds", "From append to COMMIT of an event batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
    registry=REGISTRY,
)
APPEND_BATCH_SIZE = Histogram(
    "relay_event_append_batch_size", "Events per group-commit transaction.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 4000), registry=REGISTRY,
)
BREAKER_OPEN = Gauge(
    "relay_circuit_breaker_open", "1 while sending is paused because APNs is in trouble.",
    registry=REGISTRY,
)
DATABASE_UP = Gauge(
    "relay_database_up", "1 while the event log's database is reachable.", registry=REGISTRY
)
# For alert rules (contrib/prometheus): "overdue" and "open too long" need the times and
# the configured intervals next to the state.
LAST_RUN_FINISHED = Gauge(
    "relay_last_run_finished_timestamp_seconds",
    "When the last wakeup run finished (Unix time); the process start until one has.",
    registry=REGISTRY,
)
BREAKER_OPENED_AT = Gauge(
    "relay_circuit_breaker_opened_timestamp_seconds",
    "When the circuit breaker last opened (Unix time).", registry=REGISTRY,
)
WAKEUP_INTERVAL = Gauge(
    "relay_wakeup_interval_seconds", "The configured wakeup.interval.", registry=REGISTRY
)
BREAKER_PAUSE = Gauge(
    "relay_wakeup_breaker_pause_seconds", "The configured wakeup.breaker_pause.",
    registry=REGISTRY,
)
# Several relays (relay/cluster.py).
FENCED_OUTCOMES = Counter(
    "relay_fenced_outcomes", "Outcome events refused because their shard's lease had moved "
    "to another process (a newer epoch).", registry=REGISTRY,
)
HEAD_HOLDERS_ENDED = Counter(
    "relay_head_holders_ended", "Database sessions of other relay processes ended because "
    "they held the log's head lock while waiting on their paused process mid-write.",
    registry=REGISTRY,
)
SHARDS_HELD = Gauge(
    "relay_cluster_shards_held", "Shards this process holds a lease on.", registry=REGISTRY
)
LEASE_CHANGES = Counter(
    "relay_cluster_lease_changes", "Shard leases this process took or gave up.", ["change"],
    registry=REGISTRY,
)
