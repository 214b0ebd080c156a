//! `linksim`: a serial line between two byte streams, at a baud rate, with latency and noise.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use line_protocol::io::{PortAddr, PtySlave, Transport};
use meter_sim::linksim::{LinkParams, spawn};

#[derive(Parser, Debug)]
#[command(
    name = "linksim",
    version,
    about = "Joins two byte streams as a serial line: baud rate (10 wire bits per byte), latency, bit errors, drops",
    long_about = "Joins endpoint A and endpoint B. An endpoint is `pty` (a new pseudo-terminal; its path is \
printed as a JSON line {\"side\":\"a\",\"path\":...}), a device path (opened as a serial port), \
tcp://HOST:PORT (connect) or tcp-listen://HOST:PORT (accept one connection). Typical use: \
--a <the path meter-sim printed> --b pty, then point the station at the printed path."
)]
struct Args {
    /// Endpoint A.
    #[arg(long)]
    a: String,
    /// Endpoint B.
    #[arg(long)]
    b: String,
    /// Baud rate of the emulated line.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// One-way latency in milliseconds (turnaround adds it in each direction).
    #[arg(long, default_value_t = 4.0)]
    latency_ms: f64,
    /// Bit-error rate (probability per data bit).
    #[arg(long, default_value_t = 0.0)]
    ber: f64,
    /// Probability that a byte is lost.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Seed for the noise (same seed, same errors).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bytes buffered per direction before the sender is held back.
    #[arg(long, default_value_t = 4096)]
    buffer: usize,
}

async fn endpoint(side: &str, spec: &str, keep: &mut Vec<PtySlave>) -> Result<Transport> {
    if spec == "pty" {
        let (master, slave, path) = line_protocol::io::pty_pair()?;
        keep.push(slave);
        println!("{}", serde_json::json!({ "side": side, "path": path }));
        return Ok(master);
    }
    if let Some(addr) = spec.strip_prefix("tcp-listen://") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("{}", serde_json::json!({ "side": side, "listening": addr }));
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        return Ok(Box::pin(s));
    }
    let addr = PortAddr::parse(spec)?;
    Ok(line_protocol::io::open(&addr, 115_200).await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.baud == 0 {
        bail!("--baud must be positive");
    }
    if !(0.0..=1.0).contains(&args.ber) || !(0.0..=1.0).contains(&args.drop_rate) {
        bail!("--ber and --drop-rate are probabilities between 0 and 1");
    }
    if !(0.0..=10_000.0).contains(&args.latency_ms) {
        bail!("--latency-ms must be between 0 and 10000");
    }
    let mut keep = Vec::new();
    let a = endpoint("a", &args.a, &mut keep).await?;
    let b = endpoint("b", &args.b, &mut keep).await?;
    let params = LinkParams {
        baud: args.baud,
        latency: Duration::from_secs_f64(args.latency_ms / 1000.0),
        ber: args.ber,
        drop_rate: args.drop_rate,
        seed: args.seed,
        buffer: args.buffer.max(1),
    };
    println!("{}", serde_json::json!({ "ready": true }));
    let (handle, counters) = spawn(a, b, params);
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = handle => {}
    }
    let (ab, ba, flips, drops) = counters.snapshot();
    eprintln!(
        "linksim: {ab} bytes a->b, {ba} bytes b->a, {flips} bits flipped, {drops} bytes dropped"
    );
    drop(keep);
    Ok(())
}
