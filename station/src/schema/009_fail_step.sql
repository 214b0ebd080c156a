-- Station journal, schema version 9: the step at which a meter failed, for the supervisor's
-- dashboards (yield per step), and an index for reading a shift's meters by when they finished.
-- Meters that failed before this version have no step (the dashboards count them as "not
-- recorded").
ALTER TABLE meters ADD COLUMN fail_step TEXT;
CREATE INDEX meters_finished ON meters(finished_at) WHERE finished_at IS NOT NULL;
