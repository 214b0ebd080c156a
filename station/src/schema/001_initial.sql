-- Station journal, schema version 1. Times are Unix milliseconds (UTC).

CREATE TABLE users (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    role            TEXT NOT NULL CHECK (role IN ('operator', 'supervisor', 'security_officer', 'auditor')),
    pin_hash        TEXT NOT NULL,               -- Argon2id, PHC string
    disabled        INTEGER NOT NULL DEFAULT 0,
    failed_pins     INTEGER NOT NULL DEFAULT 0,
    locked_until    INTEGER,
    created_at      INTEGER NOT NULL
);

CREATE TABLE sessions (
    token_hash      BLOB PRIMARY KEY,            -- SHA-256 of the session token
    user_id         INTEGER NOT NULL REFERENCES users(id),
    created_at      INTEGER NOT NULL,
    last_seen       INTEGER NOT NULL,
    ended_at        INTEGER
);

CREATE TABLE firmware (
    id              INTEGER PRIMARY KEY,
    sha256          TEXT NOT NULL UNIQUE,        -- of the whole image file
    version         TEXT NOT NULL,
    size            INTEGER NOT NULL,
    image           BLOB NOT NULL,
    signer_key_hash TEXT NOT NULL,
    imported_at     INTEGER NOT NULL,
    imported_by     TEXT NOT NULL
);

CREATE TABLE customers (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    cert_der        BLOB NOT NULL,
    fingerprint     TEXT NOT NULL UNIQUE,        -- SHA-256 of the certificate DER
    imported_at     INTEGER NOT NULL,
    imported_by     TEXT NOT NULL
);

CREATE TABLE batches (
    id              INTEGER PRIMARY KEY,
    work_order      TEXT NOT NULL UNIQUE,
    model           TEXT NOT NULL,
    firmware_id     INTEGER NOT NULL REFERENCES firmware(id),
    customer_id     INTEGER NOT NULL REFERENCES customers(id),
    quantity        INTEGER NOT NULL CHECK (quantity > 0),
    serial_prefix   TEXT NOT NULL,
    serial_first    INTEGER NOT NULL,
    serial_last     INTEGER NOT NULL,
    next_serial     INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    transport_key   TEXT NOT NULL,               -- HSM label of the batch transport key
    transport_wrapped BLOB NOT NULL,             -- RSA-OAEP for the customer certificate
    transport_kcv   TEXT NOT NULL,               -- check value of the transport key
    oaep_hash       TEXT NOT NULL,
    opened_at       INTEGER NOT NULL,
    opened_by       TEXT NOT NULL,
    closed_at       INTEGER,
    closed_by       TEXT,
    CHECK (serial_first <= serial_last),
    CHECK (next_serial BETWEEN serial_first AND serial_last + 1)
);

CREATE TABLE meters (
    id              INTEGER PRIMARY KEY,
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    uid             TEXT NOT NULL,
    nest            INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('started', 'assigned', 'keyed', 'flashed', 'sealed', 'done', 'failed')),
    serial          TEXT UNIQUE,
    serial_no       INTEGER,
    system_title    TEXT UNIQUE,
    ldn             TEXT,
    fw_sha256       TEXT,
    receipt         BLOB,
    receipt_sig     BLOB,
    failure         TEXT,
    operator        TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
-- A UID has at most one live (not failed) record: a provisioned meter is never provisioned again
-- without an explicit rework, which fails the old record first.
CREATE UNIQUE INDEX meters_live_uid ON meters(uid) WHERE state <> 'failed';
CREATE INDEX meters_batch ON meters(batch_id, state);

CREATE TABLE certificates (
    id              INTEGER PRIMARY KEY,
    meter_id        INTEGER NOT NULL REFERENCES meters(id),
    slot            TEXT NOT NULL CHECK (slot IN ('sign', 'ka')),
    state           TEXT NOT NULL CHECK (state IN ('intent', 'issued', 'delivered', 'voided')),
    serial          TEXT NOT NULL UNIQUE,        -- chosen (and committed) before the HSM signs
    der             BLOB,
    fingerprint     TEXT,
    void_reason     TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    CHECK (state = 'intent' OR state = 'voided' OR der IS NOT NULL)
);
CREATE INDEX certificates_meter ON certificates(meter_id);

CREATE TABLE wrapped_keys (
    id              INTEGER PRIMARY KEY,
    meter_id        INTEGER NOT NULL REFERENCES meters(id),
    key_id          TEXT NOT NULL,
    key_type        TEXT NOT NULL,
    wrap_alg        TEXT NOT NULL,
    wrapped         BLOB NOT NULL,               -- under the batch transport key, never clear
    kcv             TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    UNIQUE (meter_id, key_id)
);

CREATE TABLE audit (
    seq             INTEGER PRIMARY KEY,
    ts              INTEGER NOT NULL,
    source          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    severity        TEXT NOT NULL CHECK (severity IN ('info', 'notice', 'warning', 'critical')),
    actor           TEXT NOT NULL,
    details         TEXT NOT NULL,               -- JSON object
    hash            BLOB NOT NULL,               -- chain hash up to and including this entry
    sig             BLOB NOT NULL                -- audit key signature over (seq, hash)
);

-- The newest chain head, signed by the audit key: makes truncation of the newest entries visible.
CREATE TABLE audit_head (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    seq             INTEGER NOT NULL,
    hash            BLOB NOT NULL,
    signature       BLOB NOT NULL
);

CREATE TABLE audit_checkpoints (
    id              INTEGER PRIMARY KEY,
    seq             INTEGER NOT NULL,
    hash            BLOB NOT NULL,
    note            TEXT NOT NULL,               -- C2SP signed note
    reason          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE alarms (
    id              INTEGER PRIMARY KEY,
    audit_seq       INTEGER NOT NULL REFERENCES audit(seq),
    kind            TEXT NOT NULL,
    message         TEXT NOT NULL,
    nest            INTEGER,
    raised_at       INTEGER NOT NULL,
    acked_at        INTEGER,
    acked_by        TEXT
);

CREATE TABLE exports (
    id              INTEGER PRIMARY KEY,
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    out_dir         TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    checkpoint_id   INTEGER NOT NULL REFERENCES audit_checkpoints(id),
    created_at      INTEGER NOT NULL,
    created_by      TEXT NOT NULL
);

-- Supervisor approvals to provision a failed meter again (one use each).
CREATE TABLE reworks (
    id              INTEGER PRIMARY KEY,
    uid             TEXT NOT NULL,
    approved_by     TEXT NOT NULL,
    approved_at     INTEGER NOT NULL,
    used_at         INTEGER
);
