//! The factory registry: one PostgreSQL database that every station of a factory pushes its
//! records to, afterwards, and leases its numbers from (schemas/registry.md).
//!
//! A station never waits for the registry on the line. Its journal is the outbox: triggers give
//! every finished meter, voided certificate, batch, export and audit checkpoint an outbox row in
//! the transaction that records it (journal schema 8), and [`Pusher`] sends what the registry has
//! not acknowledged, in batches, whenever it can reach it. The registry decides what it accepts:
//! row-level security keeps each station to its own rows, and its triggers check that each
//! station's checkpoints extend the last one they accepted (RFC 6962 consistency proofs), so a
//! journal rolled back to an old backup is caught there, not by the station that was rolled back.
//!
//! Uniqueness of serial numbers and system titles comes from leases: blocks of numbers the
//! registry grants one station at a time, recorded in the journal and drawn from offline. The
//! registry's unique constraints only catch a mistake; a number issued twice is its alarm.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rusqlite::{OptionalExtension, params};
use tokio_postgres::Client;

use crate::config::FleetSettings;
use crate::db::{DbError, now_ms};
use crate::merkle::{self, Hash};

/// The registry's schema, applied by [`migrate`].
pub const REGISTRY_SCHEMA: &str = include_str!("../../schemas/registry/001_registry.sql");

/// The registry's schema version this station writes.
pub const REGISTRY_VERSION: i32 = 1;

/// The last serial number: serials are nine decimal digits after the batch prefix.
pub const LAST_NUMBER: i64 = 999_999_999;

/// Something went wrong talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A setting or file of the station's.
    #[error("{0}")]
    Setup(String),
    /// The registry could not be reached or refused the connection.
    #[error("the registry at {at} cannot be reached: {why}")]
    Unreachable {
        /// host:port/database.
        at: String,
        /// What the connection said.
        why: String,
    },
    /// The registry answered with an error.
    #[error("the registry refused: {0}")]
    Refused(String),
    /// The journal.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for FleetError {
    fn from(e: rusqlite::Error) -> Self {
        FleetError::Db(e.into())
    }
}

impl From<tokio_postgres::Error> for FleetError {
    fn from(e: tokio_postgres::Error) -> Self {
        FleetError::Refused(pg_message(&e))
    }
}

/// The server's message of a PostgreSQL error, or the error itself.
pub fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

/// How to reach the registry, as one client: a station (its `[fleet]` settings) or a person's
/// command (`station fleet`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Database.
    pub database: String,
    /// The role: the CN of the client certificate.
    pub user: String,
    /// The registry server's CA (PEM).
    pub server_ca: std::path::PathBuf,
    /// The client certificate (PEM).
    pub cert: std::path::PathBuf,
    /// Its key (PEM PKCS#8, owner-only).
    pub key: std::path::PathBuf,
}

impl Endpoint {
    /// A station's endpoint.
    pub fn station(station_id: &str, f: &FleetSettings) -> Endpoint {
        Endpoint {
            host: f.host.clone(),
            port: f.port,
            database: f.database.clone(),
            user: station_id.to_string(),
            server_ca: f.server_ca.clone(),
            cert: f.cert.clone(),
            key: f.key.clone(),
        }
    }

    /// A registry connection file (`station fleet --registry FILE`): TOML with `host`, `port`
    /// (5432), `database` (`registry`), `user` (the CN of the client certificate), `server_ca`,
    /// `cert` and `key`; relative paths are taken from the file's directory.
    pub fn parse(path: &Path, text: &str) -> Result<Endpoint, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            host: String,
            port: Option<u16>,
            database: Option<String>,
            user: String,
            server_ca: std::path::PathBuf,
            cert: std::path::PathBuf,
            key: std::path::PathBuf,
        }
        let f: File = toml::from_str(text)
            .map_err(|e| format!("{}: {}", path.display(), e.message().trim()))?;
        if f.host.trim().is_empty() || f.user.trim().is_empty() {
            return Err(format!(
                "{}: host and user must not be empty",
                path.display()
            ));
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: std::path::PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Endpoint {
            host: f.host,
            port: f.port.unwrap_or(5432),
            database: f.database.unwrap_or_else(|| "registry".into()),
            user: f.user,
            server_ca: resolve(f.server_ca),
            cert: resolve(f.cert),
            key: resolve(f.key),
        })
    }

    fn at(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.database)
    }
}

