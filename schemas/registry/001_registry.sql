-- The factory registry, schema version 1 (PostgreSQL 15 or later).
--
-- Every station stays autonomous on its line; this database receives what their journals record,
-- afterwards and idempotently, and hands out the blocks of numbers (serial number and system
-- title) they provision from. The schema is described in schemas/registry.md.
--
-- Who may do what is PostgreSQL's own business here, not the stations' good behaviour:
--   * a station logs in as its own role (its name is the station id, the CN of its TLS client
--     certificate, `cert` authentication), a member of fleet_station;
--   * row-level security lets a station read and write only its own rows;
--   * everything a station's record implies (the meters table, the checkpoint chain, alarms) is
--     written by triggers that run as the schema's owner, so a station cannot write them directly;
--   * auditors, supervisors and account managers are members of fleet_reader: they read, never
--     write.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE SCHEMA fleet;

DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_station') THEN
        CREATE ROLE fleet_station NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_reader') THEN
        CREATE ROLE fleet_reader NOLOGIN;
    END IF;
END $$;

CREATE TABLE fleet.meta (
    id          int PRIMARY KEY CHECK (id = 1),
    version     int NOT NULL
);
INSERT INTO fleet.meta VALUES (1, 1);

-- Enrolled stations. The audit-signer certificate is recorded at enrolment, out of band: the
-- fleet audit checks every checkpoint's signature against it, not against a key the station
-- sends.
CREATE TABLE fleet.stations (
    station         text PRIMARY KEY CHECK (station ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    flag            text NOT NULL CHECK (flag ~ '^[A-Z]{3}$'),
    audit_cert      text NOT NULL,
    enrolled_at     timestamptz NOT NULL DEFAULT now()
);

-- The numbers of one manufacturer (FLAG id): serial number n and system title FLAG || n (five
-- bytes) are one number; `next` is the first never leased.
CREATE TABLE fleet.number_spaces (
    flag            text PRIMARY KEY CHECK (flag ~ '^[A-Z]{3}$'),
    next            bigint NOT NULL CHECK (next >= 1),
    last            bigint NOT NULL CHECK (last < 1099511627776)
);

-- Blocks granted to stations. No two blocks of one space overlap, whatever the code does.
CREATE TABLE fleet.leases (
    id              bigserial PRIMARY KEY,
    station         text NOT NULL REFERENCES fleet.stations,
    request         text NOT NULL,
    flag            text NOT NULL REFERENCES fleet.number_spaces,
    first           bigint NOT NULL,
    last            bigint NOT NULL,
    granted_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (first <= last),
    UNIQUE (station, request),
    EXCLUDE USING gist (flag WITH =, int8range(first, last, '[]') WITH &&)
);

-- Everything a station pushed, once per (station, seq): its outbox, verbatim. `digest` is the
-- SHA-256 of the body's text, computed here; a second push of the same sequence number
-- with the same digest is a no-op, with another digest an alarm.
CREATE TABLE fleet.records (
    station         text NOT NULL DEFAULT current_user,
    seq             bigint NOT NULL CHECK (seq >= 1),
    kind            text NOT NULL CHECK (kind IN ('meter', 'void', 'batch', 'export', 'checkpoint')),
    body            text NOT NULL,
    digest          bytea NOT NULL,
    proof           bytea[],
    verdict         text NOT NULL DEFAULT 'accepted' CHECK (verdict IN ('accepted', 'refused')),
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (station, seq)
);

-- What the registry concluded from the records. Written by triggers only.
CREATE TABLE fleet.meters (
    station         text NOT NULL,
    meter_id        bigint NOT NULL,
    seq             bigint NOT NULL,
    work_order      text,
    uid             text NOT NULL,
    nest            int,
    state           text NOT NULL,
    serial          text,
    serial_no       bigint,
    system_title    text,
    failure         text,
    operator        text,
    started_at      timestamptz,
    finished_at     timestamptz,
    PRIMARY KEY (station, meter_id)
);
-- The last line of defence: a number issued twice anywhere in the factory.
CREATE UNIQUE INDEX meters_serial ON fleet.meters (serial) WHERE serial IS NOT NULL;
CREATE UNIQUE INDEX meters_system_title ON fleet.meters (system_title) WHERE system_title IS NOT NULL;
CREATE INDEX meters_uid ON fleet.meters (uid);
CREATE INDEX meters_work_order ON fleet.meters (work_order);

-- Accepted audit checkpoints, per station in order: each continues the one before (a
-- consistency proof between their tree heads verified here).
CREATE TABLE fleet.checkpoints (
    station         text NOT NULL,
    seq             bigint NOT NULL,
    tree_size       bigint NOT NULL,
    root            bytea NOT NULL,
    note            text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (station, seq)
);
CREATE INDEX checkpoints_head ON fleet.checkpoints (station, tree_size DESC, seq DESC);

CREATE TABLE fleet.alarms (
    id              bigserial PRIMARY KEY,
    station         text NOT NULL,
    kind            text NOT NULL,
    seq             bigint,
    message         text NOT NULL,
    raised_at       timestamptz NOT NULL DEFAULT now()
);

-- Append-only: what the registry received and concluded is never edited, not even by a station
-- role that somehow gained the privilege.
CREATE FUNCTION fleet.append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'fleet.%: rows are append-only', TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER records_append_only BEFORE UPDATE OR DELETE ON fleet.records
    FOR EACH ROW EXECUTE FUNCTION fleet.append_only();
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON fleet.checkpoints
    FOR EACH ROW EXECUTE FUNCTION fleet.append_only();
CREATE TRIGGER alarms_append_only BEFORE UPDATE OR DELETE ON fleet.alarms
    FOR EACH ROW EXECUTE FUNCTION fleet.append_only();
CREATE TRIGGER leases_append_only BEFORE UPDATE OR DELETE ON fleet.leases
    FOR EACH ROW EXECUTE FUNCTION fleet.append_only();

-- RFC 9162 2.1.4.2: does `proof` show the tree of size2 (root2) extends the one of size1 (root1)?
CREATE FUNCTION fleet.node_hash(l bytea, r bytea) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT sha256('\x01'::bytea || l || r)
$$;

CREATE FUNCTION fleet.verify_consistency(size1 bigint, size2 bigint, proof bytea[], root1 bytea, root2 bytea)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    path bytea[] := coalesce(proof, '{}');
    fn bigint;
    sn bigint;
    fr bytea;
    sr bytea;
    c bytea;
    i int;
BEGIN
    IF size1 < 1 OR size1 > size2 THEN
        RETURN false;
    END IF;
    IF size1 = size2 THEN
        RETURN cardinality(path) = 0 AND root1 = root2;
    END IF;
    IF size1 & (size1 - 1) = 0 THEN
        path := root1 || path;
    END IF;
    IF cardinality(path) = 0 THEN
        RETURN false;
    END IF;
    fn := size1 - 1;
    sn := size2 - 1;
    WHILE fn & 1 = 1 LOOP
        fn := fn >> 1;
        sn := sn >> 1;
    END LOOP;
    fr := path[1];
    sr := path[1];
    FOR i IN 2 .. cardinality(path) LOOP
        c := path[i];
        IF sn = 0 THEN
            RETURN false;
        END IF;
        IF fn & 1 = 1 OR fn = sn THEN
            fr := fleet.node_hash(c, fr);
            sr := fleet.node_hash(c, sr);
            IF fn & 1 = 0 THEN
                WHILE fn & 1 = 0 AND fn <> 0 LOOP
                    fn := fn >> 1;
                    sn := sn >> 1;
                END LOOP;
            END IF;
        ELSE
            sr := fleet.node_hash(sr, c);
        END IF;
        fn := fn >> 1;
        sn := sn >> 1;
    END LOOP;
    RETURN fr = root1 AND sr = root2 AND sn = 0;
END $$;

-- Before a record is stored: a repeat is dropped (idempotent push), a different record under a
-- used sequence number is an alarm and dropped (the first one stays), a checkpoint that does not
-- continue the station's last accepted one is stored as refused with an alarm.
CREATE FUNCTION fleet.record_in() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = fleet, pg_temp AS $$
DECLARE
    old_digest bytea;
    old_at timestamptz;
    last fleet.checkpoints%ROWTYPE;
    size bigint;
    root bytea;
    from_size bigint;
    why text;
BEGIN
    NEW.digest := sha256(convert_to(NEW.body, 'UTF8'));
    SELECT digest, received_at INTO old_digest, old_at FROM fleet.records WHERE station = NEW.station AND seq = NEW.seq;
    IF FOUND THEN
        IF old_digest <> NEW.digest THEN
            SELECT * INTO last FROM fleet.checkpoints WHERE station = NEW.station ORDER BY tree_size DESC, seq DESC LIMIT 1;
            INSERT INTO fleet.alarms (station, kind, seq, message) VALUES (NEW.station,
                CASE WHEN NEW.kind = 'checkpoint' THEN 'checkpoint_refused' ELSE 'divergence' END, NEW.seq,
                format('station %s sent a %s record %s that differs from the one received at %s: its journal does not continue what it sent before (restored from an old backup?); last good checkpoint: %s',
                       NEW.station, NEW.kind, NEW.seq, old_at,
                       CASE WHEN last.station IS NULL THEN 'none'
                            ELSE format('%s entries, root %s, received %s', last.tree_size, encode(last.root, 'base64'), last.received_at) END));
        END IF;
        RETURN NULL;
    END IF;
    IF NEW.kind = 'checkpoint' THEN
        SELECT * INTO last FROM fleet.checkpoints WHERE station = NEW.station ORDER BY tree_size DESC, seq DESC LIMIT 1;
        size := (NEW.body::jsonb ->> 'tree_size')::bigint;
        root := decode(NEW.body::jsonb ->> 'root', 'base64');
        from_size := (NEW.body::jsonb ->> 'proof_from')::bigint;
        IF last.station IS NOT NULL THEN
            IF size < last.tree_size THEN
                why := format('its tree has %s entries, fewer than the %s of the last good checkpoint', size, last.tree_size);
            ELSIF from_size IS DISTINCT FROM last.tree_size AND size <> last.tree_size THEN
                why := format('its consistency proof starts at %s entries, not at the last good checkpoint''s %s', from_size, last.tree_size);
            ELSIF NOT fleet.verify_consistency(last.tree_size, size, CASE WHEN size = last.tree_size THEN '{}'::bytea[] ELSE NEW.proof END, last.root, root) THEN
                why := 'its tree does not extend the last good checkpoint''s (the consistency proof fails)';
            END IF;
            IF why IS NOT NULL THEN
                NEW.verdict := 'refused';
                INSERT INTO fleet.alarms (station, kind, seq, message) VALUES (NEW.station, 'checkpoint_refused', NEW.seq,
                    format('station %s: checkpoint at %s entries refused: %s; last good checkpoint: %s entries, root %s, received %s',
                           NEW.station, size, why, last.tree_size, encode(last.root, 'base64'), last.received_at));
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER records_in BEFORE INSERT ON fleet.records FOR EACH ROW EXECUTE FUNCTION fleet.record_in();

-- After a record is stored: what it says goes into the registry's tables. A number already
-- issued elsewhere is a critical alarm, never a failed push.
CREATE FUNCTION fleet.record_applied() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = fleet, pg_temp AS $$
DECLARE
    b jsonb := NEW.body::jsonb;
    other text;
BEGIN
    IF NEW.verdict <> 'accepted' THEN
        RETURN NULL;
    END IF;
    IF NEW.kind = 'checkpoint' THEN
        INSERT INTO fleet.checkpoints (station, seq, tree_size, root, note)
        VALUES (NEW.station, NEW.seq, (b ->> 'tree_size')::bigint, decode(b ->> 'root', 'base64'), b ->> 'note');
    ELSIF NEW.kind = 'meter' THEN
        BEGIN
            INSERT INTO fleet.meters (station, meter_id, seq, work_order, uid, nest, state, serial, serial_no,
                                      system_title, failure, operator, started_at, finished_at)
            VALUES (NEW.station, (b ->> 'meter_id')::bigint, NEW.seq, b ->> 'work_order', b ->> 'uid',
                    (b ->> 'nest')::int, b ->> 'state', b ->> 'serial', (b ->> 'serial_no')::bigint,
                    b ->> 'system_title', b ->> 'failure', b ->> 'operator',
                    to_timestamp((b ->> 'started_at')::bigint / 1000.0),
                    to_timestamp((b ->> 'finished_at')::bigint / 1000.0))
            ON CONFLICT (station, meter_id) DO UPDATE SET
                seq = EXCLUDED.seq, state = EXCLUDED.state, failure = EXCLUDED.failure,
                finished_at = EXCLUDED.finished_at;
        EXCEPTION WHEN unique_violation THEN
            SELECT station INTO other FROM fleet.meters
             WHERE serial = b ->> 'serial' OR system_title = b ->> 'system_title' LIMIT 1;
            INSERT INTO fleet.alarms (station, kind, seq, message) VALUES (NEW.station, 'duplicate_number', NEW.seq,
                format('station %s provisioned meter %s as serial %s, system title %s, already issued by station %s: a number was issued twice',
                       NEW.station, b ->> 'uid', b ->> 'serial', b ->> 'system_title', coalesce(other, '?')));
        END;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER records_applied AFTER INSERT ON fleet.records FOR EACH ROW EXECUTE FUNCTION fleet.record_applied();

-- A block of `count` numbers for the calling station, once per request id (a station that lost
-- the answer asks again with the same id and gets the same block).
CREATE FUNCTION fleet.take_lease(request text, count bigint)
RETURNS TABLE (lease_id bigint, first bigint, last bigint) LANGUAGE plpgsql SECURITY DEFINER
SET search_path = fleet, pg_temp AS $$
DECLARE
    me text := session_user;
    f text;
    space fleet.number_spaces%ROWTYPE;
BEGIN
    IF count < 1 OR count > 10000000 THEN
        RAISE EXCEPTION 'a lease is 1 to 10000000 numbers, not %', count;
    END IF;
    SELECT s.flag INTO f FROM fleet.stations s WHERE s.station = me;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'station % is not enrolled in this registry', me USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY SELECT l.id, l.first, l.last FROM fleet.leases l WHERE l.station = me AND l.request = take_lease.request;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO space FROM fleet.number_spaces WHERE flag = f FOR UPDATE;
    IF NOT FOUND OR space.next + count - 1 > space.last THEN
        RAISE EXCEPTION 'the numbers of % are used up (next %, last %)', f, space.next, space.last;
    END IF;
    UPDATE fleet.number_spaces SET next = space.next + count WHERE flag = f;
    RETURN QUERY INSERT INTO fleet.leases (station, request, flag, first, last)
        VALUES (me, take_lease.request, f, space.next, space.next + count - 1)
        RETURNING id, leases.first, leases.last;
END $$;

-- The fleet view, for supervisors at any cell's console (through their station) and for
-- fleet_reader: counts per batch and per nest, and where one meter was provisioned. A station
-- role reads nothing else of other stations; these look up one exact serial, system title or
-- UID, and never list meters.
CREATE FUNCTION fleet.view_batches()
RETURNS TABLE (work_order text, station text, done bigint, failed bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = fleet, pg_temp AS $$
    SELECT coalesce(m.work_order, '?'), m.station,
           count(*) FILTER (WHERE m.state = 'done'), count(*) FILTER (WHERE m.state = 'failed')
      FROM fleet.meters m GROUP BY 1, 2 ORDER BY 1, 2
$$;

CREATE FUNCTION fleet.view_yield()
RETURNS TABLE (station text, nest int, done bigint, failed bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = fleet, pg_temp AS $$
    SELECT m.station, m.nest,
           count(*) FILTER (WHERE m.state = 'done'), count(*) FILTER (WHERE m.state = 'failed')
      FROM fleet.meters m GROUP BY 1, 2 ORDER BY 1, 2
$$;

CREATE FUNCTION fleet.view_find(what text)
RETURNS TABLE (station text, work_order text, nest int, uid text, state text, serial text,
               system_title text, operator text, finished_at text, failure text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = fleet, pg_temp AS $$
    SELECT m.station, m.work_order, m.nest, m.uid, m.state, m.serial, m.system_title, m.operator,
           m.finished_at::text, m.failure
      FROM fleet.meters m
     WHERE m.serial = what OR upper(m.uid) = upper(what) OR upper(m.system_title) = upper(what)
     ORDER BY m.finished_at
$$;

-- Row-level security: a station sees and writes its own rows only.
ALTER TABLE fleet.records ENABLE ROW LEVEL SECURITY;
CREATE POLICY records_own ON fleet.records TO fleet_station
    USING (station = current_user) WITH CHECK (station = current_user);
CREATE POLICY records_read ON fleet.records FOR SELECT TO fleet_reader USING (true);
ALTER TABLE fleet.leases ENABLE ROW LEVEL SECURITY;
CREATE POLICY leases_own ON fleet.leases FOR SELECT TO fleet_station USING (station = current_user);
CREATE POLICY leases_read ON fleet.leases FOR SELECT TO fleet_reader USING (true);
ALTER TABLE fleet.alarms ENABLE ROW LEVEL SECURITY;
CREATE POLICY alarms_own ON fleet.alarms FOR SELECT TO fleet_station USING (station = current_user);
CREATE POLICY alarms_read ON fleet.alarms FOR SELECT TO fleet_reader USING (true);

REVOKE ALL ON SCHEMA fleet FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA fleet FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA fleet FROM PUBLIC;
GRANT USAGE ON SCHEMA fleet TO fleet_station, fleet_reader;
GRANT SELECT, INSERT ON fleet.records TO fleet_station;
GRANT SELECT ON fleet.leases, fleet.alarms TO fleet_station;
GRANT EXECUTE ON FUNCTION fleet.take_lease(text, bigint) TO fleet_station;
GRANT EXECUTE ON FUNCTION fleet.view_batches(), fleet.view_yield(), fleet.view_find(text)
    TO fleet_station, fleet_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA fleet TO fleet_reader;

-- Enrols a station (run by the registry's administrator): its role, which logs in with a client
-- certificate whose CN is the station id, and its audit-signer certificate.
CREATE FUNCTION fleet.enrol(station text, flag text, audit_cert text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet.stations (station, flag, audit_cert) VALUES (enrol.station, enrol.flag, enrol.audit_cert);
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = enrol.station) THEN
        EXECUTE format('CREATE ROLE %I LOGIN IN ROLE fleet_station', enrol.station);
    ELSE
        EXECUTE format('GRANT fleet_station TO %I', enrol.station);
    END IF;
END $$;
REVOKE ALL ON FUNCTION fleet.enrol(text, text, text) FROM PUBLIC;
