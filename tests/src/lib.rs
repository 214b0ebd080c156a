//! Harness of the end-to-end tests: a whole cell on one machine, built from real parts.
//!
//! A SoftHSM token (in-process, through `hsm::testkit`) holding the demo PKI, a firmware release
//! signed in MCUboot format, a demo utility with its RSA key, emulated meters in nests on real
//! pseudo-terminals behind the link emulator, a configuration file, a journal with users, and an
//! open batch. Tests drive it through its daemon — in-process ([`Cell::daemon`], whose engine the
//! tests may look into) or the real `stationd` as a child process (the `e2e-stationd` binary of
//! this package) — with the API's client or the real `station` command as a child process (the
//! `e2e-station` binary); a few look at an engine opened in-process directly.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test harness: failures are test failures

pub mod registry;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meter_sim::faults::Faults;
use meter_sim::flash::Capabilities;
use meter_sim::linksim::{self, LinkParams};
use meter_sim::nest::{FaultScope, NestConfig};
use station::api::client::{Address, Client};
use station::auth::Role;
use station::config::Config;
use station::daemon::Daemon;
use station::engine::BatchSpec;
use station::{Command, Engine, OpenOptions, Reply, Session};

pub const MODEL: &str = "EM-300";

/// How a test cell is built.
#[derive(Debug, Clone)]
pub struct CellOptions {
    /// Nests.
    pub nests: u32,
    /// Faults by nest (1-based), for the first meter of that nest.
    pub faults: Vec<(u32, String)>,
    /// Baud rate of the emulated lines.
    pub baud: u32,
    /// Firmware payload, KiB.
    pub firmware_kib: usize,
    /// Meters in the batch.
    pub quantity: i64,
    /// Seed of the emulated meters per nest (`None`: random UIDs). Two nests with the same seed
    /// and number produce the same UIDs.
    pub seeds: Vec<Option<u64>>,
    /// Nest numbers given to the emulator (by default 1, 2, ...).
    pub emulator_numbers: Vec<u32>,
    /// Extra configuration text appended to station.toml.
    pub extra_config: String,
    /// Open the batch.
    pub open_batch: bool,
    /// The model has a key-agreement certificate besides the signing one.
    pub key_agreement: bool,
    /// Extra lines of the model's `[[models]]` table.
    pub model_extra: String,
    /// The cell's token is a Kryoptic one (else SoftHSM): a second PKCS#11 implementation, which
    /// cannot mark keys trusted (the cell runs with `hsm.trusted_wrap = false`).
    pub kryoptic: bool,
    /// The cell's SoftHSM token is seen through the quirks module with these quirks (see
    /// `hsm::testkit::quirks_module`): SoftHSM behaving like another HSM.
    pub quirks: Option<&'static str>,
    /// The emulated meters know only the AES-ECB key transport (not X9.63).
    pub meters_without_x963: bool,
    /// The frames the emulated meters buffer (their advertised window), if not the default.
    pub meter_window: Option<u8>,
    /// The emulated meters' firmware slot, bytes, if not the default.
    pub meter_slot_size: Option<u32>,
    /// The station id (default `e2e-cell`).
    pub station_id: Option<String>,
    /// The cell has a factory registry (`extra_config` holds its `[fleet]` section): the batch
    /// is opened without a serial range, its numbers come from leases.
    pub leased_numbers: bool,
    /// Each nest has a nameplate scanner on a pseudo-terminal (the test writes the codes to
    /// [`Cell::scanners`]) and the model's serials are scanned.
    pub scanners: bool,
}

impl Default for CellOptions {
    fn default() -> Self {
        CellOptions {
            nests: 2,
            faults: Vec::new(),
            baud: 921_600,
            firmware_kib: 24,
            quantity: 4,
            seeds: Vec::new(),
            emulator_numbers: Vec::new(),
            extra_config: String::new(),
            open_batch: true,
            key_agreement: true,
            model_extra: String::new(),
            kryoptic: false,
            quirks: None,
            meters_without_x963: false,
            meter_window: None,
            meter_slot_size: None,
            station_id: None,
            leased_numbers: false,
            scanners: false,
        }
    }
}

