//! Station performance (`cargo xtask bench station`). Prints one JSON object per line:
//!
//! - `overhead_ms_per_meter`: the station's own time per meter (HSM, journal, CPU) with the wire
//!   taken out: meters on loopback sockets, the meters' own processing time (measured by the
//!   emulator) subtracted from the cycle time.
//! - `meters_per_hour` for 1, 4 and 16 nests over linksim at 921600 baud, 4 ms latency, with a
//!   64 KiB firmware image.
//! - `cycle_ratio`: the measured cycle time over its theoretical minimum, the wire time of every
//!   byte exchanged plus the meter's processing time (one nest, 921600 baud, no added latency).
//!
//! `station-bench overhead|nests|ratio` runs one of the three. The station is `stationd` as it
//! runs in a cell — its engine and its API on a Unix socket, in this process — and the line is
//! driven and followed through the API as `station run` does (a client over the socket: log-in,
//! start, the event stream). Everything runs on a SoftHSM token with the demo PKI; the emulated
//! meters share the machine's cores with the station, as a commissioning run on one PC would.
//! The runs share one journal (and so one set of users), as one cell's batches would.

// A benchmark tool: a failed set-up step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meter_sim::faults::Faults;
use meter_sim::flash::Capabilities;
use meter_sim::linksim::{self, LinkCounters, LinkParams};
use meter_sim::nest::{FaultScope, NestConfig};
use station::api::client::{Address, Client};
use station::api::convert::Update;
use station::config::Config;
use station::daemon::Daemon;
use station::engine::{BatchSpec, Event};
use station::{Command, Reply, Session};

mod common;

const MODEL: &str = "EM-300";

struct Base {
    dir: PathBuf,
    /// The first serial number of the next run's batch: the runs share one journal, and system
    /// titles are unique across batches.
    next_serial: i64,
    conf_head: String,
    pins: Vec<(String, String)>,
    root: p256::PublicKey,
}

async fn base(dir: &Path) -> Base {
    let common::BenchCell { pki, conf_head } = common::bench_cell(dir, "bench", MODEL).await;
    let root = meter_sim::load_root(&pki.join("provisioning-root.pem")).unwrap();
    Base {
        dir: dir.to_path_buf(),
        next_serial: 1,
        conf_head,
        pins: Vec::new(),
        root,
    }
}

fn nest_config(n: u32, state_dir: &Path, root: p256::PublicKey) -> NestConfig {
    NestConfig {
        nest: n,
        state_dir: state_dir.to_path_buf(),
        caps: Capabilities {
            model: MODEL.into(),
            ..Capabilities::default()
        },
        root,
        faults: Faults::default(),
        fault_scope: FaultScope::All,
        meters: None,
        insert_delay: Duration::ZERO,
        seed: None,
        flash_bytes_per_s: None,
    }
}

/// The line's ports for a run, and what keeps them alive.
struct Ports {
    config_nests: String,
    counters: Vec<Arc<LinkCounters>>,
    _keep: Vec<line_protocol::io::PtySlave>,
}

async fn loopback_nests(n: u32, meters: &Path, root: p256::PublicKey) -> Ports {
    let mut text = String::new();
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cfg = nest_config(i + 1, meters, root);
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let _ = meter_sim::nest::run_nest(Box::pin(s), cfg).await;
        });
        text.push_str(&format!(
            "[[nests]]\nname = \"N{}\"\nport = \"tcp://127.0.0.1:{port}\"\nbaud = 921600\n\n",
            i + 1
        ));
    }
    Ports {
        config_nests: text,
        counters: Vec::new(),
        _keep: Vec::new(),
    }
}

async fn linked_nests(
    n: u32,
    meters: &Path,
    root: p256::PublicKey,
    baud: u32,
    latency: Duration,
) -> Ports {
    let mut text = String::new();
    let mut keep = Vec::new();
    let mut counters = Vec::new();
    for i in 0..n {
        let (master, slave, meter_path) = line_protocol::io::pty_pair().unwrap();
        keep.push(slave);
        tokio::spawn(meter_sim::nest::run_nest(
            master,
            nest_config(i + 1, meters, root),
        ));
        let meter = line_protocol::io::open(
            &line_protocol::io::PortAddr::parse(&meter_path).unwrap(),
            baud,
        )
        .await
        .unwrap();
        let (station_side, slave2, path) = line_protocol::io::pty_pair().unwrap();
        keep.push(slave2);
        let (_, c) = linksim::spawn(
            station_side,
            meter,
            LinkParams {
                baud,
                latency,
                ..LinkParams::default()
            },
        );
        counters.push(c);
        text.push_str(&format!(
            "[[nests]]\nname = \"N{}\"\nport = \"{path}\"\nbaud = {baud}\n\n",
            i + 1
        ));
    }
    Ports {
        config_nests: text,
        counters,
        _keep: keep,
    }
}

const PIN: &str = "246810";

