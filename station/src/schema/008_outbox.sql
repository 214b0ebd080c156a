-- Station journal, schema version 8: the journal is the outbox of the factory registry, and the
-- blocks of numbers the registry leased to this station.
--
-- Every meter that ends (done or failed), every voided certificate, every batch opened or closed,
-- every export and every audit checkpoint gets an outbox row in the same transaction that records
-- it: triggers, so that no code path can forget one. `seq` is AUTOINCREMENT, so a number is never
-- used twice, not even after the newest rows were deleted. The body is the record as it will be
-- sent, fixed now: a record pushed twice is the same bytes twice.
CREATE TABLE outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL CHECK (kind IN ('meter', 'void', 'batch', 'export', 'checkpoint')),
    body        TEXT NOT NULL,              -- JSON object
    created_at  INTEGER NOT NULL
);

-- How far the registry has acknowledged, and the pusher's last word (for the health screen).
CREATE TABLE outbox_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    acked       INTEGER NOT NULL,
    pushed_at   INTEGER,
    error       TEXT,
    error_at    INTEGER
);
INSERT INTO outbox_state (id, acked) VALUES (1, 0);

-- Blocks of numbers (serial number n, system title FLAG || n) leased from the registry. A request
-- is written before it is sent, so that a station that lost the answer asks again with the same
-- id and gets the same block. With a registry configured, meters draw their number here only.
CREATE TABLE leases (
    id          INTEGER PRIMARY KEY,
    request     TEXT NOT NULL UNIQUE,
    count       INTEGER NOT NULL CHECK (count > 0),
    state       TEXT NOT NULL CHECK (state IN ('requested', 'granted')),
    registry_id INTEGER,
    first       INTEGER,
    last        INTEGER,
    next        INTEGER,
    requested_at INTEGER NOT NULL,
    granted_at  INTEGER,
    CHECK (state = 'requested' OR (first <= last AND next BETWEEN first AND last + 1))
);

CREATE TRIGGER outbox_meter AFTER UPDATE OF state ON meters
WHEN NEW.state IN ('done', 'failed') AND OLD.state <> NEW.state
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('meter', json_object(
        'meter_id', NEW.id,
        'work_order', (SELECT work_order FROM batches WHERE id = NEW.batch_id),
        'uid', NEW.uid,
        'nest', NEW.nest,
        'state', NEW.state,
        'serial', NEW.serial,
        'serial_no', NEW.serial_no,
        'system_title', NEW.system_title,
        'ldn', NEW.ldn,
        'fw_sha256', NEW.fw_sha256,
        'failure', NEW.failure,
        'operator', NEW.operator,
        'started_at', NEW.started_at,
        'finished_at', NEW.finished_at,
        'certificates', (SELECT json_group_array(json_object('slot', slot, 'serial', serial, 'state', state, 'fingerprint', fingerprint))
                         FROM certificates WHERE meter_id = NEW.id)
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;

CREATE TRIGGER outbox_void AFTER UPDATE OF state ON certificates
WHEN NEW.state = 'voided' AND OLD.state <> 'voided'
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('void', json_object(
        'meter_id', NEW.meter_id,
        'slot', NEW.slot,
        'serial', NEW.serial,
        'fingerprint', NEW.fingerprint,
        'reason', NEW.void_reason,
        'at', NEW.updated_at
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;

CREATE TRIGGER outbox_batch_opened AFTER INSERT ON batches
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('batch', json_object(
        'batch_id', NEW.id, 'work_order', NEW.work_order, 'model', NEW.model, 'quantity', NEW.quantity,
        'state', NEW.state, 'at', NEW.opened_at, 'by', NEW.opened_by
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;

CREATE TRIGGER outbox_batch_closed AFTER UPDATE OF state ON batches
WHEN NEW.state = 'closed' AND OLD.state <> 'closed'
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('batch', json_object(
        'batch_id', NEW.id, 'work_order', NEW.work_order, 'model', NEW.model, 'quantity', NEW.quantity,
        'state', NEW.state, 'at', NEW.closed_at, 'by', NEW.closed_by
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;

CREATE TRIGGER outbox_export AFTER INSERT ON exports
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('export', json_object(
        'export_id', NEW.id,
        'work_order', (SELECT work_order FROM batches WHERE id = NEW.batch_id),
        'manifest_sha256', NEW.manifest_sha256,
        'checkpoint_id', NEW.checkpoint_id,
        'at', NEW.created_at, 'by', NEW.created_by
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;

-- Each checkpoint keeps its tree's right edge (merkle::Frontier), so that the consistency proof
-- to the next one is computed from it and the entries in between only.
ALTER TABLE audit_checkpoints ADD COLUMN frontier BLOB;

-- The tree size of a checkpoint is its entry number; the pusher adds the consistency proof from
-- the checkpoint before it (deterministic, computed from the log when sent).
CREATE TRIGGER outbox_checkpoint AFTER INSERT ON audit_checkpoints
BEGIN
    INSERT INTO outbox (kind, body, created_at) VALUES ('checkpoint', json_object(
        'checkpoint_id', NEW.id,
        'tree_size', NEW.seq,
        'note', NEW.note,
        'reason', NEW.reason,
        'at', NEW.created_at
    ), CAST(strftime('%s', 'now') AS INTEGER) * 1000);
END;