/// A test cell.
pub struct Cell {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub meters_dir: PathBuf,
    pub token: String,
    pub pins: HashMap<&'static str, String>,
    pub firmware: Vec<u8>,
    pub firmware_sha: String,
    pub batch_id: Option<i64>,
    pub softhsm_conf: PathBuf,
    /// The nests' scanners, the side a test writes codes to (with `CellOptions::scanners`).
    pub scanners: tokio::sync::Mutex<Vec<line_protocol::io::Transport>>,
    _lines: Vec<line_protocol::io::PtySlave>,
}

impl std::fmt::Debug for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cell")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn write_owner_only(path: &Path, text: &str) {
    station::demo::write_secret(path, text).unwrap();
}

const USERS: [(&str, Role); 4] = [
    ("officer", Role::SecurityOfficer),
    ("super", Role::Supervisor),
    ("oper", Role::Operator),
    ("audit", Role::Auditor),
];

impl Cell {
    /// Builds a cell. Must run inside a multi-thread tokio runtime.
    pub async fn new(opts: CellOptions) -> Cell {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        // The token: in-process SoftHSM (one configuration per test process).
        let token = if opts.kryoptic {
            hsm::testkit::TestToken::kryoptic("cell").unwrap()
        } else if let Some(q) = opts.quirks {
            hsm::testkit::TestToken::with_quirks("cell", q).unwrap()
        } else {
            hsm::testkit::TestToken::new("cell").unwrap()
        };
        let softhsm_conf = hsm::testkit::dir().unwrap().join("softhsm2.conf");
        let module_conf = if opts.kryoptic {
            format!(
                "kryoptic_conf = \"{}\"\ntrusted_wrap = false\n",
                hsm::testkit::kryoptic_conf().unwrap().display()
            )
        } else {
            format!("softhsm_conf = \"{}\"\n", softhsm_conf.display())
        };
        write_owner_only(&d.join("hsm-pin"), hsm::testkit::USER_PIN);
        write_owner_only(&d.join("hsm-so-pin"), hsm::testkit::SO_PIN);
        let h = token.open(2).unwrap();
        let pki = d.join("pki");
        let h2 = h.clone();
        let p2 = pki.clone();
        tokio::task::spawn_blocking(move || hsm::pki::init_dev(&h2, &p2))
            .await
            .unwrap()
            .unwrap();
        drop(h);
        std::fs::copy(pki.join("root-ca.pem"), d.join("root-ca.pem")).unwrap();

        // Firmware.
        let key_pem = std::fs::read_to_string(pki.join("firmware-signing-key.pem")).unwrap();
        let fw_key =
            <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&key_pem)
                .unwrap();
        let payload = meter_sim::firmware::firmware_like_payload(opts.firmware_kib * 1024, 0.6, 7);
        let firmware = meter_sim::firmware::sign_image(
            &payload,
            line_protocol::image::ImageVersion {
                major: 2,
                minor: 1,
                revision: 0,
                build: 0,
            },
            0x200,
            &fw_key,
        );
        std::fs::write(d.join("firmware.bin"), &firmware).unwrap();
        let firmware_sha = hex::encode(line_protocol::crypto::sha256(&firmware));

        // Utility.
        let d2 = d.clone();
        tokio::task::spawn_blocking(move || station::demo::make_utility(&d2))
            .await
            .unwrap()
            .unwrap();

        // Meters.
        let root = meter_sim::load_root(&pki.join("provisioning-root.pem")).unwrap();
        let meters_dir = d.join("meters");
        let mut lines = Vec::new();
        let mut ports = Vec::new();
        for n in 0..opts.nests {
            let mut faults = Faults::default();
            for (nest, f) in &opts.faults {
                if *nest == n + 1 {
                    faults.add(f).unwrap();
                }
            }
            let (master, slave, meter_path) = line_protocol::io::pty_pair().unwrap();
            lines.push(slave);
            let cfg = NestConfig {
                nest: opts
                    .emulator_numbers
                    .get(n as usize)
                    .copied()
                    .unwrap_or(n + 1),
                state_dir: meters_dir.clone(),
                caps: Capabilities {
                    model: MODEL.into(),
                    ktk_x963: !opts.meters_without_x963,
                    window: opts.meter_window.unwrap_or(Capabilities::default().window),
                    slot_size: opts
                        .meter_slot_size
                        .unwrap_or(Capabilities::default().slot_size),
                    ..Capabilities::default()
                },
                root,
                faults,
                fault_scope: FaultScope::First(1),
                meters: None,
                insert_delay: Duration::from_millis(20),
                seed: opts.seeds.get(n as usize).copied().flatten(),
                flash_bytes_per_s: None,
            };
            tokio::spawn(meter_sim::nest::run_nest(master, cfg));
            let meter = line_protocol::io::open(
                &line_protocol::io::PortAddr::parse(&meter_path).unwrap(),
                opts.baud,
            )
            .await
            .unwrap();
            let (station_side, slave2, station_path) = line_protocol::io::pty_pair().unwrap();
            lines.push(slave2);
            let params = LinkParams {
                baud: opts.baud,
                latency: Duration::from_millis(2),
                ..LinkParams::default()
            };
            let _ = linksim::spawn(station_side, meter, params);
            ports.push(station_path);
        }