/// Starts the cell's daemon with `ports` and opens a batch of `quantity` meters of `image`
/// (closing the batch of the run before). Returns the daemon and a client of it.
async fn cell(
    b: &mut Base,
    run: &str,
    ports: &Ports,
    image: &[u8],
    quantity: i64,
    latency_ms: u32,
) -> (Daemon, Client) {
    let dir = b.dir.join(run);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("station.toml"),
        format!(
            "{}[line]\nlatency_ms = {latency_ms}\npoll_ms = 20\n\n[api]\nsocket = \"{}\"\nexport_dir = \"{}\"\n\n{}",
            b.conf_head.replace(
                "database = \"station.db\"",
                &format!("database = \"{}\"", b.dir.join("station.db").display())
            ).replace(
                "pin = { file = \"hsm-pin\" }",
                &format!("pin = {{ file = \"{}\" }}", b.dir.join("hsm-pin").display())
            ),
            dir.join("stationd.sock").display(),
            dir.join("exports").display(),
            ports.config_nests
        ),
    )
    .unwrap();
    let daemon = Daemon::start(Config::load(&dir.join("station.toml")).unwrap(), "stationd")
        .await
        .unwrap();
    let client = Client::connect(&Address::Unix(daemon.socket().to_path_buf()), "bench")
        .await
        .unwrap();
    let first = b.pins.is_empty();
    if first {
        common::add_users(&client, PIN).await;
        b.pins.push(("officer".into(), PIN.into()));
    }
    let officer = client.login("officer", PIN).await.unwrap().session;
    if first {
        client
            .execute(
                &officer,
                Command::ImportCustomer {
                    name: "utility".into(),
                    cert: std::fs::read(b.dir.join("utility.pem")).unwrap(),
                },
            )
            .await
            .unwrap();
    }
    let sha = hex::encode(line_protocol::crypto::sha256(image));
    let _ = client
        .execute(
            &officer,
            Command::ImportFirmware {
                name: "fw.bin".into(),
                image: image.to_vec(),
            },
        )
        .await;
    match client
        .execute(&officer, Command::ListFirmware)
        .await
        .unwrap()
    {
        Reply::Firmwares(fs) => assert!(fs.iter().any(|f| f.sha256 == sha)),
        _ => unreachable!(),
    }
    let sup = client.login("super", PIN).await.unwrap().session;
    if let Some(open) = client.snapshot(&sup).await.unwrap().batch {
        client
            .execute(&sup, Command::CloseBatch { id: open.id })
            .await
            .unwrap();
    }
    client
        .execute(
            &sup,
            Command::OpenBatch(BatchSpec {
                work_order: format!("WO-{run}"),
                model: MODEL.into(),
                firmware: sha,
                customer: "utility".into(),
                quantity,
                serial_prefix: run.to_uppercase(),
                serial_first: b.next_serial,
                serial_last: b.next_serial + quantity * 2 + 10,
            }),
        )
        .await
        .unwrap();
    b.next_serial += quantity * 2 + 11;
    for s in [officer, sup] {
        let _ = client.logout(&s).await;
    }
    (daemon, client)
}

/// Runs the line through the API until `n` meters are done; returns (elapsed, cycle times in
/// ms).
async fn produce(client: &Client, n: usize) -> (Duration, Vec<u64>) {
    let oper: Session = client.login("oper", PIN).await.unwrap().session;
    let mut events = client.events(&oper).await.unwrap();
    assert!(matches!(events.next().await, Some(Ok(Update::Snapshot(_)))));
    let t0 = Instant::now();
    client.execute(&oper, Command::StartLine).await.unwrap();
    let mut cycles = Vec::new();
    while cycles.len() < n {
        match tokio::time::timeout(Duration::from_secs(120), events.next()).await {
            Ok(Some(Ok(Update::Event(Event::MeterFinished {
                ok: true, cycle_ms, ..
            })))) => cycles.push(cycle_ms),
            Ok(Some(Ok(Update::Event(Event::MeterFinished {
                ok: false, reason, ..
            })))) => panic!("a meter failed: {reason:?}"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("events: {e}"),
            Ok(None) => panic!("the event stream ended"),
            Err(_) => panic!("no meter finished within two minutes"),
        }
    }
    let elapsed = t0.elapsed();
    client.execute(&oper, Command::StopLine).await.unwrap();
    let _ = client.logout(&oper).await;
    (elapsed, cycles)
}

/// Mean processing time of the emulated meters (from the emulator's record), ms.
fn meter_busy_ms(meters: &Path) -> f64 {
    let text = std::fs::read_to_string(meters.join("meters.jsonl")).unwrap_or_default();
    let busy: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "released")
        .filter_map(|v| v["busy_us"].as_f64())
        .collect();
    busy.iter().sum::<f64>() / busy.len().max(1) as f64 / 1000.0
}

