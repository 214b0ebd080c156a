//! One emulated jig nest: a sequence of meters on one port, each running the meter session over
//! its own flash directory, with line faults applied.
//!
//! The nest models the operator too: a meter is taken out when the station releases it
//! (RESET release) and a blank one is put in after `insert_delay`. A meter that has gone silent
//! (fault `silent-at`) is taken out when the station starts a new session with a HELLO, as an
//! operator would remove a meter the station gave up on; so is a meter the station worked on and
//! now only greets (three HELLOs in a row): it failed without being released, and the nest shows
//! it as failed.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use line_protocol::crypto::sha256;
use line_protocol::io::{Transport, system_rng};
use line_protocol::meter::{MeterEvent, MeterSession};
use line_protocol::msg::{ResetMode, ty};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::faults::Faults;
use crate::flash::{Capabilities, FlashMeter};
use crate::rng::NoiseRng;

/// Which meters of a nest get the faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultScope {
    /// The first `n` meters inserted.
    First(u32),
    /// Every meter.
    All,
}

/// How a nest behaves.
#[derive(Debug, Clone)]
pub struct NestConfig {
    /// Nest number (1-based), for UIDs and logs.
    pub nest: u32,
    /// Where meters keep their flash.
    pub state_dir: PathBuf,
    /// What meters advertise.
    pub caps: Capabilities,
    /// Provisioning root burned into every bootloader.
    pub root: p256::PublicKey,
    /// Faults.
    pub faults: Faults,
    /// Which meters get them.
    pub fault_scope: FaultScope,
    /// Meters to insert in all (`None`: as many as the station takes).
    pub meters: Option<u32>,
    /// Time between a release and the next meter.
    pub insert_delay: Duration,
    /// Seed for UIDs and noise (`None`: random UIDs).
    pub seed: Option<u64>,
    /// Emulated flash write speed in bytes per second (`None`: instant).
    pub flash_bytes_per_s: Option<u64>,
}

/// One line of `meters.jsonl`, the emulator's record of what it inserted and what became of it.
#[derive(Debug, Clone, Serialize)]
struct Record<'a> {
    nest: u32,
    index: u32,
    uid: String,
    event: &'a str,
    faults: bool,
    /// Time the meter spent processing (the emulated bootloader's own work), microseconds.
    busy_us: u64,
}

fn uid_for(seed: Option<u64>, nest: u32, index: u32) -> Vec<u8> {
    match seed {
        Some(s) => {
            let mut input = b"meter-sim uid".to_vec();
            input.extend_from_slice(&s.to_le_bytes());
            input.extend_from_slice(&nest.to_le_bytes());
            input.extend_from_slice(&index.to_le_bytes());
            sha256(&input)[..12].to_vec()
        }
        None => {
            let mut u = vec![0u8; 12];
            rand_core::Rng::fill_bytes(&mut system_rng(), &mut u);
            u
        }
    }
}

fn record(cfg: &NestConfig, index: u32, uid: &[u8], event: &str, faults: bool, busy_us: u64) {
    use std::io::Write;
    let line = Record {
        nest: cfg.nest,
        index,
        uid: hex::encode(uid),
        event,
        faults,
        busy_us,
    };
    if let Ok(text) = serde_json::to_string(&line)
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.state_dir.join("meters.jsonl"))
    {
        let _ = writeln!(f, "{text}");
    }
}

