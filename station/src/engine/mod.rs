//! The engine: one per cell. It owns the journal, the HSM pool, the audit log and one task per
//! nest, and exposes exactly two things to front ends: [`Engine::execute`], through which every
//! command passes the permission table, and an event stream plus snapshot of the line.
//!
//! The nest tasks ([`nest`]) run meters through the steps of the design ([`provision`]); the
//! administrative commands (batches, firmware, customers, users) are in [`admin`]; start-up
//! recovery is in [`recovery`].

mod admin;
pub mod hsm_check;
pub mod keys;
pub mod nest;
mod outbox;
mod provision;
mod recovery;
pub(crate) mod retention;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::OptionalExtension as _;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use admin::accept_customer_certificate;
pub use admin::{BatchSpec, ExportOutcome};
pub use keys::{CELL_MARKER, CellAccess, CellKeys, open_hsm};
use line_protocol::firmware::{PlanParams, TransferPlan};
pub(crate) use provision::iface_names;

use crate::audit::{self, Alarm, Audit, NewEvent, Severity, Verification};
use crate::auth::{self, Action, AuthError, LoginOutcome, PepperedPin, Role, SessionToken, User};
use crate::config::Config;
use crate::db::{Db, DbError, now_ms};
use crate::records::{self, BatchRow, CustomerRow, FirmwareRow};

/// Everything that can go wrong, with a message an operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Authentication or authorisation.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The journal.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The HSM.
    #[error("hsm: {0}")]
    Hsm(#[from] hsm::Error),
    /// The audit log could not record (and so nothing was done).
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    /// Bad input from the user.
    #[error("{0}")]
    Invalid(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The cell is not set up.
    #[error("{0}")]
    Setup(String),
    /// A service the cell relies on off the line (the factory registry) cannot be used now.
    #[error("{0}")]
    Unavailable(String),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Db(e.into())
    }
}

/// Result of engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A logged-in user.
#[derive(Debug, Clone)]
pub struct Session {
    token: SessionToken,
    /// User name.
    pub user: String,
    /// Role.
    pub role: Role,
}

impl Session {
    /// The session token, for the client that logged in (never log it).
    pub fn token(&self) -> &SessionToken {
        &self.token
    }

    /// A session as a client holds it: the token the daemon gave it, with the name and role
    /// the log-in answered (the daemon decides from the token alone).
    pub fn from_parts(token: SessionToken, user: String, role: Role) -> Session {
        Session { token, user, role }
    }
}

/// Where a nest is.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NestState {
    /// The port cannot be opened.
    Offline,
    /// Waiting for a meter (or for the line to start).
    Idle,
    /// A meter is being provisioned.
    Busy,
    /// The last meter passed.
    Pass,
    /// The last meter failed.
    Fail,
    /// Disabled by an operator, or the line is stopped.
    Stopped,
}

impl NestState {
    /// Upper-case word for displays.
    pub fn word(self) -> &'static str {
        match self {
            NestState::Offline => "OFFLINE",
            NestState::Idle => "IDLE",
            NestState::Busy => "BUSY",
            NestState::Pass => "PASS",
            NestState::Fail => "FAIL",
            NestState::Stopped => "STOPPED",
        }
    }
}

/// The steps of one meter.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Identify.
    Hello,
    /// Secure channel.
    Channel,
    /// Model, UID and lifecycle checks.
    Check,
    /// Serial number, system title.
    Assign,
    /// Key pairs, certificates, secret keys.
    Keys,
    /// Trust anchors.
    Anchors,
    /// Firmware.
    Firmware,
    /// Seal.
    Seal,
    /// Attestation.
    Attest,
    /// Release from the nest.
    Release,
}

impl Step {
    /// Word for displays.
    pub fn word(self) -> &'static str {
        match self {
            Step::Hello => "identify",
            Step::Channel => "secure channel",
            Step::Check => "check",
            Step::Assign => "assign",
            Step::Keys => "keys",
            Step::Anchors => "trust anchors",
            Step::Firmware => "firmware",
            Step::Seal => "seal",
            Step::Attest => "attest",
            Step::Release => "release",
        }
    }
}

/// One nest as a display sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NestView {
    /// Number, from 1.
    pub nest: u32,
    /// Name.
    pub name: String,
    /// Port.
    pub port: String,
    /// Taking meters when the line runs.
    pub enabled: bool,
    /// State.
    pub state: NestState,
    /// Meter UID, hex.
    pub uid: Option<String>,
    /// Meter serial.
    pub serial: Option<String>,
    /// Current step.
    pub step: Option<Step>,
    /// Progress of a long step, 0..1.
    pub progress: Option<f32>,
    /// Failure reason, or what the nest waits for.
    pub message: Option<String>,
    /// Port open.
    pub port_open: bool,
    /// Cycle time of the last meter, ms.
    pub last_cycle_ms: Option<u64>,
}

/// Health of the cell's parts.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct Health {
    /// HSM reachable and logged in.
    pub hsm: bool,
    /// Token label and detail.
    pub hsm_detail: String,
    /// Journal writable.
    pub database: bool,
    /// The factory registry, when the station has one.
    pub fleet: Option<FleetHealth>,
}

/// The station's link to the factory registry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct FleetHealth {
    /// The last attempt reached it.
    pub reachable: bool,
    /// Records not yet acknowledged.
    pub backlog: u64,
    /// Age of the oldest of them, seconds.
    pub oldest_unsent_s: Option<u64>,
    /// Numbers left in the station's leases.
    pub leased_left: u64,
    /// Why the last attempt failed, or what the registry refused.
    pub problem: Option<String>,
}

/// The line at a glance.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LineView {
    /// Station id.
    pub station: String,
    /// Line started.
    pub running: bool,
    /// Why the station stopped the line by itself (the journal or the HSM failed), until it is
    /// started again.
    pub halted: Option<String>,
    /// Who started it.
    pub operator: Option<String>,
    /// The open batch.
    pub batch: Option<BatchRow>,
    /// Nests.
    pub nests: Vec<NestView>,
    /// Unacknowledged alarms.
    pub alarms: Vec<Alarm>,
    /// Health.
    pub health: Health,
    /// Last cycle time, ms.
    pub last_cycle_ms: Option<u64>,
    /// Average cycle time, ms.
    pub avg_cycle_ms: Option<u64>,
}

/// What the engine tells its front ends.
// A few hundred events a second at most: boxing the batch row would save nothing that matters.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub enum Event {
    /// A nest changed.
    Nest(NestView),
    /// The open batch changed (counts, opened, closed).
    Batch(Option<BatchRow>),
    /// An alarm was raised.
    Alarm(Alarm),
    /// An alarm was acknowledged.
    AlarmAcked {
        /// Id.
        id: i64,
        /// By.
        by: String,
    },
    /// The line was started or stopped.
    Line {
        /// Running.
        running: bool,
        /// Why the station stopped the line by itself, when it did.
        halted: Option<String>,
    },
    /// Health changed.
    Health(Health),
    /// A meter finished.
    MeterFinished {
        /// Nest.
        nest: u32,
        /// UID.
        uid: String,
        /// Serial, if assigned.
        serial: Option<String>,
        /// Passed.
        ok: bool,
        /// Failure reason.
        reason: Option<String>,
        /// Cycle time, ms.
        cycle_ms: u64,
    },
}