        // Configuration.
        let mut t = format!(
            "station_id = \"{}\"\ndatabase = \"station.db\"\n\n[manufacturer]\nname = \"{}\"\nflag_id = \"DMW\"\n\n\
             [hsm]\nmodule = \"{}\"\ntoken = \"{}\"\npin = {{ file = \"hsm-pin\" }}\n{module_conf}pool_size = 4\n\n[line]\nlatency_ms = 2\npoll_ms = 50\n\n",
            opts.station_id.as_deref().unwrap_or("e2e-cell"),
            hsm::pki::DEMO_ORGANIZATION,
            token.module.display(),
            token.label,
        );
        let mut scanners = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            t.push_str(&format!(
                "[[nests]]\nname = \"N{}\"\nport = \"{p}\"\nbaud = {}\n",
                i + 1,
                opts.baud
            ));
            if opts.scanners {
                let (writer, slave, path) = line_protocol::io::pty_pair().unwrap();
                lines.push(slave);
                scanners.push(writer);
                t.push_str(&format!("scanner = \"{path}\"\n"));
            }
            t.push('\n');
        }
        let model_extra = if opts.scanners {
            format!("{}serial_source = \"scan\"\n", opts.model_extra)
        } else {
            opts.model_extra.clone()
        };
        t.push_str(&format!("[[models]]\nname = \"{MODEL}\"\nsuite = 1\nkeygen = \"meter\"\nkey_agreement = {}\nanchors = [\"utility.pem\"]\n{}\n[audit]\ncheckpoint_interval = 25\n", opts.key_agreement, model_extra));
        t.push_str(&opts.extra_config);
        let config = d.join("station.toml");
        std::fs::write(&config, t).unwrap();

        let mut cell = Cell {
            dir,
            config,
            meters_dir,
            token: token.label.clone(),
            pins: HashMap::new(),
            firmware,
            firmware_sha,
            batch_id: None,
            softhsm_conf,
            scanners: tokio::sync::Mutex::new(scanners),
            _lines: lines,
        };
        // Users, imports, batch: through the daemon, as a cell is set up.
        let daemon = cell.daemon().await;
        let client = cell.client().await;
        for (i, (name, role)) in USERS.iter().enumerate() {
            let pin = format!("{}{}", 100_000 + i * 111_111, "");
            cell.pins.insert(name, pin.clone());
            write_owner_only(&cell.path(&format!("pins/{name}.pin")), &pin);
            if i == 0 {
                client.bootstrap(name, &pin).await.unwrap();
            } else {
                let officer = cell.login(&client, "officer").await;
                client
                    .execute(
                        &officer,
                        Command::AddUser {
                            name: name.to_string(),
                            role: *role,
                            pin: zeroize::Zeroizing::new(pin),
                        },
                    )
                    .await
                    .unwrap();
            }
        }
        let officer = cell.login(&client, "officer").await;
        client
            .execute(
                &officer,
                Command::ImportFirmware {
                    name: "firmware.bin".into(),
                    image: cell.firmware.clone(),
                },
            )
            .await
            .unwrap();
        // The token's security officer approves the utility's key (a process of its own, beside
        // the running daemon); then the cell's security officer records the customer.
        cell.trust_customer("utility", &std::fs::read(cell.path("utility.pem")).unwrap());
        client
            .execute(
                &officer,
                Command::ImportCustomer {
                    name: "utility".into(),
                    cert: std::fs::read(cell.path("utility.pem")).unwrap(),
                },
            )
            .await
            .unwrap();
        if opts.open_batch {
            let sup = cell.login(&client, "super").await;
            let r = client
                .execute(
                    &sup,
                    Command::OpenBatch(BatchSpec {
                        work_order: "WO-E2E-1".into(),
                        model: MODEL.into(),
                        firmware: cell.firmware_sha.clone(),
                        customer: "utility".into(),
                        quantity: opts.quantity,
                        serial_prefix: "E2E".into(),
                        serial_first: if opts.leased_numbers { 0 } else { 1000 },
                        serial_last: if opts.leased_numbers {
                            station::fleet::LAST_NUMBER
                        } else {
                            1000 + opts.quantity * 10 + 50
                        },
                    }),
                )
                .await
                .unwrap();
            if let Reply::Batch(b) = r {
                cell.batch_id = Some(b.id);
            }
        }
        drop(client);
        daemon.stop().await.unwrap();
        cell
    }

    /// A file of the cell.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Opens the engine of the cell (with nest tasks if `nests`).
    pub async fn engine(&self, nests: bool) -> Engine {
        let cfg = Config::load(&self.config).unwrap();
        Engine::open(
            cfg,
            OpenOptions {
                source: "test".into(),
                nests,
            },
        )
        .await
        .unwrap()
    }

    /// Logs a user in through the API.
    pub async fn login(&self, client: &Client, user: &str) -> Session {
        client.login(user, &self.pins[user]).await.unwrap().session
    }

    /// Logs a user in to an engine opened in-process.
    pub async fn login_engine(&self, engine: &Engine, user: &str) -> Session {
        engine.login(user, &self.pins[user]).await.unwrap()
    }

    /// The cell's daemon, in this process: its engine with the nest tasks, serving the API on
    /// the cell's socket.
    pub async fn daemon(&self) -> Daemon {
        Daemon::start(Config::load(&self.config).unwrap(), "stationd")
            .await
            .unwrap()
    }

    /// A client of the cell's daemon over its socket.
    pub async fn client(&self) -> Client {
        Client::connect(&Address::Unix(self.socket()), "e2e")
            .await
            .unwrap()
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.path("stationd.sock")
    }

    /// The real `stationd` for this cell, as a child process, once it says it is ready.
    pub fn spawn_stationd(&self) -> std::process::Child {
        self.spawn_stationd_with(&[])
    }

    /// [`Cell::spawn_stationd`] with extra environment variables (a crash point, say).
    pub fn spawn_stationd_with(&self, env: &[(&str, &str)]) -> std::process::Child {
        use std::io::BufRead;
        let mut child = std::process::Command::new(stationd_exe())
            .arg("--config")
            .arg(&self.config)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains(" ready on ") => break,
                Some(Ok(_)) => {}
                _ => panic!("stationd did not become ready: {:?}", child.wait()),
            }
        }
        // Keep its standard output drained.
        std::thread::spawn(move || for _ in lines {});
        child
    }

    /// The `station` command for this cell, logged in as `user` (or nobody).
    pub fn station(&self, user: Option<&str>) -> std::process::Command {
        let mut c = std::process::Command::new(station_exe());
        c.arg("--config").arg(&self.config);
        if let Some(u) = user {
            c.arg("--user")
                .arg(u)
                .arg("--pin-file")
                .arg(self.path(&format!("pins/{u}.pin")));
        }
        // The utility's side (manifest import into a token) opens SoftHSM in the command.
        c.env("SOFTHSM2_CONF", &self.softhsm_conf)
            .env_remove("STATION_PIN")
            .env_remove("STATION_CONNECT")
            .stdin(std::process::Stdio::null());
        c
    }

    /// The token's security officer approves `cert` (PEM or DER) as customer `name`'s key, with
    /// `station hsm trust-customer` (a process of its own).
    pub fn trust_customer(&self, name: &str, cert: &[u8]) {
        let dir = self.path("customers");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.cert"));
        std::fs::write(&file, cert).unwrap();
        let (code, out, err) = self.run(
            None,
            &[
                "hsm",
                "trust-customer",
                name,
                file.to_str().unwrap(),
                "--so-pin-file",
                self.path("hsm-so-pin").to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "trust-customer {name}: {out}{err}");
    }

    /// Runs the `station` command to completion; returns (status code, stdout, stderr).
    pub fn run(&self, user: Option<&str>, args: &[&str]) -> (i32, String, String) {
        let out = self.station(user).args(args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Opens the journal directly (as someone with the file would).
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.path("station.db")).unwrap()
    }

    /// The flash directory of a meter.
    pub fn meter_dir(&self, uid: &str) -> PathBuf {
        self.meters_dir.join(uid)
    }
}

