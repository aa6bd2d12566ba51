-- Projections: caches of state folded from the event log (events/projection.py).
-- They are written in the same transaction as the events they reflect, so they are
-- always a snapshot of some log prefix; `relay audit --verify` proves they equal a
-- fresh fold of the log, and `relay rebuild` regenerates them from it.

-- One row per token that ever appeared in a token event.
-- Registration: active, registered_at_ms (of the last device_registered; the
-- re-registration rule compares dead-token verdicts with it), unregistered_at_ms and
-- cause (of the unregistration in force; cleared when the token registers again).
-- Delivery, for the last run the token took part in: run, attempts,
-- next_attempt_at_ms (only while a retry is pending), apns_id, final ('delivered',
-- 'abandoned', 'dead' once the token has its final outcome in that run).
CREATE TABLE devices (
    token              text    COLLATE "C" PRIMARY KEY,  -- hex: byte order, fast compares
    active             boolean NOT NULL,
    registered_at_ms   bigint,
    unregistered_at_ms bigint,
    cause              text,
    run                bigint,
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at_ms bigint,
    apns_id            text,
    final              text CHECK (final IN ('delivered', 'abandoned', 'dead'))
) WITH (fillfactor = 80);  -- room for HOT updates: delivery state changes touch no index

-- LogReader.due_tokens pages active tokens by token (keyset), and active_count counts
-- them, both from this index alone.
CREATE INDEX devices_active_token ON devices (token) WHERE active;

-- One row per wakeup run. Counts: delivered/abandoned/unregistered = tokens with that
-- final outcome in the run (unregistered counts dead-token finals), failed = failed
-- attempts, tokens = tokens taking part (from run_started; run_finished's counts,
-- as the dispatcher reports them, replace the running ones when it arrives).
CREATE TABLE runs (
    run            bigint PRIMARY KEY,
    started_at_ms  bigint,
    finished_at_ms bigint,
    tokens         integer NOT NULL DEFAULT 0,
    delivered      integer NOT NULL DEFAULT 0,
    failed         integer NOT NULL DEFAULT 0,
    abandoned      integer NOT NULL DEFAULT 0,
    unregistered   integer NOT NULL DEFAULT 0
);