/// A command from a front end. Each maps to one [`Action`] of the permission table.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Command {
    /// Start the line.
    StartLine,
    /// Stop the line after the meters in progress.
    StopLine,
    /// Enable or disable one nest.
    EnableNest {
        /// Nest number.
        nest: u32,
        /// Enabled.
        enabled: bool,
    },
    /// Clear a failed nest's display.
    ClearNest {
        /// Nest number.
        nest: u32,
    },
    /// Open a batch.
    OpenBatch(BatchSpec),
    /// Close a batch.
    CloseBatch {
        /// Batch id.
        id: i64,
    },
    /// Let a failed meter be provisioned again.
    Rework {
        /// UID, hex.
        uid: String,
    },
    /// Acknowledge an alarm.
    AckAlarm {
        /// Alarm id.
        id: i64,
    },
    /// Import a firmware release.
    ImportFirmware {
        /// File name, for the log.
        name: String,
        /// Image bytes.
        image: Vec<u8>,
    },
    /// Import a utility's certificate.
    ImportCustomer {
        /// Customer name.
        name: String,
        /// Certificate, PEM or DER.
        cert: Vec<u8>,
    },
    /// Add a user.
    AddUser {
        /// Name.
        name: String,
        /// Role.
        role: Role,
        /// PIN.
        pin: zeroize::Zeroizing<String>,
    },
    /// Disable a user.
    DisableUser {
        /// Name.
        name: String,
    },
    /// Set a user's PIN.
    ResetPin {
        /// Name.
        name: String,
        /// New PIN.
        pin: zeroize::Zeroizing<String>,
    },
    /// List users.
    ListUsers,
    /// List batches.
    ListBatches,
    /// One batch.
    BatchStatus {
        /// Batch id (the open one when absent).
        id: Option<i64>,
    },
    /// List firmware releases.
    ListFirmware,
    /// List customers.
    ListCustomers,
    /// Verify the audit log.
    AuditVerify,
    /// The newest audit entries.
    AuditTail {
        /// How many.
        n: i64,
    },
    /// Entries after a sequence number (for following the log).
    AuditSince {
        /// After this.
        after: i64,
    },
    /// The whole audit log with checkpoints.
    AuditExport,
    /// Unacknowledged alarms.
    ListAlarms,
    /// Print a done meter's rating-plate label again (audited).
    ReprintLabel {
        /// Its serial number.
        serial: String,
    },
    /// The factory at a glance, from the registry: meters per batch and station, yield per
    /// station and nest, and where a serial number, system title or UID was provisioned.
    FleetView {
        /// A serial number, system title or UID to look up.
        find: Option<String>,
    },
    /// The shift at a glance for the dashboards: the meters finished in the last `hours` hours,
    /// aggregated per nest, step, reason and time.
    ShiftView {
        /// How far back (1 to 24 hours).
        hours: u32,
    },
    /// HSM information.
    HsmInfo,
    /// The HSM's known-answer self-test, every finding.
    HsmCheck,
    /// Export a closed batch's manifest.
    Export {
        /// Batch id.
        batch: i64,
        /// Output directory.
        out_dir: std::path::PathBuf,
    },
    /// Generate a role's key in the HSM and return its certificate request (PEM).
    PkiCsr {
        /// The role (device CA, manifest signer, audit signer, station identity).
        role: hsm::KeyRole,
        /// Subject of the request.
        subject: hsm::pki::CsrSubject,
        /// Curve.
        curve: hsm::Curve,
    },
    /// Store the certificate the offline root issued for a role's key (chain checked).
    PkiImport {
        /// The role.
        role: hsm::KeyRole,
        /// The certificate, PEM.
        cert_pem: String,
        /// Issuer certificates up to a self-signed root, PEM.
        chain_pem: Vec<String>,
    },
    /// Resume a frozen audit log (security officer; audited as a critical event).
    RecoverAudit {
        /// Why, in words, for the log.
        reason: String,
    },
    /// Issue a TLS certificate of the service API from the device CA.
    IssueTls {
        /// The console's or host's name.
        name: String,
        /// Client or server.
        usage: hsm::TlsUsage,
        /// The key's SubjectPublicKeyInfo, DER: P-256 for the service API, RSA (2048 to 4096
        /// bits) for OPC UA.
        spki_der: Vec<u8>,
        /// An OPC UA application instance certificate for this application URI.
        application_uri: Option<String>,
        /// Validity in days.
        days: u32,
        /// Server certificates: DNS names.
        dns_names: Vec<String>,
        /// Server certificates: IP addresses.
        ip_addresses: Vec<std::net::IpAddr>,
    },
}

impl Command {
    /// The action this command needs.
    pub fn action(&self) -> Action {
        match self {
            Command::StartLine | Command::StopLine | Command::EnableNest { .. } => Action::RunLine,
            Command::ClearNest { .. } => Action::ClearNest,
            Command::OpenBatch(_) => Action::OpenBatch,
            Command::CloseBatch { .. } => Action::CloseBatch,
            Command::Rework { .. } => Action::Rework,
            Command::AckAlarm { .. } => Action::AckAlarm,
            Command::ImportFirmware { .. } => Action::ImportFirmware,
            Command::ImportCustomer { .. } => Action::ImportCustomer,
            Command::AddUser { .. }
            | Command::DisableUser { .. }
            | Command::ResetPin { .. }
            | Command::ListUsers => Action::ManageUsers,
            Command::ListBatches
            | Command::BatchStatus { .. }
            | Command::ListFirmware
            | Command::ListCustomers
            | Command::ListAlarms => Action::ViewLine,
            Command::FleetView { .. } => Action::ViewFleet,
            Command::ShiftView { .. } => Action::ViewShift,
            Command::ReprintLabel { .. } => Action::ReprintLabel,
            Command::AuditVerify => Action::VerifyAudit,
            Command::AuditTail { .. } | Command::AuditSince { .. } => Action::ViewAudit,
            Command::AuditExport => Action::ExportAudit,
            Command::HsmInfo | Command::HsmCheck => Action::ViewHsm,
            Command::Export { .. } => Action::ExportManifest,
            Command::PkiCsr { .. } | Command::PkiImport { .. } | Command::IssueTls { .. } => {
                Action::ManagePki
            }
            Command::RecoverAudit { .. } => Action::RecoverAudit,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Command::StartLine => "start line",
            Command::StopLine => "stop line",
            Command::EnableNest { .. } => "enable nest",
            Command::ClearNest { .. } => "clear nest",
            Command::OpenBatch(_) => "open batch",
            Command::CloseBatch { .. } => "close batch",
            Command::Rework { .. } => "rework",
            Command::AckAlarm { .. } => "acknowledge alarm",
            Command::ImportFirmware { .. } => "import firmware",
            Command::ImportCustomer { .. } => "import customer",
            Command::AddUser { .. } => "add user",
            Command::DisableUser { .. } => "disable user",
            Command::ResetPin { .. } => "reset pin",
            Command::ListUsers => "list users",
            Command::ListBatches => "list batches",
            Command::BatchStatus { .. } => "batch status",
            Command::ListFirmware => "list firmware",
            Command::ListCustomers => "list customers",
            Command::AuditVerify => "verify audit log",
            Command::AuditTail { .. } | Command::AuditSince { .. } => "read audit log",
            Command::AuditExport => "export audit log",
            Command::ListAlarms => "list alarms",
            Command::FleetView { .. } => "view the factory",
            Command::ShiftView { .. } => "view the shift",
            Command::ReprintLabel { .. } => "reprint a label",
            Command::HsmInfo => "hsm info",
            Command::HsmCheck => "hsm check",
            Command::Export { .. } => "export manifest",
            Command::PkiCsr { .. } => "pki csr",
            Command::PkiImport { .. } => "pki import",
            Command::IssueTls { .. } => "issue tls certificate",
            Command::RecoverAudit { .. } => "recover the audit log",
        }
    }
}

