//! `station demo`: a whole cell on one machine. A SoftHSM token with the demo PKI, a firmware
//! release signed in MCUboot format, a demo utility, emulated meters on pseudo-terminals joined
//! to the station through the link emulator at the chosen baud rate, one batch provisioned from
//! start to finish, the audit log verified — and a working cell left behind in the output
//! directory, so that every other command can be tried on it.
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

use crate::auth::Role;
use crate::config::Config;
use crate::engine::{BatchSpec, Command, Engine, OpenOptions, Reply, Session};

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
        }
    }
}

/// A demo cell, set up and running, with its batch open and the line stopped.
pub struct DemoCell {
    /// The engine.
    pub engine: Engine,
    /// The cell directory.
    pub dir: PathBuf,
    /// The open batch.
    pub batch: crate::records::BatchRow,
    // The slave sides of the pseudo-terminals: the emulated lines live as long as these.
    _lines: Vec<line_protocol::io::PtySlave>,
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
    let conf = hsm::softhsm::write_conf(&out.join("hsm"))?;
    hsm::softhsm::use_conf(&conf);
    Ok(())
}

fn random_digits(n: usize) -> Zeroizing<String> {
    let mut bytes = vec![0u8; n];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut bytes);
    Zeroizing::new(bytes.iter().map(|b| char::from(b'0' + b % 10)).collect())
}

