//! `station demo`: a whole cell on one machine. A SoftHSM token with the demo PKI, a firmware
//! release signed in MCUboot format, a demo utility, emulated meters on pseudo-terminals joined
//! to the station through the link emulator at the chosen baud rate, `stationd` started for the
//! cell, and one batch provisioned from start to finish through the daemon's API as the
//! `station` command would — the audit log verified — and a working cell left behind in the
//! output directory, so that every other command can be tried on it.
//!
//! Also `station pki init-dev`, which makes the token and the demo hierarchy.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meter_sim::faults::Faults;
use meter_sim::flash::Capabilities;
use meter_sim::linksim::{self, LinkParams};
use meter_sim::nest::{FaultScope, NestConfig};
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::api::client::{Address, Client};
use crate::auth::Role;
use crate::config::Config;
use crate::daemon::Daemon;
use crate::engine::{BatchSpec, Command, Engine, Reply, Session};

/// Options of `station demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Meters in the batch.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub meters: u32,
    /// Nests (each an emulated meter on its own pseudo-terminal).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    pub nests: u32,
    /// Baud rate of the emulated jig lines.
    #[arg(long, default_value_t = 115_200, value_parser = clap::value_parser!(u32).range(9600..=12_000_000))]
    pub baud: u32,
    /// Output directory: the cell it leaves behind.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Replace the output directory of an earlier demo.
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(long)]
    pub plain: bool,
    /// Firmware payload size in KiB.
    #[arg(long, default_value_t = 96)]
    pub firmware_kib: usize,
    /// Use the well-known demo PINs (oper 111111, super 222222, officer 333333, audit 444444)
    /// instead of random ones, so that a person can log in to the console. Demo cells only.
    #[arg(long)]
    pub known_pins: bool,
    /// Milliseconds the emulated operator takes to put the next meter into a nest.
    #[arg(long, default_value_t = 200)]
    pub insert_delay_ms: u64,
    /// A fault for the first meter of one nest, as meter-sim takes it: "2:wrong-hash"
    /// (see `meter-sim --help` for the catalogue). Repeatable.
    #[arg(long = "fault")]
    pub faults: Vec<String>,
    /// The software token the cell runs on: softhsm, or kryoptic (a second PKCS#11
    /// implementation; its module from KRYOPTIC_MODULE, which `cargo xtask demo` builds and
    /// sets; it cannot mark keys trusted, so the cell runs with `hsm.trusted_wrap = false`).
    #[arg(long, value_enum, default_value_t = DemoToken::Softhsm)]
    pub token: DemoToken,
    /// The `stationd` binary to run the cell with; `None` runs the daemon inside this process
    /// (the console's demo mode and the tests).
    #[arg(skip)]
    pub stationd: Option<PathBuf>,
}

/// The software token of a demo cell.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoToken {
    /// SoftHSM 2 (Debian's `softhsm2`).
    Softhsm,
    /// Kryoptic.
    Kryoptic,
}

impl DemoToken {
    /// Its PKCS#11 module.
    pub fn module(self) -> Result<PathBuf> {
        match self {
            DemoToken::Softhsm => Ok(PathBuf::from(hsm::SOFTHSM_MODULE)),
            DemoToken::Kryoptic => std::env::var_os("KRYOPTIC_MODULE")
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "Kryoptic's module is not built: run the demo as `cargo xtask demo --token kryoptic`, which builds it and sets KRYOPTIC_MODULE"
                    )
                }),
        }
    }

    fn name(self) -> &'static str {
        match self {
            DemoToken::Softhsm => "SoftHSM",
            DemoToken::Kryoptic => "Kryoptic",
        }
    }
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            meters: 20,
            nests: 4,
            baud: 115_200,
            out: PathBuf::from("demo-out"),
            force: false,
            plain: false,
            firmware_kib: 96,
            known_pins: false,
            insert_delay_ms: 200,
            faults: Vec::new(),
            token: DemoToken::Softhsm,
            stationd: None,
        }
    }
}