/// What a command returns.
// One reply per command: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub enum Reply {
    /// Done, nothing to show.
    Done,
    /// The factory, from the registry.
    Fleet(crate::fleet::FleetView),
    /// The shift, for the dashboards.
    Shift(crate::shift::ShiftView),
    /// A batch.
    Batch(BatchRow),
    /// Batches.
    Batches(Vec<BatchRow>),
    /// A firmware release.
    Firmware(FirmwareRow),
    /// Firmware releases.
    Firmwares(Vec<FirmwareRow>),
    /// A customer.
    Customer(CustomerRow),
    /// Customers.
    Customers(Vec<CustomerRow>),
    /// A user.
    User(User),
    /// Users.
    Users(Vec<User>),
    /// Audit verification.
    Verification(Verification),
    /// Audit entries.
    Entries(Vec<audit::Entry>),
    /// The audit log and its checkpoints.
    AuditExport {
        /// Entries.
        entries: Vec<audit::Entry>,
        /// Checkpoint notes.
        checkpoints: Vec<String>,
        /// Verification of what was exported.
        verification: Verification,
    },
    /// Alarms.
    Alarms(Vec<Alarm>),
    /// Text.
    Text(String),
    /// An export.
    Export(ExportOutcome),
}

/// How the engine is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Who opens it: "cli", "gui", "demo" (audit source).
    pub source: String,
    /// Start the nest tasks (a one-shot CLI command needs none).
    pub nests: bool,
}

struct State {
    running: bool,
    halted: Option<String>,
    /// Meters whose failure could not be journalled (failed before the line starts again).
    orphans: Vec<i64>,
    /// Audit events that could not be journalled when they happened (appended before the line
    /// starts again).
    pending: Vec<NewEvent>,
    operator: Option<String>,
    enabled: Vec<bool>,
    nests: Vec<NestView>,
    cycles: Vec<u64>,
    health: Health,
}

/// What a batch fixed when it opened, for each of its meters.
#[derive(Debug)]
pub(crate) struct Pinned {
    /// The trust anchors, in the order they are installed.
    pub(crate) anchors: Vec<records::AnchorRow>,
    /// The interfaces a meter must have disabled once sealed (line-protocol `iface` bits).
    pub(crate) disable: u16,
}

pub(crate) struct Inner {
    pub(crate) cfg: Config,
    pub(crate) db: Db,
    pub(crate) hsm: hsm::Hsm,
    pub(crate) audit: Audit,
    pub(crate) keys: CellKeys,
    /// The PIN pepper key in the token.
    pepper: hsm::KeyHandle,
    /// The newest audit entry anchored in the token (-1: not known yet).
    anchored: std::sync::atomic::AtomicI64,
    /// What the open batch pinned, once checked: (batch id, pins).
    pinned: Mutex<Option<(i64, Arc<Pinned>)>>,
    pub(crate) source: String,
    events: broadcast::Sender<Event>,
    state: Mutex<State>,
    wake: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    plans: Mutex<HashMap<(String, PlanParams), Arc<TransferPlan>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Wakes the registry task (a meter drew a leased number).
    pub(crate) fleet_wake: tokio::sync::Notify,
    /// The PLC's handshake per nest, when a PLC drives the line (`[plc]`).
    pub(crate) plc: Option<Arc<crate::plc::PlcTable>>,
    /// Serial numbers whose labels are to be printed (`[labels]`; the printing task's queue).
    pub(crate) labels: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Per nest: the codes its nameplate scanner read, oldest first (nests with a scanner).
    pub(crate) scans: Vec<tokio::sync::Mutex<Option<tokio::sync::mpsc::Receiver<String>>>>,
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("station", &self.inner.cfg.station_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The state behind these locks stays consistent across a panic (plain values, replaced whole).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    /// Opens the cell: journal, HSM, keys, recovery of meters left in flight, start-up event.
    pub async fn open(cfg: Config, opts: OpenOptions) -> Result<Engine> {
        // A software token's configuration (`hsm.softhsm_conf`) must be in the environment before
        // the module loads: the binary sets it first thing, before any thread starts.
        let db = Db::open(&cfg.database)?;
        let hsm = open_hsm(&cfg)?;
        let keys = CellKeys::load(&hsm).await?;
        let access = CellAccess::load(&hsm).await?;
        let audit = Audit::new(
            Arc::new(keys.audit_signer(&hsm)),
            &cfg.station_id,
            cfg.audit.checkpoint_interval,
            cfg.audit.critical.clone(),
        );
        let (events, _) = broadcast::channel(4096);
        let cfg_plc_nests = cfg.plc.as_ref().map(|_| cfg.nests.len());
        let cfg_nest_count = cfg.nests.len();
        let nests = cfg
            .nests
            .iter()
            .enumerate()
            .map(|(i, n)| NestView {
                nest: i as u32 + 1,
                name: n.name.clone(),
                port: n.port.clone(),
                enabled: true,
                state: NestState::Stopped,
                uid: None,
                serial: None,
                step: None,
                progress: None,
                message: None,
                port_open: false,
                last_cycle_ms: None,
            })
            .collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                running: false,
                halted: None,
                orphans: Vec::new(),
                pending: Vec::new(),
                operator: None,
                enabled: vec![true; cfg.nests.len()],
                nests,
                cycles: Vec::new(),
                health: Health {
                    hsm: true,
                    hsm_detail: hsm.token().label.clone(),
                    database: true,
                    fleet: None,
                },
            }),
            cfg,
            db,
            hsm,
            audit,
            keys,
            pepper: access.pepper.clone(),
            anchored: std::sync::atomic::AtomicI64::new(-1),
            pinned: Mutex::new(None),
            source: opts.source.clone(),
            events,
            wake: watch::channel(0).0,
            stop: watch::channel(false).0,
            plans: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            fleet_wake: tokio::sync::Notify::new(),
            plc: cfg_plc_nests.map(|n| Arc::new(crate::plc::PlcTable::new(n))),
            labels: std::sync::OnceLock::new(),
            scans: (0..cfg_nest_count)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
        });
        let engine = Engine { inner };
        engine.startup_events(&access).await?;
        if opts.nests {
            engine.spawn_tasks();
        }
        Ok(engine)
    }
}

impl Engine {
    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The PLC's handshake table, when a PLC drives the line.
    pub fn plc(&self) -> Option<Arc<crate::plc::PlcTable>> {
        self.inner.plc.clone()
    }

    /// Records a Modbus connection refused for its address (Modbus has no log-in).
    pub async fn plc_refused(&self, addr: std::net::SocketAddr) {
        self.inner
            .record_or_keep(NewEvent::new(
                &self.inner.source,
                "plc.refused",
                Severity::Warning,
                "system",
                serde_json::json!({"message": format!("a Modbus connection from {addr} was refused: not a PLC address of plc.allow"), "peer": addr.to_string()}),
            ))
            .await;
    }

