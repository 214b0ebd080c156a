//! The client of `stationd`'s API, as the `station` command and the touch console use it.
//!
//! It speaks in the engine's own types ([`Command`], [`Reply`], [`Event`], [`LineView`]), so a
//! front end reads the same whether it once ran an engine in-process or talks to the daemon now.
//! It holds no PIN beyond the log-in call and no journal: the session token the daemon hands out
//! at log-in is all it keeps, and it sends it with every call.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};
use zeroize::Zeroizing;

use super::convert::{self, Update};
use super::pb::{self, station_client::StationClient};
use super::{EXPORT_FILES, REASON_KEY};
use crate::audit::Verification;
use crate::auth::{Role, SessionToken, User};
use crate::engine::{Command, ExportOutcome, LineView, Reply, Session};

/// Where the daemon is.
#[derive(Clone)]
pub enum Address {
    /// Its Unix socket on this host.
    Unix(PathBuf),
    /// A remote daemon over mutual TLS.
    Tls(TlsClient),
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("url", &self.url)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tls(t) => write!(f, "{}", t.url),
        }
    }
}

impl std::fmt::Debug for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Address({self})")
    }
}

/// A remote console's TLS material: the cell's CA to check the daemon by, and the console's own
/// certificate and key (issued by the cell's device CA with clientAuth).
#[derive(Clone)]
pub struct TlsClient {
    /// `https://host:port`.
    pub url: String,
    /// The name the daemon's certificate carries (default: the URL's host).
    pub domain: Option<String>,
    /// The CA certificate(s) the daemon's certificate chains to, PEM.
    pub ca_pem: Vec<u8>,
    /// The console's certificate, PEM.
    pub cert_pem: Vec<u8>,
    /// The console's private key, PEM.
    pub key_pem: Zeroizing<Vec<u8>>,
}

/// A refused or failed call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    /// The gRPC status code.
    pub code: Code,
    /// The daemon's reason key (see [`REASON_KEY`]), when it gave one.
    pub reason: Option<String>,
    /// What happened and what to do.
    pub message: String,
}

impl ClientError {
    fn new(code: Code, message: impl Into<String>) -> ClientError {
        ClientError {
            code,
            reason: None,
            message: message.into(),
        }
    }

    /// The session has ended (or there is none): log in again.
    pub fn is_expired(&self) -> bool {
        self.code == Code::Unauthenticated
            && matches!(
                self.reason.as_deref(),
                Some("expired" | "no-session") | None
            )
    }

    /// The user's role may not do this.
    pub fn is_forbidden(&self) -> bool {
        self.code == Code::PermissionDenied
    }

    /// Wrong user name or PIN.
    pub fn is_bad_credentials(&self) -> bool {
        self.reason.as_deref() == Some("bad-credentials")
    }

