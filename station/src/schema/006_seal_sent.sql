-- Station journal, schema version 6: when SEAL was sent to a meter. The journal leads the meter:
-- this is committed before SEAL goes on the line, so that a crash between the meter sealing and
-- the journal's `sealed` leaves a meter that start-up recovery knows *may* be sealed (it was sent
-- SEAL) rather than one it takes for unsealed.
ALTER TABLE meters ADD COLUMN seal_sent_at INTEGER;