    async fn startup_events(&self, access: &CellAccess) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let source = inner.source.clone();
        // Before anything is appended: does the newest entry match the signed head? If not, the
        // log is frozen (appending would bury what happened) and nothing else starts.
        let key = inner.keys.audit_verifying_key()?;
        let audit = inner.audit.clone();
        if let Some(why) = inner
            .db
            .call(move |c| audit.check_tail(c, &key).map_err(Error::from))
            .await?
        {
            tracing::error!(reason = %why, "the audit log is damaged; the cell is frozen");
            return Ok(());
        }
        // The anchor the HSM keeps of the log: a journal cut short or put back from an older
        // copy (with its own, valid signed head) no longer reaches it.
        let anchor = inner.read_audit_anchor().await?;
        if let Some(why) = inner
            .db
            .call(move |c| Audit::check_anchor(c, anchor).map_err(Error::from))
            .await?
        {
            tracing::error!(reason = %why, "the journal does not reach the HSM's anchor; the cell is frozen");
            inner.audit.freeze(why);
            return Ok(());
        }
        // The certificates an auditor needs to verify a copy of this journal off-line, and no
        // session from before this start lives on.
        let certs = vec![
            ("audit-signer", inner.keys.audit_cert.clone()),
            ("manifest-signer", inner.keys.manifest_cert.clone()),
            ("device-ca", inner.keys.device_ca.cert_der.clone()),
        ];
        inner
            .db
            .call(move |c| -> Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                for (label, der) in certs {
                    tx.execute(
                        "INSERT INTO cell_certificates (label, der, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(label) DO UPDATE SET der = excluded.der, updated_at = excluded.updated_at
                         WHERE der <> excluded.der",
                        rusqlite::params![label, der, now],
                    )?;
                }
                tx.execute(
                    "UPDATE sessions SET ended_at = ?1 WHERE ended_at IS NULL",
                    [now],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        // The token's known-answer self-test, before any meter or export is touched: a token
        // that fails it never starts the line.
        let report = self_test(&inner).await?;
        if !report.passed() {
            return Err(Error::Setup(format!(
                "the HSM failed its self-test; nothing was started (`station hsm check` runs it again):\n{report}"
            )));
        }
        let recovered = recovery::recover(&inner).await?;
        crate::manifest::export::recover_exports(&inner).await?;
        // Wrapped keys past their retention go now, and then every hour (`spawn_tasks`).
        let purged = match retention::sweep(&inner).await {
            Ok(p) => p.len(),
            Err(e) => {
                tracing::warn!(error = %e, "the retention sweep failed; it runs again within the hour");
                0
            }
        };
        let station = inner.cfg.station_id.clone();
        let token = inner.hsm.token().label.clone();
        let mechanisms = match inner.hsm.mechanisms().rsa_oaep {
            Some(h) => format!("{h:?}").to_lowercase(),
            None => "none".into(),
        };
        inner
            .record(NewEvent::new(
                &source,
                "station.start",
                Severity::Notice,
                "system",
                serde_json::json!({
                    "station": station,
                    "version": env!("CARGO_PKG_VERSION"),
                    "token": token,
                    "oaep": mechanisms,
                    "recovered_meters": recovered,
                    "batches_purged": purged,
                }),
            ))
            .await?;
        if !inner.cfg.hsm.trusted_wrap {
            inner
                .record(NewEvent::new(
                    &source,
                    "security.untrusted_wrap",
                    Severity::Warning,
                    "system",
                    serde_json::json!({"message": "hsm.trusted_wrap = false: batch transport keys are not CKA_WRAP_WITH_TRUSTED, so anyone with the HSM user PIN can wrap one out; use a token that can mark keys trusted"}),
                ))
                .await?;
        }
        if access.created {
            inner
                .record(NewEvent::new(
                    &source,
                    "key.generated",
                    Severity::Notice,
                    "system",
                    serde_json::json!({"role": "pin-pepper", "label": keys::PEPPER_LABEL,
                        "message": "a new PIN pepper key was generated in the HSM (a fresh cell)"}),
                ))
                .await?;
        }
        // A cell whose first officer was committed but whose token marker was not (a crash in
        // between) gets its marker now.
        if access.marker.is_none() && self.has_users().await? {
            self.mark_cell_set_up("repaired at start-up").await?;
        }
        Ok(())
    }

    /// Writes the token's set-up marker (audited).
    async fn mark_cell_set_up(&self, why: &str) -> Result<()> {
        let value =
            serde_json::json!({"station": self.inner.cfg.station_id, "at": now_ms()}).to_string();
        self.inner
            .hsm
            .run(move |s| s.create_data(CELL_MARKER, value.as_bytes()))
            .await?;
        self.inner
            .record(NewEvent::new(
                &self.inner.source,
                "cell.set_up",
                Severity::Notice,
                "system",
                serde_json::json!({"message": format!("the HSM token now marks this cell as set up ({why})")}),
            ))
            .await?;
        Ok(())
    }

    /// Whether the cell is fresh: the token carries no set-up marker, so the first security
    /// officer may be created without a log-in.
    pub async fn is_fresh(&self) -> Result<bool> {
        Ok(self
            .inner
            .hsm
            .run(|s| s.find_data(CELL_MARKER))
            .await?
            .is_none())
    }

    fn spawn_tasks(&self) {
        let mut tasks = lock(&self.inner.tasks);
        for i in 0..self.inner.cfg.nests.len() {
            let inner = Arc::clone(&self.inner);
            tasks.push(tokio::spawn(nest::run(inner, i)));
        }
        let inner = Arc::clone(&self.inner);
        tasks.push(tokio::spawn(watchdog(inner)));
        let inner = Arc::clone(&self.inner);
        tasks.push(tokio::spawn(retention::run(inner)));
        if let Some(f) = self.inner.cfg.fleet.clone() {
            let inner = Arc::clone(&self.inner);
            tasks.push(tokio::spawn(outbox::run(inner, f)));
        }
        for (i, n) in self.inner.cfg.nests.iter().enumerate() {
            if let Some((path, baud)) = n.scanner.clone() {
                let (tx, rx) = tokio::sync::mpsc::channel(SCANS_KEPT);
                if let Some(slot) = self.inner.scans.get(i)
                    && let Ok(mut slot) = slot.try_lock()
                {
                    *slot = Some(rx);
                }
                let inner = Arc::clone(&self.inner);
                tasks.push(tokio::spawn(read_scanner(inner, path, baud, tx)));
            }
        }
        if let Some(l) = self.inner.cfg.labels.clone() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            if self.inner.labels.set(tx).is_ok() {
                let inner = Arc::clone(&self.inner);
                tasks.push(tokio::spawn(print_labels(inner, l, rx)));
            }
        }
    }

    /// Logs a user in (audited either way).
    pub async fn login(&self, user: &str, pin: &str) -> Result<Session> {
        self.login_from(user, pin, serde_json::json!({"transport": "in-process"}))
            .await
    }

