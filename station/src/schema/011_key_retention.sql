-- Station journal, schema version 11: a closed batch's wrapped meter keys are deleted once the
-- retention period after its newest export has passed (the utility has them); the batch records
-- when. Until then the journal refuses to lose a done meter's keys, whatever statement tries.
ALTER TABLE batches ADD COLUMN keys_purged_at INTEGER;

CREATE TRIGGER wrapped_keys_retention_guard BEFORE DELETE ON wrapped_keys
WHEN EXISTS (
    SELECT 1 FROM meters m JOIN batches b ON b.id = m.batch_id
     WHERE m.id = OLD.meter_id AND m.state = 'done' AND b.keys_purged_at IS NULL
)
BEGIN
    SELECT RAISE(ABORT, 'the wrapped keys of a done meter are deleted only after the retention period');
END;
