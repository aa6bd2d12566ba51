-- Three counts of a run's dead tokens instead of one (events/types.py, run_finished v2):
--   dead         dead-token verdicts (what `unregistered` counted until now)
--   unregistered device_unregistered events of the run
--   kept         unregister_skipped events of the run (the device registered again)
-- Existing rows are brought to what a fold of the log gives (events/projection.py):
-- the old count moves to `dead`, the other two are counted from the events. The head
-- lock keeps appends out meanwhile, so no event of a run is missed.
SELECT position FROM log_head FOR UPDATE;

ALTER TABLE runs ADD COLUMN dead integer NOT NULL DEFAULT 0,
                 ADD COLUMN kept integer NOT NULL DEFAULT 0;

UPDATE runs SET dead = unregistered, unregistered = 0;

UPDATE runs r
   SET unregistered = c.unregistered, kept = c.kept
  FROM (SELECT run,
               count(*) FILTER (WHERE type = 'device_unregistered') AS unregistered,
               count(*) FILTER (WHERE type = 'unregister_skipped') AS kept
          FROM events
         WHERE run IS NOT NULL AND type IN ('device_unregistered', 'unregister_skipped')
         GROUP BY run) c
 WHERE r.run = c.run;

COMMENT ON COLUMN runs.dead IS 'dead-token verdicts in the run';
COMMENT ON COLUMN runs.unregistered IS 'device_unregistered events of the run';
COMMENT ON COLUMN runs.kept IS 'unregister_skipped events of the run (registered again)';
