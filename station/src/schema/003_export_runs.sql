-- Station journal, schema version 3: an export's intent is journalled before any file is
-- written, so that start-up finds an export a crash interrupted and finishes or abandons it.

CREATE TABLE export_runs (
    id              INTEGER PRIMARY KEY,
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    out_dir         TEXT NOT NULL,               -- where the export appears, whole, or not at all
    staging_dir     TEXT NOT NULL,               -- where its files are written first
    checkpoint_id   INTEGER NOT NULL REFERENCES audit_checkpoints(id),
    state           TEXT NOT NULL CHECK (state IN ('started', 'done', 'abandoned')),
    started_at      INTEGER NOT NULL,
    started_by      TEXT NOT NULL,
    finished_at     INTEGER
);

-- Each wrapped key's binding to its meter: the first 16 bytes of SHA-256 over
-- "cell-key-binding-v1" NUL ‖ system title (8 bytes) ‖ key id NUL ‖ the key, computed in the HSM
-- when the key is made. Moving a key to another meter's row cannot carry a binding that holds.
ALTER TABLE wrapped_keys ADD COLUMN binding TEXT;

-- The SHA-256 of each certified public key: a key certified before (a meter with a broken random
-- generator) is refused, and the journal refuses a second certificate for one key.
ALTER TABLE certificates ADD COLUMN key_sha256 TEXT;
CREATE UNIQUE INDEX certificates_key ON certificates(key_sha256) WHERE key_sha256 IS NOT NULL;
