//! The station configuration: one TOML file, described by `schemas/config.schema.json`.
//!
//! Unknown keys and bad values are refused with the file, the line and the reason. Relative paths
//! are resolved against the directory of the configuration file, so a cell directory can be moved
//! as a whole. Nothing secret is ever in this file: the HSM PIN is named by its source (a prompt,
//! an environment variable or an owner-only file), never written here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// 1-based line (0 when the file could not be read).
    pub line: usize,
    /// What is wrong and what to do.
    pub reason: String,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// Station identity, as it appears in manifests and audit entries.
    pub station_id: String,
    /// The manufacturer.
    pub manufacturer: Manufacturer,
    /// The SQLite journal.
    pub database: PathBuf,
    /// The HSM.
    pub hsm: HsmSettings,
    /// Line-wide settings.
    pub line: LineSettings,
    /// The nests, in order (nest numbers start at 1).
    pub nests: Vec<NestSettings>,
    /// Meter models this cell provisions.
    pub models: Vec<ModelSettings>,
    /// Audit log settings.
    pub audit: AuditSettings,
    /// Users, PINs, sessions.
    pub access: AccessSettings,
    /// How long obsolete data is kept.
    pub retention: RetentionSettings,
    /// The service API of `stationd`.
    pub api: ApiSettings,
    /// The factory registry; a station without one stands alone.
    pub fleet: Option<FleetSettings>,
    /// The line's PLC over Modbus TCP; off when absent.
    pub plc: Option<PlcSettings>,
    /// The rating-plate label printer; no labels when absent.
    pub labels: Option<LabelSettings>,
    /// The OPC UA server for the line's MES and SCADA; off when absent.
    pub opcua: Option<OpcUaSettings>,
}

/// The OPC UA server (schemas/opcua.md): only signed and encrypted channels, only users of this
/// station, only client applications whose certificates the cell's device CA issued and that
/// are listed in `trusted_clients`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpcUaSettings {
    /// Address and port to serve on, e.g. `10.20.0.5:4840`.
    pub listen: std::net::SocketAddr,
    /// The server's application URI; its certificate names it.
    pub application_uri: String,
    /// The server's application instance certificate (PEM or DER), issued by the device CA
    /// (`station pki opcua-cert`).
    pub certificate: PathBuf,
    /// Its RSA private key (PEM), an owner-only file.
    pub key: PathBuf,
    /// A directory of the client applications' certificates (one PEM or DER file each) that
    /// may connect; each must have been issued by the device CA.
    pub trusted_clients: PathBuf,
}

/// The label printer (ZPL II over raw TCP), printing one label per done meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSettings {
    /// The printer's address and port (raw printing, usually 9100).
    pub printer: std::net::SocketAddr,
    /// How long one label may take to send.
    pub timeout_ms: u64,
}

/// The Modbus TCP server a PLC or handler drives the nests through (schemas/plc-modbus.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlcSettings {
    /// Address and port to serve on, e.g. `10.20.0.5:502`.
    pub listen: std::net::SocketAddr,
    /// The only addresses a connection is taken from (Modbus has no authentication).
    pub allow: Vec<std::net::IpAddr>,
    /// A nest starts a meter only on the PLC's START (else on its own, the PLC only watching).
    pub plc_starts: bool,
}

/// The factory registry (PostgreSQL) this station pushes its records to and leases numbers from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// Registry host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database.
    pub database: String,
    /// The registry server's CA certificate (PEM): the server's certificate must chain to it.
    pub server_ca: PathBuf,
    /// This station's client certificate (PEM; its CN is the station id, the registry role).
    pub cert: PathBuf,
    /// Its private key (PEM PKCS#8), an owner-only file.
    pub key: PathBuf,
    /// Numbers per lease: enough for the longest WAN outage the plant plans for.
    pub lease_block: u32,
    /// A new lease is taken when fewer numbers than this are left.
    pub lease_low_water: u32,
    /// Seconds between pushes while there is nothing new (a new record pushes at once).
    pub push_interval_s: u64,
    /// Records per push.
    pub push_batch: u32,
}

/// Where `stationd` serves its API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// The Unix domain socket local clients connect to.
    pub socket: PathBuf,
    /// Its permissions: who on this host may talk to the daemon at all (the PIN log-in then
    /// decides what they may do).
    pub socket_mode: u32,
    /// Where exported manifests are written (the daemon's own directory).
    pub export_dir: PathBuf,
    /// Remote consoles over mutual TLS; off when absent.
    pub tls: Option<TlsSettings>,
}

/// The daemon's TLS listener for remote consoles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Address and port, e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// The daemon's certificate, PEM (issued by the cell's device CA, serverAuth).
    pub cert: PathBuf,
    /// Its private key, PEM PKCS#8, an owner-only file.
    pub key: PathBuf,
}

