-- The head's guard (schema/001_event_log.sql) checks the same facts for less: it ran
-- once per append with every one of its queries planned afresh (`force_custom_plan`),
-- about 340 us of the server's time per commit, a sixth of a lone registration's.
-- Only the contiguity count depends on its bounds for a good plan (a range over the
-- primary key); the probes by position and the end of the log use the primary key
-- whatever the values, so PostgreSQL keeps their plans (plan_cache_mode auto: the count
-- stays planned per call, as its generic estimate is far above its custom one). The
-- last event is read once, for both "nothing after the new head" and its hash.
CREATE OR REPLACE FUNCTION log_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_position bigint;
    last_hash     bytea;
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
    SELECT position, hash INTO last_position, last_hash
      FROM events ORDER BY position DESC LIMIT 1;
    IF last_position <> NEW.position THEN
        RAISE EXCEPTION 'the log head must be the last event (events exist after %)', NEW.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    IF NEW.hash IS DISTINCT FROM last_hash THEN
        RAISE EXCEPTION 'the log head hash must be the hash of event %', NEW.position
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END
$$;
