-- Rotation-due notices: when the sweep last claimed the key for a notice
-- (INTEGER microseconds; NULL when never, cleared by a rotation). A key is
-- claimed only when this is older than the start of its current due period,
-- in one UPDATE, so each period brings one notice across restarts.
ALTER TABLE keysmith_keys ADD COLUMN rotation_due_notified_at INTEGER;
