-- Station journal, schema version 2: state transitions guarded by the journal itself.
--
-- The engine's updates name the state they expect (`UPDATE ... WHERE state = ...`, row count
-- checked); these triggers are the second line: whatever process or statement tries it, a failed
-- meter never becomes done, a done meter never becomes failed, and a voided or delivered
-- certificate never changes again.

CREATE TRIGGER meters_state_guard BEFORE UPDATE OF state ON meters
WHEN NOT (
       (OLD.state = 'started'  AND NEW.state IN ('assigned', 'failed'))
    OR (OLD.state = 'assigned' AND NEW.state IN ('keyed', 'flashed', 'failed'))
    OR (OLD.state = 'keyed'    AND NEW.state IN ('flashed', 'failed'))
    OR (OLD.state = 'flashed'  AND NEW.state IN ('sealed', 'failed'))
    OR (OLD.state = 'sealed'   AND NEW.state IN ('done', 'failed'))
)
BEGIN
    SELECT RAISE(ABORT, 'meter state transition refused by the journal');
END;

CREATE TRIGGER certificates_state_guard BEFORE UPDATE OF state ON certificates
WHEN NOT (
       (OLD.state = 'intent' AND NEW.state IN ('issued', 'voided'))
    OR (OLD.state = 'issued' AND NEW.state IN ('delivered', 'voided'))
)
BEGIN
    SELECT RAISE(ABORT, 'certificate state transition refused by the journal');
END;

-- Whether a session may still be used is decided with its creation time too (absolute lifetime).
CREATE INDEX sessions_user ON sessions(user_id) WHERE ended_at IS NULL;

-- The cell's own certificates, as the token held them when the station last started: an
-- auditor verifies a copied journal with the audit signer's certificate (checked against the
-- manufacturer root they hold) without the HSM.
CREATE TABLE cell_certificates (
    label           TEXT PRIMARY KEY,
    der             BLOB NOT NULL,
    updated_at      INTEGER NOT NULL
);
