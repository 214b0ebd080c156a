//! The daemon's side of the API: every call of `schemas/station.proto`, answered by the engine.
//!
//! Each call is checked in three steps before the engine sees it: the transport (a local peer
//! on the Unix socket, or a remote console whose TLS client certificate carries the clientAuth
//! extended key usage — the handshake has already checked its chain to the cell's device CA),
//! the session token (absent: refused and audited), and the session's binding to the peer that
//! logged in (a token used by another local user or another certificate is refused and audited).
//! The permission table itself is the engine's ([`Engine::execute_token`]); nothing here decides
//! what a role may do.
//!
//! What this module does not do: decide permissions, touch the journal or the HSM itself (only
//! through the engine), or keep any state beyond the session bindings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use zeroize::Zeroizing;

use super::pb::{self, station_server::Station};
use super::{EXPORT_FILES, REASON_KEY};
use crate::auth::{Action, AuthError, Role, SessionToken};
use crate::engine::{BatchSpec, Command, Engine, Error, Reply};

/// Largest message the daemon accepts (a firmware image is the largest request).
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// Chunks of an export's files.
const CHUNK: usize = 1024 * 1024;

/// How often an event stream checks that its session may still follow the line.
const STREAM_SESSION_CHECK: Duration = Duration::from_secs(2);

/// id-kp-clientAuth (RFC 5280 §4.2.1.12).
const CLIENT_AUTH: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// Where a call came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A process on this host, over the Unix socket.
    Local {
        /// Its user id.
        uid: Option<u32>,
        /// Its process id.
        pid: Option<i32>,
    },
    /// A remote console over mutual TLS.
    Remote {
        /// Its address.
        addr: Option<std::net::SocketAddr>,
        /// Its certificate's subject.
        subject: String,
        /// SHA-256 of its certificate, hex.
        fingerprint: String,
    },
}

impl Origin {
    /// For the audit log.
    pub fn json(&self) -> serde_json::Value {
        match self {
            Origin::Local { uid, pid } => {
                serde_json::json!({"transport": "unix", "uid": uid, "pid": pid})
            }
            Origin::Remote {
                addr,
                subject,
                fingerprint,
            } => serde_json::json!({
                "transport": "tls",
                "addr": addr.map(|a| a.to_string()),
                "certificate": subject,
                "fingerprint": fingerprint,
            }),
        }
    }

    /// What a session is bound to: the local user, or the remote console's certificate.
    fn binding(&self) -> String {
        match self {
            Origin::Local { uid, .. } => format!("uid:{}", uid.map(i64::from).unwrap_or(-1)),
            Origin::Remote { fingerprint, .. } => format!("cert:{fingerprint}"),
        }
    }
}

/// The transport's word on the caller: a local peer, or a remote console with a client
/// certificate fit for it.
pub fn origin<T>(req: &Request<T>) -> Result<Origin, Status> {
    if let Some(info) = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
    {
        return Ok(Origin::Local {
            uid: info.peer_cred.map(|c| c.uid()),
            pid: info.peer_cred.and_then(|c| c.pid()),
        });
    }
    let Some(certs) = req.peer_certs() else {
        return Err(refusal(
            Code::Unauthenticated,
            "no-client-certificate",
            "remote consoles need a client certificate issued by the cell's PKI",
        ));
    };
    let Some(leaf) = certs.first() else {
        return Err(refusal(
            Code::Unauthenticated,
            "no-client-certificate",
            "remote consoles need a client certificate issued by the cell's PKI",
        ));
    };
    let der: &[u8] = leaf.as_ref();
    let (subject, ok) = client_certificate(der);
    if !ok {
        return Err(refusal(
            Code::Unauthenticated,
            "not-a-console-certificate",
            "this certificate is not a console certificate (no clientAuth extended key usage); ask the security officer for one (`station pki tls-cert --usage client`)",
        ));
    }
    Ok(Origin::Remote {
        addr: req.remote_addr(),
        subject,
        fingerprint: hex::encode(Sha256::digest(der)),
    })
}

