-- Station journal, schema version 4: the trust anchors a batch's meters receive are pinned when
-- the batch opens (device CA, firmware-verification certificate, the model's utility anchors),
-- in order. Every meter of the batch gets exactly these bytes, whatever files or token objects
-- change later; the digest of the set is in the batch's audit entry and the manifest lists them.

CREATE TABLE batch_anchors (
    batch_id        INTEGER NOT NULL REFERENCES batches(id),
    position        INTEGER NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('device-ca', 'firmware-verification', 'utility-ca', 'utility-client')),
    idx             INTEGER NOT NULL CHECK (idx BETWEEN 0 AND 255),
    sha256          TEXT NOT NULL,               -- of the certificate's DER, hex
    der             BLOB NOT NULL,
    PRIMARY KEY (batch_id, position)
);

CREATE TRIGGER batch_anchors_never_change BEFORE UPDATE ON batch_anchors
BEGIN
    SELECT RAISE(ABORT, 'a batch''s pinned trust anchors never change');
END;

CREATE TRIGGER batch_anchors_never_go BEFORE DELETE ON batch_anchors
BEGIN
    SELECT RAISE(ABORT, 'a batch''s pinned trust anchors are never removed');
END;

-- The interfaces every meter of a batch must have disabled when it seals (iface bits of the line
-- protocol, the provisioning bit always among them), fixed when the batch opens.
ALTER TABLE batches ADD COLUMN disable_mask INTEGER CHECK (disable_mask BETWEEN 1 AND 65535);
