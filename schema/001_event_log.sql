-- The event log: one append-only, hash-chained table and the row that heads it.
--
-- Canonical bytes and the chain are defined in events/codec.py:
--   body      = compact sorted-key UTF-8 JSON of {"position", "type", ...data}
--   hash(n)   = sha256(hash(n-1) || body(n)),  hash(0) = 32 zero bytes.
-- `type`, `token` and `run` repeat what the body says, for queries and indexes;
-- `relay audit --verify` checks that they agree with the bytes.

CREATE TABLE events (
    position bigint PRIMARY KEY CHECK (position > 0),
    type     text   NOT NULL,
    token    text COLLATE "C",
    run      bigint,
    body     bytea  NOT NULL,
    hash     bytea  NOT NULL CHECK (octet_length(hash) = 32)
);
COMMENT ON TABLE events IS
    'Append-only, hash-chained event log; the single source of truth (events/codec.py).';

-- No index on token: it would cost a third of the append rate (measured with
-- bench/journal.py's raw COPY), for the sake of `relay audit --token`, which can
-- afford one sequential scan of the log.

-- ORDER WITHOUT GAPS. A sequence value is taken at INSERT but becomes visible at
-- COMMIT, so with free-running sequences a reader paging "position > N" can pass N+2
-- while N+1 is still uncommitted, and never see N+1. Instead, every append
-- transaction first locks this single row (SELECT ... FOR UPDATE) and numbers its
-- events head.position + 1, + 2, ...: appenders are serialised, so positions are
-- contiguous and commit in order, and a reader that has seen position N has seen
-- every position before it. Group commit (events/journal.py) makes one lock per
-- batch cheap. The row also carries the hash of the last event, the start of the
-- next link of the chain, and lets `--verify` detect a truncated tail.
CREATE TABLE log_head (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    position bigint  NOT NULL CHECK (position >= 0),
    hash     bytea   NOT NULL CHECK (octet_length(hash) = 32)
);
INSERT INTO log_head (id, position, hash) VALUES (true, 0, decode(repeat('00', 32), 'hex'));

-- Bookkeeping for the Journal: the id of every committed batch, so that after a
-- connection lost during COMMIT the writer can tell whether that batch is in the log
-- (and at which positions) instead of guessing and duplicating or losing events.
-- Not part of the log; old rows are pruned by the Journal.
CREATE TABLE journal_batches (
    batch          uuid        PRIMARY KEY,
    first_position bigint      NOT NULL,
    last_position  bigint      NOT NULL,
    committed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX journal_batches_committed_at ON journal_batches (committed_at);

-- THE GUARD. PostgreSQL itself refuses to change or remove events, whoever asks.
-- Statement-level, so even an UPDATE or DELETE matching no row is refused. The
-- triggers are ENABLE ALWAYS: `session_replication_role = replica` does not silence
-- them; only the table owner or a superuser explicitly disabling them (ALTER TABLE
-- ... DISABLE TRIGGER) gets past, and `relay audit --verify` catches what they do.
CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on % is refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation',
              HINT = 'history is corrected by appending events, never by rewriting them';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
ALTER TABLE events ENABLE ALWAYS TRIGGER events_append_only;

-- THE HEAD FOLLOWS THE LOG. Every INSERT into events (INSERT or COPY, by the Journal
-- or anyone else) moves the head to the last event, at the end of the statement, and
-- the head's own guard (below) accepts that move only if it is consistent. So the
-- events table and its head cannot disagree without disabling triggers, and no
-- writer, however careless, can leave a gap or fork the chain. The last event is read
-- from the end of the primary key index: no transition table, no pass over the rows.
CREATE FUNCTION events_advance_head() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE log_head
       SET position = last.position, hash = last.hash
      FROM (SELECT position, hash FROM events ORDER BY position DESC LIMIT 1) AS last
     WHERE log_head.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_advance_head
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_advance_head();
ALTER TABLE events ENABLE ALWAYS TRIGGER events_advance_head;

-- The head may only move forward over a contiguous extension of the log that starts
-- a link from the old head and ends at the new head: positions OLD+1 .. NEW all
-- present (counted on the primary key index) and nothing beyond NEW; the first new
-- event hashing to sha256(old head's hash || its body); the new head's hash equal to
-- the last event's. An UPDATE that leaves position and hash as they are is harmless
-- and allowed. Deleting or adding head rows is refused.
--
-- WHAT IS CHECKED HERE, AND WHAT BY THE AUDIT. Order and joints are the database's
-- job because only the database sees every writer: with the head lock, the count and
-- the first link, a writer that skipped the lock, raced another or used a stale head
-- is refused, so positions stay contiguous in commit order and every batch continues
-- the chain where the log ends. The links inside a batch are the writer's arithmetic
-- over bytes it sends and the database keeps as written (bytea, never re-encoded):
-- recomputing them here cost as much as the rest of an append (3-4 ms per 1,000
-- events) and proves nothing `relay audit --verify` does not prove from the same bytes,
-- which it recomputes from the first event to the head, naming the first bad row.
CREATE FUNCTION log_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'log_head has exactly one row: % is refused', TG_OP
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.position < OLD.position THEN
        RAISE EXCEPTION 'the log head never moves back (from % to %)', OLD.position, NEW.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.position = OLD.position THEN
        IF NEW.hash IS DISTINCT FROM OLD.hash THEN
            RAISE EXCEPTION 'the log head hash changes only with its position'
                USING ERRCODE = 'restrict_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (SELECT count(*) FROM events WHERE position > OLD.position AND position <= NEW.position)
            <> NEW.position - OLD.position THEN
        RAISE EXCEPTION 'events % to % are not contiguous after the head at %',
            OLD.position + 1, NEW.position, OLD.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF (SELECT hash IS DISTINCT FROM sha256(OLD.hash || body) FROM events
         WHERE position = OLD.position + 1) THEN
        RAISE EXCEPTION 'event % does not extend the hash chain at the head', OLD.position + 1
            USING ERRCODE = 'restrict_violation';
    END IF;
    -- max() reads the end of the primary key index, whatever the statistics say.
    IF (SELECT max(position) FROM events) <> NEW.position THEN
        RAISE EXCEPTION 'the log head must be the last event (events exist after %)', NEW.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.hash IS DISTINCT FROM (SELECT hash FROM events WHERE position = NEW.position) THEN
        RAISE EXCEPTION 'the log head hash must be the hash of event %', NEW.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$ SET plan_cache_mode = force_custom_plan;  -- plan each range query for its bounds

CREATE TRIGGER log_head_guard
    BEFORE INSERT OR UPDATE OR DELETE ON log_head
    FOR EACH ROW EXECUTE FUNCTION log_head_guard();
CREATE TRIGGER log_head_no_truncate
    BEFORE TRUNCATE ON log_head
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();
ALTER TABLE log_head ENABLE ALWAYS TRIGGER log_head_guard;
ALTER TABLE log_head ENABLE ALWAYS TRIGGER log_head_no_truncate;
