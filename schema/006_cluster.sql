-- Several relay processes on one log (relay/cluster.py).
--
-- A run's tokens are split into shards: ranges of a 16-bit point hashed from the token,
-- so that tokens spread evenly whatever their bytes. Shard i of N holds the points
-- [i * 65536 / N, (i + 1) * 65536 / N). The index lets the holder of a shard page its
-- tokens (keyset, by point then token) without reading any other shard's.
CREATE FUNCTION token_point(token text) RETURNS integer
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT ('x' || substr(pg_catalog.md5(token), 1, 4))::bit(16)::integer $$;

CREATE INDEX devices_active_point ON devices (token_point(token), token) WHERE active;

-- One row per shard: who holds it (process id and host), until when, and its epoch,
-- which grows by one with every new holder. Taking a shard (epoch + 1) is committed in
-- the same transaction as its shard_leased event, under the head lock, so every outcome
-- appended before it is visible to the new holder, and every outcome after it is checked
-- against the new epoch (cluster_fence). A renewal only moves expires_at. The clock is
-- the database's: processes on several hosts never compare their own clocks.
CREATE TABLE cluster_shards (
    shard      integer PRIMARY KEY CHECK (shard >= 0),
    holder     text,
    host       text,
    epoch      bigint  NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    leased_at  timestamptz,
    expires_at timestamptz
);

-- The live processes: each renews its row with its leases; a row not renewed within the
-- lease time is a process gone. The shards' fair share is counted from these rows.
CREATE TABLE cluster_members (
    process    text PRIMARY KEY,
    host       text        NOT NULL,
    pid        integer     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- FENCING. Called inside an append transaction, after the head lock: refuses the whole
-- transaction (SQLSTATE RL001) when an outcome's shard has moved to another epoch, i.e.
-- when its sender lost the lease (paused, partitioned) and another process took over.
CREATE FUNCTION cluster_fence(shards integer[], epochs bigint[]) RETURNS void
    LANGUAGE plpgsql AS $$
DECLARE
    stale integer[];
BEGIN
    SELECT array_agg(f.shard ORDER BY f.shard) INTO stale
      FROM unnest(shards, epochs) AS f(shard, epoch)
      LEFT JOIN cluster_shards c ON c.shard = f.shard
     WHERE c.epoch IS DISTINCT FROM f.epoch;
    IF stale IS NOT NULL THEN
        RAISE EXCEPTION 'stale lease epoch for shard(s) %', stale USING ERRCODE = 'RL001';
    END IF;
END
$$;