/// The manufacturer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manufacturer {
    /// Name (certificate O, manifest).
    pub name: String,
    /// DLMS FLAG ID: three upper-case letters.
    pub flag_id: String,
}

/// Where the HSM PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSourceSetting {
    /// Asked on the terminal.
    Prompt,
    /// An environment variable.
    Env(String),
    /// A file readable by its owner only.
    File(PathBuf),
}

/// HSM settings.
#[derive(Debug, Clone)]
pub struct HsmSettings {
    /// PKCS#11 module.
    pub module: PathBuf,
    /// Token label.
    pub token: String,
    /// PIN source.
    pub pin: PinSourceSetting,
    /// Sessions in the pool.
    pub pool_size: usize,
    /// `SOFTHSM2_CONF` for this process (software tokens only).
    pub softhsm_conf: Option<PathBuf>,
    /// `KRYOPTIC_CONF` for this process (Kryoptic, a software token).
    pub kryoptic_conf: Option<PathBuf>,
    /// Batch transport keys leave the token only under keys its security officer marked trusted
    /// (the default). Off only for tokens that cannot mark a key trusted; the daemon then warns
    /// in the audit log at every start.
    pub trusted_wrap: bool,
}

impl HsmSettings {
    /// Puts a software token's configuration (`hsm.softhsm_conf`, `hsm.kryoptic_conf`) into this
    /// process's environment. The module reads it once, when it loads: call this before any
    /// thread starts.
    pub fn use_module_env(&self) {
        if let Some(conf) = &self.softhsm_conf {
            hsm::softhsm::use_module_env("SOFTHSM2_CONF", conf);
        }
        if let Some(conf) = &self.kryoptic_conf {
            hsm::softhsm::use_module_env("KRYOPTIC_CONF", conf);
        }
    }
}

/// Line settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    /// One-way latency allowance of the adapters, milliseconds.
    pub latency_ms: u32,
    /// Largest frame payload the station offers.
    pub max_payload: u16,
    /// Frames in flight the station offers.
    pub window: u8,
    /// How often an empty nest is polled, milliseconds.
    pub poll_ms: u64,
}

/// One nest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestSettings {
    /// Name shown to operators.
    pub name: String,
    /// `/dev/serial/by-path/...`, a device path, or `tcp://host:port`.
    pub port: String,
    /// Baud rate.
    pub baud: u32,
    /// The nest's nameplate scanner (a serial device sending one code per line) and its baud
    /// rate, for models whose serials are scanned.
    pub scanner: Option<(String, u32)>,
}

/// Where a meter's serial number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SerialSource {
    /// The station assigns the next number of the batch (or of its leases).
    #[default]
    Assign,
    /// The nameplate was printed before the cell: its scanned code is the serial number.
    Scan,
}

/// How a model gets its key pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keygen {
    /// On the meter (its TRNG); the station certifies the request.
    Meter,
    /// In the HSM; the private key travels wrapped under the key-transport key.
    Hsm,
}

/// A meter model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSettings {
    /// Model name, as the meter reports it.
    pub name: String,
    /// DLMS/COSEM security suite: 0 and 1 use AES-128 and P-256, 2 uses AES-256 and P-384.
    pub suite: u8,
    /// Where key pairs are generated.
    pub keygen: Keygen,
    /// Also issue a key-agreement certificate.
    pub key_agreement: bool,
    /// Extra trust anchors (utility CA and client certificates), PEM files.
    pub anchors: Vec<PathBuf>,
    /// Certificate end of validity (RFC 3339); none means 9999-12-31T23:59:59Z.
    pub not_after: Option<String>,
    /// The interfaces a meter must have disabled once sealed (line-protocol `iface` bits; the
    /// provisioning interface always among them).
    pub disable: u16,
    /// Where its serial numbers come from.
    pub serial_source: SerialSource,
}

impl ModelSettings {
    /// AES key length of the suite.
    pub fn aes_bytes(&self) -> usize {
        if self.suite == 2 { 32 } else { 16 }
    }

    /// Curve of the suite.
    pub fn curve(&self) -> line_protocol::msg::Curve {
        if self.suite == 2 {
            line_protocol::msg::Curve::P384
        } else {
            line_protocol::msg::Curve::P256
        }
    }
}

/// Audit settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// A signed checkpoint every this many entries.
    pub checkpoint_interval: u64,
    /// Event kinds that raise an alarm a supervisor must acknowledge.
    pub critical: BTreeSet<String>,
}

/// Access-control settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessSettings {
    /// Wrong PINs before lock-out.
    pub max_failed_pins: u32,
    /// Lock-out duration, minutes.
    pub lockout_minutes: u64,
    /// Sessions end after this much inactivity, minutes.
    pub session_idle_minutes: u64,
    /// Sessions end after this long, however busy, hours.
    pub session_max_hours: u64,
    /// Shortest PIN accepted.
    pub min_pin_length: usize,
}