fn tls_config(ep: &Endpoint) -> Result<rustls::ClientConfig, FleetError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let setup = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
        FleetError::Setup(format!("{what} {}: {e}", p.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ep.server_ca)
        .map_err(|e| setup("cannot read the registry CA", &ep.server_ca, &e))?
    {
        let c = c.map_err(|e| setup("cannot read the registry CA", &ep.server_ca, &e))?;
        roots
            .add(c)
            .map_err(|e| setup("the registry CA is not usable:", &ep.server_ca, &e))?;
    }
    if roots.is_empty() {
        return Err(FleetError::Setup(format!(
            "{} holds no certificate (the registry server's CA, PEM)",
            ep.server_ca.display()
        )));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ep.cert)
        .map_err(|e| setup("cannot read the client certificate", &ep.cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| setup("cannot read the client certificate", &ep.cert, &e))?;
    if chain.is_empty() {
        return Err(FleetError::Setup(format!(
            "{} holds no certificate",
            ep.cert.display()
        )));
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(&ep.key).map_err(|e| setup("cannot read the key", &ep.key, &e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(FleetError::Setup(format!(
                "{} is readable by others (mode {:o}): a private key must be owner-only (chmod 600)",
                ep.key.display(),
                meta.permissions().mode() & 0o777
            )));
        }
    }
    let key = PrivateKeyDer::from_pem_file(&ep.key)
        .map_err(|e| setup("cannot read the key", &ep.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Setup(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| FleetError::Setup(format!("the client certificate and key: {e}")))
}

/// Connects to the registry over TLS with the endpoint's client certificate; the server must
/// present a certificate for `host` under the registry CA.
pub async fn connect(ep: &Endpoint) -> Result<Client, FleetError> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(ep)?);
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&ep.host)
        .port(ep.port)
        .dbname(&ep.database)
        .user(&ep.user)
        .application_name("station")
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = cfg
        .connect(tls)
        .await
        .map_err(|e| FleetError::Unreachable {
            at: ep.at(),
            why: pg_message(&e),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "registry connection ended");
        }
    });
    Ok(client)
}

