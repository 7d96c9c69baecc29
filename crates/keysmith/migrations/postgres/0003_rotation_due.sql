-- Rotation-due notices: when the sweep last claimed the key for a notice
-- (NULL when never, cleared by a rotation). A key is claimed only when this is
-- older than the start of its current due period, under a row lock (FOR UPDATE
-- SKIP LOCKED), so each period brings one notice across restarts and nodes.
ALTER TABLE keysmith_keys ADD COLUMN rotation_due_notified_at TIMESTAMPTZ;