/// Writes a secret to an owner-only file.
pub fn write_secret(path: &Path, secret: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

/// `station pki init-dev`: a new SoftHSM token under `token_dir` (PINs in owner-only files) with
/// the whole demo hierarchy; the public certificates go to `out` (default `token_dir/pki`).
pub async fn init_dev_token(token_dir: &Path, label: &str, out: Option<&Path>) -> Result<String> {
    let user_pin = random_digits(8);
    let so_pin = random_digits(12);
    let user_file = token_dir.join("hsm-user.pin");
    write_secret(&user_file, &user_pin)?;
    write_secret(&token_dir.join("hsm-so.pin"), &so_pin)?;
    let module = PathBuf::from(hsm::SOFTHSM_MODULE);
    let (m, l) = (module.clone(), label.to_string());
    let (u, s) = (
        SecretString::from(user_pin.to_string()),
        SecretString::from(so_pin.to_string()),
    );
    tokio::task::spawn_blocking(move || hsm::softhsm::init_token(&m, &l, &s, &u))
        .await?
        .with_context(|| format!("cannot create the token {label}"))?;
    let mut cfg = hsm::HsmConfig::new(module, label, hsm::PinSource::File(user_file.clone()));
    cfg.pool_size = 2;
    let hsm = hsm::Hsm::open(&cfg)?;
    let out_dir = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| token_dir.join("pki"));
    let o2 = out_dir.clone();
    let made = tokio::task::spawn_blocking(move || hsm::pki::init_dev(&hsm, &o2)).await??;
    let mut text = format!(
        "token {label} created (SoftHSM configuration {})\n",
        token_dir.join("hsm/softhsm2.conf").display()
    );
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

fn config_text(dir: &Path, ports: &[String], baud: u32) -> String {
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
    let _ = writeln!(
        t,
        "[hsm]\nmodule = \"{}\"\ntoken = \"{TOKEN_LABEL}\"\npin = {{ file = \"hsm-user.pin\" }}\nsofthsm_conf = \"hsm/softhsm2.conf\"\npool_size = 4\n",
        hsm::SOFTHSM_MODULE
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
    engine: &Engine,
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
    engine
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

async fn login(engine: &Engine, dir: &Path, name: &str) -> Result<Session> {
    let pin = std::fs::read_to_string(dir.join("pins").join(format!("{name}.pin")))?;
    Ok(engine.login(name, pin.trim()).await?)
}

/// Sets a demo cell up: token and PKI, firmware, utility, emulated meters behind linksim, the
/// configuration, the engine, users, imports and an open batch. The line is left stopped.
pub async fn build(args: &DemoArgs) -> Result<DemoCell> {
    let dir = std::fs::canonicalize(&args.out)?;

    // 1. Token and PKI.
    init_dev_token(&dir, TOKEN_LABEL, Some(&dir.join("pki"))).await?;
    std::fs::copy(dir.join("pki/root-ca.pem"), dir.join("root-ca.pem"))?;
    println!(
        "  HSM: SoftHSM token {TOKEN_LABEL} with the demo PKI (certificates in {}/pki)",
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

    // 5. The cell.
    let config_path = dir.join("station.toml");
    std::fs::write(&config_path, config_text(&dir, &ports, args.baud))?;
    let cfg = Config::load(&config_path)?;
    let engine = Engine::open(
        cfg,
        OpenOptions {
            source: "demo".into(),
            nests: true,
        },
    )
    .await?;
    match setup_cell(&engine, &dir, args, &fw_path, &utility_cert).await {
        Ok(batch) => Ok(DemoCell {
            engine,
            dir,
            batch,
            _lines: lines,
        }),
        Err(e) => {
            let _ = engine.shutdown().await;
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
    let shutdown = cell.engine.shutdown().await;
    result?;
    shutdown?;
    Ok(())
}

async fn setup_cell(
    engine: &Engine,
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
    engine.bootstrap_admin("officer", &officer_pin).await?;
    let officer = login(engine, dir, "officer").await?;
    user(
        engine,
        &officer,
        dir,
        "super",
        Role::Supervisor,
        args.known_pins,
    )
    .await?;
    user(
        engine,
        &officer,
        dir,
        "oper",
        Role::Operator,
        args.known_pins,
    )
    .await?;
    user(
        engine,
        &officer,
        dir,
        "audit",
        Role::Auditor,
        args.known_pins,
    )
    .await?;
    println!(
        "  users: officer, super, oper, audit (PINs in {}/pins, owner-only)",
        dir.display()
    );

    let image = std::fs::read(fw_path)?;
    let fw = match engine
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
    engine
        .execute(
            &officer,
            Command::ImportCustomer {
                name: "demo-utility".into(),
                cert: std::fs::read(utility_cert)?,
            },
        )
        .await?;
    let supervisor = login(engine, dir, "super").await?;
    let quantity = i64::from(args.meters);
    let batch = match engine
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
        let _ = engine.logout(&s).await;
    }
    Ok(batch)
}

async fn drive(cell: &DemoCell, args: &DemoArgs) -> Result<()> {
    let (engine, dir) = (&cell.engine, cell.dir.as_path());
    let operator = login(engine, dir, "oper").await?;
    let summary = crate::run::run_line(engine, &operator, false, args.plain).await?;
    println!("\n{summary}");
    let supervisor = login(engine, dir, "super").await?;
    engine
        .execute(&supervisor, Command::CloseBatch { id: cell.batch.id })
        .await?;

    // The manifest, and what the utility does with it.
    let officer = login(engine, dir, "officer").await?;
    let out = dir.join("export");
    let exported = match engine
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
    for f in ["manifest.json", "manifest.p7m"] {
        std::fs::copy(out.join(f), dir.join(f))?;
    }
    println!(
        "manifest exported: {} meters, {} voided certificates, checkpoint at audit entry {} ({}/manifest.p7m)",
        exported.meters,
        exported.voided,
        exported.checkpoint_seq,
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

    let auditor = login(engine, dir, "audit").await?;
    let verification = match engine.execute(&auditor, Command::AuditVerify).await? {
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
    println!("\nThe cell is left in {}. Try:", dir.display());
    let c = format!("station --config {}/station.toml", dir.display());
    println!(
        "  {c} --user audit --pin-file {}/pins/audit.pin audit verify",
        dir.display()
    );
    println!(
        "  {c} --user super --pin-file {}/pins/super.pin batch status {}",
        dir.display(),
        cell.batch.id
    );
    println!(
        "  {c} --user audit --pin-file {}/pins/audit.pin audit tail -n 10",
        dir.display()
    );
    println!(
        "  station manifest verify {d}/manifest.p7m --root {d}/root-ca.pem",
        d = dir.display()
    );
    println!(
        "  openssl cms -verify -binary -inform DER -in {d}/manifest.p7m -CAfile {d}/root-ca.pem -out /dev/null",
        d = dir.display()
    );
    for s in [operator, supervisor, auditor, officer] {
        let _ = engine.logout(&s).await;
    }
    Ok(())
}