/// The subject of a client certificate and whether it names clientAuth among its extended key
/// usages. Meter certificates, issued by the same device CA, carry none and are refused here.
fn client_certificate(der: &[u8]) -> (String, bool) {
    use der::Decode;
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return (String::new(), false);
    };
    let subject = cert.tbs_certificate().subject().to_string();
    let eku = cert
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::ExtendedKeyUsage>()
        .ok()
        .flatten()
        .map(|(_, eku)| eku.0.contains(&CLIENT_AUTH))
        .unwrap_or(false);
    (subject, eku)
}

/// A refusal with the reason key clients branch on.
fn refusal(code: Code, reason: &str, message: &str) -> Status {
    let mut meta = MetadataMap::new();
    if let Ok(v) = reason.parse() {
        meta.insert(REASON_KEY, v);
    }
    Status::with_metadata(code, message, meta)
}

/// The status of an engine error: its code and reason key, and its message (a sentence an
/// operator can act on; engine errors carry nothing secret).
pub fn status(e: &Error) -> Status {
    use crate::audit::AuditError;
    use crate::db::DbError;
    let (code, reason) = match e {
        Error::Auth(a) => match a {
            AuthError::BadCredentials { .. } => (Code::Unauthenticated, "bad-credentials"),
            AuthError::Locked { .. } => (Code::Unauthenticated, "locked"),
            AuthError::Disabled(_) => (Code::Unauthenticated, "disabled"),
            AuthError::Expired => (Code::Unauthenticated, "expired"),
            AuthError::Forbidden { .. } => (Code::PermissionDenied, "forbidden"),
            AuthError::WeakPin(_) | AuthError::BadName => (Code::InvalidArgument, "invalid"),
            AuthError::NoSuchUser(_) => (Code::NotFound, "not-found"),
            _ => (Code::Internal, "journal"),
        },
        Error::Db(DbError::Full | DbError::ReadOnly(_) | DbError::Locked { .. }) => {
            (Code::Unavailable, "journal")
        }
        Error::Db(DbError::Constraint(_) | DbError::Stale { .. }) => {
            (Code::FailedPrecondition, "conflict")
        }
        Error::Db(_) => (Code::Internal, "journal"),
        // What the HSM refuses about the request itself is the caller's to fix; the rest is the
        // HSM's state.
        Error::Hsm(
            hsm::Error::Csr(_)
            | hsm::Error::Cert(_)
            | hsm::Error::Profile(_)
            | hsm::Error::InvalidInput(_),
        ) => (Code::InvalidArgument, "invalid"),
        Error::Hsm(hsm::Error::RoleExists { .. } | hsm::Error::NotPermitted(_)) => {
            (Code::FailedPrecondition, "conflict")
        }
        Error::Hsm(_) => (Code::Unavailable, "hsm"),
        Error::Audit(AuditError::Frozen(_)) => (Code::FailedPrecondition, "audit-frozen"),
        Error::Audit(_) => (Code::Unavailable, "audit"),
        Error::Invalid(_) => (Code::InvalidArgument, "invalid"),
        Error::NotFound(_) => (Code::NotFound, "not-found"),
        Error::Conflict(_) => (Code::FailedPrecondition, "conflict"),
        Error::Setup(_) => (Code::FailedPrecondition, "setup"),
        Error::Unavailable(_) => (Code::Unavailable, "unavailable"),
    };
    refusal(code, reason, &e.to_string())
}

/// Sessions by the SHA-256 of their token, bound to the peer that logged in.
type Bindings = Arc<Mutex<HashMap<[u8; 32], String>>>;

fn token_hash(t: &SessionToken) -> [u8; 32] {
    Sha256::digest(t.expose().as_bytes()).into()
}