    /// Logs a user in; `origin` (the client's transport, peer process or certificate) goes into
    /// the audit entry. Every attempt costs the same: the HSM's MAC of the PIN, then one Argon2id
    /// check, whether or not the user exists.
    pub async fn login_from(
        &self,
        user: &str,
        pin: &str,
        origin: serde_json::Value,
    ) -> Result<Session> {
        let peppered = self.inner.pepper_pin(pin).await?;
        let inner = Arc::clone(&self.inner);
        let name = user.to_string();
        let access = inner.cfg.access;
        let source = inner.source.clone();
        let audit = inner.audit.clone();
        let frozen = audit.frozen().is_some();
        let outcome = inner
            .db
            .call(
                move |c| -> Result<(LoginOutcome, Option<SessionToken>, Option<i64>)> {
                    let now = now_ms();
                    let tx = c.transaction()?;
                    let outcome = auth::login(&tx, &name, &peppered, &access, now)?;
                    if frozen {
                        // A frozen log takes no entries: only reading and verifying it is possible.
                        let token = match &outcome {
                            LoginOutcome::Success(u) => Some(auth::start_session(&tx, u, now)?),
                            LoginOutcome::Refused { .. } => None,
                        };
                        tx.commit()?;
                        return Ok((outcome, token, None));
                    }
                    let (token, alarm) = match &outcome {
                        LoginOutcome::Success(u) => {
                            let t = auth::start_session(&tx, u, now)?;
                            audit.append(
                                &tx,
                                &NewEvent::new(
                                    &source,
                                    "auth.success",
                                    Severity::Info,
                                    &u.name,
                                    serde_json::json!({"role": u.role.as_str(), "origin": origin}),
                                ),
                            )?;
                            (Some(t), None)
                        }
                        LoginOutcome::Refused { error, locked_now } => {
                            let (kind, sev) = if *locked_now {
                                ("auth.lockout", Severity::Critical)
                            } else {
                                ("auth.failure", Severity::Warning)
                            };
                            // The log is told what the client is not.
                            let message = match error {
                                AuthError::BadCredentials { user: None, .. } => {
                                    format!("unknown user {name:?}")
                                }
                                AuthError::BadCredentials {
                                    remaining: Some(r),
                                    locked_now: false,
                                    ..
                                } if *r > 0 => format!(
                                    "wrong PIN for {name:?} ({r} attempts left before lock-out)"
                                ),
                                AuthError::BadCredentials {
                                    locked_now: true, ..
                                } => format!(
                                    "wrong PIN for {name:?}: locked out for {} minutes",
                                    access.lockout_minutes
                                ),
                                AuthError::BadCredentials { .. } => {
                                    format!("wrong PIN for {name:?}, who is locked out or disabled")
                                }
                                other => other.to_string(),
                            };
                            let a = audit.append(
                                &tx,
                                &NewEvent::new(
                                    &source,
                                    kind,
                                    sev,
                                    &name,
                                    serde_json::json!({"message": message, "origin": origin}),
                                ),
                            )?;
                            (None, a.alarm)
                        }
                    };
                    tx.commit()?;
                    Ok((outcome, token, alarm))
                },
            )
            .await?;
        match outcome {
            (LoginOutcome::Success(u), Some(token), _) => Ok(Session {
                token,
                user: u.name,
                role: u.role,
            }),
            (LoginOutcome::Refused { error, .. }, _, alarm) => {
                if let Some(id) = alarm {
                    self.inner.publish_alarm(id).await;
                }
                Err(Error::Auth(error))
            }
            _ => Err(Error::Invalid("login failed".into())),
        }
    }

    /// Creates the first security officer of a new cell. Refused unless the HSM token says the
    /// cell is fresh (no set-up marker) and the journal has no users; then marks the token.
    pub async fn bootstrap_admin(&self, name: &str, pin: &str) -> Result<User> {
        if !self.is_fresh().await? {
            return Err(Error::Conflict(
                "this cell has been set up already (its HSM token says so): log in as a security officer, who adds users with `station user add`".into(),
            ));
        }
        auth::check_user_name(name)?;
        auth::check_pin_policy(pin, self.inner.cfg.access.min_pin_length)?;
        let peppered = self.inner.pepper_pin(pin).await?;
        let inner = Arc::clone(&self.inner);
        let name = name.to_string();
        let source = inner.source.clone();
        let audit = inner.audit.clone();
        let user = inner
            .db
            .call(move |c| -> Result<User> {
                let tx = c.transaction()?;
                let n: i64 = tx.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?;
                if n > 0 {
                    return Err(Error::Conflict("the cell already has users; a security officer adds more with `station user add`".into()));
                }
                let u = auth::add_user(&tx, &name, Role::SecurityOfficer, &peppered, now_ms())?;
                audit.append(&tx, &NewEvent::new(&source, "user.added", Severity::Notice, "bootstrap", serde_json::json!({"user": name, "role": "security_officer", "message": "first security officer of the cell"})))?;
                tx.commit()?;
                Ok(u)
            })
            .await?;
        self.mark_cell_set_up("first security officer created")
            .await?;
        Ok(user)
    }

    /// Does the cell have any user yet?
    pub async fn has_users(&self) -> Result<bool> {
        self.inner
            .db
            .call(|c| -> Result<bool> {
                Ok(c.query_row("SELECT count(*) FROM users", [], |r| r.get::<_, i64>(0))? > 0)
            })
            .await
    }

    /// Ends a session.
    pub async fn logout(&self, s: &Session) -> Result<()> {
        self.logout_token(&s.token).await
    }

