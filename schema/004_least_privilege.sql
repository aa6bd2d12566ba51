-- Least privilege (relay/privilege.py): the runtime role appends to `events` and locks
-- the head, but may not move the head itself. The insert trigger that moves it runs
-- with the rights of its owner (the role that runs migrations), so the runtime role
-- needs no UPDATE right on the head's position and hash; the head's guard still checks
-- every move. search_path is fixed to the one of this migration, so a caller cannot
-- slip in a `log_head` of its own.
ALTER FUNCTION events_advance_head() SECURITY DEFINER;
ALTER FUNCTION events_advance_head() SET search_path FROM CURRENT;