/// Where the demo cell's daemon runs.
#[derive(Debug)]
enum DaemonRun {
    /// In this process.
    InProcess(Daemon),
    /// A `stationd` child process.
    Child(tokio::process::Child),
}

/// A demo cell, set up and running, with its batch open and the line stopped.
pub struct DemoCell {
    /// A client of the cell's daemon.
    pub client: Client,
    /// The cell directory.
    pub dir: PathBuf,
    /// The open batch.
    pub batch: crate::records::BatchRow,
    daemon: DaemonRun,
    // The slave sides of the pseudo-terminals: the emulated lines live as long as these.
    _lines: Vec<line_protocol::io::PtySlave>,
}

impl DemoCell {
    /// The daemon's engine, when it runs in this process (tests look inside).
    pub fn engine(&self) -> Option<&Engine> {
        match &self.daemon {
            DaemonRun::InProcess(d) => Some(d.engine()),
            DaemonRun::Child(_) => None,
        }
    }

    /// The cell's configuration file.
    pub fn config(&self) -> PathBuf {
        self.dir.join("station.toml")
    }

    /// Logs a demo user in with the PIN from the cell's `pins` directory.
    pub async fn login(&self, user: &str) -> Result<Session> {
        login(&self.client, &self.dir, user).await
    }

    /// Stops the daemon: the line stops cleanly and the journal is released.
    pub async fn stop(self) -> Result<()> {
        self.daemon.stop().await
    }
}

impl DaemonRun {
    async fn stop(self) -> Result<()> {
        match self {
            DaemonRun::InProcess(d) => d.stop().await,
            DaemonRun::Child(mut c) => {
                if let Some(pid) = c.id() {
                    let _ = tokio::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status()
                        .await;
                }
                match tokio::time::timeout(Duration::from_secs(120), c.wait()).await {
                    Ok(Ok(s)) if s.success() => Ok(()),
                    Ok(Ok(s)) => bail!("stationd ended with {s}"),
                    Ok(Err(e)) => bail!("cannot wait for stationd: {e}"),
                    Err(_) => {
                        let _ = c.kill().await;
                        bail!("stationd did not stop within 2 minutes; it was killed")
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for DemoCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoCell")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The PIN of a demo user with `--known-pins`.
pub fn known_pin(user: &str) -> Option<&'static str> {
    Some(match user {
        "oper" => "111111",
        "super" => "222222",
        "officer" => "333333",
        "audit" => "444444",
        _ => return None,
    })
}

const MARKER: &str = ".station-demo";
const TOKEN_LABEL: &str = "demo-cell";
const MODEL: &str = "EM-300";

/// Before the runtime starts: a fresh output directory and the software token's configuration.
pub fn prepare(args: &DemoArgs) -> Result<()> {
    let out = &args.out;
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            if args.force && out.join(MARKER).exists() {
                std::fs::remove_dir_all(out).with_context(|| {
                    format!("cannot remove the earlier demo in {}", out.display())
                })?;
            } else if out.join(MARKER).exists() {
                bail!(
                    "{} holds an earlier demo; pass --force to replace it, or choose another --out",
                    out.display()
                );
            } else {
                bail!(
                    "{} exists and is not a demo directory; choose another --out",
                    out.display()
                );
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join(MARKER), "made by station demo\n")?;
    match args.token {
        DemoToken::Softhsm => {
            let conf = hsm::softhsm::write_conf(&out.join("hsm"))?;
            hsm::softhsm::use_conf(&conf);
        }
        DemoToken::Kryoptic => {
            args.token.module()?;
            let dir = out.join("hsm");
            std::fs::create_dir_all(&dir)?;
            let conf = dir.join("kryoptic.conf");
            std::fs::write(
                &conf,
                format!(
                    "# Kryoptic configuration of this cell's software token\n[[slots]]\nslot = 1\ndbtype = \"sqlite\"\ndbargs = \"{}\"\n",
                    dir.join("kryoptic.sql").display()
                ),
            )?;
            hsm::softhsm::use_module_env("KRYOPTIC_CONF", &conf);
        }
    }
    Ok(())
}

fn random_digits(n: usize) -> Zeroizing<String> {
    let mut bytes = vec![0u8; n];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut bytes);
    Zeroizing::new(bytes.iter().map(|b| char::from(b'0' + b % 10)).collect())
}

/// Writes a secret to a new owner-only file (in an owner-only directory when it has to make
/// one). An existing file is never overwritten: a PIN file that exists may be the only copy of
/// a token's PIN.
pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        crate::daemon::private_dir(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} exists and is never overwritten (it may be the only copy of a secret); move it away first",
                    path.display()
                )
            } else {
                format!("cannot write {}", path.display())
            }
        })?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