/// A client application of the OPC UA server: its name, its own public key (PEM) when it keeps
/// its key itself (else the station tool makes one, NAME-key.pem), and whether an officer lists
/// it in `opcua.trusted_clients`.
pub type OpcUaClient<'a> = (&'a str, Option<&'a Path>, bool);

/// Switches the cell's OPC UA server on (schemas/opcua.md) as an officer would, the daemon
/// stopped before and after: the device CA issues the server's certificate (its key made by the
/// station tool) and one per client; the listed clients go into `opcua.trusted_clients`; the
/// server listens on a free loopback port. `dir` gets every client's NAME.pem (and NAME-key.pem
/// when made here) and the server's certificate as server.pem.
pub async fn enable_opcua(cell: &Cell, dir: &Path, clients: &[OpcUaClient<'_>]) {
    let daemon = cell.daemon().await;
    let issue = |args: &[&str]| {
        let mut a = vec!["pki", "opcua-cert"];
        a.extend_from_slice(args);
        let (code, out, err) = cell.run(Some("officer"), &a);
        assert_eq!(code, 0, "{out}{err}");
    };
    let station = Config::load(&cell.config).unwrap().station_id;
    let server_dir = cell.path("opcua");
    let (sd, dd) = (server_dir.to_str().unwrap(), dir.to_str().unwrap());
    let uri = format!("urn:smart-meter-cell:{station}");
    issue(&[
        "--usage",
        "server",
        "--name",
        "server",
        "--uri",
        &uri,
        "--ip",
        "127.0.0.1",
        "--out",
        sd,
    ]);
    let listed = cell.path("opcua-clients");
    std::fs::create_dir_all(&listed).unwrap();
    for (name, public_key, trusted) in clients {
        let mut args = vec![
            "--usage",
            "client",
            "--name",
            name,
            "--uri",
            "urn:test:mes",
            "--out",
            dd,
        ];
        let pk = public_key.map(|p| p.to_str().unwrap().to_string());
        if let Some(p) = &pk {
            args.extend_from_slice(&["--public-key", p]);
        }
        issue(&args);
        if *trusted {
            std::fs::copy(
                dir.join(format!("{name}.pem")),
                listed.join(format!("{name}.pem")),
            )
            .unwrap();
        }
    }
    daemon.stop().await.unwrap();
    std::fs::copy(server_dir.join("server.pem"), dir.join("server.pem")).unwrap();
    let mut config = std::fs::read_to_string(&cell.config).unwrap();
    config.push_str(
        "\n[opcua]\nlisten = \"127.0.0.1:0\"\ncertificate = \"opcua/server.pem\"\nkey = \"opcua/server-key.pem\"\ntrusted_clients = \"opcua-clients\"\n",
    );
    std::fs::write(&cell.config, config).unwrap();
}

/// Makes, with `openssl`, a self-signed P-256 certificate for a fresh key of its own (written
/// beside `out` as `<out>.key`): `subject` as openssl takes it, `exts` as `-addext` values, PEM
/// or DER by `out`'s extension. What someone with a shell makes to stand in for a real anchor.
pub fn rogue_certificate(out: &Path, subject: &str, exts: &[&str]) {
    let mut c = std::process::Command::new("openssl");
    c.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ])
    .arg("-keyout")
    .arg(out.with_extension("key"))
    .args(["-subj", subject, "-days", "30"]);
    for e in exts {
        c.args(["-addext", e]);
    }
    if out.extension().is_some_and(|e| e == "der") {
        c.args(["-outform", "DER"]);
    }
    let o = c.arg("-out").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The SHA-256 (hex) `sha256sum` prints for the output of the shell pipeline `cmd`.