/// CPU time (user + system) of this whole process — station, emulated meters and links — in
/// seconds, from /proc (Linux counts it in USER_HZ = 100 ticks per second).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn mean(v: &[u64]) -> f64 {
    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let mut b = base(tmp.path()).await;
    let key_pem = std::fs::read_to_string(tmp.path().join("pki/firmware-signing-key.pem")).unwrap();
    let fw_key =
        <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&key_pem)
            .unwrap();
    let version = line_protocol::image::ImageVersion {
        major: 1,
        minor: 0,
        revision: 0,
        build: 0,
    };
    let small = meter_sim::firmware::sign_image(
        &meter_sim::firmware::firmware_like_payload(4 * 1024, 0.6, 1),
        version,
        0x200,
        &fw_key,
    );
    let image = meter_sim::firmware::sign_image(
        &meter_sim::firmware::firmware_like_payload(64 * 1024, 0.6, 1),
        version,
        0x200,
        &fw_key,
    );

    // `station-bench [overhead|nests|ratio|selftest]` runs one part; no argument runs all.
    let only = std::env::args().nth(1);
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);

    // 1. Station overhead: loopback links, a tiny image, meter processing subtracted.
    if part("overhead") {
        let meters = tmp.path().join("overhead-meters");
        let ports = loopback_nests(1, &meters, b.root).await;
        let (daemon, client) = cell(&mut b, "overhead", &ports, &small, 1000, 0).await;
        produce(&client, 5).await; // warm-up
        let (_, cycles) = produce(&client, 40).await;
        drop(client);
        daemon.stop().await.unwrap();
        let cycle = mean(&cycles);
        let busy = meter_busy_ms(&meters);
        println!(
            "{}",
            serde_json::json!({"metric": "overhead_ms_per_meter", "value": cycle - busy, "cycle_ms": cycle, "meter_busy_ms": busy, "meters": cycles.len()})
        );
    }

    // 2. Throughput against the number of nests.
    let mut one = 0.0;
    for nests in [1u32, 4, 16] {
        if !part("nests") {
            break;
        }
        let meters = tmp.path().join(format!("mph{nests}-meters"));
        let ports = linked_nests(nests, &meters, b.root, 921_600, Duration::from_millis(4)).await;
        let (daemon, client) =
            cell(&mut b, &format!("mph{nests}"), &ports, &image, 10_000, 4).await;
        produce(&client, nests as usize).await; // warm-up: every nest has done one
        let n = (nests as usize * 4).max(8);
        let cpu0 = cpu_seconds();
        let (elapsed, cycles) = produce(&client, n).await;
        let cpu = cpu_seconds() - cpu0;
        drop(client);
        daemon.stop().await.unwrap();
        let mph = n as f64 * 3600.0 / elapsed.as_secs_f64();
        if nests == 1 {
            one = mph;
        }
        println!(
            "{}",
            serde_json::json!({"metric": "meters_per_hour", "nests": nests, "value": mph, "scaling": mph / one, "mean_cycle_ms": mean(&cycles), "meters": n, "cpu_ms_per_meter": cpu * 1000.0 / n as f64, "cores_busy": cpu / elapsed.as_secs_f64()})
        );
    }

    // 3. Cycle time against its theoretical minimum: one nest, no added latency.
    if part("ratio") {
        let meters = tmp.path().join("ratio-meters");
        let baud = 921_600u32;
        let ports = linked_nests(1, &meters, b.root, baud, Duration::ZERO).await;
        let (daemon, client) = cell(&mut b, "ratio", &ports, &image, 1000, 0).await;
        produce(&client, 2).await;
        let before = ports.counters[0].snapshot();
        let (_, cycles) = produce(&client, 10).await;
        let after = ports.counters[0].snapshot();
        drop(client);
        daemon.stop().await.unwrap();
        let bytes = (after.0 - before.0) + (after.1 - before.1);
        let wire_ms = bytes as f64 * 10.0 / baud as f64 * 1000.0 / cycles.len() as f64;
        let busy = meter_busy_ms(&meters);
        let cycle = mean(&cycles);
        println!(
            "{}",
            serde_json::json!({"metric": "cycle_ratio", "value": cycle / (wire_ms + busy), "cycle_ms": cycle, "wire_ms": wire_ms, "meter_busy_ms": busy})
        );
    }

    // 4. The HSM self-test that every start runs, on both tokens (goal: at most 1 s).
    if part("selftest") {
        let soft = hsm::testkit::TestToken::new("bench-selftest").unwrap();
        let kry = hsm::testkit::TestToken::kryoptic("bench-selftest").unwrap();
        let mut kry_config = kry.config(4);
        kry_config.trusted_wrap = false;
        for (token, h) in [
            ("softhsm", soft.open(4).unwrap()),
            ("kryoptic", hsm::Hsm::open(&kry_config).unwrap()),
        ] {
            let dir = tmp.path().join(format!("selftest-{token}"));
            std::fs::create_dir_all(&dir).unwrap();
            hsm::pki::init_dev(&h, &dir).unwrap();
            let mut ms = Vec::new();
            for _ in 0..5 {
                let r = station::engine::hsm_check::run(&h);
                assert!(r.passed(), "{r}");
                ms.push(u64::try_from(r.elapsed.as_micros()).unwrap_or(u64::MAX));
            }
            println!(
                "{}",
                serde_json::json!({"metric": "hsm_self_test_ms", "token": token, "value": mean(&ms) / 1000.0, "max_ms": ms.iter().max().copied().unwrap_or(0) as f64 / 1000.0, "runs": ms.len()})
            );
        }
    }
}