/// `station pki init-dev`: a new SoftHSM token under `token_dir` (PINs in owner-only files) with
/// the whole demo hierarchy; the public certificates go to `out` (default `token_dir/pki`).
pub async fn init_dev_token(token_dir: &Path, label: &str, out: Option<&Path>) -> Result<String> {
    init_dev_token_on(&PathBuf::from(hsm::SOFTHSM_MODULE), token_dir, label, out).await
}

/// [`init_dev_token`] on the token module `module` (its configuration already in this
/// process's environment).
pub async fn init_dev_token_on(
    module: &Path,
    token_dir: &Path,
    label: &str,
    out: Option<&Path>,
) -> Result<String> {
    let user_file = token_dir.join("hsm-user.pin");
    for f in [&user_file, &token_dir.join("hsm-so.pin")] {
        if f.exists() {
            bail!(
                "{} exists: `pki init-dev` never overwrites a PIN file (it may be the only copy of a token's PIN); choose another --token-dir",
                f.display()
            );
        }
    }
    let user_pin = random_digits(8);
    let so_pin = random_digits(12);
    write_secret(&user_file, &user_pin)?;
    write_secret(&token_dir.join("hsm-so.pin"), &so_pin)?;
    let module = module.to_path_buf();
    let (m, l) = (module.clone(), label.to_string());
    let (u, s) = (
        SecretString::from(user_pin.to_string()),
        SecretString::from(so_pin.to_string()),
    );
    tokio::task::spawn_blocking(move || hsm::softhsm::init_token(&m, &l, &s, &u))
        .await?
        .with_context(|| format!("cannot create the token {label}"))?;
    let mut cfg = hsm::HsmConfig::new(
        module.clone(),
        label,
        hsm::PinSource::File(user_file.clone()),
    );
    cfg.pool_size = 2;
    let hsm = hsm::Hsm::open(&cfg)?;
    let out_dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| token_dir.join("pki"));
    let o2 = out_dir.clone();
    let made = tokio::task::spawn_blocking(move || hsm::pki::init_dev(&hsm, &o2)).await??;
    let mut text = format!("token {label} created in {}\n", module.display());
    let _ = writeln!(
        text,
        "user PIN in {} and SO PIN in {} (owner-only)",
        user_file.display(),
        token_dir.join("hsm-so.pin").display()
    );
    let _ = write!(text, "{made}");
    Ok(text)
}