pub fn sha256_of_pipeline(cmd: &str) -> String {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} | sha256sum"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        fp.len(),
        64,
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    fp
}

/// A binary of this package: cargo builds it next to the test executables
/// (`target/<profile>/NAME`, the tests living in `target/<profile>/deps/`).
fn package_exe(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the e2e package's binaries (cargo test -p e2e builds them)",
        p.display()
    );
    p
}

/// The `e2e-station` binary: the `station` command.
pub fn station_exe() -> PathBuf {
    package_exe("e2e-station")
}

/// The `e2e-stationd` binary: the `stationd` daemon.
pub fn stationd_exe() -> PathBuf {
    package_exe("e2e-stationd")
}

/// Stops a `stationd` child as its service manager would (SIGTERM) and checks that it ended
/// cleanly (the line stopped, the shut-down checkpoint signed, exit 0).
pub fn stop_stationd(mut child: std::process::Child) {
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert!(
        child.wait().unwrap().success(),
        "stationd did not stop cleanly"
    );
}

/// Starts the cell's daemon in-process and runs the line through the API as the operator until
/// the batch is complete (or `limit` passes); returns the daemon (still serving) and the summary.
pub async fn run_batch(cell: &Cell, limit: Duration) -> (Daemon, station::run::Summary) {
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let summary = tokio::time::timeout(limit, station::run::run_line(&client, &oper, false, true))
        .await
        .expect("the batch did not complete in time")
        .unwrap();
    let _ = client.logout(&oper).await;
    (daemon, summary)
}