/// How long the journal keeps what it no longer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Days after a batch's newest export before its wrapped keys are deleted, from the journal
    /// and from the export's files.
    pub wrapped_keys_days: u32,
}

/// The critical kinds when the configuration names none.
pub const DEFAULT_CRITICAL: &[&str] = &[
    "security.replay",
    "security.tamper",
    "security.downgrade",
    "security.bad_certificate_request",
    "security.firmware_mismatch",
    "security.attestation_failed",
    "security.reused_key",
    "security.protocol_violation",
    "meter.duplicate_uid",
    "meter.unknown_lifecycle",
    "auth.lockout",
    "firmware.rejected",
    "audit.verification_failed",
    "audit.recovered",
    "hsm.unavailable",
    "station.halted",
    "fleet.registry_alarm",
    "keys.purge_incomplete",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    station_id: Spanned<String>,
    database: Spanned<String>,
    manufacturer: RawManufacturer,
    hsm: RawHsm,
    #[serde(default)]
    line: RawLine,
    #[serde(default)]
    nests: Vec<RawNest>,
    #[serde(default)]
    models: Vec<RawModel>,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    api: RawApi,
    fleet: Option<RawFleet>,
    plc: Option<RawPlc>,
    labels: Option<RawLabels>,
    opcua: Option<RawOpcUa>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpcUa {
    listen: Spanned<String>,
    application_uri: Option<Spanned<String>>,
    certificate: String,
    key: String,
    trusted_clients: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabels {
    printer: Spanned<String>,
    #[serde(default = "default_label_timeout")]
    timeout_ms: Spanned<u64>,
}

fn default_label_timeout() -> Spanned<u64> {
    Spanned::new(0..0, 3000)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlc {
    listen: Spanned<String>,
    allow: Spanned<Vec<String>>,
    #[serde(default = "default_plc_start")]
    start: Spanned<String>,
}

fn default_plc_start() -> Spanned<String> {
    Spanned::new(0..0, "plc".into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    host: Spanned<String>,
    #[serde(default = "default_pg_port")]
    port: u16,
    #[serde(default = "default_registry_db")]
    database: String,
    server_ca: String,
    cert: String,
    key: String,
    #[serde(default = "default_lease_block")]
    lease_block: Spanned<u32>,
    lease_low_water: Option<Spanned<u32>>,
    #[serde(default = "default_push_interval")]
    push_interval_s: Spanned<u64>,
    #[serde(default = "default_push_batch")]
    push_batch: Spanned<u32>,
}

fn default_pg_port() -> u16 {
    5432
}
fn default_registry_db() -> String {
    "registry".into()
}
fn default_lease_block() -> Spanned<u32> {
    Spanned::new(0..0, 10_000)
}
fn default_push_interval() -> Spanned<u64> {
    Spanned::new(0..0, 5)
}
fn default_push_batch() -> Spanned<u32> {
    Spanned::new(0..0, 500)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    socket: Spanned<String>,
    socket_mode: Spanned<String>,
    export_dir: Spanned<String>,
    tls: Option<RawTls>,
}

impl Default for RawApi {
    fn default() -> Self {
        RawApi {
            socket: Spanned::new(0..0, "stationd.sock".into()),
            socket_mode: Spanned::new(0..0, "0660".into()),
            export_dir: Spanned::new(0..0, "exports".into()),
            tls: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Spanned<String>,
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManufacturer {
    name: Spanned<String>,
    flag_id: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawPin {
    Prompt,
    Env(String),
    File(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: Spanned<String>,
    token: Spanned<String>,
    pin: Spanned<RawPin>,
    #[serde(default = "default_pool")]
    pool_size: Spanned<u32>,
    softhsm_conf: Option<String>,
    kryoptic_conf: Option<String>,
    #[serde(default = "yes")]
    trusted_wrap: bool,
}

/// A name the registry accepts as a station's role: what `fleet.stations` checks.
pub fn is_registry_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

fn default_pool() -> Spanned<u32> {
    Spanned::new(0..0, 4)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLine {
    latency_ms: u32,
    max_payload: Spanned<u32>,
    window: Spanned<u32>,
    poll_ms: u64,
}

impl Default for RawLine {
    fn default() -> Self {
        RawLine {
            latency_ms: 4,
            max_payload: Spanned::new(0..0, 16384),
            window: Spanned::new(0..0, 16),
            poll_ms: 250,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNest {
    name: Spanned<String>,
    port: Spanned<String>,
    #[serde(default = "default_baud")]
    baud: Spanned<u32>,
    scanner: Option<Spanned<String>>,
    #[serde(default = "default_scanner_baud")]
    scanner_baud: u32,
}

fn default_scanner_baud() -> u32 {
    9600
}

fn default_baud() -> Spanned<u32> {
    Spanned::new(0..0, 115_200)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: Spanned<String>,
    suite: Spanned<u8>,
    #[serde(default = "default_keygen")]
    keygen: Spanned<String>,
    #[serde(default = "yes")]
    key_agreement: bool,
    #[serde(default)]
    anchors: Vec<String>,
    not_after: Option<Spanned<String>>,
    disable: Option<Spanned<Vec<String>>>,
    serial_source: Option<Spanned<String>>,
}

fn default_keygen() -> Spanned<String> {
    Spanned::new(0..0, "meter".into())
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    checkpoint_interval: Spanned<u64>,
    critical: Option<Vec<String>>,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            checkpoint_interval: Spanned::new(0..0, 100),
            critical: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    max_failed_pins: Spanned<u32>,
    lockout_minutes: u64,
    session_idle_minutes: Spanned<u64>,
    session_max_hours: Spanned<u64>,
    min_pin_length: Spanned<usize>,
}

impl Default for RawAccess {
    fn default() -> Self {
        RawAccess {
            max_failed_pins: Spanned::new(0..0, 5),
            lockout_minutes: 15,
            session_idle_minutes: Spanned::new(0..0, 15),
            session_max_hours: Spanned::new(0..0, 12),
            min_pin_length: Spanned::new(0..0, 6),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    wrapped_keys_days: Spanned<u32>,
}

impl Default for RawRetention {
    fn default() -> Self {
        RawRetention {
            wrapped_keys_days: Spanned::new(0..0, 90),
        }
    }
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        reason: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.to_string(),
            line: if span.is_empty() && span.start == 0 {
                1
            } else {
                self.line_of(span.start)
            },
            reason: reason.into(),
        })
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            line: 0,
            reason: format!(
                "cannot read the configuration: {e}; pass --config FILE or create ./station.toml"
            ),
        })?;
        Config::parse(path, &text)
    }

    /// Parses `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let cx = Ctx { file: &file, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| cx.line_of(s.start)).unwrap_or(1);
            ConfigError {
                file: file.clone(),
                line,
                reason: e.message().trim().to_string(),
            }
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| {
            let p = PathBuf::from(p);
            if p.is_absolute() { p } else { base.join(p) }
        };

        let station_id = raw.station_id.get_ref().trim().to_string();
        if station_id.is_empty()
            || station_id.len() > 64
            || !station_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return cx.err(
                raw.station_id.span(),
                "station_id must be 1..64 characters of letters, digits, '-', '_' or '.'",
            );
        }
        let flag = raw.manufacturer.flag_id.get_ref();
        if flag.len() != 3 || !flag.chars().all(|c| c.is_ascii_uppercase()) {
            return cx.err(
                raw.manufacturer.flag_id.span(),
                "manufacturer.flag_id must be three upper-case letters (the DLMS FLAG ID)",
            );
        }
        if raw.manufacturer.name.get_ref().trim().is_empty() {
            return cx.err(
                raw.manufacturer.name.span(),
                "manufacturer.name must not be empty",
            );
        }
        if raw.database.get_ref().trim().is_empty() {
            return cx.err(raw.database.span(), "database must name a file");
        }
        let pin = match raw.hsm.pin.get_ref() {
            RawPin::Prompt => PinSourceSetting::Prompt,
            RawPin::Env(v) if !v.is_empty() => PinSourceSetting::Env(v.clone()),
            RawPin::File(f) if !f.is_empty() => PinSourceSetting::File(resolve(f)),
            _ => {
                return cx.err(
                    raw.hsm.pin.span(),
                    "hsm.pin needs a variable name or a file",
                );
            }
        };
        let pool = *raw.hsm.pool_size.get_ref();
        if !(1..=64).contains(&pool) {
            return cx.err(
                raw.hsm.pool_size.span(),
                "hsm.pool_size must be between 1 and 64",
            );
        }
        if raw.hsm.token.get_ref().is_empty() || raw.hsm.token.get_ref().len() > 32 {
            return cx.err(
                raw.hsm.token.span(),
                "hsm.token must be a token label of 1..32 characters",
            );
        }
        if raw.hsm.module.get_ref().is_empty() {
            return cx.err(
                raw.hsm.module.span(),
                "hsm.module must name a PKCS#11 library",
            );
        }
        let mp = *raw.line.max_payload.get_ref();
        if !(2048..=32768).contains(&mp) {
            return cx.err(
                raw.line.max_payload.span(),
                "line.max_payload must be between 2048 and 32768",
            );
        }
        let win = *raw.line.window.get_ref();
        if !(1..=32).contains(&win) {
            return cx.err(
                raw.line.window.span(),
                "line.window must be between 1 and 32",
            );
        }
        let mut nests = Vec::new();
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for n in &raw.nests {
            if n.name.get_ref().trim().is_empty() || !names.insert(n.name.get_ref().clone()) {
                return cx.err(
                    n.name.span(),
                    format!("nest name {:?} is empty or used twice", n.name.get_ref()),
                );
            }
            if let Err(e) = line_protocol::io::PortAddr::parse(n.port.get_ref()) {
                return cx.err(n.port.span(), e.to_string());
            }
            if !ports.insert(n.port.get_ref().clone()) {
                return cx.err(
                    n.port.span(),
                    format!("port {} is used by two nests", n.port.get_ref()),
                );
            }
            let baud = *n.baud.get_ref();
            if !(300..=12_000_000).contains(&baud) {
                return cx.err(n.baud.span(), "baud must be between 300 and 12000000");
            }
            if let Some(sc) = &n.scanner
                && sc.get_ref().trim().is_empty()
            {
                return cx.err(sc.span(), "scanner must name the scanner's serial device");
            }
            nests.push(NestSettings {
                name: n.name.get_ref().clone(),
                port: n.port.get_ref().clone(),
                baud,
                scanner: n
                    .scanner
                    .as_ref()
                    .map(|sc| (sc.get_ref().clone(), n.scanner_baud)),
            });
        }
        let mut models = Vec::new();
        let mut model_names = BTreeSet::new();
        for m in &raw.models {
            if m.name.get_ref().is_empty()
                || m.name.get_ref().len() > 32
                || !model_names.insert(m.name.get_ref().clone())
            {
                return cx.err(
                    m.name.span(),
                    format!(
                        "model name {:?} is empty, too long or used twice",
                        m.name.get_ref()
                    ),
                );
            }
            if *m.suite.get_ref() > 2 {
                return cx.err(
                    m.suite.span(),
                    "suite must be 0, 1 or 2 (DLMS/COSEM security suites)",
                );
            }
            let keygen = match m.keygen.get_ref().as_str() {
                "meter" => Keygen::Meter,
                "hsm" => Keygen::Hsm,
                other => {
                    return cx.err(
                        m.keygen.span(),
                        format!("keygen must be \"meter\" or \"hsm\", not {other:?}"),
                    );
                }
            };
            if let Some(na) = &m.not_after
                && time::OffsetDateTime::parse(
                    na.get_ref(),
                    &time::format_description::well_known::Rfc3339,
                )
                .is_err()
            {
                return cx.err(
                    na.span(),
                    "not_after must be an RFC 3339 time such as 2045-12-31T23:59:59Z",
                );
            }
            let mut disable = line_protocol::msg::iface::PROVISIONING;
            match &m.disable {
                // Every interface the protocol knows, unless the model says otherwise.
                None => disable = line_protocol::msg::iface::ALL,
                Some(list) => {
                    for name in list.get_ref() {
                        disable |= match name.as_str() {
                            "debug" => line_protocol::msg::iface::DEBUG,
                            "optical" => line_protocol::msg::iface::OPTICAL,
                            "provisioning" => line_protocol::msg::iface::PROVISIONING,
                            other => {
                                return cx.err(
                                    list.span(),
                                    format!("unknown interface {other:?} in disable: the interfaces are \"debug\", \"optical\" and \"provisioning\" (always disabled)"),
                                );
                            }
                        };
                    }
                }
            }
            let serial_source = match m
                .serial_source
                .as_ref()
                .map(|x| (x.get_ref().as_str(), x.span()))
            {
                None | Some(("assign", _)) => SerialSource::Assign,
                Some(("scan", span)) => {
                    if let Some(n) = nests.iter().find(|n| n.scanner.is_none()) {
                        return cx.err(
                            span,
                            format!("serial_source = \"scan\": nest {} has no scanner (scanner = \"/dev/...\" in its [[nests]])", n.name),
                        );
                    }
                    SerialSource::Scan
                }
                Some((_, span)) => {
                    return cx.err(span, "serial_source must be \"assign\" or \"scan\"");
                }
            };
            models.push(ModelSettings {
                serial_source,
                disable,
                name: m.name.get_ref().clone(),
                suite: *m.suite.get_ref(),
                keygen,
                key_agreement: m.key_agreement,
                anchors: m.anchors.iter().map(|a| resolve(a)).collect(),
                not_after: m.not_after.as_ref().map(|s| s.get_ref().clone()),
            });
        }
        let interval = *raw.audit.checkpoint_interval.get_ref();
        if !(1..=100_000).contains(&interval) {
            return cx.err(
                raw.audit.checkpoint_interval.span(),
                "audit.checkpoint_interval must be between 1 and 100000",
            );
        }
        let critical = match raw.audit.critical {
            Some(list) => list.into_iter().collect(),
            None => DEFAULT_CRITICAL.iter().map(|s| s.to_string()).collect(),
        };
        let access = AccessSettings {
            max_failed_pins: *raw.access.max_failed_pins.get_ref(),
            lockout_minutes: raw.access.lockout_minutes,
            session_idle_minutes: *raw.access.session_idle_minutes.get_ref(),
            session_max_hours: *raw.access.session_max_hours.get_ref(),
            min_pin_length: *raw.access.min_pin_length.get_ref(),
        };
        if access.max_failed_pins == 0 {
            return cx.err(
                raw.access.max_failed_pins.span(),
                "access.max_failed_pins must be at least 1",
            );
        }
        if access.session_idle_minutes == 0 {
            return cx.err(
                raw.access.session_idle_minutes.span(),
                "access.session_idle_minutes must be at least 1",
            );
        }
        if !(1..=168).contains(&access.session_max_hours) {
            return cx.err(
                raw.access.session_max_hours.span(),
                "access.session_max_hours must be between 1 and 168",
            );
        }
        if !(4..=64).contains(&access.min_pin_length) {
            return cx.err(
                raw.access.min_pin_length.span(),
                "access.min_pin_length must be between 4 and 64",
            );
        }
        let retention = RetentionSettings {
            wrapped_keys_days: *raw.retention.wrapped_keys_days.get_ref(),
        };
        if !(1..=3650).contains(&retention.wrapped_keys_days) {
            return cx.err(
                raw.retention.wrapped_keys_days.span(),
                "retention.wrapped_keys_days must be between 1 and 3650",
            );
        }
        if raw.api.socket.get_ref().trim().is_empty() {
            return cx.err(raw.api.socket.span(), "api.socket must name a file");
        }
        let socket_mode = match u32::from_str_radix(raw.api.socket_mode.get_ref(), 8) {
            Ok(m) if m & !0o770 == 0 && m & 0o600 == 0o600 => m,
            _ => {
                return cx.err(
                    raw.api.socket_mode.span(),
                    "api.socket_mode must be an octal mode like \"0660\": owner read-write, group at most read-write, nothing for others",
                );
            }
        };
        let tls = match &raw.api.tls {
            None => None,
            Some(t) => {
                if t.listen.get_ref().parse::<std::net::SocketAddr>().is_err() {
                    return cx.err(
                        t.listen.span(),
                        "api.tls.listen must be an address and port, e.g. \"0.0.0.0:7443\"",
                    );
                }
                Some(TlsSettings {
                    listen: t.listen.get_ref().clone(),
                    cert: resolve(&t.cert),
                    key: resolve(&t.key),
                })
            }
        };
        let api = ApiSettings {
            socket: resolve(raw.api.socket.get_ref()),
            socket_mode,
            export_dir: resolve(raw.api.export_dir.get_ref()),
            tls,
        };
        let fleet = match &raw.fleet {
            None => None,
            Some(f) => {
                if !is_registry_name(&station_id) {
                    return cx.err(
                        raw.station_id.span(),
                        "with a [fleet] registry, station_id is the station's registry role: 1..63 lower-case letters, digits, '-' or '_', starting with a letter or digit",
                    );
                }
                if f.host.get_ref().trim().is_empty() {
                    return cx.err(f.host.span(), "fleet.host must name the registry server");
                }
                let block = *f.lease_block.get_ref();
                if !(1..=10_000_000).contains(&block) {
                    return cx.err(
                        f.lease_block.span(),
                        "fleet.lease_block must be between 1 and 10000000",
                    );
                }
                let low = match &f.lease_low_water {
                    None => block.div_ceil(2),
                    Some(l) if *l.get_ref() <= block => *l.get_ref(),
                    Some(l) => {
                        return cx.err(
                            l.span(),
                            "fleet.lease_low_water must not exceed fleet.lease_block",
                        );
                    }
                };
                let interval = *f.push_interval_s.get_ref();
                if !(1..=3600).contains(&interval) {
                    return cx.err(
                        f.push_interval_s.span(),
                        "fleet.push_interval_s must be between 1 and 3600",
                    );
                }
                let batch = *f.push_batch.get_ref();
                if !(1..=5000).contains(&batch) {
                    return cx.err(
                        f.push_batch.span(),
                        "fleet.push_batch must be between 1 and 5000",
                    );
                }
                Some(FleetSettings {
                    host: f.host.get_ref().trim().to_string(),
                    port: f.port,
                    database: f.database.clone(),
                    server_ca: resolve(&f.server_ca),
                    cert: resolve(&f.cert),
                    key: resolve(&f.key),
                    lease_block: block,
                    lease_low_water: low,
                    push_interval_s: interval,
                    push_batch: batch,
                })
            }
        };
        let plc = match &raw.plc {
            None => None,
            Some(p) => {
                let Ok(listen) = p.listen.get_ref().parse::<std::net::SocketAddr>() else {
                    return cx.err(
                        p.listen.span(),
                        "plc.listen must be an address and port, e.g. \"10.20.0.5:502\"",
                    );
                };
                let mut allow = Vec::new();
                for a in p.allow.get_ref() {
                    match a.parse::<std::net::IpAddr>() {
                        Ok(ip) => allow.push(ip),
                        Err(_) => {
                            return cx.err(
                                p.allow.span(),
                                format!("plc.allow: {a:?} is not an IP address"),
                            );
                        }
                    }
                }
                if allow.is_empty() {
                    return cx.err(
                        p.allow.span(),
                        "plc.allow must name the PLC's address (Modbus has no log-in: only these addresses may connect)",
                    );
                }
                let plc_starts = match p.start.get_ref().as_str() {
                    "plc" => true,
                    "auto" => false,
                    _ => {
                        return cx.err(
                            p.start.span(),
                            "plc.start must be \"plc\" (a nest waits for the PLC's START) or \"auto\"",
                        );
                    }
                };
                Some(PlcSettings {
                    listen,
                    allow,
                    plc_starts,
                })
            }
        };
        let labels = match &raw.labels {
            None => None,
            Some(l) => {
                let Ok(printer) = l.printer.get_ref().parse::<std::net::SocketAddr>() else {
                    return cx.err(
                        l.printer.span(),
                        "labels.printer must be the printer's address and port, e.g. \"10.20.0.30:9100\"",
                    );
                };
                let t = *l.timeout_ms.get_ref();
                if !(100..=60_000).contains(&t) {
                    return cx.err(
                        l.timeout_ms.span(),
                        "labels.timeout_ms must be between 100 and 60000",
                    );
                }
                Some(LabelSettings {
                    printer,
                    timeout_ms: t,
                })
            }
        };
        let opcua = match &raw.opcua {
            None => None,
            Some(o) => {
                let Ok(listen) = o.listen.get_ref().parse::<std::net::SocketAddr>() else {
                    return cx.err(
                        o.listen.span(),
                        "opcua.listen must be an address and port, e.g. \"10.20.0.5:4840\"",
                    );
                };
                let application_uri = match &o.application_uri {
                    Some(u) => {
                        let v = u.get_ref().trim();
                        if !v.contains(':') || v.len() > 256 || !v.is_ascii() || v.contains(' ') {
                            return cx.err(
                                u.span(),
                                "opcua.application_uri must be a URI, e.g. \"urn:acme:cell-a3\"",
                            );
                        }
                        v.to_string()
                    }
                    None => format!("urn:smart-meter-cell:{station_id}"),
                };
                Some(OpcUaSettings {
                    listen,
                    application_uri,
                    certificate: resolve(&o.certificate),
                    key: resolve(&o.key),
                    trusted_clients: resolve(&o.trusted_clients),
                })
            }
        };
        Ok(Config {
            path: path.to_path_buf(),
            station_id,
            manufacturer: Manufacturer {
                name: raw.manufacturer.name.get_ref().trim().to_string(),
                flag_id: flag.clone(),
            },
            database: resolve(raw.database.get_ref()),
            hsm: HsmSettings {
                module: resolve(raw.hsm.module.get_ref()),
                token: raw.hsm.token.get_ref().clone(),
                pin,
                pool_size: pool as usize,
                softhsm_conf: raw.hsm.softhsm_conf.as_deref().map(resolve),
                kryoptic_conf: raw.hsm.kryoptic_conf.as_deref().map(resolve),
                trusted_wrap: raw.hsm.trusted_wrap,
            },
            line: LineSettings {
                latency_ms: raw.line.latency_ms,
                max_payload: mp as u16,
                window: win as u8,
                poll_ms: raw.line.poll_ms.max(10),
            },
            nests,
            models,
            audit: AuditSettings {
                checkpoint_interval: interval,
                critical,
            },
            access,
            retention,
            api,
            fleet,
            plc,
            labels,
            opcua,
        })
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelSettings> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
station_id = "cell-01"
database = "station.db"

[manufacturer]
name = "Example Meters"
flag_id = "EXM"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token = "cell-01"
pin = { file = "hsm-pin" }

[[nests]]
name = "N1"
port = "/dev/pts/3"
baud = 921600

[[models]]
name = "EM-300"
suite = 1
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/cell/station.toml"), text)
    }

    #[test]
    fn scanned_serials_need_a_scanner_in_every_nest() {
        let scan = EXAMPLE.replace("suite = 1", "suite = 1\nserial_source = \"scan\"");
        let e = parse(&scan).unwrap_err();
        assert!(e.reason.contains("nest N1 has no scanner"), "{e}");
        let with_scanner =
            scan.replace("baud = 921600", "baud = 921600\nscanner = \"/dev/ttyACM0\"");
        let c = parse(&with_scanner).unwrap();
        assert_eq!(c.models[0].serial_source, SerialSource::Scan);
        assert_eq!(c.nests[0].scanner, Some(("/dev/ttyACM0".into(), 9600)));
        // With a registry too: scanned numbers are checked against it (not leased).
        let fleet = "\n[fleet]\nhost = \"r\"\nserver_ca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c = parse(&format!("{with_scanner}{fleet}")).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.fleet.is_some() && c.models[0].serial_source == SerialSource::Scan);
        let e = parse(&EXAMPLE.replace("suite = 1", "suite = 1\nserial_source = \"guess\""))
            .unwrap_err();
        assert!(e.reason.contains("\"assign\" or \"scan\""), "{e}");
    }

    #[test]
    fn a_fleet_section_is_read_with_its_defaults_and_checked() {
        let fleet = "\n[fleet]\nhost = \"registry.plant\"\nserver_ca = \"reg/ca.pem\"\ncert = \"reg/c.pem\"\nkey = \"reg/k.pem\"\nlease_block = 1000\n";
        let c = parse(&format!("{EXAMPLE}{fleet}")).unwrap();
        let f = c.fleet.unwrap();
        assert_eq!((f.port, f.database.as_str()), (5432, "registry"));
        assert_eq!((f.lease_block, f.lease_low_water), (1000, 500));
        assert_eq!(f.cert, PathBuf::from("/cell/reg/c.pem"));
        assert!(parse(EXAMPLE).unwrap().fleet.is_none());
        let cases = [
            (
                format!("{EXAMPLE}{fleet}").replace("cell-01\"\ndatabase", "Cell.01\"\ndatabase"),
                "registry role",
            ),
            (
                format!("{EXAMPLE}{fleet}lease_low_water = 1001\n"),
                "must not exceed fleet.lease_block",
            ),
            (
                format!("{EXAMPLE}{fleet}").replace("lease_block = 1000", "lease_block = 0"),
                "between 1 and 10000000",
            ),
            (format!("{EXAMPLE}{fleet}push_batch = 0\n"), "push_batch"),
            (
                format!("{EXAMPLE}{fleet}password = \"x\"\n"),
                "unknown field",
            ),
        ];
        for (text, reason) in cases {
            let e = parse(&text).unwrap_err();
            assert!(e.reason.contains(reason), "{e}");
        }
    }

    #[test]
    fn example_parses_with_defaults_and_resolved_paths() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.database, PathBuf::from("/cell/station.db"));
        assert_eq!(
            c.hsm.pin,
            PinSourceSetting::File(PathBuf::from("/cell/hsm-pin"))
        );
        assert_eq!(c.nests[0].baud, 921_600);
        assert_eq!(c.models[0].keygen, Keygen::Meter);
        assert!(c.audit.critical.contains("security.replay"));
        assert_eq!(c.access.max_failed_pins, 5);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let cases = [
            (
                EXAMPLE.replace("baud = 921600", "baud = 921600\nspeed = 3"),
                18,
                "unknown field `speed`",
            ),
            (
                EXAMPLE.replace("baud = 921600", "baud = 12"),
                17,
                "baud must be between",
            ),
            (
                EXAMPLE.replace("flag_id = \"EXM\"", "flag_id = \"exm1\""),
                7,
                "three upper-case letters",
            ),
            (
                EXAMPLE.replace("suite = 1", "suite = 7"),
                21,
                "suite must be 0, 1 or 2",
            ),
            (
                EXAMPLE.replace("port = \"/dev/pts/3\"", "port = \"udp://x:1\""),
                16,
                "only tcp:// is supported",
            ),
            (
                EXAMPLE.replace(
                    "pin = { file = \"hsm-pin\" }",
                    "pin = { file = \"hsm-pin\", env = \"X\" }",
                ),
                12,
                "",
            ),
            (
                EXAMPLE.replace("suite = 1", "suite = \"one\""),
                21,
                "invalid type",
            ),
        ];
        let retention = format!("{EXAMPLE}\n[retention]\nwrapped_keys_days = 0\n");
        let e = parse(&retention).unwrap_err();
        assert_eq!(e.line, retention.lines().count(), "{e}");
        assert!(e.reason.contains("between 1 and 3650"), "{e}");
        let kept = format!("{EXAMPLE}\n[retention]\nwrapped_keys_days = 30\n");
        assert_eq!(parse(&kept).unwrap().retention.wrapped_keys_days, 30);
        assert_eq!(parse(EXAMPLE).unwrap().retention.wrapped_keys_days, 90);
        for (text, line, reason) in cases {
            let e = parse(&text).unwrap_err();
            assert_eq!(e.line, line, "{e}");
            assert!(e.reason.contains(reason), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("/cell/station.toml:{line}: ")),
                "{e}"
            );
        }
    }
}