/// The demo utility: an RSA-3072 key and a self-signed certificate, written as
/// `utility-key.pem` (owner-only) and `utility.pem` in `dir`.
pub fn make_utility(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    use rsa::pkcs8::EncodePrivateKey;
    use std::str::FromStr;
    use x509_cert::builder::{Builder, CertificateBuilder};
    let key = rsa::RsaPrivateKey::new(&mut line_protocol::io::system_rng(), 3072)
        .context("cannot generate the demo utility key")?;
    let pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .context("cannot encode the demo utility key")?;
    let key_path = dir.join("utility-key.pem");
    write_secret(&key_path, pem.trim_end())?;
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key.clone());
    let public = rsa::RsaPublicKey::from(&key);
    let spki_der = rsa::pkcs8::EncodePublicKey::to_public_key_der(&public)?;
    let spki = <spki::SubjectPublicKeyInfoOwned as der::Decode>::from_der(spki_der.as_bytes())?;
    let name = x509_cert::name::Name::from_str("CN=Demo Utility Key Import,O=Demo Utility")?;
    let profile = UtilityProfile(name);
    let mut serial = [0u8; 16];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut serial);
    serial[0] = (serial[0] & 0x7F) | 0x01;
    let validity = x509_cert::time::Validity::from_now(Duration::from_secs(10 * 365 * 24 * 3600))?;
    let builder = CertificateBuilder::new(
        profile,
        x509_cert::serial_number::SerialNumber::new(&serial)?,
        validity,
        spki,
    )?;
    let cert = builder
        .build::<_, rsa::pkcs1v15::Signature>(&signer)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cert_pem = der::EncodePem::to_pem(&cert, der::pem::LineEnding::LF)?;
    let cert_path = dir.join("utility.pem");
    std::fs::write(&cert_path, cert_pem)?;
    Ok((cert_path, key_path))
}

/// The demo utility's self-signed certificate: an RSA key for key transport.
struct UtilityProfile(x509_cert::name::Name);

impl x509_cert::builder::profile::BuilderProfile for UtilityProfile {
    fn get_issuer(&self, _subject: &x509_cert::name::Name) -> x509_cert::name::Name {
        self.0.clone()
    }
    fn get_subject(&self) -> x509_cert::name::Name {
        self.0.clone()
    }
    fn build_extensions(
        &self,
        spk: spki::SubjectPublicKeyInfoRef<'_>,
        _issuer: spki::SubjectPublicKeyInfoRef<'_>,
        tbs: &x509_cert::certificate::TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<x509_cert::ext::Extension>> {
        use x509_cert::ext::ToExtension;
        use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier};
        Ok(vec![
            BasicConstraints {
                ca: false,
                path_len_constraint: None,
            }
            .to_extension(tbs.subject(), &[])?,
            KeyUsage(KeyUsages::KeyEncipherment | KeyUsages::DigitalSignature)
                .to_extension(tbs.subject(), &[])?,
            SubjectKeyIdentifier::try_from(spk)?.to_extension(tbs.subject(), &[])?,
        ])
    }
}

fn config_text(dir: &Path, ports: &[String], baud: u32, token: DemoToken, module: &Path) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# The cell `station demo` left behind. Try: station --config {}/station.toml --user audit --pin-file {}/pins/audit.pin audit verify",
        dir.display(),
        dir.display()
    );
    let _ = writeln!(t, "station_id = \"demo-cell\"\ndatabase = \"station.db\"\n");
    let _ = writeln!(
        t,
        "[manufacturer]\nname = \"{}\"\nflag_id = \"DMW\"\n",
        hsm::pki::DEMO_ORGANIZATION
    );
    let module_conf = match token {
        DemoToken::Softhsm => "softhsm_conf = \"hsm/softhsm2.conf\"",
        DemoToken::Kryoptic => {
            "kryoptic_conf = \"hsm/kryoptic.conf\"\n# Kryoptic cannot mark keys trusted (CKA_TRUSTED): a weaker policy, chosen here and warned of\ntrusted_wrap = false"
        }
    };
    let _ = writeln!(
        t,
        "[hsm]\nmodule = \"{}\"\ntoken = \"{TOKEN_LABEL}\"\npin = {{ file = \"hsm-user.pin\" }}\n{module_conf}\npool_size = 4\n",
        module.display()
    );
    let _ = writeln!(t, "[line]\nlatency_ms = 4\n");
    for (i, p) in ports.iter().enumerate() {
        let _ = writeln!(
            t,
            "# emulated meters through linksim; these pseudo-terminals exist only while the demo runs\n[[nests]]\nname = \"N{}\"\nport = \"{p}\"\nbaud = {baud}\n",
            i + 1
        );
    }
    let _ = writeln!(
        t,
        "[[models]]\nname = \"{MODEL}\"\nsuite = 1\nkeygen = \"meter\"\nkey_agreement = true\n"
    );
    let _ = writeln!(t, "[audit]\ncheckpoint_interval = 50");
    t
}