/// The journal's promises after any run, however it ended: `quantity` meters done, nothing left
/// half-done, no serial or certificate serial used twice, every certificate delivered to a done
/// meter or voided, no wrapped keys kept for a failed meter.
pub fn assert_journal_consistent(db: &rusqlite::Connection, quantity: i64) {
    let q = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q("SELECT count(*) FROM meters WHERE state = 'done'"),
        quantity,
        "the batch is complete"
    );
    assert_eq!(
        q("SELECT count(*) FROM meters WHERE state NOT IN ('done', 'failed')"),
        0,
        "nothing is left half-done"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM (SELECT serial FROM meters WHERE serial IS NOT NULL GROUP BY serial HAVING count(*) > 1)"
        ),
        0
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM (SELECT serial FROM certificates GROUP BY serial HAVING count(*) > 1)"
        ),
        0
    );
    assert_eq!(
        q("SELECT count(*) FROM certificates WHERE state NOT IN ('delivered', 'voided')"),
        0,
        "every certificate is delivered or voided"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE c.state = 'delivered' AND m.state <> 'done'"
        ),
        0,
        "delivered certificates belong to done meters"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE c.state = 'voided' AND m.state = 'done'"
        ),
        0,
        "done meters have no voided certificates"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.state = 'failed'"
        ),
        0
    );
}

/// Validates the JSON document `doc` against the JSON Schema `schema` with an independent
/// validator, Python's jsonschema (the Python `cargo xtask test` installs it for, in
/// `CELL_PYTHON`): Ok, or the validator's messages.
pub fn validate_with_jsonschema(schema: &Path, doc: &Path) -> Result<(), String> {
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        jsonschema.Draft202012Validator.check_schema(schema)\n\
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(json.load(open(sys.argv[2]))), key=str)\n\
        print('\\n'.join(e.message for e in errors))\n\
        sys.exit(1 if errors else 0)\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(schema)
        .arg(doc)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "Python's jsonschema is missing: run the tests through `cargo xtask test`, which installs it, or set CELL_PYTHON to a Python that has it ({stderr})"
    );
    assert!(
        !stderr.contains("Traceback"),
        "the validator failed: {stderr}"
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{stderr}", String::from_utf8_lossy(&out.stdout)))
    }
}

/// Runs `openssl ARGS` in `dir` (an independent peer, or an offline root); panics with its
/// output when it fails.
pub fn openssl(args: &[&str], dir: &Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts the cell's daemon and its line and waits (at most 30 s) for the first meter the
/// station refuses or fails; stops both and returns the reason it gave.
pub async fn first_stopped_meter(cell: &Cell) -> String {
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let line = tokio::spawn(async move {
        let _ = station::run::run_line(&client, &oper, false, true).await;
    });
    let find = || -> Option<String> {
        cell.db()
            .query_row(
                "SELECT COALESCE(json_extract(details, '$.message'), json_extract(details, '$.reason')) FROM audit
                 WHERE kind IN ('meter.refused', 'meter.failed') ORDER BY seq LIMIT 1",
                [],
                |r| r.get::<_, String>(0),
            )
            .ok()
    };
    let mut reason = None;
    for _ in 0..300 {
        reason = find();
        if reason.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    line.abort();
    daemon.stop().await.unwrap();
    reason.expect("a meter was refused or failed")
}