fn mangle(bytes: &[u8], faults: &Faults, rng: &mut NoiseRng) -> Vec<u8> {
    if faults.drop_bytes == 0.0 && faults.corrupt_bytes == 0.0 {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    for &b in bytes {
        if rng.chance(faults.drop_bytes) {
            continue;
        }
        if rng.chance(faults.corrupt_bytes) {
            out.push(b ^ (1 << rng.below(8)));
        } else {
            out.push(b);
        }
    }
    out
}

/// The outcome of a meter pulled out in the middle of a request (fault `swap-at`).
const SWAPPED: &str = "swapped";

/// Reads and throws away input for `d` (an empty nest, or a rebooting meter).
async fn discard_for(
    rd: &mut (impl AsyncReadExt + Unpin),
    buf: &mut [u8],
    d: Duration,
) -> io::Result<()> {
    let until = Instant::now() + d;
    loop {
        match tokio::time::timeout_at(until, rd.read(buf)).await {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Runs the nest until the transport closes or every meter has been released.
pub async fn run_nest(transport: Transport, cfg: NestConfig) -> io::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    let (mut rd, mut wr) = tokio::io::split(transport);
    let mut buf = vec![0u8; 32 * 1024];
    let mut noise = NoiseRng::new(cfg.seed.unwrap_or(0) ^ u64::from(cfg.nest) << 32);
    let mut index = 0u32;
    loop {
        if cfg.meters.is_some_and(|n| index >= n) {
            // Nothing left to insert: an empty nest ignores the station.
            loop {
                if rd.read(&mut buf).await? == 0 {
                    return Ok(());
                }
            }
        }
        let uid = uid_for(cfg.seed, cfg.nest, index);
        let faulty = match cfg.fault_scope {
            FaultScope::All => true,
            FaultScope::First(n) => index < n,
        };
        let faults = if faulty {
            cfg.faults.clone()
        } else {
            Faults::default()
        };
        let mut app = FlashMeter::open(
            &cfg.state_dir,
            &uid,
            cfg.caps.clone(),
            cfg.root,
            faults.clone(),
        )?;
        record(&cfg, index, &uid, "inserted", faulty, 0);
        tracing::info!(nest = cfg.nest, uid = %hex::encode(&uid), "meter inserted");
        let mut busy = Duration::ZERO;
        let outcome = run_meter(
            &mut rd, &mut wr, &mut buf, &mut app, &faults, &mut noise, &cfg, &mut busy,
        )
        .await?;
        record(&cfg, index, &uid, outcome, faulty, busy.as_micros() as u64);
        tracing::info!(nest = cfg.nest, uid = %hex::encode(&uid), outcome, "meter removed");
        index += 1;
        if outcome != SWAPPED {
            discard_for(&mut rd, &mut buf, cfg.insert_delay).await?;
        }
    }
}

// The nest's state lent to one meter; a struct would only rename the same eight things.
#[allow(clippy::too_many_arguments)]
async fn run_meter(
    rd: &mut (impl AsyncReadExt + Unpin),
    wr: &mut (impl AsyncWriteExt + Unpin),
    buf: &mut [u8],
    app: &mut FlashMeter,
    faults: &Faults,
    noise: &mut NoiseRng,
    cfg: &NestConfig,
    busy: &mut Duration,
) -> io::Result<&'static str> {
    let mut session = MeterSession::new(cfg.caps.max_payload);
    let mut rng = system_rng();
    let mut silent = false;
    let mut rebooted = false;
    let mut fw_size: Option<u32> = None;
    let mut watch = line_protocol::frame::FrameDecoder::new(4096);
    // Has the station gone past HELLO with this meter, and how many HELLOs since?
    let mut worked = false;
    let mut hellos = 0u32;
    let mut lost_one = false;
    let mut lost_types = std::collections::HashSet::new();
    let mut flash_free = Instant::now();
    loop {
        let n = rd.read(buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let input = mangle(&buf[..n], faults, noise);
        if silent {
            // The station gave up and starts over: the operator swaps the dead meter.
            if contains_hello(&mut watch, &input) {
                return Ok("removed-silent");
            }
            continue;
        }
        let started = std::time::Instant::now();
        let out = session.receive(&input, app, &mut rng);
        *busy += started.elapsed();
        let mut released = false;
        let mut reboot_now = false;
        let mut replay = false;
        let mut lose = false;
        let mut flash_bytes = 0u64;
        for ev in &out.events {
            match ev {
                MeterEvent::Handled { msg_type, .. } => {
                    // The nest model of section 6.6: a CHANNEL_OPEN (whatever its answer) means
                    // the station worked on this meter; any request but HELLO ends a run of
                    // HELLOs.
                    if *msg_type == ty::HELLO {
                        hellos += 1;
                    } else {
                        worked |= *msg_type == ty::CHANNEL_OPEN;
                        hellos = 0;
                    }
                    if faults.silent_at == Some(*msg_type) {
                        silent = true;
                    }
                    if faults.swap_at == Some(*msg_type) {
                        // Out before its answer leaves; the next meter is already in.
                        return Ok(SWAPPED);
                    }
                    if faults.replay_after == Some(*msg_type) {
                        replay = true;
                    }
                    if faults.lose_response == Some(*msg_type) && !lost_one {
                        lost_one = true;
                        lose = true;
                    }
                    if faults.lose_response_all && lost_types.insert(*msg_type) {
                        lose = true;
                    }
                    if *msg_type == ty::FW_BEGIN {
                        fw_size = app.state().staging.as_ref().map(|s| s.0);
                    }
                }
                MeterEvent::FwBlock { offset, len } => {
                    flash_bytes += u64::from(*len);
                    if let (Some(pct), Some(size), false) =
                        (faults.reboot_at_percent, fw_size, rebooted)
                        && u64::from(offset + len) * 100 >= u64::from(size) * u64::from(pct)
                    {
                        reboot_now = true;
                    }
                }
                MeterEvent::Reset(ResetMode::Release) => released = true,
                MeterEvent::Reset(_) => session.reboot(),
                MeterEvent::Reworked => {
                    tracing::info!(nest = cfg.nest, "meter returned to blank by a rework token");
                }
                _ => {}
            }
        }
        if let (Some(rate), true) = (cfg.flash_bytes_per_s, flash_bytes > 0) {
            // The flash writes at its rate from when it is free: the deadline carries over from
            // block to block, so the timer's rounding does not add up over a transfer.
            let write = Duration::from_micros(flash_bytes * 1_000_000 / rate.max(1));
            flash_free = flash_free.max(Instant::now()) + write;
            tokio::time::sleep_until(flash_free).await;
        }
        if silent {
            continue;
        }
        if worked && hellos >= 3 {
            // The station gave up on this meter without releasing it: the operator takes it out.
            return Ok("removed-failed");
        }
        if reboot_now {
            rebooted = true;
            session.reboot();
            tracing::info!(nest = cfg.nest, "meter reboots mid-transfer (fault)");
            discard_for(rd, buf, Duration::from_millis(300)).await?;
            continue;
        }
        if lose {
            tracing::info!(nest = cfg.nest, "an answer is lost on the line (fault)");
            continue;
        }
        if !out.bytes.is_empty() {
            if faults.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
            }
            let bytes = mangle(&out.bytes, faults, noise);
            wr.write_all(&bytes).await?;
            if replay {
                // The same authentic frame a second time: its counter is not new.
                wr.write_all(&bytes).await?;
            }
            wr.flush().await?;
        }
        if released {
            return Ok("released");
        }
    }
}

/// Does this input complete a HELLO frame?
fn contains_hello(dec: &mut line_protocol::frame::FrameDecoder, input: &[u8]) -> bool {
    let mut out = Vec::new();
    dec.push(input, &mut out);
    out.iter().any(
        |d| matches!(d, line_protocol::frame::Decoded::Frame(f) if f.header.msg_type == ty::HELLO),
    )
}