async fn user(
    client: &Client,
    officer: &Session,
    dir: &Path,
    name: &str,
    role: Role,
    known: bool,
) -> Result<()> {
    let pin = match known_pin(name).filter(|_| known) {
        Some(p) => Zeroizing::new(p.to_string()),
        None => random_digits(8),
    };
    write_secret(&dir.join("pins").join(format!("{name}.pin")), &pin)?;
    client
        .execute(
            officer,
            Command::AddUser {
                name: name.into(),
                role,
                pin,
            },
        )
        .await?;
    Ok(())
}

async fn login(client: &Client, dir: &Path, name: &str) -> Result<Session> {
    let pin = Zeroizing::new(std::fs::read_to_string(
        dir.join("pins").join(format!("{name}.pin")),
    )?);
    Ok(client.login(name, pin.trim()).await?.session)
}

/// Starts the cell's daemon: the `stationd` binary as a child process, or in this process.
async fn start_daemon(config: &Path, stationd: Option<&Path>) -> Result<DaemonRun> {
    let Some(exe) = stationd else {
        let cfg = Config::load(config)?;
        return Ok(DaemonRun::InProcess(Daemon::start(cfg, "stationd").await?));
    };
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(exe)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stationd's output cannot be read"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains(" ready on ") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !ready {
        let _ = child.kill().await;
        bail!("stationd did not become ready (its messages are above)");
    }
    // Keep reading its standard output so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(DaemonRun::Child(child))
}

