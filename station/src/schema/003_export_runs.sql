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