/// Creates the registry's schema in an empty database (the administrator's connection), or
/// checks the one there is this version.
pub async fn migrate(admin: &Client) -> Result<(), FleetError> {
    let have: Option<i32> = admin
        .query_opt(
            "SELECT version FROM fleet.meta WHERE id = 1 AND to_regclass('fleet.meta') IS NOT NULL",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    match have {
        Some(v) if v == REGISTRY_VERSION => Ok(()),
        Some(v) => Err(FleetError::Setup(format!(
            "the registry has schema version {v}; this station knows version {REGISTRY_VERSION}"
        ))),
        None => Ok(admin.batch_execute(REGISTRY_SCHEMA).await?),
    }
}

/// Opens a manufacturer's number space in the registry (administrator).
pub async fn add_number_space(
    admin: &Client,
    flag: &str,
    first: i64,
    last: i64,
) -> Result<(), FleetError> {
    admin
        .execute(
            "INSERT INTO fleet.number_spaces (flag, next, last) VALUES ($1, $2, $3)",
            &[&flag, &first, &last],
        )
        .await?;
    Ok(())
}

/// Enrols a station (administrator): its role and its audit-signer certificate (PEM).
pub async fn enrol(
    admin: &Client,
    station: &str,
    flag: &str,
    audit_cert_pem: &str,
) -> Result<(), FleetError> {
    admin
        .execute(
            "SELECT fleet.enrol($1, $2, $3)",
            &[&station, &flag, &audit_cert_pem],
        )
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The outbox (station side)

/// One outbox row, as it goes to the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Outbox sequence.
    pub seq: i64,
    /// meter, void, batch, export or checkpoint.
    pub kind: String,
    /// The record, JSON; for a checkpoint with its tree head and where its proof starts.
    pub body: String,
    /// A checkpoint's consistency proof from the checkpoint before it.
    pub proof: Option<Vec<Vec<u8>>>,
}

/// The backlog: records not yet acknowledged, and when the oldest was made (ms).
pub fn backlog(conn: &rusqlite::Connection) -> Result<(i64, Option<i64>), DbError> {
    Ok(conn.query_row(
        "SELECT count(*), min(created_at) FROM outbox WHERE seq > (SELECT acked FROM outbox_state WHERE id = 1)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// The next `limit` records the registry has not acknowledged, ready to send.
pub fn pending(conn: &rusqlite::Connection, limit: u32) -> Result<Vec<Outgoing>, FleetError> {
    let rows: Vec<(i64, String, String)> = {
        let mut stmt = conn.prepare(
            "SELECT seq, kind, body FROM outbox WHERE seq > (SELECT acked FROM outbox_state WHERE id = 1) ORDER BY seq LIMIT ?1",
        )?;
        stmt.query_map([limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    let mut leaves: Option<Vec<Hash>> = None;
    let mut out = Vec::with_capacity(rows.len());
    for (seq, kind, body) in rows {
        if kind != "checkpoint" {
            out.push(Outgoing {
                seq,
                kind,
                body,
                proof: None,
            });
            continue;
        }
        let (body, proof) = checkpoint_record(conn, &body, &mut leaves)?;
        out.push(Outgoing {
            seq,
            kind,
            body,
            proof: Some(proof),
        });
    }
    Ok(out)
}

/// A checkpoint's record: its outbox body with the tree head and the size of the checkpoint
/// before it, and the consistency proof between the two. All of it follows from the log, so the
/// record is the same bytes however often it is sent.
fn checkpoint_record(
    conn: &rusqlite::Connection,
    body: &str,
    leaves: &mut Option<Vec<Hash>>,
) -> Result<(String, Vec<Vec<u8>>), FleetError> {
    let bad = |why: &str| FleetError::Setup(format!("outbox checkpoint record: {why}"));
    let mut v: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(body).map_err(|_| bad("not JSON"))?;
    let id = v
        .get("checkpoint_id")
        .and_then(|x| x.as_i64())
        .ok_or_else(|| bad("no checkpoint id"))?;
    let note = v
        .get("note")
        .and_then(|x| x.as_str())
        .ok_or_else(|| bad("no note"))?
        .to_string();
    let (size, root) = crate::audit::checkpoint_tree_head(&note)
        .ok_or_else(|| bad("the note has no tree head"))?;
    // The checkpoint before it with a tree head (an older form has none: no proof then), and
    // its tree's right edge when it was kept.
    let mut from = 0i64;
    let mut edge: Option<merkle::Frontier> = None;
    {
        let mut stmt = conn.prepare(
            "SELECT note, frontier FROM audit_checkpoints WHERE id < ?1 ORDER BY id DESC",
        )?;
        let mut rows = stmt.query([id])?;
        while let Some(r) = rows.next()? {
            let n: String = r.get(0)?;
            if let Some((s, _)) = crate::audit::checkpoint_tree_head(&n) {
                if s > 0 && s <= size {
                    from = s;
                    edge = r
                        .get::<_, Option<Vec<u8>>>(1)?
                        .and_then(|b| merkle::Frontier::from_bytes(s as u64, &b));
                }
                break;
            }
        }
    }
    let proof = if from > 0 && from < size {
        let hashes = match &edge {
            // From the old right edge and the entries since: as long as what was appended.
            Some(edge) => {
                let mut stmt = conn
                    .prepare("SELECT hash FROM audit WHERE seq > ?1 AND seq <= ?2 ORDER BY seq")?;
                let appended: Vec<Hash> = stmt
                    .query_map([from, size], |r| r.get::<_, Vec<u8>>(0))?
                    .map(|h| h.map(|h| merkle::leaf_hash(&h)))
                    .collect::<Result<_, _>>()?;
                if appended.len() as i64 != size - from {
                    return Err(bad("entries are missing between two checkpoints"));
                }
                merkle::consistency_proof_extending(edge, &appended)
            }
            // A checkpoint written before the edges were kept: from the whole log.
            None => {
                if leaves.as_ref().is_none_or(|l| (l.len() as i64) < size) {
                    let mut stmt = conn.prepare("SELECT hash FROM audit ORDER BY seq")?;
                    // The tree's leaves are the entries' chain hashes, hashed as RFC 6962 leaves.
                    let all: Vec<Hash> = stmt
                        .query_map([], |r| r.get::<_, Vec<u8>>(0))?
                        .map(|h| h.map(|h| merkle::leaf_hash(&h)))
                        .collect::<Result<_, _>>()?;
                    *leaves = Some(all);
                }
                let all = leaves.as_deref().unwrap_or(&[]);
                let upto = all
                    .get(..size as usize)
                    .ok_or_else(|| bad("the log is shorter than its checkpoint"))?;
                merkle::consistency_proof(from as usize, upto)
            }
        };
        hashes
            .ok_or_else(|| bad("no consistency proof"))?
            .into_iter()
            .map(|h| h.to_vec())
            .collect()
    } else {
        Vec::new()
    };
    v.insert(
        "root".into(),
        base64::engine::general_purpose::STANDARD
            .encode(root)
            .into(),
    );
    v.insert("proof_from".into(), from.into());
    let text = serde_json::to_string(&v).map_err(|_| bad("cannot write"))?;
    Ok((text, proof))
}

/// What the registry said about a push.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PushReport {
    /// Records sent.
    pub sent: usize,
    /// The newest sequence now acknowledged.
    pub acked: i64,
    /// The registry's alarms about these records (kind, seq, message).
    pub alarms: Vec<(String, Option<i64>, String)>,
}

/// Sends records in one transaction; the registry drops the ones it already has. Returns its
/// alarms about them (a checkpoint refused, a record that differs from the one it holds, a
/// number issued twice).
pub async fn push(client: &mut Client, recs: &[Outgoing]) -> Result<PushReport, FleetError> {
    let Some(last) = recs.last() else {
        return Ok(PushReport::default());
    };
    let plain: Vec<&Outgoing> = recs.iter().filter(|r| r.proof.is_none()).collect();
    let seqs: Vec<i64> = plain.iter().map(|r| r.seq).collect();
    let kinds: Vec<&str> = plain.iter().map(|r| r.kind.as_str()).collect();
    let bodies: Vec<&str> = plain.iter().map(|r| r.body.as_str()).collect();
    let tx = client.transaction().await?;
    if !seqs.is_empty() {
        tx.execute(
            "INSERT INTO fleet.records (seq, kind, body) SELECT * FROM unnest($1::int8[], $2::text[], $3::text[])",
            &[&seqs, &kinds, &bodies],
        )
        .await?;
    }
    for r in recs.iter().filter(|r| r.proof.is_some()) {
        let proof = r.proof.clone().unwrap_or_default();
        tx.execute(
            "INSERT INTO fleet.records (seq, kind, body, proof) VALUES ($1, $2, $3, $4)",
            &[&r.seq, &r.kind, &r.body, &proof],
        )
        .await?;
    }
    tx.commit().await?;
    let all: Vec<i64> = recs.iter().map(|r| r.seq).collect();
    let alarms = client
        .query(
            "SELECT kind, seq, message FROM fleet.alarms WHERE station = current_user AND seq = ANY($1) AND raised_at > now() - interval '1 hour' ORDER BY id",
            &[&all],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    Ok(PushReport {
        sent: recs.len(),
        acked: last.seq,
        alarms,
    })
}

/// Records that the registry acknowledged everything up to `seq`.
pub fn ack(conn: &rusqlite::Connection, seq: i64) -> Result<(), DbError> {
    conn.execute(
        "UPDATE outbox_state SET acked = max(acked, ?1), pushed_at = ?2, error = NULL, error_at = NULL WHERE id = 1",
        params![seq, now_ms()],
    )?;
    Ok(())
}

/// Records why the last push failed (for the health screen).
pub fn push_failed(conn: &rusqlite::Connection, why: &str) -> Result<(), DbError> {
    conn.execute(
        "UPDATE outbox_state SET error = ?1, error_at = ?2 WHERE id = 1",
        params![why, now_ms()],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Leases

/// Numbers left in the station's leases.
pub fn leased_left(conn: &rusqlite::Connection) -> Result<i64, DbError> {
    Ok(conn.query_row(
        "SELECT coalesce(sum(last - next + 1), 0) FROM leases WHERE state = 'granted'",
        [],
        |r| r.get(0),
    )?)
}

/// The request not yet answered, if any, else a new one for `count` numbers (written first, so
/// that an answer lost in a crash is asked for again under the same id).
pub fn lease_request(conn: &rusqlite::Connection, count: u32) -> Result<(String, i64), DbError> {
    if let Some(r) = conn
        .query_row(
            "SELECT request, count FROM leases WHERE state = 'requested' ORDER BY id LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
    {
        return Ok(r);
    }
    let mut raw = [0u8; 16];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut raw);
    let request = hex::encode(raw);
    conn.execute(
        "INSERT INTO leases (request, count, state, requested_at) VALUES (?1, ?2, 'requested', ?3)",
        params![request, count, now_ms()],
    )?;
    Ok((request, i64::from(count)))
}

/// Asks the registry for the block of `request`.
pub async fn take_lease(
    client: &Client,
    request: &str,
    count: i64,
) -> Result<(i64, i64, i64), FleetError> {
    let row = client
        .query_one(
            "SELECT lease_id, first, last FROM fleet.take_lease($1, $2)",
            &[&request, &count],
        )
        .await?;
    let (id, first, last): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    if first < 0 || last > LAST_NUMBER || first > last {
        return Err(FleetError::Refused(format!(
            "the registry granted numbers {first}..{last}, outside 0..{LAST_NUMBER}"
        )));
    }
    Ok((id, first, last))
}

/// Records a granted block; `Ok(Err(why))` when the block overlaps one the station holds
/// already: the registry has lost a lease it granted (restored from a backup, or failed over to
/// a standby that had not received it), and its numbers could be issued twice. Such a block is
/// never used.
pub fn lease_granted(
    conn: &rusqlite::Connection,
    request: &str,
    id: i64,
    first: i64,
    last: i64,
) -> Result<Result<(), String>, DbError> {
    if let Some((f, l)) = conn
        .query_row(
            "SELECT first, last FROM leases WHERE state = 'granted' AND first <= ?2 AND ?1 <= last",
            params![first, last],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )
        .optional()?
    {
        return Ok(Err(format!(
            "the registry granted numbers {first}..{last}, which overlap this station's lease {f}..{l}: the registry has lost a lease it granted (restored from a backup, or a standby that had not received it), so these numbers could be issued twice; the block is not used — call the registry's administrator"
        )));
    }
    conn.execute(
        "UPDATE leases SET state = 'granted', registry_id = ?2, first = ?3, last = ?4, next = ?3, granted_at = ?5
         WHERE request = ?1 AND state = 'requested'",
        params![request, id, first, last, now_ms()],
    )?;
    Ok(Ok(()))
}

/// Where the registry says this station's records end; the pusher starts again after it if it
/// is behind what the journal counts as acknowledged (a registry restored from a backup, or a
/// standby promoted before it had received the newest records).
pub async fn registry_acked(client: &Client) -> Result<i64, FleetError> {
    Ok(client
        .query_one(
            "SELECT coalesce(max(seq), 0) FROM fleet.records WHERE station = current_user",
            &[],
        )
        .await?
        .get(0))
}

/// The highest number this station's meter records in the registry carry (0 if none).
pub async fn registry_highest_number(client: &Client) -> Result<i64, FleetError> {
    Ok(client
        .query_one(
            "SELECT coalesce(max((body::jsonb ->> 'serial_no')::bigint), 0) FROM fleet.records
              WHERE station = current_user AND kind = 'meter'",
            &[],
        )
        .await?
        .get(0))
}

/// Moves the leases' cursors past `used`, the highest number the registry holds from this
/// station: numbers are drawn in order, so every number up to it was issued. A journal put back
/// from an old backup has its cursors behind what it issued since; it would issue those numbers
/// again. Returns the numbers skipped.
pub fn skip_used_numbers(conn: &rusqlite::Connection, used: i64) -> Result<i64, DbError> {
    let before = leased_left(conn)?;
    conn.execute(
        "UPDATE leases SET next = min(last + 1, ?1 + 1)
          WHERE state = 'granted' AND first <= ?1 AND next <= ?1",
        [used],
    )?;
    Ok(before - leased_left(conn)?)
}

/// Moves the acknowledged mark back to `seq` (see [`registry_acked`]); returns whether it moved.
pub fn rewind(conn: &rusqlite::Connection, seq: i64) -> Result<bool, DbError> {
    Ok(conn.execute(
        "UPDATE outbox_state SET acked = ?1 WHERE id = 1 AND acked > ?1",
        [seq],
    )? > 0)
}

/// Draws the next number from the leases, inside the transaction that assigns it; `None` when
/// every lease is used up.
pub fn draw(tx: &rusqlite::Transaction<'_>) -> Result<Option<i64>, DbError> {
    let Some((id, next)): Option<(i64, i64)> = tx
        .query_row(
            "SELECT id, next FROM leases WHERE state = 'granted' AND next <= last ORDER BY first LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?
    else {
        return Ok(None);
    };
    tx.execute("UPDATE leases SET next = next + 1 WHERE id = ?1", [id])?;
    Ok(Some(next))
}

// ---------------------------------------------------------------------------------------------
// The auditor's view

/// What `station fleet audit` found for one station.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StationAudit {
    /// Station id.
    pub station: String,
    /// Records received.
    pub records: i64,
    /// The newest outbox sequence received.
    pub last_seq: Option<i64>,
    /// Sequence numbers never received, as ranges (first, last).
    pub gaps: Vec<(i64, i64)>,
    /// Checkpoints accepted.
    pub checkpoints: i64,
    /// The newest checkpoint whose signature, tree head and consistency with the one before were
    /// checked here: (tree size, root in base64, received).
    pub last_verified: Option<(i64, String, String)>,
    /// Checkpoints the registry refused (they do not continue the chain).
    pub refused: i64,
    /// What failed a check here: a signature, a tree head that is not the one signed, a proof.
    pub failures: Vec<String>,
    /// The registry's alarms about this station: (kind, outbox seq, message, raised).
    pub alarms: Vec<(String, Option<i64>, String, String)>,
}

impl StationAudit {
    /// Nothing wrong: no gap, no refused checkpoint, no failed check, no alarm.
    pub fn ok(&self) -> bool {
        self.gaps.is_empty()
            && self.refused == 0
            && self.failures.is_empty()
            && self.alarms.is_empty()
    }
}

/// The audit-signer's key of an enrolled station, from the certificate recorded at enrolment.
pub(crate) fn audit_key(pem: &str) -> Result<(p256::ecdsa::VerifyingKey, [u8; 4]), String> {
    use der::{DecodePem, Encode};
    let cert = x509_cert::Certificate::from_pem(pem.as_bytes())
        .map_err(|e| format!("the enrolled audit certificate cannot be read: {e}"))?;
    let spki = cert.tbs_certificate().subject_public_key_info();
    let der = spki
        .to_der()
        .map_err(|e| format!("the enrolled audit certificate's key: {e}"))?;
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or("the enrolled audit certificate's key cannot be read")?;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
        .map_err(|_| "the enrolled audit certificate's key is not a P-256 key".to_string())?;
    Ok((key, crate::audit::note_key_id(&der)))
}

/// Checks every enrolled station's records in the registry, independently of the registry's own
/// triggers: gaps in the outbox sequence, each accepted checkpoint's signature (against the
/// audit certificate recorded at enrolment), that the tree head stored is the one signed, that
/// each consistency proof links it to the one before; and lists the registry's alarms.
pub async fn audit(client: &Client) -> Result<Vec<StationAudit>, FleetError> {
    let stations = client
        .query(
            "SELECT station, audit_cert FROM fleet.stations ORDER BY station",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for s in stations {
        let station: String = s.get(0);
        let cert: String = s.get(1);
        let mut a = StationAudit {
            station: station.clone(),
            ..Default::default()
        };
        let row = client
            .query_one(
                "SELECT count(*), max(seq), count(*) FILTER (WHERE verdict = 'refused') FROM fleet.records WHERE station = $1",
                &[&station],
            )
            .await?;
        a.records = row.get(0);
        a.last_seq = row.get(1);
        a.refused = row.get(2);
        a.gaps = client
            .query(
                "SELECT s + 1, n - 1 FROM (SELECT seq AS s, lead(seq) OVER (ORDER BY seq) AS n FROM fleet.records WHERE station = $1
                   UNION ALL SELECT 0, min(seq) FROM fleet.records WHERE station = $1) g
                 WHERE n > s + 1 ORDER BY s",
                &[&station],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let key = audit_key(&cert);
        if let Err(e) = &key {
            a.failures.push(e.clone());
        }
        let cps = client
            .query(
                "SELECT c.tree_size, c.root, c.note, c.received_at::text, r.proof, r.body
                   FROM fleet.checkpoints c JOIN fleet.records r ON r.station = c.station AND r.seq = c.seq
                  WHERE c.station = $1 ORDER BY c.tree_size, c.seq",
                &[&station],
            )
            .await?;
        let mut prev: Option<(i64, Hash)> = None;
        for r in cps {
            a.checkpoints += 1;
            let size: i64 = r.get(0);
            let root: Vec<u8> = r.get(1);
            let note: String = r.get(2);
            let at: String = r.get(3);
            let proof: Option<Vec<Vec<u8>>> = r.get(4);
            let mut good = true;
            if let Ok((k, id)) = &key
                && !crate::audit::verify_note(&note, k, id)
            {
                a.failures.push(format!(
                    "checkpoint at {size} entries: the signature is not the station's audit key's"
                ));
                good = false;
            }
            let signed = crate::audit::checkpoint_tree_head(&note);
            let root: Option<Hash> = root.try_into().ok();
            if signed.map(|(s, h)| (s, h.to_vec())) != root.map(|h| (size, h.to_vec())) {
                a.failures.push(format!(
                    "checkpoint at {size} entries: the tree head the registry holds is not the one signed"
                ));
                good = false;
            }
            if let (Some((psize, proot)), Some(root)) = (prev, root) {
                let path: Vec<Hash> = proof
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|h| h.try_into().ok())
                    .collect();
                let ok = if psize == size {
                    proot == root
                } else {
                    merkle::verify_consistency(psize as u64, size as u64, &path, &proot, &root)
                };
                if !ok {
                    a.failures.push(format!(
                        "checkpoint at {size} entries does not extend the one at {psize} (consistency proof)"
                    ));
                    good = false;
                }
            }
            if let Some(root) = root {
                prev = Some((size, root));
                if good {
                    a.last_verified = Some((
                        size,
                        base64::engine::general_purpose::STANDARD.encode(root),
                        at,
                    ));
                }
            }
        }
        a.alarms = client
            .query(
                "SELECT kind, seq, message, raised_at::text FROM fleet.alarms WHERE station = $1 ORDER BY id",
                &[&station],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        out.push(a);
    }
    Ok(out)
}

/// Meters per batch across stations: (work order, station, done, failed).
pub async fn batches(client: &Client) -> Result<Vec<(String, String, i64, i64)>, FleetError> {
    Ok(client
        .query("SELECT * FROM fleet.view_batches()", &[])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// Yield per station and nest: (station, nest, done, failed); `by_nest` false sums the nests.
pub async fn yields(
    client: &Client,
    by_nest: bool,
) -> Result<Vec<(String, Option<i32>, i64, i64)>, FleetError> {
    let rows: Vec<(String, Option<i32>, i64, i64)> = client
        .query("SELECT * FROM fleet.view_yield()", &[])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    if by_nest {
        return Ok(rows);
    }
    let mut out: Vec<(String, Option<i32>, i64, i64)> = Vec::new();
    for (station, _, done, failed) in rows {
        match out.last_mut() {
            Some(last) if last.0 == station => {
                last.2 += done;
                last.3 += failed;
            }
            _ => out.push((station, None, done, failed)),
        }
    }
    Ok(out)
}

/// Where a meter was provisioned and by whom.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Found {
    /// Station.
    pub station: String,
    /// Work order.
    pub work_order: Option<String>,
    /// Nest.
    pub nest: Option<i32>,
    /// UID.
    pub uid: String,
    /// done or failed.
    pub state: String,
    /// Serial.
    pub serial: Option<String>,
    /// System title (hex).
    pub system_title: Option<String>,
    /// The operator signed in.
    pub operator: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// Every record of a serial number, system title or UID, across stations.
pub async fn find(client: &Client, what: &str) -> Result<Vec<Found>, FleetError> {
    Ok(client
        .query("SELECT * FROM fleet.view_find($1)", &[&what])
        .await?
        .into_iter()
        .map(|r| Found {
            station: r.get(0),
            work_order: r.get(1),
            nest: r.get(2),
            uid: r.get(3),
            state: r.get(4),
            serial: r.get(5),
            system_title: r.get(6),
            operator: r.get(7),
            finished_at: r.get(8),
            failure: r.get(9),
        })
        .collect())
}

/// The factory at a glance, as a console shows it: meters per batch and station, yield per
/// station and nest, and the meters that match `find`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FleetView {
    /// (work order, station, done, failed).
    pub batches: Vec<(String, String, i64, i64)>,
    /// (station, nest, done, failed).
    pub yields: Vec<(String, Option<i32>, i64, i64)>,
    /// What `find` matched.
    pub found: Vec<Found>,
}

/// Reads the [`FleetView`] (one connection, three queries).
pub async fn view(ep: &Endpoint, find_what: Option<&str>) -> Result<FleetView, FleetError> {
    let client = connect(ep).await?;
    Ok(FleetView {
        batches: batches(&client).await?,
        yields: yields(&client, true).await?,
        found: match find_what {
            Some(w) if !w.trim().is_empty() => find(&client, w.trim()).await?,
            _ => Vec::new(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> (tempfile::TempDir, crate::db::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("j.db")).unwrap();
        (dir, db)
    }

    /// A batch and one meter in it, sealed: what finishing it needs.
    fn sealed_meter(c: &rusqlite::Connection, n: i64) -> i64 {
        if n == 1 {
            c.execute_batch(
                "INSERT INTO firmware (sha256, version, size, image, signer_key_hash, imported_at, imported_by) VALUES ('f', '1', 1, x'00', 'k', 0, 'o');
                 INSERT INTO customers (name, cert_der, fingerprint, imported_at, imported_by) VALUES ('u', x'00', 'fp', 0, 'o');
                 INSERT INTO batches (work_order, model, firmware_id, customer_id, quantity, serial_prefix, serial_first, serial_last, next_serial, state, transport_key, transport_wrapped, transport_kcv, oaep_hash, opened_at, opened_by)
                 VALUES ('WO-1', 'M', 1, 1, 10, 'S', 0, 999999999, 0, 'open', 'tk', x'00', 'kcv', 'sha256', 0, 's');",
            )
            .unwrap();
        }
        c.execute(
            "INSERT INTO meters (batch_id, uid, nest, state, serial, serial_no, system_title, operator, started_at) VALUES (1, ?1, 1, 'sealed', ?2, ?3, ?4, 'oper', 0)",
            params![format!("{n:02X}"), format!("S{n:09}"), n, format!("{n:016X}")],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    #[test]
    fn a_finished_meter_and_its_outbox_record_commit_together_or_not_at_all() {
        let (_d, db) = journal();
        db.with(|c| {
            let batch_rows = pending(c, 100).unwrap().len();
            assert_eq!(batch_rows, 0, "the batch is opened below");
            let id = sealed_meter(c, 1);
            assert_eq!(pending(c, 100).unwrap().len(), 1, "the batch's record");
            // Rolled back: no meter change, no record.
            let tx = c.transaction().unwrap();
            tx.execute("UPDATE meters SET state = 'done' WHERE id = ?1", [id])
                .unwrap();
            drop(tx);
            assert_eq!(pending(c, 100).unwrap().len(), 1);
            c.execute(
                "UPDATE meters SET state = 'done', finished_at = 5 WHERE id = ?1",
                [id],
            )
            .unwrap();
            let recs = pending(c, 100).unwrap();
            assert_eq!(recs.len(), 2);
            let m: serde_json::Value = serde_json::from_str(&recs[1].body).unwrap();
            assert_eq!(
                (recs[1].kind.as_str(), m["uid"].as_str()),
                ("meter", Some("01"))
            );
            assert_eq!(m["work_order"], "WO-1");
            // Acknowledged, the backlog is empty; a registry that lost them gets them again.
            ack(c, recs[1].seq).unwrap();
            assert_eq!(backlog(c).unwrap().0, 0);
            assert!(rewind(c, recs[0].seq).unwrap());
            assert!(!rewind(c, recs[1].seq).unwrap(), "never forwards");
            assert_eq!(pending(c, 100).unwrap(), recs[1..].to_vec());
            // A voided certificate and an export are records too.
            let id2 = sealed_meter(c, 2);
            c.execute(
                "INSERT INTO certificates (meter_id, slot, state, serial, created_at, updated_at) VALUES (?1, 'sign', 'intent', 'c2', 0, 0)",
                [id2],
            )
            .unwrap();
            c.execute(
                "UPDATE certificates SET state = 'voided', void_reason = 'meter failed' WHERE serial = 'c2'",
                [],
            )
            .unwrap();
            c.execute_batch(
                "INSERT INTO audit_checkpoints (seq, hash, note, reason, created_at) VALUES (0, x'00', 'n', 'export', 0);
                 INSERT INTO exports (batch_id, out_dir, manifest_sha256, checkpoint_id, created_at, created_by) VALUES (1, '/x', 'ab', 1, 0, 'so');",
            )
            .unwrap();
            let kinds: Vec<String> = c
                .prepare("SELECT kind FROM outbox ORDER BY seq")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(kinds, ["batch", "meter", "void", "checkpoint", "export"]);
            let void: String = c
                .query_row("SELECT body FROM outbox WHERE kind = 'void'", [], |r| r.get(0))
                .unwrap();
            assert!(void.contains("meter failed") && void.contains("\"c2\""), "{void}");
        });
    }

    #[test]
    fn numbers_come_from_leases_in_order_and_an_overlapping_grant_is_refused() {
        let (_d, db) = journal();
        db.with(|c| {
            let (req, n) = lease_request(c, 3).unwrap();
            assert_eq!(n, 3);
            // Asked again before an answer: the same request.
            assert_eq!(lease_request(c, 3).unwrap().0, req);
            assert_eq!(leased_left(c).unwrap(), 0);
            assert_eq!(lease_granted(c, &req, 1, 101, 103).unwrap(), Ok(()));
            let (req2, _) = lease_request(c, 3).unwrap();
            assert_ne!(req2, req);
            // A registry that forgot the first block grants part of it again.
            let why = lease_granted(c, &req2, 2, 102, 104).unwrap().unwrap_err();
            assert!(why.contains("overlap") && why.contains("101..103"), "{why}");
            assert_eq!(leased_left(c).unwrap(), 3, "the refused block is not used");
            assert_eq!(lease_granted(c, &req2, 2, 201, 202).unwrap(), Ok(()));
            let tx = c.transaction().unwrap();
            let drawn: Vec<Option<i64>> = (0..6).map(|_| draw(&tx).unwrap()).collect();
            tx.commit().unwrap();
            assert_eq!(
                drawn,
                vec![Some(101), Some(102), Some(103), Some(201), Some(202), None]
            );
            assert_eq!(leased_left(c).unwrap(), 0);
            // A journal put back from a backup, its cursors behind what the registry saw issued.
            c.execute_batch("UPDATE leases SET next = first").unwrap();
            assert_eq!(skip_used_numbers(c, 102).unwrap(), 2);
            assert_eq!(skip_used_numbers(c, 102).unwrap(), 0, "once");
            let tx = c.transaction().unwrap();
            assert_eq!(draw(&tx).unwrap(), Some(103));
            assert_eq!(draw(&tx).unwrap(), Some(201));
        });
    }

    #[test]
    fn a_registry_file_is_read_with_its_defaults_and_nothing_unknown() {
        let p = Path::new("/etc/station/registry.toml");
        let e = Endpoint::parse(
            p,
            "host = \"db\"\nuser = \"aud\"\nserver_ca = \"ca.pem\"\ncert = \"/k/c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!((e.port, e.database.as_str()), (5432, "registry"));
        assert_eq!(e.server_ca, Path::new("/etc/station/ca.pem"));
        assert_eq!(e.cert, Path::new("/k/c.pem"));
        for bad in [
            "host = \"db\"\nuser = \"aud\"\nserver_ca = \"a\"\ncert = \"b\"\nkey = \"c\"\npassword = \"x\"\n",
            "host = \"\"\nuser = \"aud\"\nserver_ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            "host = \"db\"\nserver_ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
        ] {
            let e = Endpoint::parse(p, bad).unwrap_err();
            assert!(e.starts_with("/etc/station/registry.toml: "), "{e}");
        }
    }
}