/// Sets a demo cell up: token and PKI, firmware, utility, emulated meters behind linksim, the
/// configuration, the engine, users, imports and an open batch. The line is left stopped.
pub async fn build(args: &DemoArgs) -> Result<DemoCell> {
    let dir = std::fs::canonicalize(&args.out)?;

    // 1. Token and PKI.
    let module = args.token.module()?;
    init_dev_token_on(&module, &dir, TOKEN_LABEL, Some(&dir.join("pki"))).await?;
    std::fs::copy(dir.join("pki/root-ca.pem"), dir.join("root-ca.pem"))?;
    println!(
        "  HSM: {} token {TOKEN_LABEL} with the demo PKI (certificates in {}/pki)",
        args.token.name(),
        dir.display()
    );

    // 2. Firmware release, signed as the release process would.
    let fw_key_pem = std::fs::read_to_string(dir.join("pki/firmware-signing-key.pem"))?;
    let fw_key =
        <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&fw_key_pem)
            .map_err(|e| anyhow::anyhow!("the demo firmware signing key: {e}"))?;
    let payload = meter_sim::firmware::firmware_like_payload(args.firmware_kib * 1024, 0.6, 2026);
    let version = line_protocol::image::ImageVersion {
        major: 1,
        minor: 0,
        revision: 0,
        build: 0,
    };
    let image = meter_sim::firmware::sign_image(&payload, version, 0x200, &fw_key);
    std::fs::create_dir_all(dir.join("firmware"))?;
    let fw_path = dir.join("firmware/meter-fw-1.0.0.bin");
    std::fs::write(&fw_path, &image)?;
    println!(
        "  firmware: {} ({} bytes, MCUboot format, signed)",
        fw_path.display(),
        image.len()
    );

    // 3. The demo utility.
    let (utility_cert, _) = tokio::task::spawn_blocking({
        let d = dir.clone();
        move || make_utility(&d)
    })
    .await??;
    println!(
        "  utility: {} and its key utility-key.pem",
        utility_cert.display()
    );
    // The token's security officer approves the utility's key: only a key they install may
    // wrap a batch transport key (as `station hsm trust-customer` does on a real cell).
    let so_pin = hsm::PinSource::File(dir.join("hsm-so.pin")).read_as("security officer")?;
    let cert_der =
        crate::engine::accept_customer_certificate("demo-utility", &std::fs::read(&utility_cert)?)?;
    // Kryoptic cannot mark a key trusted: there the key is installed unmarked, and the cell
    // runs with `hsm.trusted_wrap = false` (and says so in its audit log).
    let mark = args.token == DemoToken::Softhsm;
    let m2 = module.clone();
    let trusted = tokio::task::spawn_blocking(move || {
        let officer = hsm::SecurityOfficer::login(&m2, TOKEN_LABEL, &so_pin)?;
        officer.install_customer_key("demo-utility", &cert_der, mark)
    })
    .await??;
    println!(
        "  the token's security officer {} the utility's key (rsa-{}, spki sha-256 {}…)",
        if mark {
            "trusts"
        } else {
            "installs (unmarked)"
        },
        trusted.bits,
        &trusted.spki_sha256[..16]
    );

    // 4. Emulated meters, each behind a link emulator at the chosen baud rate.
    let root =
        meter_sim::load_root(&dir.join("pki/provisioning-root.pem")).map_err(anyhow::Error::msg)?;
    let meters_dir = dir.join("meters");
    let mut ports = Vec::new();
    let mut lines = Vec::new();
    let mut faults = vec![Faults::default(); args.nests as usize];
    for spec in &args.faults {
        let (n, f) = spec
            .split_once(':')
            .and_then(|(n, f)| Some((n.parse::<usize>().ok()?, f)))
            .filter(|(n, _)| (1..=args.nests as usize).contains(n))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--fault takes NEST:FAULT with a nest from 1 to {}",
                    args.nests
                )
            })?;
        faults[n - 1].add(f).map_err(anyhow::Error::msg)?;
    }
    for n in 0..args.nests {
        let (master, slave, meter_path) = line_protocol::io::pty_pair()?;
        lines.push(slave);
        let cfg = NestConfig {
            nest: n + 1,
            state_dir: meters_dir.clone(),
            caps: Capabilities {
                model: MODEL.into(),
                ..Capabilities::default()
            },
            root,
            faults: faults[n as usize].clone(),
            fault_scope: FaultScope::First(1),
            meters: None,
            insert_delay: Duration::from_millis(args.insert_delay_ms),
            seed: None,
            flash_bytes_per_s: None,
        };
        tokio::spawn(meter_sim::nest::run_nest(master, cfg));
        let meter =
            line_protocol::io::open(&line_protocol::io::PortAddr::parse(&meter_path)?, args.baud)
                .await?;
        let (station_side, slave2, station_path) = line_protocol::io::pty_pair()?;
        lines.push(slave2);
        let params = LinkParams {
            baud: args.baud,
            latency: Duration::from_millis(4),
            ..LinkParams::default()
        };
        let _ = linksim::spawn(station_side, meter, params);
        ports.push(station_path);
    }
    println!(
        "  meters: {} emulated nests (flash in {}), lines at {} baud with 4 ms latency",
        args.nests,
        meters_dir.display(),
        args.baud
    );

    // 5. The cell: its daemon, and a client of it.
    let config_path = dir.join("station.toml");
    std::fs::write(
        &config_path,
        config_text(&dir, &ports, args.baud, args.token, &module),
    )?;
    let cfg = Config::load(&config_path)?;
    let daemon = start_daemon(&config_path, args.stationd.as_deref()).await?;
    println!(
        "  stationd: {} for the cell, serving {}",
        match &daemon {
            DaemonRun::InProcess(_) => "running in this process".to_string(),
            DaemonRun::Child(c) => format!("started (pid {})", c.id().unwrap_or(0)),
        },
        cfg.api.socket.display()
    );
    let set_up = async {
        let client =
            Client::connect(&Address::Unix(cfg.api.socket.clone()), "station-demo").await?;
        let batch = setup_cell(&client, &dir, args, &fw_path, &utility_cert).await?;
        Ok::<_, anyhow::Error>((client, batch))
    }
    .await;
    match set_up {
        Ok((client, batch)) => Ok(DemoCell {
            client,
            dir,
            batch,
            daemon,
            _lines: lines,
        }),
        Err(e) => {
            let _ = daemon.stop().await;
            Err(e)
        }
    }
}