/// The service.
#[derive(Clone)]
pub struct Service {
    engine: Engine,
    export_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
    bindings: Bindings,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("export_dir", &self.export_dir)
            .finish_non_exhaustive()
    }
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Service {
    /// The service over `engine`; exports go under `export_dir`; event streams end when
    /// `shutdown` turns true.
    pub fn new(engine: Engine, export_dir: PathBuf, shutdown: watch::Receiver<bool>) -> Service {
        Service {
            engine,
            export_dir,
            shutdown,
            bindings: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The generated server around this service, with the daemon's message limits.
    pub fn server(self) -> pb::station_server::StationServer<Service> {
        pb::station_server::StationServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(64 * 1024 * 1024)
    }

    fn bindings(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], String>> {
        // A plain map of values replaced whole: consistent after a panic elsewhere.
        self.bindings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The caller's session token, after the transport and binding checks; refusals audited.
    async fn session<T>(&self, req: &Request<T>, call: &str) -> Result<SessionToken, Status> {
        let origin = origin(req)?;
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(SessionToken::from_client);
        let Some(token) = token else {
            self.engine
                .refuse_without_session(call, origin.json())
                .await;
            return Err(refusal(
                Code::Unauthenticated,
                "no-session",
                "log in first: every call but Login needs a session",
            ));
        };
        let bound = self.bindings().get(&token_hash(&token)).cloned();
        if bound.as_deref() != Some(origin.binding().as_str()) {
            self.engine
                .refuse_without_session(
                    call,
                    serde_json::json!({"origin": origin.json(),
                        "reason": if bound.is_some() { "the session belongs to another client" } else { "unknown session" }}),
                )
                .await;
            return Err(refusal(
                Code::Unauthenticated,
                "expired",
                "the session has ended; log in again",
            ));
        }
        Ok(token)
    }

    /// Runs `cmd` for the caller's session.
    async fn run<T>(&self, req: &Request<T>, call: &str, cmd: Command) -> Result<Reply, Status> {
        let token = self.session(req, call).await?;
        self.engine
            .execute_token(&token, cmd)
            .await
            .map_err(|e| self.refused(&token, &e))
    }

    /// The status of `e`; a session the engine ended is forgotten here too.
    fn refused(&self, token: &SessionToken, e: &Error) -> Status {
        if matches!(e, Error::Auth(AuthError::Expired)) {
            self.bindings().remove(&token_hash(token));
        }
        status(e)
    }

    async fn authorize<T>(
        &self,
        req: &Request<T>,
        call: &str,
        a: Action,
    ) -> Result<SessionToken, Status> {
        let token = self.session(req, call).await?;
        self.engine
            .authorize_token(&token, a)
            .await
            .map_err(|e| self.refused(&token, &e))?;
        Ok(token)
    }

    async fn snapshot(&self) -> Result<crate::engine::LineView, Status> {
        let e = self.engine.clone();
        tokio::task::spawn_blocking(move || e.snapshot())
            .await
            .map_err(|e| Status::internal(format!("the line could not be read: {e}")))
    }
}

fn unexpected(call: &str) -> Status {
    Status::internal(format!(
        "{call}: the engine answered with something unexpected"
    ))
}

fn done(r: Reply, call: &str) -> Result<Response<pb::Empty>, Status> {
    match r {
        Reply::Done => Ok(Response::new(pb::Empty {})),
        _ => Err(unexpected(call)),
    }
}

fn batch(r: Reply, call: &str) -> Result<Response<pb::Batch>, Status> {
    match r {
        Reply::Batch(b) => Ok(Response::new(b.into())),
        _ => Err(unexpected(call)),
    }
}

fn text(r: Reply, call: &str) -> Result<Response<pb::Text>, Status> {
    match r {
        Reply::Text(text) => Ok(Response::new(pb::Text { text })),
        _ => Err(unexpected(call)),
    }
}

fn entries(r: Reply, call: &str) -> Result<Response<pb::AuditEntries>, Status> {
    match r {
        Reply::Entries(es) => Ok(Response::new(pb::AuditEntries {
            entries: es.into_iter().map(Into::into).collect(),
        })),
        _ => Err(unexpected(call)),
    }
}

fn role_of(name: &str) -> Result<hsm::KeyRole, Status> {
    super::key_role(name).map_err(Status::invalid_argument)
}

fn curve_of(name: &str) -> Result<hsm::Curve, Status> {
    match name.to_ascii_uppercase().as_str() {
        "" | "P-256" | "P256" => Ok(hsm::Curve::P256),
        "P-384" | "P384" => Ok(hsm::Curve::P384),
        other => Err(Status::invalid_argument(format!(
            "unknown curve {other:?}: P-256 or P-384"
        ))),
    }
}

/// The newest export directory of a batch, checked to lie under the daemon's export directory.
async fn export_dir_of(engine: &Engine, root: &Path, batch: i64) -> Result<PathBuf, Status> {
    let (dir, purged): (Option<String>, Option<String>) = engine
        .db()
        .call(move |c| -> crate::engine::Result<_> {
            use rusqlite::OptionalExtension;
            let dir = c
                .query_row(
                    "SELECT out_dir FROM exports WHERE batch_id = ?1 ORDER BY id DESC LIMIT 1",
                    [batch],
                    |r| r.get(0),
                )
                .optional()?;
            Ok((dir, crate::engine::retention::purged_reason(c, batch)?))
        })
        .await
        .map_err(|e| status(&e))?;
    if let Some(why) = purged {
        return Err(status(&Error::Conflict(why)));
    }
    let Some(dir) = dir else {
        return Err(Status::not_found(format!(
            "batch {batch} has not been exported; export it first"
        )));
    };
    let dir = PathBuf::from(dir);
    let (Ok(d), Ok(r)) = (dir.canonicalize(), root.canonicalize()) else {
        return Err(Status::not_found(format!(
            "the export of batch {batch} is no longer on the station"
        )));
    };
    if !d.starts_with(&r) {
        return Err(Status::failed_precondition(format!(
            "the export of batch {batch} lies outside the daemon's export directory; export it again"
        )));
    }
    Ok(d)
}

#[tonic::async_trait]
impl Station for Service {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let origin = origin(&req)?;
        let m = req.into_inner();
        let pin = Zeroizing::new(m.pin);
        let client: String = m.client.chars().take(64).collect();
        let mut o = origin.json();
        if let Some(obj) = o.as_object_mut() {
            obj.insert("client".into(), client.into());
        }
        let session = self
            .engine
            .login_from(&m.user, &pin, o)
            .await
            .map_err(|e| status(&e))?;
        self.bindings()
            .insert(token_hash(session.token()), origin.binding());
        let cfg = self.engine.config();
        Ok(Response::new(pb::LoginReply {
            token: session.token().expose().to_string(),
            user: session.user.clone(),
            role: session.role.as_str().into(),
            station: cfg.station_id.clone(),
            idle_timeout_ms: cfg.access.session_idle_minutes * 60_000,
            models: cfg.models.iter().map(|m| m.name.clone()).collect(),
            flag_id: cfg.manufacturer.flag_id.clone(),
        }))
    }

    async fn logout(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        let token = self.session(&req, "Logout").await?;
        self.bindings().remove(&token_hash(&token));
        self.engine
            .logout_token(&token)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn bootstrap(
        &self,
        req: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::User>, Status> {
        if !matches!(origin(&req)?, Origin::Local { .. }) {
            return Err(Status::permission_denied(
                "a cell's first security officer is created on the station's host only",
            ));
        }
        let m = req.into_inner();
        let pin = Zeroizing::new(m.pin);
        let u = self
            .engine
            .bootstrap_admin(&m.name, &pin)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(u.into()))
    }

    async fn snapshot(&self, req: Request<pb::Empty>) -> Result<Response<pb::LineView>, Status> {
        self.authorize(&req, "Snapshot", Action::ViewLine).await?;
        Ok(Response::new(self.snapshot().await?.into()))
    }

    type EventsStream = Stream_<pb::Event>;

    async fn events(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let token = self.authorize(&req, "Events", Action::ViewLine).await?;
        // Subscribe first, then read the line: nothing that happens in between is lost.
        let mut rx = self.engine.subscribe();
        let first = self.snapshot().await?;
        let (tx, out) = mpsc::channel::<Result<pb::Event, Status>>(256);
        let this = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if tx.send(Ok(first.into())).await.is_err() {
                return;
            }
            let mut check = tokio::time::interval(STREAM_SESSION_CHECK);
            check.tick().await;
            loop {
                let msg = tokio::select! {
                    ev = rx.recv() => match ev {
                        Ok(e) => Ok(pb::Event::from(e)),
                        Err(broadcast::error::RecvError::Lagged(_)) => match this.snapshot().await {
                            Ok(l) => Ok(l.into()),
                            Err(e) => Err(e),
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = check.tick() => match this.engine.session_alive(&token).await {
                        Ok(_) => continue,
                        Err(e) => Err(this.refused(&token, &e)),
                    },
                    _ = shutdown.changed() => Err(Status::unavailable("stationd is stopping")),
                    _ = tx.closed() => return,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn start_line(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        done(
            self.run(&req, "StartLine", Command::StartLine).await?,
            "StartLine",
        )
    }

    async fn stop_line(&self, req: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        done(
            self.run(&req, "StopLine", Command::StopLine).await?,
            "StopLine",
        )
    }

    async fn enable_nest(
        &self,
        req: Request<pb::EnableNestRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let m = *req.get_ref();
        let cmd = Command::EnableNest {
            nest: m.nest,
            enabled: m.enabled,
        };
        done(self.run(&req, "EnableNest", cmd).await?, "EnableNest")
    }

    async fn clear_nest(
        &self,
        req: Request<pb::NestRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let nest = req.get_ref().nest;
        done(
            self.run(&req, "ClearNest", Command::ClearNest { nest })
                .await?,
            "ClearNest",
        )
    }

    async fn open_batch(&self, req: Request<pb::BatchSpec>) -> Result<Response<pb::Batch>, Status> {
        let m = req.get_ref().clone();
        let cmd = Command::OpenBatch(BatchSpec {
            work_order: m.work_order,
            model: m.model,
            firmware: m.firmware,
            customer: m.customer,
            quantity: m.quantity,
            serial_prefix: m.serial_prefix,
            serial_first: m.serial_first,
            serial_last: m.serial_last,
        });
        batch(self.run(&req, "OpenBatch", cmd).await?, "OpenBatch")
    }

    async fn close_batch(
        &self,
        req: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = req.get_ref().id;
        batch(
            self.run(&req, "CloseBatch", Command::CloseBatch { id })
                .await?,
            "CloseBatch",
        )
    }

    async fn list_batches(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::BatchList>, Status> {
        match self.run(&req, "ListBatches", Command::ListBatches).await? {
            Reply::Batches(bs) => Ok(Response::new(pb::BatchList {
                batches: bs.into_iter().map(Into::into).collect(),
            })),
            _ => Err(unexpected("ListBatches")),
        }
    }

    async fn batch_status(
        &self,
        req: Request<pb::BatchQuery>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = req.get_ref().id;
        batch(
            self.run(&req, "BatchStatus", Command::BatchStatus { id })
                .await?,
            "BatchStatus",
        )
    }

    async fn rework(&self, req: Request<pb::ReworkRequest>) -> Result<Response<pb::Empty>, Status> {
        let uid = req.get_ref().uid.clone();
        done(
            self.run(&req, "Rework", Command::Rework { uid }).await?,
            "Rework",
        )
    }

    async fn export_manifest(
        &self,
        req: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::ExportReply>, Status> {
        let id = req.get_ref().id;
        let out_dir = self
            .export_dir
            .join(format!("batch-{id}-{}", crate::db::now_ms()));
        match self
            .run(
                &req,
                "ExportManifest",
                Command::Export { batch: id, out_dir },
            )
            .await?
        {
            Reply::Export(e) => Ok(Response::new((&e).into())),
            _ => Err(unexpected("ExportManifest")),
        }
    }

    type FetchExportStream = Stream_<pb::FileChunk>;

    async fn fetch_export(
        &self,
        req: Request<pb::BatchRequest>,
    ) -> Result<Response<Self::FetchExportStream>, Status> {
        self.authorize(&req, "FetchExport", Action::ExportManifest)
            .await?;
        let dir = export_dir_of(&self.engine, &self.export_dir, req.get_ref().id).await?;
        let (tx, out) = mpsc::channel::<Result<pb::FileChunk, Status>>(4);
        tokio::spawn(async move {
            for name in EXPORT_FILES {
                let path = dir.join(name);
                let data = match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
                    Ok(r) => r,
                    Err(e) => Err(std::io::Error::other(e.to_string())),
                };
                let data = match data {
                    Ok(d) => d,
                    // An export made before the PSKC container or the report existed.
                    Err(e)
                        if (name == crate::manifest::pskc::FILE || name == crate::report::FILE)
                            && e.kind() == std::io::ErrorKind::NotFound =>
                    {
                        continue;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!("{name} of the export: {e}"))))
                            .await;
                        return;
                    }
                };
                let sha = hex::encode(Sha256::digest(&data));
                let chunks: Vec<&[u8]> = if data.is_empty() {
                    vec![&[]]
                } else {
                    data.chunks(CHUNK).collect()
                };
                let last = chunks.len() - 1;
                for (i, c) in chunks.into_iter().enumerate() {
                    let chunk = pb::FileChunk {
                        name: name.to_string(),
                        offset: (i * CHUNK) as u64,
                        data: c.to_vec(),
                        sha256: if i == last {
                            sha.clone()
                        } else {
                            String::new()
                        },
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn reprint_label(
        &self,
        req: Request<pb::ReprintLabelRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let serial = req.get_ref().serial.clone();
        self.run(&req, "ReprintLabel", Command::ReprintLabel { serial })
            .await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn fleet_view(
        &self,
        req: Request<pb::FleetViewRequest>,
    ) -> Result<Response<pb::FleetViewReply>, Status> {
        let find = req.get_ref().find.clone();
        match self
            .run(&req, "FleetView", Command::FleetView { find })
            .await?
        {
            Reply::Fleet(v) => Ok(Response::new(v.into())),
            _ => Err(unexpected("FleetView")),
        }
    }

    async fn shift_view(
        &self,
        req: Request<pb::ShiftViewRequest>,
    ) -> Result<Response<pb::ShiftViewReply>, Status> {
        let hours = req.get_ref().hours;
        match self
            .run(&req, "ShiftView", Command::ShiftView { hours })
            .await?
        {
            Reply::Shift(v) => Ok(Response::new(v.into())),
            _ => Err(unexpected("ShiftView")),
        }
    }

    async fn list_alarms(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::AlarmList>, Status> {
        match self.run(&req, "ListAlarms", Command::ListAlarms).await? {
            Reply::Alarms(a) => Ok(Response::new(pb::AlarmList {
                alarms: a.into_iter().map(Into::into).collect(),
            })),
            _ => Err(unexpected("ListAlarms")),
        }
    }

    async fn ack_alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let id = req.get_ref().id;
        done(
            self.run(&req, "AckAlarm", Command::AckAlarm { id }).await?,
            "AckAlarm",
        )
    }

    async fn import_firmware(
        &self,
        req: Request<pb::ImportFirmwareRequest>,
    ) -> Result<Response<pb::Firmware>, Status> {
        let token = self.session(&req, "ImportFirmware").await?;
        let m = req.into_inner();
        let cmd = Command::ImportFirmware {
            name: m.name.chars().take(255).collect(),
            image: m.image,
        };
        match self
            .engine
            .execute_token(&token, cmd)
            .await
            .map_err(|e| self.refused(&token, &e))?
        {
            Reply::Firmware(f) => Ok(Response::new(f.into())),
            _ => Err(unexpected("ImportFirmware")),
        }
    }

    async fn list_firmware(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::FirmwareList>, Status> {
        match self
            .run(&req, "ListFirmware", Command::ListFirmware)
            .await?
        {
            Reply::Firmwares(fs) => Ok(Response::new(pb::FirmwareList {
                releases: fs.into_iter().map(Into::into).collect(),
            })),
            _ => Err(unexpected("ListFirmware")),
        }
    }

    async fn import_customer(
        &self,
        req: Request<pb::ImportCustomerRequest>,
    ) -> Result<Response<pb::Customer>, Status> {
        let token = self.session(&req, "ImportCustomer").await?;
        let m = req.into_inner();
        let cmd = Command::ImportCustomer {
            name: m.name,
            cert: m.certificate,
        };
        match self
            .engine
            .execute_token(&token, cmd)
            .await
            .map_err(|e| self.refused(&token, &e))?
        {
            Reply::Customer(c) => Ok(Response::new(c.into())),
            _ => Err(unexpected("ImportCustomer")),
        }
    }

    async fn list_customers(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::CustomerList>, Status> {
        match self
            .run(&req, "ListCustomers", Command::ListCustomers)
            .await?
        {
            Reply::Customers(cs) => Ok(Response::new(pb::CustomerList {
                customers: cs.into_iter().map(Into::into).collect(),
            })),
            _ => Err(unexpected("ListCustomers")),
        }
    }

    async fn add_user(
        &self,
        req: Request<pb::AddUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        // The permission first, so that a refused caller learns nothing of its arguments.
        let token = self.authorize(&req, "AddUser", Action::ManageUsers).await?;
        let m = req.into_inner();
        let pin = Zeroizing::new(m.pin);
        let role = Role::parse(&m.role).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown role {:?}: operator, supervisor, security_officer or auditor",
                m.role
            ))
        })?;
        let cmd = Command::AddUser {
            name: m.name,
            role,
            pin,
        };
        match self
            .engine
            .execute_token(&token, cmd)
            .await
            .map_err(|e| self.refused(&token, &e))?
        {
            Reply::User(u) => Ok(Response::new(u.into())),
            _ => Err(unexpected("AddUser")),
        }
    }

    async fn disable_user(
        &self,
        req: Request<pb::UserRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let name = req.get_ref().name.clone();
        done(
            self.run(&req, "DisableUser", Command::DisableUser { name })
                .await?,
            "DisableUser",
        )
    }

    async fn reset_pin(
        &self,
        req: Request<pb::ResetPinRequest>,
    ) -> Result<Response<pb::Empty>, Status> {
        let token = self.session(&req, "ResetPin").await?;
        let m = req.into_inner();
        let cmd = Command::ResetPin {
            name: m.name,
            pin: Zeroizing::new(m.pin),
        };
        match self
            .engine
            .execute_token(&token, cmd)
            .await
            .map_err(|e| self.refused(&token, &e))?
        {
            Reply::Done => Ok(Response::new(pb::Empty {})),
            _ => Err(unexpected("ResetPin")),
        }
    }

    async fn list_users(&self, req: Request<pb::Empty>) -> Result<Response<pb::UserList>, Status> {
        match self.run(&req, "ListUsers", Command::ListUsers).await? {
            Reply::Users(us) => Ok(Response::new(pb::UserList {
                users: us.into_iter().map(Into::into).collect(),
            })),
            _ => Err(unexpected("ListUsers")),
        }
    }

    async fn audit_verify(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::Verification>, Status> {
        match self.run(&req, "AuditVerify", Command::AuditVerify).await? {
            Reply::Verification(v) => Ok(Response::new(v.into())),
            _ => Err(unexpected("AuditVerify")),
        }
    }

    async fn audit_tail(
        &self,
        req: Request<pb::AuditTailRequest>,
    ) -> Result<Response<pb::AuditEntries>, Status> {
        let n = req.get_ref().count.clamp(1, 10_000);
        entries(
            self.run(&req, "AuditTail", Command::AuditTail { n })
                .await?,
            "AuditTail",
        )
    }

    async fn audit_since(
        &self,
        req: Request<pb::AuditSinceRequest>,
    ) -> Result<Response<pb::AuditEntries>, Status> {
        let after = req.get_ref().after;
        entries(
            self.run(&req, "AuditSince", Command::AuditSince { after })
                .await?,
            "AuditSince",
        )
    }

    async fn audit_export(
        &self,
        req: Request<pb::Empty>,
    ) -> Result<Response<pb::AuditExportReply>, Status> {
        match self.run(&req, "AuditExport", Command::AuditExport).await? {
            Reply::AuditExport {
                entries,
                checkpoints,
                verification,
            } => Ok(Response::new(pb::AuditExportReply {
                entries: entries.into_iter().map(Into::into).collect(),
                checkpoints,
                verification: Some(verification.into()),
            })),
            _ => Err(unexpected("AuditExport")),
        }
    }

    async fn audit_recover(
        &self,
        req: Request<pb::AuditRecoverRequest>,
    ) -> Result<Response<pb::Text>, Status> {
        let reason = req.get_ref().reason.clone();
        text(
            self.run(&req, "AuditRecover", Command::RecoverAudit { reason })
                .await?,
            "AuditRecover",
        )
    }

    async fn hsm_info(&self, req: Request<pb::Empty>) -> Result<Response<pb::Text>, Status> {
        text(
            self.run(&req, "HsmInfo", Command::HsmInfo).await?,
            "HsmInfo",
        )
    }

    async fn hsm_check(&self, req: Request<pb::Empty>) -> Result<Response<pb::Text>, Status> {
        text(
            self.run(&req, "HsmCheck", Command::HsmCheck).await?,
            "HsmCheck",
        )
    }

    async fn pki_csr(&self, req: Request<pb::PkiCsrRequest>) -> Result<Response<pb::Text>, Status> {
        self.authorize(&req, "PkiCsr", Action::ManagePki).await?;
        let m = req.get_ref().clone();
        let cmd = Command::PkiCsr {
            role: role_of(&m.role)?,
            subject: hsm::pki::CsrSubject {
                common_name: m.common_name,
                organization: m.organization,
                country: None,
            },
            curve: curve_of(&m.curve)?,
        };
        text(self.run(&req, "PkiCsr", cmd).await?, "PkiCsr")
    }

    async fn pki_import(
        &self,
        req: Request<pb::PkiImportRequest>,
    ) -> Result<Response<pb::Text>, Status> {
        self.authorize(&req, "PkiImport", Action::ManagePki).await?;
        let m = req.get_ref().clone();
        let cmd = Command::PkiImport {
            role: role_of(&m.role)?,
            cert_pem: m.certificate_pem,
            chain_pem: m.chain_pem,
        };
        text(self.run(&req, "PkiImport", cmd).await?, "PkiImport")
    }

    async fn issue_tls_certificate(
        &self,
        req: Request<pb::TlsCertificateRequest>,
    ) -> Result<Response<pb::Text>, Status> {
        self.authorize(&req, "IssueTlsCertificate", Action::ManagePki)
            .await?;
        let m = req.get_ref().clone();
        let usage = match pb::TlsUsage::try_from(m.usage) {
            Ok(pb::TlsUsage::Client) => hsm::TlsUsage::Client,
            Ok(pb::TlsUsage::Server) => hsm::TlsUsage::Server,
            _ => return Err(Status::invalid_argument("usage must be client or server")),
        };
        let ip_addresses = m
            .ip_addresses
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| Status::invalid_argument(format!("{a:?} is not an IP address")))
            })
            .collect::<Result<_, _>>()?;
        let cmd = Command::IssueTls {
            name: m.name,
            usage,
            spki_der: m.public_key,
            application_uri: m.application_uri,
            days: m.days,
            dns_names: m.dns_names,
            ip_addresses,
        };
        text(
            self.run(&req, "IssueTlsCertificate", cmd).await?,
            "IssueTlsCertificate",
        )
    }
}
