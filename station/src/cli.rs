//! The `station` command line: arguments, credentials, output. The binary is one call to
//! [`main`]; keeping it here lets the end-to-end tests run the very same command.
//!
//! It is a client of `stationd` ([`crate::api::client`]): it parses arguments, obtains the
//! user's PIN, logs in over the daemon's socket (or mutual TLS), runs the command and logs out.
//! It holds no HSM PIN and never opens the journal. What a utility or an auditor runs off-line
//! needs no daemon: `manifest verify`, `manifest import` and `audit verify --offline` on a
//! copied journal; so do the set-up commands of a fresh token (`pki init-dev`, and `pki csr` /
//! `pki import` with `--local`, refused once the cell has been set up). Every failure exits
//! non-zero with a message that says what to do.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::api::client::{Address, Client, TlsClient};
use crate::auth::Role;
use crate::config::Config;
use crate::engine::BatchSpec;
use crate::{Command, Reply, Session};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

#[derive(Parser, Debug)]
#[command(
    name = "station",
    version,
    about = "Trust-provisioning cell controller: keys, certificates and firmware into meters, with a journal, an audit log and signed manifests",
    long_about = None,
    after_help = "The station's service, stationd, holds the HSM and the journal; this command talks to it over its socket (the cell configuration's `[api] socket`, or --connect).\nCredentials: commands log in as --user (or STATION_USER) with the PIN from STATION_PIN, --pin-file (an owner-only file) or a prompt.\nStart with `station demo` to see a whole cell at work."
)]
struct Cli {
    /// Cell configuration (to find the daemon's socket; read only).
    #[arg(
        long,
        global = true,
        default_value = "station.toml",
        env = "STATION_CONFIG"
    )]
    config: PathBuf,
    /// The daemon: its Unix socket, or https://HOST:PORT for a remote daemon (mutual TLS).
    #[arg(long, global = true, env = "STATION_CONNECT")]
    connect: Option<String>,
    /// Remote daemon: the CA certificate its certificate chains to (PEM).
    #[arg(long, global = true, env = "STATION_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Remote daemon: this console's certificate (PEM, issued by the cell).
    #[arg(long, global = true, env = "STATION_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Remote daemon: this console's private key (PEM, an owner-only file).
    #[arg(long, global = true, env = "STATION_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// User to log in as.
    #[arg(long, global = true, env = "STATION_USER")]
    user: Option<String>,
    /// File holding the user's PIN (owner-only permissions).
    #[arg(long, global = true, env = "STATION_PIN_FILE")]
    pin_file: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the first security officer of a fresh cell (PIN from STATION_NEW_PIN or a
    /// prompt). Works once: the HSM token then marks the cell as set up.
    Init {
        /// Name of the first security officer.
        #[arg(long)]
        admin: String,
    },
    /// Users and roles.
    #[command(subcommand)]
    User(UserCmd),
    /// The cell's PKI in the HSM.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// The HSM.
    #[command(subcommand)]
    Hsm(HsmCmd),
    /// Firmware releases.
    #[command(subcommand)]
    Firmware(FirmwareCmd),
    /// Customers (utilities) and their certificates.
    #[command(subcommand)]
    Customer(CustomerCmd),
    /// Production batches.
    #[command(subcommand)]
    Batch(BatchCmd),
    /// Run the line headless: every nest, a progress bar per nest, a summary at the end.
    Run(RunArgs),
    /// Alarms raised by critical audit events.
    #[command(subcommand)]
    Alarm(AlarmCmd),
    /// Allow a failed meter to be provisioned again (supervisor): at its next insertion a
    /// personalized meter is wiped (RESET 2); a sealed one is sent a rework token signed in the
    /// HSM and bound to its UID, the channel and its certificate (line protocol 4.16). Either
    /// way it is then provisioned again in the same nest. One approval, one rework.
    Rework {
        /// The meter's UID (hex).
        uid: String,
    },
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The factory registry: every station's records in one PostgreSQL database (auditors,
    /// supervisors, account managers; its administrator for `init` and `enrol`). Talks to the
    /// registry directly, over TLS with the client certificate of --registry.
    Fleet(FleetArgs),
    /// Export a closed batch's signed manifest (manifest.json and manifest.p7m).
    Export {
        /// Batch id.
        #[arg(long)]
        batch: i64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// The utility's side: verify a manifest, import its keys.
    #[command(subcommand)]
    Manifest(ManifestCmd),
    /// A batch's evidence report for an auditor: report.html (and report.pdf with --pdf), made
    /// from a copy of the journal with the manufacturer root as the only trust, as `audit verify
    /// --offline` does. Exits 2 when the audit log fails verification, 3 when a check of the
    /// batch fails; the report is written either way and says so on its first page.
    Report(ReportArgs),
    /// A whole batch on emulated meters with a software HSM, ending in a verified manifest.
    Demo(crate::demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum ManifestCmd {
    /// Check signature and chain, schema, certificates, receipts, counts and duplicates.
    Verify {
        /// The manifest (manifest.p7m).
        file: PathBuf,
        /// The manufacturer's root certificate (PEM or DER).
        #[arg(long)]
        root: PathBuf,
    },
    /// Verify, then import every meter key: into your HSM (never in clear), or into per-meter
    /// key files (only with --clear-keys). A manifest that fails verification imports nothing.
    Import(ImportArgs),
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// The manifest (manifest.p7m).
    file: PathBuf,
    /// The manufacturer's root certificate (PEM or DER).
    #[arg(long)]
    root: PathBuf,
    /// Your RSA private key (PKCS#8 PEM): write per-meter key files.
    #[arg(long, requires_all = ["out", "clear_keys"], conflicts_with = "pkcs11_module")]
    key: Option<PathBuf>,
    /// Directory for the per-meter key files.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Acknowledge that the key files hold meter keys in clear (owner-only files).
    #[arg(long)]
    clear_keys: bool,
    /// Your PKCS#11 module: unwrap every key into your token.
    #[arg(long, requires = "token")]
    pkcs11_module: Option<PathBuf>,
    /// Your token's label.
    #[arg(long)]
    token: Option<String>,
    /// Label of your RSA transport key pair in the token.
    #[arg(long, default_value = "utility-transport")]
    key_label: String,
    /// Owner-only file with your token's user PIN (default: prompt, or STATION_TOKEN_PIN).
    #[arg(long)]
    token_pin_file: Option<PathBuf>,
    /// With --token: keep the meter keys out of the token, wrapped under one token key
    /// (utility-key-store, made on first use) into this new file — for a token too small for
    /// four objects per meter. Each key is checked before it is wrapped.
    #[arg(long)]
    store: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum UserCmd {
    /// Add a user (PIN from STATION_NEW_PIN or a prompt).
    Add {
        /// Name.
        name: String,
        /// operator, supervisor, security_officer or auditor.
        #[arg(long)]
        role: String,
    },
    /// List users.
    List,
    /// Disable a user.
    Disable {
        /// Name.
        name: String,
    },
    /// Set a user's PIN (from STATION_NEW_PIN or a prompt); clears a lock-out.
    ResetPin {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum PkiCmd {
    /// Create a complete demo hierarchy in a new SoftHSM token under DIR.
    InitDev {
        /// Directory for the token (and, without --out, the certificates and PIN files).
        #[arg(long)]
        token_dir: PathBuf,
        /// Token label.
        #[arg(long, default_value = "cell")]
        label: String,
        /// Where to write the public certificates (default: TOKEN_DIR/pki).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Generate a key in the HSM for a role and write its certificate request (security
    /// officer, audited).
    Csr {
        /// device-ca, manifest-signer, audit-signer or station.
        #[arg(long)]
        role: String,
        /// Subject common name.
        #[arg(long)]
        cn: String,
        /// Subject organisation.
        #[arg(long)]
        org: Option<String>,
        /// P-256 or P-384.
        #[arg(long, default_value = "P-256")]
        curve: String,
        /// Output file (PEM).
        #[arg(long)]
        out: PathBuf,
        /// Setting up a fresh token before stationd first starts: open the HSM here (with the
        /// configuration's HSM PIN). Refused once the cell has been set up.
        #[arg(long)]
        local: bool,
        /// With --local: do not generate; adopt the key pair already in the token under the
        /// role's label (made with the HSM vendor's tools), if its private key carries the key
        /// policy's attributes (token object, sensitive, not extractable, sign only).
        #[arg(long)]
        adopt: bool,
    },
    /// Import the certificate the offline root issued for a role's key (the chain is checked;
    /// security officer, audited); or, while setting up a fresh token (`--local`), one of the
    /// cell's anchors without a key in the token: manufacturer-root (first), then
    /// firmware-verification.
    Import {
        /// device-ca, manifest-signer, audit-signer, station; with --local also
        /// manufacturer-root or firmware-verification.
        #[arg(long)]
        role: String,
        /// The certificate (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Issuer certificates up to a self-signed root (PEM), in order.
        #[arg(long = "chain")]
        chain: Vec<PathBuf>,
        /// Setting up a fresh token before stationd first starts (see `pki csr --local`).
        #[arg(long)]
        local: bool,
    },
    /// Make a key pair here and have the cell's device CA certify it for the service API's
    /// TLS: a remote console (client) or the daemon's own listener (server). Writes NAME.pem,
    /// NAME-key.pem (owner-only) and ca.pem into --out.
    TlsCert {
        /// client (a remote console) or server (stationd's TLS listener).
        #[arg(long)]
        usage: String,
        /// The console's or host's name.
        #[arg(long)]
        name: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Server certificates: a DNS name clients connect to (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Server certificates: an IP address clients connect to (repeatable).
        #[arg(long = "ip")]
        ip: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=825))]
        days: u32,
    },
    /// Have the cell's device CA issue an OPC UA application instance certificate (RSA, the
    /// application URI in its subject alternative name): for stationd's OPC UA server (server)
    /// or for a client application (client) an officer then lists in opcua.trusted_clients.
    /// Makes an RSA key pair here (NAME-key.pem, owner-only) unless --public-key names the
    /// client's own; writes NAME.pem and ca.pem into --out.
    OpcuaCert {
        /// server (stationd's OPC UA server) or client (an MES, SCADA or HMI application).
        #[arg(long)]
        usage: String,
        /// The application's name (the certificate's CN).
        #[arg(long)]
        name: String,
        /// Its application URI (opcua.application_uri for the server).
        #[arg(long)]
        uri: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// The application's own RSA public key (PEM or DER SubjectPublicKeyInfo), when it
        /// keeps its private key itself.
        #[arg(long = "public-key")]
        public_key: Option<PathBuf>,
        /// Server certificates: a DNS name clients connect to (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Server certificates: an IP address clients connect to (repeatable).
        #[arg(long = "ip")]
        ip: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=825))]
        days: u32,
    },
}

#[derive(Subcommand, Debug)]
enum HsmCmd {
    /// Token, mechanisms, objects by role — nothing secret.
    Info,
    /// The HSM's known-answer self-test: the meter's key transport, ECDSA, RSA-OAEP and the
    /// attributes of what the token makes, checked against software; prints every finding and
    /// fails if any does (stationd runs it at every start too).
    Check,
    /// The token's security officer approves a utility's key-transport certificate: its RSA key
    /// goes into the token as a trusted key, the only kind that may wrap a batch transport key.
    /// Run on the station's host with the token's SO PIN; stationd may keep running. A
    /// security officer of the cell then records the customer with `station customer import`.
    TrustCustomer {
        /// Customer name (the name `customer import` and `batch open` use).
        name: String,
        /// The utility's certificate, PEM or DER.
        cert: PathBuf,
        #[command(flatten)]
        so: SoPin,
    },
    /// The token's security officer withdraws a customer's transport key: no batch can be
    /// opened for the customer until a key is trusted again.
    UntrustCustomer {
        /// Customer name.
        name: String,
        #[command(flatten)]
        so: SoPin,
    },
    /// The customer transport keys in the token, with their SubjectPublicKeyInfo fingerprints
    /// (to compare with the utility's, read aloud or on paper).
    Customers {
        #[command(flatten)]
        so: SoPin,
    },
}

/// The token security officer's PIN: an owner-only file, or a prompt on the terminal.
#[derive(Args, Debug)]
struct SoPin {
    /// File holding the token's security officer PIN (owner-only permissions); without it, the
    /// PIN is asked on the terminal.
    #[arg(long)]
    so_pin_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum FirmwareCmd {
    /// Verify an MCUboot image against the firmware verification certificate and import it.
    Import {
        /// The signed image.
        image: PathBuf,
    },
    /// List releases.
    List,
}

#[derive(Subcommand, Debug)]
enum CustomerCmd {
    /// Import a utility's certificate (RSA key: the batch transport key is wrapped to it).
    Import {
        /// Customer name.
        name: String,
        /// Certificate, PEM or DER.
        cert: PathBuf,
    },
    /// List customers.
    List,
}

#[derive(Subcommand, Debug)]
enum BatchCmd {
    /// Open a batch.
    Open(OpenBatchArgs),
    /// Close a batch (no meter may be in progress).
    Close {
        /// Batch id (default: the open batch).
        id: Option<i64>,
    },
    /// List batches.
    List,
    /// Counts and yield of a batch (default: the open batch).
    Status {
        /// Batch id.
        id: Option<i64>,
    },
}

#[derive(Args, Debug)]
struct OpenBatchArgs {
    /// Work order.
    #[arg(long)]
    work_order: String,
    /// Meter model (as configured).
    #[arg(long)]
    model: String,
    /// Firmware release: SHA-256 (8+ hex digits) or version.
    #[arg(long)]
    firmware: String,
    /// Customer name.
    #[arg(long)]
    customer: String,
    /// Meters to produce.
    #[arg(long)]
    quantity: i64,
    /// Serial number range FIRST-LAST (failed meters use numbers too: leave room). Leave it out
    /// on a station with a factory registry: its numbers come from the registry's leases.
    #[arg(long, default_value = "0-999999999")]
    serials: String,
    /// Serial number prefix.
    #[arg(long, default_value = "")]
    prefix: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Keep running after the batch is complete (until Ctrl-C).
    #[arg(long)]
    keep_running: bool,
    /// No progress bars (plain lines, for logs).
    #[arg(long)]
    plain: bool,
}

#[derive(Subcommand, Debug)]
enum AlarmCmd {
    /// Unacknowledged alarms.
    List,
    /// Acknowledge an alarm (supervisors).
    Ack {
        /// Alarm id.
        id: i64,
    },
}

#[derive(Args, Debug)]
struct FleetArgs {
    /// The registry connection: a TOML file with host, port, database, user (the CN of the
    /// client certificate), server_ca, cert and key. Without it, the `[fleet]` section of the
    /// station configuration, as the station itself.
    #[arg(long, env = "STATION_REGISTRY")]
    registry: Option<PathBuf>,
    #[command(subcommand)]
    command: FleetCmd,
}

#[derive(Subcommand, Debug)]
enum FleetCmd {
    /// Per station: the last checkpoint verified here (signature against the audit certificate
    /// recorded at enrolment, tree head, consistency with the one before), gaps in what it sent,
    /// refused checkpoints and the registry's alarms. Exits non-zero when anything is wrong.
    Audit,
    /// Meters per batch across stations.
    Batches,
    /// Yield per station (or per station and nest).
    Yield {
        /// One line per nest.
        #[arg(long)]
        by_nest: bool,
    },
    /// Where a serial number, system title or UID was provisioned, and by whom.
    Find {
        /// Serial number, system title (hex) or UID (hex).
        what: String,
    },
    /// The registry's administrator: create the registry's schema in an empty database and
    /// open the number space of a manufacturer (FLAG ID).
    Init {
        /// The manufacturer's FLAG ID.
        #[arg(long)]
        flag: String,
        /// The first number to lease.
        #[arg(long, default_value_t = 1)]
        first: i64,
    },
    /// The registry's administrator: enrol a station (its role, which logs in with a client
    /// certificate whose CN is the station id, and its audit-signer certificate).
    Enrol {
        /// The station id (as in its configuration).
        station: String,
        /// The manufacturer's FLAG ID it provisions under.
        #[arg(long)]
        flag: String,
        /// The station's audit-signer certificate (PEM), as the station's PKI issued it.
        #[arg(long)]
        audit_cert: PathBuf,
    },
}

fn registry_endpoint(cli: &Cli, a: &FleetArgs) -> Result<crate::fleet::Endpoint> {
    if let Some(path) = &a.registry {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the registry file {}", path.display()))?;
        return crate::fleet::Endpoint::parse(path, &text).map_err(|e| anyhow!(e));
    }
    let cfg = Config::load(&cli.config).map_err(|e| {
        anyhow!("{e}; name the registry with --registry FILE (or STATION_REGISTRY)")
    })?;
    let f = cfg.fleet.as_ref().ok_or_else(|| {
        anyhow!(
            "{} has no [fleet] section; name the registry with --registry FILE",
            cli.config.display()
        )
    })?;
    Ok(crate::fleet::Endpoint::station(&cfg.station_id, f))
}

async fn fleet(cli: &Cli, a: &FleetArgs) -> Result<ExitCode> {
    use crate::fleet;
    let ep = registry_endpoint(cli, a)?;
    let client = fleet::connect(&ep).await?;
    let percent = |done: i64, failed: i64| {
        if done + failed == 0 {
            "-".to_string()
        } else {
            format!("{:.1} %", 100.0 * done as f64 / (done + failed) as f64)
        }
    };
    match &a.command {
        FleetCmd::Audit => {
            let report = fleet::audit(&client).await?;
            let ok = report.iter().all(fleet::StationAudit::ok);
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for s in &report {
                    println!("{}: {}", s.station, if s.ok() { "OK" } else { "PROBLEMS" });
                    println!(
                        "  records {} (newest {}), checkpoints {} accepted, {} refused",
                        s.records,
                        s.last_seq
                            .map(|q| q.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.checkpoints,
                        s.refused
                    );
                    match &s.last_verified {
                        Some((size, root, at)) => println!(
                            "  last verified checkpoint: {size} entries, root {root}, received {at}"
                        ),
                        None => println!("  no checkpoint verified yet"),
                    }
                    for (first, last) in &s.gaps {
                        println!("  gap: records {first} to {last} never arrived");
                    }
                    for f in &s.failures {
                        println!("  FAILED: {f}");
                    }
                    for (kind, seq, message, at) in &s.alarms {
                        let seq = seq.map(|q| format!(" (record {q})")).unwrap_or_default();
                        println!("  ALARM {kind}{seq} at {at}: {message}");
                    }
                }
                if report.is_empty() {
                    println!("no station is enrolled");
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        FleetCmd::Batches => {
            let rows = fleet::batches(&client).await?;
            if cli.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(wo, st, d, f)| serde_json::json!({"work_order": wo, "station": st, "done": d, "failed": f}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20} {:<20} {:>8} {:>8} {:>8}",
                    "work order", "station", "done", "failed", "yield"
                );
                for (wo, st, d, f) in &rows {
                    println!("{wo:<20} {st:<20} {d:>8} {f:>8} {:>8}", percent(*d, *f));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Yield { by_nest } => {
            let rows = fleet::yields(&client, *by_nest).await?;
            if cli.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(st, n, d, f)| serde_json::json!({"station": st, "nest": n, "done": d, "failed": f}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20} {:>5} {:>8} {:>8} {:>8}",
                    "station", "nest", "done", "failed", "yield"
                );
                for (st, n, d, f) in &rows {
                    let n = n.map(|n| n.to_string()).unwrap_or_else(|| "all".into());
                    println!("{st:<20} {n:>5} {d:>8} {f:>8} {:>8}", percent(*d, *f));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Find { what } => {
            let rows = fleet::find(&client, what).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!(
                    "{what}: no meter with this serial number, system title or UID has reached the registry"
                );
            } else {
                for r in &rows {
                    println!(
                        "{} {}: station {}, work order {}, nest {}, serial {}, system title {}, operator {}, finished {}{}",
                        r.uid,
                        r.state,
                        r.station,
                        r.work_order.as_deref().unwrap_or("-"),
                        r.nest.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                        r.serial.as_deref().unwrap_or("-"),
                        r.system_title.as_deref().unwrap_or("-"),
                        r.operator.as_deref().unwrap_or("-"),
                        r.finished_at.as_deref().unwrap_or("-"),
                        r.failure
                            .as_deref()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(if rows.is_empty() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        FleetCmd::Init { flag, first } => {
            if flag.len() != 3 || !flag.chars().all(|c| c.is_ascii_uppercase()) {
                bail!("--flag takes the manufacturer's FLAG ID: three upper-case letters");
            }
            fleet::migrate(&client).await?;
            fleet::add_number_space(&client, flag, *first, fleet::LAST_NUMBER).await?;
            println!(
                "the registry is ready: numbers {first}..{} of {flag} to lease",
                fleet::LAST_NUMBER
            );
            Ok(ExitCode::SUCCESS)
        }
        FleetCmd::Enrol {
            station,
            flag,
            audit_cert,
        } => {
            if !crate::config::is_registry_name(station) {
                bail!(
                    "a station id in the registry is 1..63 lower-case letters, digits, '-' or '_'"
                );
            }
            let pem = std::fs::read_to_string(audit_cert)
                .with_context(|| format!("cannot read {}", audit_cert.display()))?;
            fleet::enrol(&client, station, flag, &pem).await?;
            println!(
                "station {station} enrolled: it logs in with a client certificate whose CN is {station}"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Verify the hash chain, signatures, signed head and checkpoints; names the first bad entry.
    Verify(AuditVerifyArgs),
    /// Write the whole log and its checkpoints as JSON.
    Export {
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Resume a frozen log (security officer): a new signed head over the newest entry there
    /// is, and a critical `audit.recovered` entry with the reason. What was damaged stays
    /// damaged for `audit verify` to report.
    Recover {
        /// Why the log may be resumed (it goes into the log).
        #[arg(long)]
        reason: String,
    },
    /// The newest entries.
    Tail {
        /// How many.
        #[arg(short, default_value_t = 20)]
        n: i64,
        /// Keep printing new entries.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Args, Debug)]
struct ReportArgs {
    /// The batch: its work order, or its id.
    #[arg(long)]
    batch: String,
    /// The journal (a copy will do, with its -wal file beside it; default: the configuration's
    /// `database`). It is copied and read, never written.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// The manufacturer's root certificate (PEM or DER): the audit signer's certificate must be
    /// issued by it.
    #[arg(long)]
    root: PathBuf,
    /// The audit signer's certificate (default: as the journal recorded it).
    #[arg(long)]
    audit_cert: Option<PathBuf>,
    /// Directory to write report.html (and report.pdf) into; made if missing.
    #[arg(long)]
    out: PathBuf,
    /// Also print report.pdf from the HTML with headless Chromium.
    #[arg(long)]
    pdf: bool,
    /// The Chromium to print with.
    #[arg(long, env = "STATION_CHROMIUM", default_value = "chromium")]
    chromium: PathBuf,
}

#[derive(Args, Debug)]
struct AuditVerifyArgs {
    /// Verify a copy of a journal here, without the daemon or the HSM (an auditor's check):
    /// the audit certificate must chain to --root.
    #[arg(long, requires_all = ["journal", "root"])]
    offline: bool,
    /// The copied journal (with its -wal file beside it, if there is one).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// The manufacturer's root certificate (PEM or DER).
    #[arg(long)]
    root: Option<PathBuf>,
    /// The audit signer's certificate (default: as the journal recorded it).
    #[arg(long)]
    audit_cert: Option<PathBuf>,
}

/// Logs to standard error, at the level `STATION_LOG` says (`warn` when unset): the station's
/// binaries all log this way.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STATION_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs the `station` command with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    // SoftHSM reads its configuration once, when loaded: set it before any thread starts.
    if let Err(e) = prepare_environment(&cli) {
        eprintln!("station: {e:#}");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("station: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("station: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn prepare_environment(cli: &Cli) -> Result<()> {
    match &cli.command {
        Cmd::Demo(args) => crate::demo::prepare(args),
        Cmd::Pki(PkiCmd::InitDev { token_dir, .. }) => {
            let conf = hsm::softhsm::write_conf(&token_dir.join("hsm"))?;
            hsm::softhsm::use_conf(&conf);
            Ok(())
        }
        // Only the set-up of a fresh token and the token's security officer open the HSM here.
        Cmd::Pki(PkiCmd::Csr { local: true, .. } | PkiCmd::Import { local: true, .. })
        | Cmd::Hsm(
            HsmCmd::TrustCustomer { .. }
            | HsmCmd::UntrustCustomer { .. }
            | HsmCmd::Customers { .. },
        ) => {
            if let Ok(cfg) = Config::load(&cli.config) {
                cfg.hsm.use_module_env();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn read_pin_file(path: &Path) -> Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read the PIN file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "the PIN file {} can be read by others; `chmod 600` it",
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the PIN file {}", path.display()))?,
    );
    Ok(Zeroizing::new(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

fn credentials(cli: &Cli) -> Result<(String, Zeroizing<String>)> {
    let user = cli.user.clone().ok_or_else(|| {
        anyhow!("this command needs a user: pass --user NAME or set STATION_USER")
    })?;
    if let Ok(pin) = std::env::var("STATION_PIN") {
        return Ok((user, Zeroizing::new(pin)));
    }
    if let Some(f) = &cli.pin_file {
        return Ok((user, read_pin_file(f)?));
    }
    if std::io::stdin().is_terminal() {
        let pin = rpassword::prompt_password(format!("PIN for {user}: "))
            .context("cannot read the PIN")?;
        return Ok((user, Zeroizing::new(pin)));
    }
    bail!("no PIN for {user}: set STATION_PIN, pass --pin-file, or run on a terminal to be asked")
}

fn new_pin(what: &str) -> Result<Zeroizing<String>> {
    if let Ok(pin) = std::env::var("STATION_NEW_PIN") {
        return Ok(Zeroizing::new(pin));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no PIN for {what}: set STATION_NEW_PIN or run on a terminal to be asked");
    }
    let a = Zeroizing::new(rpassword::prompt_password(format!("New PIN for {what}: "))?);
    let b = Zeroizing::new(rpassword::prompt_password("Repeat the PIN: ")?);
    if a != b {
        bail!("the two PINs differ");
    }
    Ok(a)
}

/// Where the daemon is: --connect, else the socket the cell's configuration names.
pub fn address(
    connect: Option<&str>,
    config: &Path,
    tls: (Option<&Path>, Option<&Path>, Option<&Path>),
) -> Result<Address> {
    match connect {
        Some(url) if url.starts_with("https://") => {
            let (Some(ca), Some(cert), Some(key)) = tls else {
                bail!("a remote daemon needs --tls-ca, --tls-cert and --tls-key");
            };
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
            {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(key)
                    .with_context(|| format!("cannot read {}", key.display()))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    bail!(
                        "the key {} can be read by others; `chmod 600` it",
                        key.display()
                    );
                }
            }
            Ok(Address::Tls(TlsClient {
                url: url.to_string(),
                domain: None,
                ca_pem: read(ca)?,
                cert_pem: read(cert)?,
                key_pem: Zeroizing::new(read(key)?),
            }))
        }
        Some(path) => Ok(Address::Unix(PathBuf::from(path))),
        None => match Config::load(config) {
            Ok(cfg) => Ok(Address::Unix(cfg.api.socket)),
            Err(_) => Ok(Address::Unix(PathBuf::from(DEFAULT_SOCKET))),
        },
    }
}

/// The daemon's socket when neither --connect nor a readable configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/stationd/stationd.sock";

async fn connect(cli: &Cli) -> Result<Client> {
    let addr = address(
        cli.connect.as_deref(),
        &cli.config,
        (
            cli.tls_ca.as_deref(),
            cli.tls_cert.as_deref(),
            cli.tls_key.as_deref(),
        ),
    )?;
    Ok(Client::connect(&addr, "station-cli").await?)
}

async fn login(cli: &Cli, client: &Client) -> Result<Session> {
    let (user, pin) = credentials(cli)?;
    Ok(client.login(&user, &pin).await?.session)
}

/// Connects, logs in, runs one command, logs out.
async fn one(cli: &Cli, cmd: Command) -> Result<Reply> {
    let client = connect(cli).await?;
    let session = login(cli, &client).await?;
    let r = client.execute(&session, cmd).await;
    let _ = client.logout(&session).await;
    Ok(r?)
}

fn print(cli: &Cli, reply: &Reply) -> Result<()> {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(reply)?);
        return Ok(());
    }
    match reply {
        Reply::Done => println!("done"),
        Reply::Batch(b) => print_batch(b),
        Reply::Batches(bs) => {
            if bs.is_empty() {
                println!("no batches");
            }
            for b in bs {
                println!(
                    "{:>4}  {:<16} {:<8} {:<10} {:>5}/{:<5} failed {:<4} {}",
                    b.id, b.work_order, b.state, b.model, b.done, b.quantity, b.failed, b.customer
                );
            }
        }
        Reply::Firmware(f) => println!(
            "imported firmware {} (sha256 {}, {} bytes)",
            f.version, f.sha256, f.size
        ),
        Reply::Firmwares(fs) => {
            if fs.is_empty() {
                println!("no firmware releases");
            }
            for f in fs {
                println!(
                    "{:>4}  {:<12} {}  {:>8} bytes  imported {} by {}",
                    f.id, f.version, f.sha256, f.size, f.imported_at, f.imported_by
                );
            }
        }
        Reply::Customer(c) => println!(
            "imported customer {} (certificate sha256 {})",
            c.name, c.fingerprint
        ),
        Reply::Customers(cs) => {
            if cs.is_empty() {
                println!("no customers");
            }
            for c in cs {
                println!("{:>4}  {:<24} {}", c.id, c.name, c.fingerprint);
            }
        }
        Reply::User(u) => println!("user {} ({})", u.name, u.role.as_str()),
        Reply::Users(us) => {
            for u in us {
                let state = if u.disabled {
                    "disabled"
                } else if u.locked_until.is_some() {
                    "locked"
                } else {
                    "active"
                };
                println!("{:<24} {:<18} {}", u.name, u.role.as_str(), state);
            }
        }
        Reply::Verification(v) => match &v.first_bad {
            None => println!(
                "audit log verified: {} entries, {} checkpoints, all signatures good",
                v.entries, v.checkpoints
            ),
            Some((seq, why)) => println!("AUDIT LOG FAILED VERIFICATION at entry {seq}: {why}"),
        },
        Reply::Entries(es) => {
            for e in es {
                println!(
                    "{:>6} {} {:<8} {:<10} {:<28} {:<12} {}",
                    e.seq, e.time, e.severity, e.source, e.kind, e.actor, e.details
                );
            }
        }
        Reply::AuditExport { .. } => println!("{}", serde_json::to_string_pretty(reply)?),
        Reply::Alarms(a) => {
            if a.is_empty() {
                println!("no open alarms");
            }
            for a in a {
                println!("{:>4}  {}  {}", a.id, a.raised_at, a.in_words());
                println!("      {}: {}", a.kind, a.message);
            }
        }
        Reply::Text(t) => println!("{t}"),
        other => println!("{}", serde_json::to_string_pretty(other)?),
    }
    Ok(())
}

fn print_batch(b: &crate::records::BatchRow) {
    println!("batch {} — work order {} ({})", b.id, b.work_order, b.state);
    println!(
        "  model {}, firmware {} ({}), customer {}",
        b.model,
        b.firmware_version,
        &b.firmware_sha256[..16],
        b.customer
    );
    println!(
        "  {} of {} done, {} failed, {} in progress, {} remaining{}",
        b.done,
        b.quantity,
        b.failed,
        b.in_flight,
        b.remaining(),
        b.yield_percent()
            .map(|y| format!(", yield {y:.1} %"))
            .unwrap_or_default()
    );
    println!(
        "  serials {}{:09}..{}{:09}, next {}",
        b.serial_prefix, b.serial_first, b.serial_prefix, b.serial_last, b.next_serial
    );
    match (&b.exported_at, &b.keys_deleted_at) {
        (_, Some(deleted)) => println!(
            "  wrapped keys deleted at {deleted}, the retention period after its last export: it cannot be exported again"
        ),
        (Some(exported), None) => println!(
            "  last exported at {exported}; its wrapped keys are deleted once [retention] wrapped_keys_days have passed since"
        ),
        (None, None) => println!("  not exported yet"),
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let reply = match &cli.command {
        Cmd::Demo(args) => {
            // The demo runs the cell with the real daemon when it was built beside this command.
            let mut args = args.clone();
            args.stationd = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("stationd")))
                .filter(|p| p.exists());
            return crate::demo::run(args).await.map(|_| ExitCode::SUCCESS);
        }
        Cmd::Export { batch, out } => {
            one(
                &cli,
                Command::Export {
                    batch: *batch,
                    out_dir: out.clone(),
                },
            )
            .await?
        }
        Cmd::Manifest(m) => return manifest(&cli, m),
        Cmd::Report(a) => return report(&cli, a),
        Cmd::Fleet(a) => return fleet(&cli, a).await,
        Cmd::Init { admin } => {
            let client = connect(&cli).await?;
            let pin = new_pin(admin)?;
            Reply::User(client.bootstrap(admin, &pin).await?)
        }
        Cmd::User(u) => {
            let cmd = match u {
                UserCmd::Add { name, role } => {
                    let role = Role::parse(role).ok_or_else(|| anyhow!("unknown role {role:?}: operator, supervisor, security_officer or auditor"))?;
                    Command::AddUser {
                        name: name.clone(),
                        role,
                        pin: new_pin(name)?,
                    }
                }
                UserCmd::List => Command::ListUsers,
                UserCmd::Disable { name } => Command::DisableUser { name: name.clone() },
                UserCmd::ResetPin { name } => Command::ResetPin {
                    name: name.clone(),
                    pin: new_pin(name)?,
                },
            };
            one(&cli, cmd).await?
        }
        Cmd::Pki(p) => return pki(&cli, p).await,
        Cmd::Hsm(HsmCmd::Info) => one(&cli, Command::HsmInfo).await?,
        Cmd::Hsm(HsmCmd::Check) => one(&cli, Command::HsmCheck).await?,
        Cmd::Hsm(h) => return hsm_so(&cli, h).await,
        Cmd::Firmware(FirmwareCmd::Import { image }) => {
            let bytes =
                std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
            let name = image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            one(&cli, Command::ImportFirmware { name, image: bytes }).await?
        }
        Cmd::Firmware(FirmwareCmd::List) => one(&cli, Command::ListFirmware).await?,
        Cmd::Customer(CustomerCmd::Import { name, cert }) => {
            let bytes =
                std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
            one(
                &cli,
                Command::ImportCustomer {
                    name: name.clone(),
                    cert: bytes,
                },
            )
            .await?
        }
        Cmd::Customer(CustomerCmd::List) => one(&cli, Command::ListCustomers).await?,
        Cmd::Batch(BatchCmd::Open(a)) => {
            let (first, last) = a
                .serials
                .split_once('-')
                .and_then(|(f, l)| Some((f.trim().parse().ok()?, l.trim().parse().ok()?)))
                .ok_or_else(|| anyhow!("--serials takes FIRST-LAST, e.g. 1000-1199"))?;
            one(
                &cli,
                Command::OpenBatch(BatchSpec {
                    work_order: a.work_order.clone(),
                    model: a.model.clone(),
                    firmware: a.firmware.clone(),
                    customer: a.customer.clone(),
                    quantity: a.quantity,
                    serial_prefix: a.prefix.clone(),
                    serial_first: first,
                    serial_last: last,
                }),
            )
            .await?
        }
        Cmd::Batch(BatchCmd::Close { id }) => {
            let client = connect(&cli).await?;
            let session = login(&cli, &client).await?;
            let r = async {
                let id = match id {
                    Some(id) => *id,
                    None => client
                        .snapshot(&session)
                        .await?
                        .batch
                        .map(|b| b.id)
                        .ok_or_else(|| anyhow!("no batch is open"))?,
                };
                Ok::<_, anyhow::Error>(client.execute(&session, Command::CloseBatch { id }).await?)
            }
            .await;
            let _ = client.logout(&session).await;
            r?
        }
        Cmd::Batch(BatchCmd::List) => one(&cli, Command::ListBatches).await?,
        Cmd::Batch(BatchCmd::Status { id }) => one(&cli, Command::BatchStatus { id: *id }).await?,
        Cmd::Run(a) => {
            let client = connect(&cli).await?;
            return crate::run::run(&client, credentials(&cli)?, a.keep_running, a.plain)
                .await
                .map(|ok| {
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                });
        }
        Cmd::Alarm(AlarmCmd::List) => one(&cli, Command::ListAlarms).await?,
        Cmd::Alarm(AlarmCmd::Ack { id }) => one(&cli, Command::AckAlarm { id: *id }).await?,
        Cmd::Rework { uid } => one(&cli, Command::Rework { uid: uid.clone() }).await?,
        Cmd::Audit(AuditCmd::Verify(a)) if a.offline => {
            return audit_offline(&cli, a);
        }
        Cmd::Audit(AuditCmd::Verify(_)) => {
            let r = one(&cli, Command::AuditVerify).await?;
            print(&cli, &r)?;
            return Ok(match r {
                Reply::Verification(v) if v.ok() => ExitCode::SUCCESS,
                _ => ExitCode::from(2),
            });
        }
        Cmd::Audit(AuditCmd::Export { out }) => {
            let r = one(&cli, Command::AuditExport).await?;
            let text = serde_json::to_string_pretty(&r)?;
            match out {
                Some(p) => {
                    std::fs::write(p, text)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    println!("audit log written to {}", p.display());
                }
                None => println!("{text}"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Audit(AuditCmd::Recover { reason }) => {
            one(
                &cli,
                Command::RecoverAudit {
                    reason: reason.clone(),
                },
            )
            .await?
        }
        Cmd::Audit(AuditCmd::Tail { n, follow }) => {
            let client = connect(&cli).await?;
            let session = login(&cli, &client).await?;
            let r = async {
                let r = client
                    .execute(&session, Command::AuditTail { n: *n })
                    .await?;
                let mut last = match &r {
                    Reply::Entries(es) => es.last().map(|e| e.seq).unwrap_or(0),
                    _ => 0,
                };
                print(&cli, &r)?;
                if !*follow {
                    return Ok(());
                }
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                    let r = client
                        .execute(&session, Command::AuditSince { after: last })
                        .await?;
                    if let Reply::Entries(es) = &r
                        && let Some(e) = es.last()
                    {
                        last = e.seq;
                        print(&cli, &r)?;
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
            .await;
            let _ = client.logout(&session).await;
            r?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    print(&cli, &reply)?;
    Ok(ExitCode::SUCCESS)
}

fn manifest(cli: &Cli, m: &ManifestCmd) -> Result<ExitCode> {
    use crate::manifest::{import, verify};
    match m {
        ManifestCmd::Verify { file, root } => {
            let root = verify::read_cert(root).map_err(anyhow::Error::msg)?;
            let (report, _) = verify::verify_file(file, &root).map_err(anyhow::Error::msg)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        ManifestCmd::Import(a) => {
            let root = verify::read_cert(&a.root).map_err(anyhow::Error::msg)?;
            let target = match (&a.key, &a.pkcs11_module) {
                (Some(key), None) => {
                    if !a.clear_keys {
                        bail!("--key writes meter keys in clear: add --clear-keys to confirm");
                    }
                    if a.store.is_some() {
                        bail!("--store keeps keys wrapped under a token key: use it with --token");
                    }
                    import::Target::Files {
                        key_pem: key.clone(),
                        out_dir: a
                            .out
                            .clone()
                            .ok_or_else(|| anyhow!("--key needs --out DIR"))?,
                    }
                }
                (None, Some(module)) => import::Target::Token {
                    module: module.clone(),
                    token: a
                        .token
                        .clone()
                        .ok_or_else(|| anyhow!("--pkcs11-module needs --token LABEL"))?,
                    pin: match &a.token_pin_file {
                        Some(f) => hsm::PinSource::File(f.clone()),
                        None if std::env::var_os("STATION_TOKEN_PIN").is_some() => {
                            hsm::PinSource::Env("STATION_TOKEN_PIN".into())
                        }
                        None => hsm::PinSource::Prompt,
                    },
                    key_label: a.key_label.clone(),
                    store: a.store.clone(),
                },
                _ => bail!(
                    "choose where the keys go: --pkcs11-module M --token LABEL (into your HSM), or --key KEY.pem --out DIR --clear-keys (files)"
                ),
            };
            match import::import(&a.file, &root, &target) {
                Ok(r) => {
                    println!("{r}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("station: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

/// An auditor's check of a copied journal, without the daemon or the HSM.
fn audit_offline(cli: &Cli, a: &AuditVerifyArgs) -> Result<ExitCode> {
    let (Some(journal), Some(root)) = (&a.journal, &a.root) else {
        bail!("--offline needs --journal FILE and --root FILE");
    };
    let root = crate::manifest::verify::read_cert(root).map_err(anyhow::Error::msg)?;
    let cert = match &a.audit_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let v = crate::audit::verify_offline(journal, &root, cert).map_err(anyhow::Error::msg)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "audit certificate: {} (chains to the given root)",
            v.audit_certificate
        );
        print(cli, &Reply::Verification(v.verification.clone()))?;
    }
    Ok(if v.verification.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn report(cli: &Cli, a: &ReportArgs) -> Result<ExitCode> {
    // The configuration, when there is one, names the journal and the lines' speeds (for the
    // theoretical minimum cycle); an auditor with only a copied journal needs neither.
    let cfg = Config::load(&cli.config).ok();
    let journal = match (&a.journal, &cfg) {
        (Some(j), _) => j.clone(),
        (None, Some(c)) => c.database.clone(),
        (None, None) => bail!(
            "no --journal given and no configuration at {} to find it",
            cli.config.display()
        ),
    };
    let root = crate::manifest::verify::read_cert(&a.root).map_err(anyhow::Error::msg)?;
    let cert = match &a.audit_cert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let copy = crate::audit::JournalCopy::of(&journal).map_err(anyhow::Error::msg)?;
    let (key, signer) =
        crate::audit::offline_key(&copy.conn, &root, cert).map_err(anyhow::Error::msg)?;
    let batch = crate::report::find_batch(&copy.conn, &a.batch)?.ok_or_else(|| {
        anyhow!(
            "the journal has no batch {:?} (give its work order or id)",
            a.batch
        )
    })?;
    // The log's origin, as its checkpoints name it, is "<station id>/audit".
    let station_id: String = copy
        .conn
        .query_row(
            "SELECT note FROM audit_checkpoints ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get::<_, String>(0),
        )
        .ok()
        .and_then(|n| n.lines().next()?.strip_suffix("/audit").map(str::to_string))
        .or_else(|| cfg.as_ref().map(|c| c.station_id.clone()))
        .unwrap_or_else(|| "unknown station".into());
    let ctx = crate::report::Context {
        station_id,
        bauds: cfg
            .as_ref()
            .map(|c| c.nests.iter().map(|n| n.baud).collect())
            .unwrap_or_default(),
        audit_key: key,
        audit_signer: signer,
        pending_export: None,
        now_ms: crate::db::now_ms(),
        anchored: false,
    };
    let r = crate::report::gather(&copy.conn, batch, &ctx)?;
    drop(copy);
    let html = crate::report::html::render(&r);
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot make {}", a.out.display()))?;
    let path = a.out.join(crate::report::FILE);
    crate::report::write_file(&path, html.as_bytes())?;
    println!("report written to {}", path.display());
    if a.pdf {
        let pdf = a.out.join("report.pdf");
        crate::report::print_pdf(&a.chromium, &path, &pdf).map_err(anyhow::Error::msg)?;
        println!("PDF written to {}", pdf.display());
    }
    let failed: Vec<&str> = r
        .requirements
        .iter()
        .filter(|q| q.verdict == crate::report::Verdict::Failed)
        .map(|q| q.requirement.id.as_str())
        .collect();
    if let Some((seq, why)) = &r.audit.first_bad {
        eprintln!("station: the audit log fails verification at entry {seq}: {why}");
    } else if !failed.is_empty() {
        eprintln!(
            "station: checks of the batch fail for {}: see the report's first page",
            failed.join(", ")
        );
    }
    // The code the report's first page names.
    Ok(ExitCode::from(crate::report::html::exit_code(&r)))
}

fn curve_of(curve: &str) -> Result<hsm::Curve> {
    Ok(match curve.to_ascii_uppercase().as_str() {
        "P-256" | "P256" => hsm::Curve::P256,
        "P-384" | "P384" => hsm::Curve::P384,
        other => bail!("unknown curve {other:?}: P-256 or P-384"),
    })
}

/// PKI commands: through the daemon (a security officer, audited); `--local` only to set up a
/// fresh token before the daemon first starts.
async fn pki(cli: &Cli, p: &PkiCmd) -> Result<ExitCode> {
    match p {
        PkiCmd::InitDev {
            token_dir,
            label,
            out,
        } => {
            let made = crate::demo::init_dev_token(token_dir, label, out.as_deref()).await?;
            println!("{made}");
        }
        PkiCmd::Csr { local: true, .. } | PkiCmd::Import { local: true, .. } => {
            return pki_local(cli, p).await;
        }
        PkiCmd::Csr { adopt: true, .. } => {
            bail!(
                "--adopt is for setting up a fresh token before stationd first starts: add --local"
            )
        }
        PkiCmd::Csr {
            role,
            cn,
            org,
            curve,
            out,
            ..
        } => {
            let cmd = Command::PkiCsr {
                role: crate::api::key_role(role).map_err(anyhow::Error::msg)?,
                subject: hsm::pki::CsrSubject {
                    common_name: cn.clone(),
                    organization: org.clone(),
                    country: None,
                },
                curve: curve_of(curve)?,
            };
            let Reply::Text(pem) = one(cli, cmd).await? else {
                bail!("the daemon answered the request unexpectedly");
            };
            std::fs::write(out, pem.as_bytes())
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "certificate request for {role} written to {}",
                out.display()
            );
        }
        PkiCmd::Import { role, .. } if anchor_of(role).is_some() => {
            bail!(
                "{role} is stored while a fresh token is set up, before stationd first starts: add --local (a running cell's anchors never change under it)"
            );
        }
        PkiCmd::Import {
            role, cert, chain, ..
        } => {
            let cmd = Command::PkiImport {
                role: crate::api::key_role(role).map_err(anyhow::Error::msg)?,
                cert_pem: std::fs::read_to_string(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?,
                chain_pem: chain
                    .iter()
                    .map(|c| {
                        std::fs::read_to_string(c)
                            .with_context(|| format!("cannot read {}", c.display()))
                    })
                    .collect::<Result<_>>()?,
            };
            let r = one(cli, cmd).await?;
            print(cli, &r)?;
        }
        PkiCmd::OpcuaCert {
            usage,
            name,
            uri,
            out,
            public_key,
            dns,
            ip,
            days,
        } => {
            let usage = tls_usage(usage)?;
            let key_path = out.join(format!("{name}-key.pem"));
            let (spki, key) = match public_key {
                Some(p) => {
                    let bytes =
                        std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                    let der = if bytes.starts_with(b"-----BEGIN") {
                        let text = String::from_utf8_lossy(&bytes);
                        let (label, der) = der::pem::decode_vec(text.as_bytes())
                            .map_err(|e| anyhow!("{} is not PEM: {e}", p.display()))?;
                        if label != "PUBLIC KEY" {
                            bail!("{} holds a {label}, not a PUBLIC KEY", p.display());
                        }
                        der
                    } else {
                        bytes
                    };
                    (der, None)
                }
                None => {
                    if key_path.exists() {
                        bail!(
                            "{} exists; choose another --out or --name",
                            key_path.display()
                        );
                    }
                    eprintln!("making a 2048-bit RSA key pair…");
                    let key = rsa::RsaPrivateKey::new(&mut line_protocol::io::system_rng(), 2048)
                        .map_err(|e| anyhow!("cannot make an RSA key: {e}"))?;
                    let spki = rsa::pkcs8::EncodePublicKey::to_public_key_der(&key.to_public_key())
                        .map_err(|e| anyhow!("cannot encode the public key: {e}"))?;
                    (spki.as_bytes().to_vec(), Some(key))
                }
            };
            let cmd = Command::IssueTls {
                name: name.clone(),
                usage,
                spki_der: spki,
                application_uri: Some(uri.clone()),
                days: *days,
                dns_names: dns.clone(),
                ip_addresses: ip.clone(),
            };
            let key_pem = key
                .map(|k| {
                    rsa::pkcs8::EncodePrivateKey::to_pkcs8_pem(&k, rsa::pkcs8::LineEnding::LF)
                        .map_err(|e| anyhow!("cannot encode the private key: {e}"))
                })
                .transpose()?;
            issue_and_write(cli, cmd, out, name, key_pem.as_deref().map(String::as_str)).await?;
            println!(
                "OPC UA {} certificate for {name} ({uri}) written to {}: {name}.pem{}, ca.pem (the cell's device CA)",
                if usage == hsm::TlsUsage::Client {
                    "client"
                } else {
                    "server"
                },
                out.display(),
                if public_key.is_none() {
                    format!(", {name}-key.pem (owner-only)")
                } else {
                    String::new()
                },
            );
        }
        PkiCmd::TlsCert {
            usage,
            name,
            out,
            dns,
            ip,
            days,
        } => {
            let usage = tls_usage(usage)?;
            let key_path = out.join(format!("{name}-key.pem"));
            if key_path.exists() {
                bail!(
                    "{} exists; choose another --out or --name",
                    key_path.display()
                );
            }
            let key = <p256::SecretKey as p256::elliptic_curve::Generate>::generate_from_rng(
                &mut line_protocol::io::system_rng(),
            );
            let spki = p256::pkcs8::EncodePublicKey::to_public_key_der(&key.public_key())
                .map_err(|e| anyhow!("cannot encode the public key: {e}"))?;
            let cmd = Command::IssueTls {
                name: name.clone(),
                usage,
                spki_der: spki.as_bytes().to_vec(),
                application_uri: None,
                days: *days,
                dns_names: dns.clone(),
                ip_addresses: ip.clone(),
            };
            let key_pem =
                p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&key, p256::pkcs8::LineEnding::LF)
                    .map_err(|e| anyhow!("cannot encode the private key: {e}"))?;
            issue_and_write(cli, cmd, out, name, Some(&key_pem)).await?;
            println!(
                "{} certificate for {name} written to {}: {name}.pem, {name}-key.pem (owner-only), ca.pem (the cell's device CA)",
                if usage == hsm::TlsUsage::Client {
                    "console (client)"
                } else {
                    "daemon (server)"
                },
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The token security officer's commands: they log in to the token here, as its SO, in a
/// process of their own (stationd stays logged in as the token's user).
async fn hsm_so(cli: &Cli, h: &HsmCmd) -> Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    let so = match h {
        HsmCmd::TrustCustomer { so, .. }
        | HsmCmd::UntrustCustomer { so, .. }
        | HsmCmd::Customers { so } => so,
        HsmCmd::Info | HsmCmd::Check => return Ok(ExitCode::SUCCESS),
    };
    let source = match &so.so_pin_file {
        Some(f) => hsm::PinSource::File(f.clone()),
        None if std::io::stdin().is_terminal() => hsm::PinSource::Prompt,
        None => bail!(
            "no security officer PIN: pass --so-pin-file (an owner-only file) or run on a terminal to be asked"
        ),
    };
    let pin = source.read_as("security officer")?;
    enum Op {
        Trust(String, Vec<u8>),
        Untrust(String),
        List,
    }
    let op = match h {
        HsmCmd::TrustCustomer { name, cert, .. } => {
            let bytes =
                std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?;
            let der = crate::engine::accept_customer_certificate(name, &bytes)?;
            Op::Trust(name.clone(), der)
        }
        HsmCmd::UntrustCustomer { name, .. } => Op::Untrust(name.clone()),
        _ => Op::List,
    };
    let (module, token) = (cfg.hsm.module.clone(), cfg.hsm.token.clone());
    let trusted_wrap = cfg.hsm.trusted_wrap;
    let lines = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let officer = hsm::SecurityOfficer::login(&module, &token, &pin)?;
        Ok(match op {
            Op::Trust(name, der) => {
                let k = officer.install_customer_key(&name, &der, trusted_wrap)?;
                vec![
                    if k.trusted {
                        format!("customer {name}: its key is trusted in token {token}")
                    } else {
                        format!(
                            "customer {name}: its key is installed in token {token}, not marked trusted (hsm.trusted_wrap is off)"
                        )
                    },
                    k.to_string(),
                    format!(
                        "next, a security officer of the cell records it: station customer import {name} CERT"
                    ),
                ]
            }
            Op::Untrust(name) => {
                if officer.remove_customer_key(&name)? {
                    vec![format!(
                        "customer {name}: its key is removed from token {token}; no batch can be opened for it"
                    )]
                } else {
                    bail!("token {token} holds no key for customer {name}")
                }
            }
            Op::List => {
                let keys = officer.customer_keys()?;
                if keys.is_empty() {
                    vec![format!("token {token} holds no customer transport key")]
                } else {
                    keys.iter().map(ToString::to_string).collect()
                }
            }
        })
    })
    .await??;
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `pki csr --local` and `pki import --local`: the set-up of a fresh token on the HSM's host,
/// before stationd first starts. Refused once the token marks the cell as set up: from then on
/// only the daemon changes the PKI, for a security officer, audited.
/// The anchor a `pki import --role` names, if it names one.
fn anchor_of(role: &str) -> Option<hsm::pki::Anchor> {
    match role {
        "manufacturer-root" => Some(hsm::pki::Anchor::ManufacturerRoot),
        "firmware-verification" => Some(hsm::pki::Anchor::FirmwareVerification),
        _ => None,
    }
}

async fn pki_local(cli: &Cli, p: &PkiCmd) -> Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    let hsm = crate::engine::open_hsm(&cfg)?;
    let marker = {
        let h = hsm.clone();
        tokio::task::spawn_blocking(move || {
            h.with_session(|s| s.find_data(crate::engine::CELL_MARKER))
        })
        .await??
    };
    if marker.is_some() {
        bail!(
            "this cell has been set up (its HSM token says so): change its PKI through stationd as a security officer — drop --local"
        );
    }
    match p {
        PkiCmd::Csr {
            role,
            cn,
            org,
            curve,
            out,
            adopt,
            ..
        } => {
            let role = crate::api::key_role(role).map_err(anyhow::Error::msg)?;
            let curve = curve_of(curve)?;
            let subject = hsm::pki::CsrSubject {
                common_name: cn.clone(),
                organization: org.clone(),
                country: None,
            };
            let (h, adopt) = (hsm.clone(), *adopt);
            let outp = tokio::task::spawn_blocking(move || {
                if adopt {
                    hsm::pki::csr_adopting(&h, role, &subject)
                } else {
                    hsm::pki::csr(&h, role, curve, &subject)
                }
            })
            .await??;
            std::fs::write(out, outp.pem.as_bytes())
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "certificate request for {:?} written to {}",
                role,
                out.display()
            );
        }
        PkiCmd::Import {
            role, cert, chain, ..
        } if anchor_of(role).is_some() => {
            if !chain.is_empty() {
                bail!("{role} takes no --chain: it is checked against the manufacturer root");
            }
            let anchor = anchor_of(role).ok_or_else(|| anyhow!("{role}"))?;
            let pem = std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            let h = hsm.clone();
            let outcome =
                tokio::task::spawn_blocking(move || hsm::pki::import_anchor(&h, anchor, &pem))
                    .await??;
            println!("{outcome}");
        }
        PkiCmd::Import {
            role, cert, chain, ..
        } => {
            let role = crate::api::key_role(role).map_err(anyhow::Error::msg)?;
            let pem = std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?;
            let chain: Vec<String> = chain
                .iter()
                .map(|c| {
                    std::fs::read_to_string(c)
                        .with_context(|| format!("cannot read {}", c.display()))
                })
                .collect::<Result<_>>()?;
            let h = hsm.clone();
            let outcome =
                tokio::task::spawn_blocking(move || hsm::pki::import(&h, role, &pem, &chain))
                    .await??;
            println!("{outcome}");
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Has the daemon issue a certificate (`cmd`, an `IssueTls`) and writes NAME.pem, ca.pem (the
/// device CA) and, when the key was made here, NAME-key.pem (owner-only) into `out`.
async fn issue_and_write(
    cli: &Cli,
    cmd: Command,
    out: &Path,
    name: &str,
    key_pem: Option<&str>,
) -> Result<()> {
    let Reply::Text(pems) = one(cli, cmd).await? else {
        bail!("the daemon answered the request unexpectedly");
    };
    let end = "-----END CERTIFICATE-----\n";
    let split = pems.find(end).map(|i| i + end.len()).unwrap_or(pems.len());
    let (leaf, ca) = pems.split_at(split);
    crate::daemon::private_dir(out)?;
    if let Some(k) = key_pem {
        crate::demo::write_secret(&out.join(format!("{name}-key.pem")), k.trim_end())?;
    }
    std::fs::write(out.join(format!("{name}.pem")), leaf)?;
    std::fs::write(out.join("ca.pem"), ca)?;
    Ok(())
}

/// `--usage client|server` of a TLS or OPC UA certificate.
fn tls_usage(usage: &str) -> Result<hsm::TlsUsage> {
    Ok(match usage {
        "client" => hsm::TlsUsage::Client,
        "server" => hsm::TlsUsage::Server,
        other => bail!("unknown usage {other:?}: client or server"),
    })
}