/// `station demo`.
pub async fn run(args: DemoArgs) -> Result<()> {
    println!(
        "station demo: {} meters, {} nests at {} baud, cell in {}",
        args.meters,
        args.nests,
        args.baud,
        args.out.display()
    );
    let cell = build(&args).await?;
    let result = drive(&cell, &args).await;
    let (dir, stopped) = (cell.dir.clone(), cell.stop().await);
    result?;
    stopped?;
    // Off-line, as an auditor with a copy of the journal and the manufacturer root would.
    let root =
        crate::manifest::verify::read_cert(&dir.join("root-ca.pem")).map_err(anyhow::Error::msg)?;
    let v = crate::audit::verify_offline(&dir.join("station.db"), &root, None)
        .map_err(anyhow::Error::msg)?;
    if !v.verification.ok() {
        bail!(
            "the audit log does not verify off-line: {:?}",
            v.verification.first_bad
        );
    }
    println!(
        "audit log verified off-line from a copy of the journal: {} entries, audit certificate {} chains to the root",
        v.verification.entries, v.audit_certificate
    );
    println!(
        "\nThe cell is left in {}. Start its daemon, then try:",
        dir.display()
    );
    let c = format!("station --config {}/station.toml", dir.display());
    println!("  stationd --config {}/station.toml &", dir.display());
    println!(
        "  {c} --user audit --pin-file {}/pins/audit.pin audit verify",
        dir.display()
    );
    println!(
        "  {c} --user super --pin-file {}/pins/super.pin batch status {}",
        dir.display(),
        1
    );
    println!(
        "  {c} --user audit --pin-file {}/pins/audit.pin audit tail -n 10",
        dir.display()
    );
    println!("Without the daemon:");
    println!(
        "  station audit verify --offline --journal {d}/station.db --root {d}/root-ca.pem",
        d = dir.display()
    );
    println!(
        "  station manifest verify {d}/manifest.p7m --root {d}/root-ca.pem",
        d = dir.display()
    );
    println!(
        "  station --config {d}/station.toml report --root {d}/root-ca.pem --batch 1 --out {d}/report --pdf",
        d = dir.display()
    );
    println!(
        "  openssl cms -verify -binary -inform DER -purpose any -in {d}/manifest.p7m -CAfile {d}/root-ca.pem -out /dev/null   (the chain only: the recipe in docs/utility.md also checks the signer's role)",
        d = dir.display()
    );
    Ok(())
}