    /// Ends the session of a token as a client sent it.
    pub async fn logout_token(&self, token: &SessionToken) -> Result<()> {
        let user = self.session_alive(token).await?.name;
        let token = token.clone();
        let inner = Arc::clone(&self.inner);
        let source = inner.source.clone();
        let audit = inner.audit.clone();
        inner
            .db
            .call(move |c| -> Result<()> {
                let tx = c.transaction()?;
                auth::end_session(&tx, &token, now_ms())?;
                if audit.frozen().is_some() {
                    tx.commit()?;
                    return Ok(());
                }
                audit.append(
                    &tx,
                    &NewEvent::new(
                        &source,
                        "auth.logout",
                        Severity::Info,
                        &user,
                        serde_json::json!({}),
                    ),
                )?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Checks the session and the permission table for `action`; refusals are audited.
    pub async fn authorize(&self, s: &Session, action: Action) -> Result<User> {
        self.authorize_token(&s.token, action).await
    }

    /// Checks a session token (as a client sent it) and the permission table for `action`;
    /// refusals are audited with the user, when the token names one.
    pub async fn authorize_token(&self, token: &SessionToken, action: Action) -> Result<User> {
        let inner = Arc::clone(&self.inner);
        let token = token.clone();
        let access = inner.cfg.access;
        let source = inner.source.clone();
        let audit = inner.audit.clone();
        let (result, alarm) = inner
            .db
            .call(move |c| -> Result<(Result<User, AuthError>, Option<i64>)> {
                let now = now_ms();
                let tx = c.transaction()?;
                let r = match auth::check_session(&tx, &token, &access, now) {
                    Ok(user) if auth::allowed(user.role, action) => Ok(user),
                    Ok(user) => Err(AuthError::Forbidden {
                        user: user.name,
                        role: user.role,
                        action,
                    }),
                    Err(e) => Err(e),
                };
                let mut alarm = None;
                if let (Err(e), None) = (&r, audit.frozen()) {
                    let (kind, who) = match e {
                        AuthError::Forbidden { user, .. } => ("auth.forbidden", user.clone()),
                        _ => ("auth.session_expired", "(no session)".to_string()),
                    };
                    alarm = audit
                        .append(
                            &tx,
                            &NewEvent::new(
                                &source,
                                kind,
                                Severity::Warning,
                                &who,
                                serde_json::json!({"action": action, "message": e.to_string()}),
                            ),
                        )?
                        .alarm;
                }
                tx.commit()?;
                Ok((r, alarm))
            })
            .await?;
        if let Some(id) = alarm {
            self.inner.publish_alarm(id).await;
        }
        Ok(result?)
    }

    /// Whether a session token may still follow the line (see [`auth::session_alive`]).
    pub async fn session_alive(&self, token: &SessionToken) -> Result<User> {
        let token = token.clone();
        let access = self.inner.cfg.access;
        self.inner
            .db
            .call(move |c| auth::session_alive(c, &token, &access, now_ms()).map_err(Error::from))
            .await
    }

    /// Records a call refused for want of a session (no token at all), with where it came from.
    pub async fn refuse_without_session(&self, call: &str, origin: serde_json::Value) {
        if self.inner.audit.frozen().is_some() {
            return;
        }
        let _ = self
            .inner
            .record(NewEvent::new(
                &self.inner.source,
                "auth.no_session",
                Severity::Warning,
                "(no session)",
                serde_json::json!({"call": call, "origin": origin,
                    "message": format!("{call} was refused: the client has not logged in")}),
            ))
            .await;
    }

    /// Runs a command for a session: permission first, then the command.
    pub async fn execute(&self, s: &Session, cmd: Command) -> Result<Reply> {
        self.execute_token(&s.token, cmd).await
    }

    /// Runs a command for a session token as a client sent it: permission first, then the
    /// command.
    pub async fn execute_token(&self, token: &SessionToken, cmd: Command) -> Result<Reply> {
        let user = self.authorize_token(token, cmd.action()).await?;
        if let Some(why) = self.inner.audit.frozen() {
            let reads_the_log = matches!(
                cmd,
                Command::AuditVerify
                    | Command::AuditTail { .. }
                    | Command::AuditSince { .. }
                    | Command::AuditExport
                    | Command::ListAlarms
                    | Command::RecoverAudit { .. }
            );
            if !reads_the_log {
                return Err(Error::Audit(audit::AuditError::Frozen(why)));
            }
        }
        tracing::debug!(user = %user.name, command = cmd.name(), "command");
        admin::execute(self, &user, cmd).await
    }

    /// Publishes `e` to every front end as if the line had produced it, changing nothing in the
    /// cell: for load tests of the event stream (`cargo xtask bench api`). Only code in the
    /// daemon's own process can call it; the API offers nothing like it.
    #[doc(hidden)]
    pub fn publish_for_load_test(&self, e: Event) {
        self.inner.emit(e);
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The line now.
    pub fn snapshot(&self) -> LineView {
        self.inner.snapshot()
    }

    /// Stops the line, waits for the nests, writes the shut-down event and a checkpoint, and
    /// gives the journal's lock up (whatever the outcome): the engine is not used afterwards.
    pub async fn shutdown(&self) -> Result<()> {
        let r = self.close().await;
        self.inner.db.release();
        r
    }

    async fn close(&self) -> Result<()> {
        let _ = self.inner.stop.send(true);
        self.inner.bump();
        let tasks: Vec<_> = lock(&self.inner.tasks).drain(..).collect();
        for t in tasks {
            let _ = t.await;
        }
        let inner = Arc::clone(&self.inner);
        let source = inner.source.clone();
        let audit = inner.audit.clone();
        if audit.frozen().is_some() {
            return Ok(());
        }
        inner
            .db
            .call(move |c| -> Result<()> {
                let tx = c.transaction()?;
                audit.append(
                    &tx,
                    &NewEvent::new(
                        &source,
                        "station.stop",
                        Severity::Notice,
                        "system",
                        serde_json::json!({}),
                    ),
                )?;
                audit.checkpoint(&tx, "shutdown")?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        inner.anchor_audit(false).await
    }

    /// Waits until the open batch has all its meters, the line stops, or `stop` resolves.
    pub async fn wait_batch_complete(&self, stop: impl Future<Output = ()>) -> bool {
        let mut events = self.subscribe();
        tokio::pin!(stop);
        loop {
            if let Some(b) = self.snapshot().batch
                && b.remaining() == 0
                && b.in_flight == 0
            {
                return true;
            }
            if !self.snapshot().running {
                return false;
            }
            tokio::select! {
                _ = &mut stop => return false,
                ev = events.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = ev {
                        return false;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The HSM.
    pub fn hsm(&self) -> &hsm::Hsm {
        &self.inner.hsm
    }

    /// The journal.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The cell's keys and certificates.
    pub fn keys(&self) -> &CellKeys {
        &self.inner.keys
    }

    /// The audit log's writer, for benchmarks that fill a journal the way the line does.
    #[doc(hidden)]
    pub fn audit_log(&self) -> &Audit {
        &self.inner.audit
    }
}

impl Inner {
    /// The audit anchor the token holds, if any.
    async fn read_audit_anchor(&self) -> Result<Option<(i64, [u8; 32])>> {
        let raw = self
            .hsm
            .run(|s| s.find_data_all(keys::AUDIT_ANCHOR))
            .await?;
        // Two anchors only after a crash while one replaced the other: the higher one counts.
        Ok(raw
            .iter()
            .filter_map(|v| {
                let seq = i64::from_be_bytes(v.get(..8)?.try_into().ok()?);
                let hash: [u8; 32] = v.get(8..40)?.try_into().ok()?;
                Some((seq, hash))
            })
            .max_by_key(|(seq, _)| *seq))
    }

    /// Moves the token's audit anchor to the newest committed entry, when it is newer than the
    /// last one anchored (or always, with `force`: after a recovery, which may start the log
    /// again below it). A frozen log is not anchored.
    pub(crate) async fn anchor_audit(&self, force: bool) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.audit.frozen().is_some() {
            return Ok(());
        }
        let Some((seq, hash)) = self
            .db
            .call(|c| Audit::newest(c).map_err(Error::from))
            .await?
        else {
            return Ok(());
        };
        if !force && seq <= self.anchored.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut value = seq.to_be_bytes().to_vec();
        value.extend_from_slice(&hash);
        self.hsm
            .run(move |s| s.put_data(keys::AUDIT_ANCHOR, &value))
            .await?;
        self.anchored.store(seq, Ordering::SeqCst);
        Ok(())
    }

    /// The HSM's MAC of a PIN ([`PepperedPin`]): the PIN is never hashed or compared otherwise.
    pub(crate) async fn pepper_pin(&self, pin: &str) -> Result<PepperedPin> {
        let input = PepperedPin::mac_input(pin);
        let key = self.pepper.clone();
        let mac = self
            .hsm
            .run(move |s| s.hmac_sha256(&key, &input))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "the HSM cannot pepper a PIN");
                Error::Setup(
                    "PINs cannot be checked now: the HSM does not answer; try again when it is back"
                        .into(),
                )
            })?;
        Ok(PepperedPin::from_mac(mac))
    }

    /// Appends an audit event in its own transaction and publishes any alarm it raises.
    pub(crate) async fn record(self: &Arc<Self>, e: NewEvent) -> Result<audit::Appended> {
        let audit = self.audit.clone();
        let a = self
            .db
            .call(move |c| -> Result<audit::Appended> {
                let tx = c.transaction()?;
                let a = audit.append(&tx, &e)?;
                tx.commit()?;
                Ok(a)
            })
            .await?;
        if let Some(id) = a.alarm {
            self.publish_alarm(id).await;
        }
        Ok(a)
    }

    pub(crate) async fn publish_alarm(self: &Arc<Self>, id: i64) {
        let alarms = self
            .db
            .call(|c| audit::open_alarms(c).map_err(Error::from))
            .await
            .unwrap_or_default();
        if let Some(a) = alarms.into_iter().find(|a| a.id == id) {
            let _ = self.events.send(Event::Alarm(a));
        }
    }

    pub(crate) fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    /// Wakes every nest task (state changed).
    pub(crate) fn bump(&self) {
        self.wake.send_modify(|v| *v += 1);
    }

    pub(crate) fn wake_rx(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    pub(crate) fn stop_rx(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub(crate) fn running(&self) -> (bool, Option<String>) {
        let st = lock(&self.state);
        (st.running, st.operator.clone())
    }

    pub(crate) fn nest_enabled(&self, i: usize) -> bool {
        lock(&self.state).enabled.get(i).copied().unwrap_or(false)
    }

    pub(crate) fn set_running(&self, running: bool, operator: Option<String>) {
        let halted = {
            let mut st = lock(&self.state);
            st.running = running;
            st.operator = operator;
            if running {
                st.halted = None;
            }
            st.halted.clone()
        };
        if let Some(p) = &self.plc {
            p.set_running(running);
        }
        self.emit(Event::Line { running, halted });
        self.bump();
    }

    pub(crate) fn add_orphan(&self, meter_id: i64) {
        lock(&self.state).orphans.push(meter_id);
    }

    /// Whether the station has stopped the line by itself (without reading the journal, as a
    /// full snapshot would).
    pub(crate) fn is_halted(&self) -> bool {
        lock(&self.state).halted.is_some()
    }

    pub(crate) fn take_orphans(&self) -> Vec<i64> {
        std::mem::take(&mut lock(&self.state).orphans)
    }

    /// Stops the line because the cell itself failed (the journal cannot be written, the HSM is
    /// gone): every further meter would fail the same way. The meters in progress end as they
    /// can; the line stays stopped until someone starts it again.
    /// What `batch` pinned when it opened, checked before its first meter after a start: every
    /// anchor row is the certificate its SHA-256 names, the anchor set and the interface mask are
    /// those the batch's audit entry recorded, and the token's device CA and
    /// firmware-verification certificate are still the pinned ones. The reason, when they are
    /// not: the line cannot go on.
    pub(crate) async fn pinned(
        self: &Arc<Self>,
        batch: &BatchRow,
    ) -> std::result::Result<Arc<Pinned>, String> {
        if let Some((id, a)) = lock(&self.pinned).as_ref()
            && *id == batch.id
        {
            return Ok(Arc::clone(a));
        }
        let (id, wo) = (batch.id, batch.work_order.clone());
        let (rows, mask, (audited, audited_mask)) = self
            .db
            .call(move |c| {
                Ok::<_, Error>((
                    records::batch_anchors(c, id)?,
                    records::disable_mask(c, id)?,
                    records::audited_pins(c, id)?,
                ))
            })
            .await
            .map_err(|e| format!("what batch {wo} pinned cannot be read: {e}"))?;
        let Some(disable) = mask.filter(|_| !rows.is_empty()) else {
            return Err(format!(
                "batch {wo} was opened before this version pinned trust anchors and interfaces; close it and open a new batch"
            ));
        };
        let changed = rows
            .iter()
            .any(|r| hex::encode(line_protocol::crypto::sha256(&r.der)) != r.sha256);
        if changed
            || audited.as_deref() != Some(records::anchors_digest(&rows).as_str())
            || audited_mask != Some(i64::from(disable))
        {
            return Err(format!(
                "the trust anchors or interfaces pinned for batch {wo} are not those its audit entry recorded: the journal was changed"
            ));
        }
        for (kind, der) in [
            ("device-ca", &self.keys.device_ca.cert_der),
            ("firmware-verification", &self.keys.firmware_cert),
        ] {
            let sha = hex::encode(line_protocol::crypto::sha256(der));
            if !rows.iter().any(|r| r.kind == kind && r.sha256 == sha) {
                return Err(format!(
                    "the HSM token's {kind} certificate is not the one pinned when batch {wo} opened; close the batch and open a new one"
                ));
            }
        }
        let pins = Arc::new(Pinned {
            anchors: rows,
            disable,
        });
        *lock(&self.pinned) = Some((id, Arc::clone(&pins)));
        Ok(pins)
    }

    pub(crate) async fn halt(self: &Arc<Self>, reason: &str) {
        {
            let mut st = lock(&self.state);
            if st.halted.is_some() {
                return;
            }
            st.halted = Some(reason.to_string());
        }
        tracing::error!(reason, "line halted");
        self.set_running(false, None);
        self.record_or_keep(NewEvent::new(
            &self.source,
            "station.halted",
            Severity::Critical,
            "system",
            serde_json::json!({"message": format!("the line was stopped: {reason}")}),
        ))
        .await;
    }

    /// Appends `e`, or keeps it to append before the line starts again when the journal or the
    /// HSM cannot take it now (the details then carry the time it happened).
    pub(crate) async fn record_or_keep(self: &Arc<Self>, mut e: NewEvent) {
        if self.record(e.clone()).await.is_ok() {
            return;
        }
        if let Some(d) = e.details.as_object_mut() {
            d.insert("occurred_at_ms".into(), serde_json::Value::from(now_ms()));
        }
        lock(&self.state).pending.push(e);
    }

    /// Appends the events kept by [`Inner::record_or_keep`]; those that still fail stay kept.
    pub(crate) async fn flush_pending(self: &Arc<Self>) -> Result<()> {
        let pending = std::mem::take(&mut lock(&self.state).pending);
        let mut rest = pending.into_iter();
        while let Some(e) = rest.next() {
            if let Err(err) = self.record(e.clone()).await {
                let mut st = lock(&self.state);
                let newer = std::mem::take(&mut st.pending);
                st.pending = std::iter::once(e).chain(rest).chain(newer).collect();
                return Err(err);
            }
        }
        Ok(())
    }

    pub(crate) fn set_enabled(&self, i: usize, enabled: bool) {
        let view = {
            let mut st = lock(&self.state);
            if let Some(e) = st.enabled.get_mut(i) {
                *e = enabled;
            }
            st.nests.get_mut(i).map(|n| {
                n.enabled = enabled;
                n.clone()
            })
        };
        if let Some(v) = view {
            self.emit(Event::Nest(v));
        }
        self.bump();
    }

    /// Updates one nest's view and publishes it.
    pub(crate) fn update_nest(&self, i: usize, f: impl FnOnce(&mut NestView)) {
        let view = {
            let mut st = lock(&self.state);
            match st.nests.get_mut(i) {
                Some(n) => {
                    f(n);
                    if let Some(p) = &self.plc {
                        p.show(i, &n.state, n.progress);
                    }
                    Some(n.clone())
                }
                None => None,
            }
        };
        if let Some(v) = view {
            self.emit(Event::Nest(v));
        }
    }

    pub(crate) fn add_cycle(&self, ms: u64) {
        lock(&self.state).cycles.push(ms);
    }

    /// Queues the label of the done meter `serial` (when the cell prints labels).
    pub(crate) fn queue_label(&self, serial: &str) {
        if let Some(q) = self.labels.get() {
            let _ = q.send(serial.to_string());
        }
    }

    /// Replaces the registry part of the health.
    pub(crate) fn set_fleet_health(&self, f: FleetHealth) {
        let h = {
            let st = lock(&self.state);
            Health {
                fleet: Some(f),
                ..st.health.clone()
            }
        };
        self.set_health(h);
    }

    pub(crate) fn set_health(&self, h: Health) {
        let changed = {
            let mut st = lock(&self.state);
            let changed = st.health != h;
            st.health = h.clone();
            changed
        };
        if changed {
            self.emit(Event::Health(h));
        }
    }

    pub(crate) fn snapshot(&self) -> LineView {
        let batch = self.db.with(|c| records::open_batch(c).ok().flatten());
        let alarms = self.db.with(|c| audit::open_alarms(c).unwrap_or_default());
        let st = lock(&self.state);
        let avg =
            (!st.cycles.is_empty()).then(|| st.cycles.iter().sum::<u64>() / st.cycles.len() as u64);
        LineView {
            station: self.cfg.station_id.clone(),
            running: st.running,
            halted: st.halted.clone(),
            operator: st.operator.clone(),
            batch,
            nests: st.nests.clone(),
            alarms,
            health: st.health.clone(),
            last_cycle_ms: st.cycles.last().copied(),
            avg_cycle_ms: avg,
        }
    }

    /// Publishes the open batch's counts.
    pub(crate) async fn publish_batch(self: &Arc<Self>) {
        let b = self
            .db
            .call(|c| records::open_batch(c).map_err(Error::from))
            .await
            .ok()
            .flatten();
        self.emit(Event::Batch(b));
    }

    /// The transfer plan of an image for negotiated parameters, computed once.
    pub(crate) fn plan(
        &self,
        sha: &str,
        image: impl FnOnce() -> Result<Vec<u8>>,
        params: PlanParams,
    ) -> Result<Arc<TransferPlan>> {
        let key = (sha.to_string(), params);
        if let Some(p) = lock(&self.plans).get(&key) {
            return Ok(Arc::clone(p));
        }
        // Before any meter is flashed from it: the image the journal holds must be the one the
        // batch pinned, and signed by the firmware signer (checked once per image and plan).
        let image = image()?;
        let got = hex::encode(line_protocol::crypto::sha256(&image));
        if got != sha {
            return Err(Error::Setup(format!(
                "the firmware image in the journal has SHA-256 {} but the batch pinned {}: it was changed after it was imported; nothing was flashed",
                &got[..16],
                &sha[..sha.len().min(16)]
            )));
        }
        line_protocol::image::verify(&image, &self.keys.firmware_key).map_err(|e| {
            Error::Setup(format!(
                "the firmware image in the journal does not verify with the firmware signer's key ({e}); nothing was flashed"
            ))
        })?;
        let plan = TransferPlan::new(&image, params);
        lock(&self.plans).insert(key, Arc::clone(&plan));
        Ok(plan)
    }
}

/// Health checks and clock-change detection, every few seconds.
/// Codes a nest's scanner may have read ahead of its meter; more are dropped (with a warning).
const SCANS_KEPT: usize = 4;
/// The longest code a scanner line may carry; a longer line is kept cut, so that it is refused
/// as no serial number.
const SCAN_MAX: usize = 64;

/// Reads one nest's nameplate scanner: a serial device sending one code per line (CR or LF).
/// Reopens the device when it goes away.
async fn read_scanner(
    inner: Arc<Inner>,
    path: String,
    baud: u32,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    use tokio::io::AsyncReadExt;
    let mut stop = inner.stop_rx();
    loop {
        let addr = match line_protocol::io::PortAddr::parse(&path) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%path, error = %e, "the scanner's address cannot be used");
                return;
            }
        };
        let mut port = match line_protocol::io::open(&addr, baud).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%path, error = %e, "the scanner cannot be opened; trying again");
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        let mut line: Vec<u8> = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = tokio::select! {
                _ = stop.changed() => return,
                r = port.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
            };
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    let code = String::from_utf8_lossy(&line).trim().to_string();
                    line.clear();
                    if !code.is_empty() && tx.try_send(code).is_err() {
                        tracing::warn!(%path, "scans are coming faster than meters: one was dropped");
                    }
                } else if line.len() < SCAN_MAX {
                    line.push(b);
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Prints the labels queued by serial number, one at a time, in order; a label that cannot be
/// printed is audited (`label.failed`) and the line goes on.
async fn print_labels(
    inner: Arc<Inner>,
    cfg: crate::config::LabelSettings,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut stop = inner.stop_rx();
    loop {
        let serial = tokio::select! {
            s = queue.recv() => match s { Some(s) => s, None => return },
            _ = stop.changed() => return,
        };
        let manufacturer = inner.cfg.manufacturer.name.clone();
        let s2 = serial.clone();
        let row = inner
            .db
            .call(
                move |c| -> Result<Option<(String, Option<String>)>, DbError> {
                    Ok(c.query_row(
                        "SELECT system_title, ldn FROM meters WHERE serial = ?1 AND state = 'done'",
                        [&s2],
                        |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?)),
                    )
                    .optional()?)
                },
            )
            .await;
        let Ok(Some((system_title, ldn))) = row else {
            tracing::warn!(%serial, "no done meter with this serial: no label");
            continue;
        };
        let label = crate::labels::Label {
            manufacturer,
            serial: serial.clone(),
            system_title: system_title.to_uppercase(),
            ldn: ldn.unwrap_or_default(),
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        if let Err(e) = crate::labels::print(cfg.printer, &label.zpl(), timeout).await {
            tracing::warn!(%serial, error = %e, "the label could not be printed");
            inner
                .record_or_keep(NewEvent::new(
                    &inner.source,
                    "label.failed",
                    Severity::Warning,
                    "system",
                    serde_json::json!({
                        "message": format!("the label of {serial} could not be printed on {}: {e}; print it again from the console when the printer is back", cfg.printer),
                        "serial": serial,
                        "printer": cfg.printer.to_string(),
                    }),
                ))
                .await;
        }
    }
}

async fn watchdog(inner: Arc<Inner>) {
    let mut stop = inner.stop_rx();
    let mut last_wall = now_ms();
    let mut last_mono = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
        let hsm_ok = inner.hsm.run(|s| s.random(1).map(|_| ())).await.is_ok();
        if hsm_ok && let Err(e) = inner.anchor_audit(false).await {
            tracing::warn!(error = %e, "the audit anchor could not be moved");
        }
        let db_ok = {
            let db = inner.db.clone();
            tokio::task::spawn_blocking(move || db.writable())
                .await
                .unwrap_or(false)
        };
        let (was_ok, fleet) = {
            let st = lock(&inner.state);
            (st.health.hsm, st.health.fleet.clone())
        };
        inner.set_health(Health {
            hsm: hsm_ok,
            hsm_detail: inner.hsm.token().label.clone(),
            database: db_ok,
            fleet,
        });
        if was_ok && !hsm_ok {
            inner
                .record_or_keep(NewEvent::new(
                    &inner.source,
                    "hsm.unavailable",
                    Severity::Critical,
                    "system",
                    serde_json::json!({"message": "the HSM does not answer"}),
                ))
                .await;
        }
        let wall = now_ms();
        let mono = last_mono.elapsed().as_millis() as i64;
        let drift = (wall - last_wall) - mono;
        if drift.abs() > 2_000 {
            let _ = inner
                .record(NewEvent::new(
                    &inner.source,
                    "time.changed",
                    Severity::Warning,
                    "system",
                    serde_json::json!({"message": format!("the system clock jumped by {} s", drift / 1000), "jump_ms": drift}),
                ))
                .await;
        }
        last_wall = wall;
        last_mono = std::time::Instant::now();
    }
}

/// Runs the HSM's self-test and records its outcome in the audit log.
pub(crate) async fn self_test(inner: &Arc<Inner>) -> Result<hsm_check::Report> {
    let hsm = inner.hsm.clone();
    let report = tokio::task::spawn_blocking(move || hsm_check::run(&hsm))
        .await
        .map_err(|e| Error::Setup(format!("the hsm self-test: {e}")))?;
    let failures: Vec<serde_json::Value> = report
        .failures()
        .map(|f| serde_json::json!({"check": f.check, "detail": f.detail}))
        .collect();
    // Every finding, with what the token read back: the evidence report shows it.
    let findings: Vec<serde_json::Value> = report
        .findings
        .iter()
        .map(|f| serde_json::json!({"check": f.check, "ok": f.ok, "detail": f.detail}))
        .collect();
    inner
        .record(NewEvent::new(
            &inner.source,
            "hsm.self_test",
            if report.passed() {
                Severity::Info
            } else {
                Severity::Critical
            },
            "system",
            serde_json::json!({
                "passed": report.passed(),
                "checks": report.findings.len(),
                "ms": u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
                "failures": failures,
                "findings": findings,
            }),
        ))
        .await?;
    Ok(report)
}