    /// The user is locked out.
    pub fn is_locked(&self) -> bool {
        self.reason.as_deref() == Some("locked")
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        let reason = s
            .metadata()
            .get(REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let message = match s.code() {
            Code::Unavailable if s.message().contains("connect") || s.message().is_empty() => {
                format!(
                    "stationd cannot be reached ({}); is it running?",
                    s.message()
                )
            }
            _ => s.message().to_string(),
        };
        ClientError {
            code: s.code(),
            reason,
            message,
        }
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What a log-in gives a client.
#[derive(Debug, Clone)]
pub struct Login {
    /// The session: send it with every call.
    pub session: Session,
    /// The cell.
    pub station: String,
    /// The session ends after this long without a call.
    pub idle_timeout: Duration,
    /// Meter models of the cell.
    pub models: Vec<String>,
    /// The manufacturer's FLAG ID.
    pub flag_id: String,
}

/// A connection to the daemon. Cheap to clone (one HTTP/2 connection underneath).
#[derive(Clone, Debug)]
pub struct Client {
    rpc: StationClient<Channel>,
    name: String,
}

fn with_session<T>(s: &Session, m: T) -> Request<T> {
    let mut r = Request::new(m);
    if let Ok(v) = format!("Bearer {}", s.token().expose()).parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn unexpected(what: &str) -> ClientError {
    ClientError::new(
        Code::Internal,
        format!("{what}: the daemon answered with something this client does not understand"),
    )
}

impl Client {
    /// Connects to the daemon at `addr`; `name` says in the audit log what the client is
    /// ("station-cli", "station-gui").
    pub async fn connect(addr: &Address, name: &str) -> Result<Client> {
        let channel = match addr {
            Address::Unix(path) => {
                let path = path.clone();
                let shown = path.display().to_string();
                // The URI is not used: every connection goes to the socket.
                Endpoint::from_static("http://stationd.local")
                    .connect_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
                    .map_err(|e| {
                        ClientError::new(
                            Code::Unavailable,
                            format!(
                                "cannot reach stationd at {shown} ({}); is it running? (`systemctl status stationd`, or start it with `stationd --config FILE`)",
                                source_chain(&e)
                            ),
                        )
                    })?
            }
            Address::Tls(t) => {
                let mut tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem))
                    .identity(tonic::transport::Identity::from_pem(
                        &t.cert_pem,
                        t.key_pem.as_slice(),
                    ));
                if let Some(d) = &t.domain {
                    tls = tls.domain_name(d.clone());
                }
                Endpoint::from_shared(t.url.clone())
                    .map_err(|e| {
                        ClientError::new(Code::InvalidArgument, format!("{}: {e}", t.url))
                    })?
                    .connect_timeout(Duration::from_secs(5))
                    .tls_config(tls)
                    .map_err(|e| {
                        ClientError::new(Code::InvalidArgument, format!("TLS set-up: {e}"))
                    })?
                    .connect()
                    .await
                    .map_err(|e| {
                        ClientError::new(
                            Code::Unavailable,
                            format!("cannot reach stationd at {} ({})", t.url, source_chain(&e)),
                        )
                    })?
            }
        };
        Ok(Client {
            rpc: StationClient::new(channel)
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(super::server::MAX_MESSAGE),
            name: name.to_string(),
        })
    }

    /// The generated client underneath, for calls this wrapper does not shape (tools, tests).
    pub fn raw(&self) -> StationClient<Channel> {
        self.rpc.clone()
    }

    /// Logs a user in.
    pub async fn login(&self, user: &str, pin: &str) -> Result<Login> {
        let r = self
            .rpc
            .clone()
            .login(pb::LoginRequest {
                user: user.to_string(),
                pin: pin.to_string(),
                client: self.name.clone(),
            })
            .await?
            .into_inner();
        let role = Role::parse(&r.role).ok_or_else(|| unexpected("Login"))?;
        Ok(Login {
            session: Session::from_parts(SessionToken::from_client(&r.token), r.user, role),
            station: r.station,
            idle_timeout: Duration::from_millis(r.idle_timeout_ms),
            models: r.models,
            flag_id: r.flag_id,
        })
    }

    /// Ends a session.
    pub async fn logout(&self, s: &Session) -> Result<()> {
        self.rpc
            .clone()
            .logout(with_session(s, pb::Empty {}))
            .await?;
        Ok(())
    }

    /// Creates the first security officer of a fresh cell.
    pub async fn bootstrap(&self, name: &str, pin: &str) -> Result<User> {
        Ok(self
            .rpc
            .clone()
            .bootstrap(pb::BootstrapRequest {
                name: name.to_string(),
                pin: pin.to_string(),
            })
            .await?
            .into_inner()
            .into())
    }

    /// The line now.
    pub async fn snapshot(&self, s: &Session) -> Result<LineView> {
        Ok(self
            .rpc
            .clone()
            .snapshot(with_session(s, pb::Empty {}))
            .await?
            .into_inner()
            .into())
    }

    /// The event stream: a snapshot first, then events.
    pub async fn events(&self, s: &Session) -> Result<Events> {
        Ok(Events {
            inner: self
                .rpc
                .clone()
                .events(with_session(s, pb::Empty {}))
                .await?
                .into_inner(),
        })
    }

    /// Runs `cmd`. [`Command::Export`] exports on the daemon and fetches the files into its
    /// `out_dir` here.
    pub async fn execute(&self, s: &Session, cmd: Command) -> Result<Reply> {
        let mut rpc = self.rpc.clone();
        let r = |m| with_session(s, m);
        let e = pb::Empty {};
        Ok(match cmd {
            Command::StartLine => {
                rpc.start_line(r(e)).await?;
                Reply::Done
            }
            Command::StopLine => {
                rpc.stop_line(r(e)).await?;
                Reply::Done
            }
            Command::EnableNest { nest, enabled } => {
                rpc.enable_nest(with_session(s, pb::EnableNestRequest { nest, enabled }))
                    .await?;
                Reply::Done
            }
            Command::ClearNest { nest } => {
                rpc.clear_nest(with_session(s, pb::NestRequest { nest }))
                    .await?;
                Reply::Done
            }
            Command::OpenBatch(b) => Reply::Batch(
                rpc.open_batch(with_session(
                    s,
                    pb::BatchSpec {
                        work_order: b.work_order,
                        model: b.model,
                        firmware: b.firmware,
                        customer: b.customer,
                        quantity: b.quantity,
                        serial_prefix: b.serial_prefix,
                        serial_first: b.serial_first,
                        serial_last: b.serial_last,
                    },
                ))
                .await?
                .into_inner()
                .into(),
            ),
            Command::CloseBatch { id } => Reply::Batch(
                rpc.close_batch(with_session(s, pb::BatchRequest { id }))
                    .await?
                    .into_inner()
                    .into(),
            ),
            Command::Rework { uid } => {
                rpc.rework(with_session(s, pb::ReworkRequest { uid }))
                    .await?;
                Reply::Done
            }
            Command::AckAlarm { id } => {
                rpc.ack_alarm(with_session(s, pb::AlarmRequest { id }))
                    .await?;
                Reply::Done
            }
            Command::ImportFirmware { name, image } => Reply::Firmware(
                rpc.import_firmware(with_session(s, pb::ImportFirmwareRequest { name, image }))
                    .await?
                    .into_inner()
                    .into(),
            ),
            Command::ImportCustomer { name, cert } => Reply::Customer(
                rpc.import_customer(with_session(
                    s,
                    pb::ImportCustomerRequest {
                        name,
                        certificate: cert,
                    },
                ))
                .await?
                .into_inner()
                .into(),
            ),
            Command::AddUser { name, role, pin } => Reply::User(
                rpc.add_user(with_session(
                    s,
                    pb::AddUserRequest {
                        name,
                        role: role.as_str().into(),
                        pin: pin.to_string(),
                    },
                ))
                .await?
                .into_inner()
                .into(),
            ),
            Command::DisableUser { name } => {
                rpc.disable_user(with_session(s, pb::UserRequest { name }))
                    .await?;
                Reply::Done
            }
            Command::ResetPin { name, pin } => {
                rpc.reset_pin(with_session(
                    s,
                    pb::ResetPinRequest {
                        name,
                        pin: pin.to_string(),
                    },
                ))
                .await?;
                Reply::Done
            }
            Command::ListUsers => Reply::Users(
                rpc.list_users(r(e))
                    .await?
                    .into_inner()
                    .users
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::ListBatches => Reply::Batches(
                rpc.list_batches(r(e))
                    .await?
                    .into_inner()
                    .batches
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::BatchStatus { id } => Reply::Batch(
                rpc.batch_status(with_session(s, pb::BatchQuery { id }))
                    .await?
                    .into_inner()
                    .into(),
            ),
            Command::ListFirmware => Reply::Firmwares(
                rpc.list_firmware(r(e))
                    .await?
                    .into_inner()
                    .releases
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::ListCustomers => Reply::Customers(
                rpc.list_customers(r(e))
                    .await?
                    .into_inner()
                    .customers
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::AuditVerify => {
                Reply::Verification(rpc.audit_verify(r(e)).await?.into_inner().into())
            }
            Command::AuditTail { n } => Reply::Entries(
                rpc.audit_tail(with_session(s, pb::AuditTailRequest { count: n }))
                    .await?
                    .into_inner()
                    .entries
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::AuditSince { after } => Reply::Entries(
                rpc.audit_since(with_session(s, pb::AuditSinceRequest { after }))
                    .await?
                    .into_inner()
                    .entries
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::AuditExport => {
                let x = rpc.audit_export(r(e)).await?.into_inner();
                Reply::AuditExport {
                    entries: x.entries.into_iter().map(Into::into).collect(),
                    checkpoints: x.checkpoints,
                    verification: x
                        .verification
                        .map(Verification::from)
                        .ok_or_else(|| unexpected("AuditExport"))?,
                }
            }
            Command::ReprintLabel { serial } => {
                rpc.reprint_label(with_session(s, pb::ReprintLabelRequest { serial }))
                    .await?;
                Reply::Done
            }
            Command::FleetView { find } => Reply::Fleet(
                rpc.fleet_view(with_session(s, pb::FleetViewRequest { find }))
                    .await?
                    .into_inner()
                    .into(),
            ),
            Command::ShiftView { hours } => Reply::Shift(
                rpc.shift_view(with_session(s, pb::ShiftViewRequest { hours }))
                    .await?
                    .into_inner()
                    .into(),
            ),
            Command::ListAlarms => Reply::Alarms(
                rpc.list_alarms(r(e))
                    .await?
                    .into_inner()
                    .alarms
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            ),
            Command::HsmInfo => Reply::Text(rpc.hsm_info(r(e)).await?.into_inner().text),
            Command::HsmCheck => Reply::Text(rpc.hsm_check(r(e)).await?.into_inner().text),
            Command::RecoverAudit { reason } => Reply::Text(
                rpc.audit_recover(with_session(s, pb::AuditRecoverRequest { reason }))
                    .await?
                    .into_inner()
                    .text,
            ),
            Command::Export { batch, out_dir } => {
                let x = rpc
                    .export_manifest(with_session(s, pb::BatchRequest { id: batch }))
                    .await?
                    .into_inner();
                self.fetch_export(s, batch, &out_dir).await?;
                Reply::Export(ExportOutcome {
                    out_dir,
                    meters: x.meters as usize,
                    voided: x.voided as usize,
                    manifest_sha256: x.manifest_sha256,
                    checkpoint_seq: x.checkpoint_seq,
                })
            }
            Command::PkiCsr {
                role,
                subject,
                curve,
            } => Reply::Text(
                rpc.pki_csr(with_session(
                    s,
                    pb::PkiCsrRequest {
                        role: role_name(role)?,
                        common_name: subject.common_name,
                        organization: subject.organization,
                        curve: curve.name().into(),
                    },
                ))
                .await?
                .into_inner()
                .text,
            ),
            Command::PkiImport {
                role,
                cert_pem,
                chain_pem,
            } => Reply::Text(
                rpc.pki_import(with_session(
                    s,
                    pb::PkiImportRequest {
                        role: role_name(role)?,
                        certificate_pem: cert_pem,
                        chain_pem,
                    },
                ))
                .await?
                .into_inner()
                .text,
            ),
            Command::IssueTls {
                name,
                usage,
                spki_der,
                application_uri,
                days,
                dns_names,
                ip_addresses,
            } => Reply::Text(
                rpc.issue_tls_certificate(with_session(
                    s,
                    pb::TlsCertificateRequest {
                        name,
                        usage: match usage {
                            hsm::TlsUsage::Client => pb::TlsUsage::Client,
                            hsm::TlsUsage::Server => pb::TlsUsage::Server,
                        } as i32,
                        public_key: spki_der,
                        application_uri,
                        days,
                        dns_names,
                        ip_addresses: ip_addresses.iter().map(|a| a.to_string()).collect(),
                    },
                ))
                .await?
                .into_inner()
                .text,
            ),
        })
    }

    /// Fetches the newest export of `batch` into `out_dir` (created if missing), checking each
    /// file's SHA-256 against the daemon's; returns the files written.
    pub async fn fetch_export(
        &self,
        s: &Session,
        batch: i64,
        out_dir: &Path,
    ) -> Result<Vec<PathBuf>> {
        let local = |e: std::io::Error, p: &Path| {
            ClientError::new(Code::Internal, format!("cannot write {}: {e}", p.display()))
        };
        std::fs::create_dir_all(out_dir).map_err(|e| local(e, out_dir))?;
        let mut stream = self
            .rpc
            .clone()
            .fetch_export(with_session(s, pb::BatchRequest { id: batch }))
            .await?
            .into_inner();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut written = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if !EXPORT_FILES.contains(&chunk.name.as_str()) {
                return Err(unexpected("FetchExport"));
            }
            match files.last_mut() {
                Some((name, data)) if *name == chunk.name => data.extend_from_slice(&chunk.data),
                _ => files.push((chunk.name.clone(), chunk.data.clone())),
            }
            if !chunk.sha256.is_empty() {
                let (name, data) = files.last().ok_or_else(|| unexpected("FetchExport"))?;
                if hex::encode(line_protocol::crypto::sha256(data)) != chunk.sha256 {
                    return Err(ClientError::new(
                        Code::DataLoss,
                        format!("{name} arrived damaged; fetch it again"),
                    ));
                }
                let p = out_dir.join(name);
                let tmp = out_dir.join(format!("{name}.part"));
                std::fs::write(&tmp, data).map_err(|e| local(e, &tmp))?;
                std::fs::rename(&tmp, &p).map_err(|e| local(e, &p))?;
                written.push(p);
            }
        }
        // The PSKC container is wanted whenever the manifest names one.
        let names_pskc = files
            .iter()
            .any(|(n, d)| n == "manifest.json" && d.windows(8).any(|w| w == b"\"pskc\": "));
        let complete = EXPORT_FILES
            .iter()
            .filter(|f| {
                **f != crate::report::FILE && (names_pskc || **f != crate::manifest::pskc::FILE)
            })
            .all(|f| written.iter().any(|p| p.ends_with(f)));
        if !complete {
            return Err(ClientError::new(
                Code::DataLoss,
                "the export arrived incomplete; fetch it again",
            ));
        }
        Ok(written)
    }
}

fn role_name(role: hsm::KeyRole) -> Result<String> {
    Ok(match role {
        hsm::KeyRole::DeviceCa => "device-ca",
        hsm::KeyRole::ManifestSigner => "manifest-signer",
        hsm::KeyRole::AuditSigner => "audit-signer",
        hsm::KeyRole::StationIdentity => "station",
        other => {
            return Err(ClientError::new(
                Code::InvalidArgument,
                format!("{other:?} keys are not set up through the station"),
            ));
        }
    }
    .into())
}

/// Every cause of an error, joined (tonic's transport errors say little at the top).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The daemon's event stream.
#[derive(Debug)]
pub struct Events {
    inner: tonic::Streaming<pb::Event>,
}

impl Events {
    /// The next update; `None` when the daemon ended the stream cleanly.
    pub async fn next(&mut self) -> Option<Result<Update>> {
        loop {
            match self.inner.message().await {
                Ok(Some(m)) => match convert::update(m) {
                    Some(u) => return Some(Ok(u)),
                    None => continue,
                },
                Ok(None) => return None,
                Err(s) => return Some(Err(s.into())),
            }
        }
    }
}