async fn setup_cell(
    client: &Client,
    dir: &Path,
    args: &DemoArgs,
    fw_path: &Path,
    utility_cert: &Path,
) -> Result<crate::records::BatchRow> {
    let officer_pin = match known_pin("officer").filter(|_| args.known_pins) {
        Some(p) => Zeroizing::new(p.to_string()),
        None => random_digits(8),
    };
    write_secret(&dir.join("pins/officer.pin"), &officer_pin)?;
    client.bootstrap("officer", &officer_pin).await?;
    let officer = login(client, dir, "officer").await?;
    for (name, role) in [
        ("super", Role::Supervisor),
        ("oper", Role::Operator),
        ("audit", Role::Auditor),
    ] {
        user(client, &officer, dir, name, role, args.known_pins).await?;
    }
    println!(
        "  users: officer, super, oper, audit (PINs in {}/pins, owner-only)",
        dir.display()
    );

    let image = std::fs::read(fw_path)?;
    let fw = match client
        .execute(
            &officer,
            Command::ImportFirmware {
                name: "meter-fw-1.0.0.bin".into(),
                image,
            },
        )
        .await?
    {
        Reply::Firmware(f) => f,
        _ => bail!("firmware import answered unexpectedly"),
    };
    client
        .execute(
            &officer,
            Command::ImportCustomer {
                name: "demo-utility".into(),
                cert: std::fs::read(utility_cert)?,
            },
        )
        .await?;
    let supervisor = login(client, dir, "super").await?;
    let quantity = i64::from(args.meters);
    let batch = match client
        .execute(
            &supervisor,
            Command::OpenBatch(BatchSpec {
                work_order: "WO-DEMO-0001".into(),
                model: MODEL.into(),
                firmware: fw.sha256.clone(),
                customer: "demo-utility".into(),
                quantity,
                serial_prefix: "DMW".into(),
                serial_first: 1,
                serial_last: quantity * 3 + 10,
            }),
        )
        .await?
    {
        Reply::Batch(b) => b,
        _ => bail!("batch open answered unexpectedly"),
    };
    println!(
        "  batch {} opened: {} × {}, firmware {}, customer demo-utility\n",
        batch.work_order, quantity, MODEL, fw.version
    );
    for s in [officer, supervisor] {
        let _ = client.logout(&s).await;
    }
    Ok(batch)
}

async fn drive(cell: &DemoCell, args: &DemoArgs) -> Result<()> {
    let (client, dir) = (&cell.client, cell.dir.as_path());
    let operator = login(client, dir, "oper").await?;
    let summary = crate::run::run_line(client, &operator, false, args.plain).await?;
    println!("\n{summary}");
    let supervisor = login(client, dir, "super").await?;
    client
        .execute(&supervisor, Command::CloseBatch { id: cell.batch.id })
        .await?;

    // The manifest, and what the utility does with it.
    let officer = login(client, dir, "officer").await?;
    let out = dir.join("export");
    let exported = match client
        .execute(
            &officer,
            Command::Export {
                batch: cell.batch.id,
                out_dir: out.clone(),
            },
        )
        .await?
    {
        Reply::Export(e) => e,
        _ => bail!("export answered unexpectedly"),
    };
    for f in [
        "manifest.json",
        "manifest.p7m",
        crate::manifest::pskc::FILE,
        crate::report::FILE,
    ] {
        std::fs::copy(out.join(f), dir.join(f))?;
    }
    println!(
        "manifest exported: {} meters, {} voided certificates, checkpoint at audit entry {} ({}/manifest.p7m)",
        exported.meters,
        exported.voided,
        exported.checkpoint_seq,
        dir.display()
    );
    println!(
        "evidence report for the auditor: {}/report.html",
        dir.display()
    );
    let root =
        crate::manifest::verify::read_cert(&dir.join("root-ca.pem")).map_err(anyhow::Error::msg)?;
    let (report, _) = crate::manifest::verify::verify_file(&dir.join("manifest.p7m"), &root)
        .map_err(anyhow::Error::msg)?;
    println!("utility side: {report}");
    if !report.ok() {
        bail!("the manifest does not verify");
    }

    let auditor = login(client, dir, "audit").await?;
    let verification = match client.execute(&auditor, Command::AuditVerify).await? {
        Reply::Verification(v) => v,
        _ => bail!("audit verify answered unexpectedly"),
    };
    if !verification.ok() {
        bail!(
            "the audit log does not verify: {:?}",
            verification.first_bad
        );
    }
    println!(
        "audit log verified: {} entries, {} signed checkpoints",
        verification.entries, verification.checkpoints
    );
    if !summary.batch_complete {
        bail!("the batch did not complete");
    }
    for s in [operator, supervisor, auditor, officer] {
        let _ = client.logout(&s).await;
    }
    Ok(())
}
