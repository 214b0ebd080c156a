//! Wire efficiency of the firmware step (`cargo xtask bench link`).
//!
//! A station-side link and an emulated meter, joined by `linksim` over two pseudo-terminals, the
//! secure channel on. For each baud rate and image kind, the time from FW_BEGIN to the meter's
//! verified FW_RESULT is measured and compared with the ideal wire time of the image,
//! `10 · bytes / baud`, and with the slower of that and the meter's flash time (rows with a
//! window-1, 2048-byte meter and a 64 KiB/s flash). Prints one JSON object per line.

// A benchmark tool: a failed set-up step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/util.rs"]
mod util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use line_protocol::firmware::{PlanParams, TransferPlan};
use line_protocol::msg::{AnchorKind, Message};
use meter_sim::faults::Faults;
use meter_sim::firmware::{firmware_like_payload, random_payload};
use meter_sim::flash::Capabilities;
use meter_sim::linksim::LinkParams;
use meter_sim::nest::{FaultScope, NestConfig, run_nest};

const LATENCY_MS: u32 = 4;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let pki = util::SoftPki::new();
    let payload_len = 256 * 1024;
    let images = [
        ("random", pki.image(&random_payload(payload_len, 1))),
        (
            "firmware-like",
            pki.image(&firmware_like_payload(payload_len, 0.6, 1)),
        ),
    ];
    // The default meter with both images; a window-1, 2048-byte meter and a meter whose flash
    // writes 64 KiB/s with the random image.
    let mut rows = Vec::new();
    for baud in [115_200u32, 921_600] {
        for (kind, image) in &images {
            rows.push((baud, *kind, image, Meter::Default));
        }
        rows.push((baud, "random", &images[0].1, Meter::Window1));
        rows.push((baud, "random", &images[0].1, Meter::SlowFlash));
    }
    for (baud, kind, image, meter) in rows {
        let r = run(baud, image, &pki, meter).await;
        // The slower of the wire and the meter's flash bounds the transfer.
        let flash_s = meter
            .flash_bytes_per_s()
            .map(|rate| image.len() as f64 / rate as f64)
            .unwrap_or(0.0);
        let bound_s = r.ideal_s.max(flash_s);
        println!(
            "{}",
            serde_json::json!({
                "baud": baud,
                "latency_ms": LATENCY_MS,
                "meter": meter.name(),
                "image": kind,
                "bytes": image.len(),
                "ideal_s": r.ideal_s,
                "flash_s": flash_s,
                "measured_s": r.measured_s,
                "efficiency": r.ideal_s / r.measured_s,
                "efficiency_vs_bound": bound_s / r.measured_s,
                "wire_bytes": r.wire_bytes,
                "frames": r.frames,
                "retransmits": r.retransmits,
            })
        );
    }
}

/// The emulated meter of a row.
#[derive(Debug, Clone, Copy)]
enum Meter {
    /// meter-sim's defaults (window 16, 16 KiB payloads, fast flash).
    Default,
    /// A meter that buffers one frame of 2048 bytes.
    Window1,
    /// A meter whose flash writes 64 KiB/s.
    SlowFlash,
}

impl Meter {
    fn name(self) -> &'static str {
        match self {
            Meter::Default => "default",
            Meter::Window1 => "window-1, 2048-byte frames",
            Meter::SlowFlash => "flash 64 KiB/s",
        }
    }

    fn caps(self) -> Capabilities {
        match self {
            Meter::Window1 => Capabilities {
                window: 1,
                max_payload: 2048,
                ..Capabilities::default()
            },
            _ => Capabilities::default(),
        }
    }

    fn flash_bytes_per_s(self) -> Option<u64> {
        match self {
            Meter::SlowFlash => Some(64 * 1024),
            _ => None,
        }
    }
}

struct Result {
    ideal_s: f64,
    measured_s: f64,
    wire_bytes: u64,
    frames: u64,
    retransmits: u64,
}

async fn run(baud: u32, image: &[u8], pki: &util::SoftPki, meter: Meter) -> Result {
    let state = tempfile::tempdir().expect("temp dir");
    let (master, _slave, meter_path) = line_protocol::io::pty_pair().expect("pty");
    let cfg = NestConfig {
        nest: 1,
        state_dir: state.path().to_path_buf(),
        caps: meter.caps(),
        root: meter_sim::load_root(&util::root_cert_path()).expect("root"),
        faults: Faults::default(),
        fault_scope: FaultScope::All,
        meters: None,
        insert_delay: Duration::ZERO,
        seed: Some(1),
        flash_bytes_per_s: meter.flash_bytes_per_s(),
    };
    let nest = tokio::spawn(run_nest(master, cfg));
    let params = LinkParams {
        baud,
        latency: Duration::from_millis(u64::from(LATENCY_MS)),
        ..LinkParams::default()
    };
    let (path, _keep, link_task) = util::link_through(&meter_path, params).await;
    let mut link = util::connect(&path, baud, LATENCY_MS).await;
    util::open(&mut link)
        .await
        .unwrap_or_else(|e| panic!("channel: {e:?}"));
    link.call(&Message::PutAnchor {
        kind: AnchorKind::FirmwareVerification,
        index: 0,
        der: pki.fw_cert.clone(),
    })
    .await
    .expect("anchor");
    let neg = link.session().negotiated().expect("negotiated");
    let plan = TransferPlan::new(
        image,
        PlanParams {
            max_payload: neg.max_payload,
            max_block: neg.max_block,
            compress: neg.compression,
        },
    );
    let out_before = link.stats().bytes_out;
    let t0 = Instant::now();
    let have = match link
        .call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: u8::from(neg.compression),
        })
        .await
        .expect("FW_BEGIN")
    {
        Message::FwBeginRsp { have } => have,
        other => panic!("{other:?}"),
    };
    let stats = link
        .send_firmware(Arc::clone(&plan), have, &mut |_, _| {})
        .await
        .expect("transfer");
    match link
        .call_sized(&Message::FwEnd, plan.size)
        .await
        .expect("FW_END")
    {
        Message::FwResult(r) if r.status == 0 && r.sha256 == plan.sha256 => {}
        other => panic!("image not verified: {other:?}"),
    }
    let measured_s = t0.elapsed().as_secs_f64();
    let wire_bytes = link.stats().bytes_out - out_before;
    link_task.abort();
    nest.abort();
    Result {
        ideal_s: 10.0 * image.len() as f64 / f64::from(baud),
        measured_s,
        wire_bytes,
        frames: stats.frames_sent,
        retransmits: stats.fast_retransmits + stats.timeout_retransmits,
    }
}
