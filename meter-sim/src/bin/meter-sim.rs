//! `meter-sim`: emulated meters in jig nests, on pseudo-terminals, serial ports or TCP.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use line_protocol::io::{PortAddr, Transport};
use meter_sim::faults::{FAULT_HELP, Faults};
use meter_sim::flash::Capabilities;
use meter_sim::nest::{FaultScope, NestConfig, run_nest};

#[derive(Parser, Debug)]
#[command(
    name = "meter-sim",
    version,
    about = "Emulated smart-meter bootloaders in jig nests, for tests, demos and commissioning",
    long_about = "Emulates one or more jig nests. Each nest holds one meter at a time speaking the jig \
line protocol; when the station releases a meter (or gives up on a silent one) the next blank meter \
is inserted. Every meter keeps its flash as files under --state-dir/<uid>/ so that what it received \
can be inspected.\n\nWithout --port, each nest gets a new pseudo-terminal and its path is printed as \
a JSON line {\"nest\":N,\"path\":\"/dev/pts/K\"} on standard output, followed by {\"ready\":true}.",
    after_help = format!("FAULTS (--fault [NEST:]SPEC, repeatable):\n{FAULT_HELP}")
)]
struct Args {
    /// Number of nests (each on its own pseudo-terminal unless --port is given).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    nests: u32,
    /// Serve on these ports instead of new pseudo-terminals: a device path, tcp://HOST:PORT
    /// (connect) or tcp-listen://HOST:PORT (accept one connection). One per nest.
    #[arg(long = "port")]
    ports: Vec<String>,
    /// Directory holding every meter's flash.
    #[arg(long)]
    state_dir: PathBuf,
    /// The provisioning root the bootloaders trust: certificate or public key, PEM or DER.
    #[arg(long)]
    root: PathBuf,
    /// Model name the meters report.
    #[arg(long, default_value = "EM-300")]
    model: String,
    /// Largest frame payload the meters accept.
    #[arg(long, default_value_t = 16384)]
    max_payload: u16,
    /// Frames the meters buffer.
    #[arg(long, default_value_t = 16)]
    window: u8,
    /// Largest decompressed firmware block.
    #[arg(long, default_value_t = 65536)]
    max_block: u32,
    /// Firmware slot size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    slot_size: u32,
    /// Meters without DEFLATE support.
    #[arg(long)]
    no_deflate: bool,
    /// Meters without a key generator (keys must come wrapped from the HSM).
    #[arg(long)]
    no_keygen: bool,
    /// Meters that know only the AES-ECB key transport (line protocol 5.3), not the X9.63 one.
    #[arg(long)]
    no_ktk_x963: bool,
    /// Meters whose bootloader does not offer REWORK (line protocol 4.16): a sealed meter stays
    /// sealed.
    #[arg(long)]
    no_rework: bool,
    /// A fault, optionally for one nest only: "2:wrong-hash". See FAULTS below.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Which meters of a nest get its faults: the first N, or "all".
    #[arg(long, default_value = "1")]
    fault_meters: String,
    /// Meters to insert per nest (default: as many as the station takes).
    #[arg(long)]
    meters: Option<u32>,
    /// Milliseconds between a release and the next meter.
    #[arg(long, default_value_t = 0)]
    insert_delay_ms: u64,
    /// Seed for UIDs and line noise (repeatable runs); random UIDs without it.
    #[arg(long)]
    seed: Option<u64>,
    /// Emulated flash write speed in KiB/s (default: instant).
    #[arg(long)]
    flash_kibps: Option<u64>,
}

async fn open_port(spec: &str) -> Result<Transport> {
    if let Some(addr) = spec.strip_prefix("tcp-listen://") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{}", serde_json::json!({ "listening": addr }));
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        return Ok(Box::pin(s));
    }
    let addr = PortAddr::parse(spec)?;
    Ok(line_protocol::io::open(&addr, 115_200).await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("METER_SIM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.ports.is_empty() && args.ports.len() != args.nests as usize && args.nests != 1 {
        bail!(
            "give one --port per nest ({} ports for {} nests)",
            args.ports.len(),
            args.nests
        );
    }
    let nests = if args.ports.is_empty() {
        args.nests
    } else {
        args.ports.len() as u32
    };
    let root = meter_sim::load_root(&args.root).map_err(anyhow::Error::msg)?;
    let caps = Capabilities {
        model: args.model.clone(),
        max_payload: args.max_payload,
        window: args.window,
        deflate: !args.no_deflate,
        keygen: !args.no_keygen,
        ktk_x963: !args.no_ktk_x963,
        rework: !args.no_rework,
        max_block: args.max_block,
        slot_size: args.slot_size,
        ..Capabilities::default()
    };
    let scope = if args.fault_meters == "all" {
        FaultScope::All
    } else {
        FaultScope::First(
            args.fault_meters
                .parse()
                .context("--fault-meters takes a number or \"all\"")?,
        )
    };
    let mut per_nest = vec![Faults::default(); nests as usize];
    for spec in &args.faults {
        let (target, fault) = match spec.split_once(':') {
            Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                let n: usize = n.parse()?;
                if n == 0 || n > nests as usize {
                    bail!("fault {spec:?} names nest {n}, but there are {nests} nests");
                }
                (Some(n - 1), rest)
            }
            _ => (None, spec.as_str()),
        };
        for (i, f) in per_nest.iter_mut().enumerate() {
            if target.is_none_or(|t| t == i) {
                f.add(fault).map_err(anyhow::Error::msg)?;
            }
        }
    }
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create {}", args.state_dir.display()))?;
    let mut tasks = Vec::new();
    let mut keep_slaves = Vec::new();
    for k in 0..nests {
        let transport = if args.ports.is_empty() {
            let (master, slave, path) = line_protocol::io::pty_pair()?;
            keep_slaves.push(slave);
            println!("{}", serde_json::json!({ "nest": k + 1, "path": path }));
            master
        } else {
            open_port(&args.ports[k as usize]).await?
        };
        let cfg = NestConfig {
            nest: k + 1,
            state_dir: args.state_dir.clone(),
            caps: caps.clone(),
            root,
            faults: per_nest[k as usize].clone(),
            fault_scope: scope,
            meters: args.meters,
            insert_delay: Duration::from_millis(args.insert_delay_ms),
            seed: args.seed,
            flash_bytes_per_s: args.flash_kibps.map(|k| k * 1024),
        };
        tasks.push(tokio::spawn(run_nest(transport, cfg)));
    }
    println!("{}", serde_json::json!({ "ready": true }));
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        r = futures_first(tasks) => {
            if let Err(e) = r {
                eprintln!("meter-sim: {e}");
                std::process::exit(1);
            }
        }
    }
    drop(keep_slaves);
    Ok(())
}

/// Waits for every nest; returns the first error.
async fn futures_first(tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>) -> Result<()> {
    for t in tasks {
        t.await??;
    }
    Ok(())
}
