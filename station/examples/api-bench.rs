//! The service API's speed (`cargo xtask bench api`). Prints one JSON object per line:
//!
//! - `round_trip_ms`: a command's round trip over the daemon's Unix socket (the client's call,
//!   the session and permission check in the journal, the engine, the answer), p50/p99/mean over
//!   2 000 calls, for `ListAlarms` (a command) and `Snapshot` (the whole line). Goal: p99 ≤ 2 ms.
//! - `events_per_second`: engine events delivered to 4 consoles following the line at once, each
//!   over its own connection and session. The events are published in the daemon as fast as the
//!   slowest console takes them (never more than 1 024 ahead of it, well inside the stream's
//!   buffers, so that none is lost: a console that falls behind would get a fresh snapshot
//!   instead, counted as `resyncs`, which must stay 0).
//!
//! The daemon runs in this process (its engine, its API on a Unix socket) with a SoftHSM token
//! and the demo PKI; the clients share the machine's cores with it.

// A benchmark tool: a failed set-up step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use station::Command;
use station::api::client::{Address, Client};
use station::api::convert::Update;
use station::config::Config;
use station::daemon::Daemon;
use station::engine::{Event, NestState, NestView};

mod common;

const PIN: &str = "246810";
const CALLS: usize = 2_000;
const CONSOLES: usize = 4;
const EVENTS: u64 = 100_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn nest(n: u32, i: u64) -> NestView {
    NestView {
        nest: n,
        name: format!("N{n}"),
        port: format!("/dev/ttyUSB{n}"),
        enabled: true,
        state: NestState::Busy,
        uid: Some("00112233445566778899aabb".into()),
        serial: Some(format!("DMW{i:09}")),
        step: Some(station::engine::Step::Firmware),
        progress: Some((i % 100) as f32 / 100.0),
        message: None,
        port_open: true,
        last_cycle_ms: Some(4_900),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let common::BenchCell { conf_head, .. } = common::bench_cell(dir, "apibench", "EM-300").await;
    std::fs::write(dir.join("station.toml"), conf_head).unwrap();
    let daemon = Daemon::start(Config::load(&dir.join("station.toml")).unwrap(), "stationd")
        .await
        .unwrap();
    let addr = Address::Unix(daemon.socket().to_path_buf());
    let client = Client::connect(&addr, "bench").await.unwrap();
    common::add_users(&client, PIN).await;

    // 1. Round trips.
    let oper = client.login("oper", PIN).await.unwrap().session;
    for (name, cmd) in [("ListAlarms", true), ("Snapshot", false)] {
        let mut ms = Vec::with_capacity(CALLS);
        for i in 0..CALLS + 200 {
            let t = Instant::now();
            if cmd {
                client.execute(&oper, Command::ListAlarms).await.unwrap();
            } else {
                client.snapshot(&oper).await.unwrap();
            }
            if i >= 200 {
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        ms.sort_by(f64::total_cmp);
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        println!(
            "{}",
            serde_json::json!({"metric": "round_trip_ms", "call": name, "p50": percentile(&ms, 0.5),
                "p99": percentile(&ms, 0.99), "mean": mean, "max": ms[ms.len() - 1], "calls": ms.len(), "goal_p99": 2.0})
        );
    }

    // 2. Events to four consoles at once.
    let mut consoles = Vec::new();
    let counts: Vec<Arc<AtomicU64>> = (0..CONSOLES).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for count in &counts {
        let count = Arc::clone(count);
        let c = Client::connect(&addr, "bench-console").await.unwrap();
        let s = c.login("oper", PIN).await.unwrap().session;
        let mut events = c.events(&s).await.unwrap();
        assert!(matches!(events.next().await, Some(Ok(Update::Snapshot(_)))));
        consoles.push(tokio::spawn(async move {
            let (mut got, mut resyncs) = (0u64, 0u64);
            let mut first: Option<Instant> = None;
            loop {
                match events.next().await {
                    Some(Ok(Update::Event(Event::Nest(n)))) => {
                        first.get_or_insert_with(Instant::now);
                        got += 1;
                        count.store(got, Ordering::Relaxed);
                        // The last event published carries nest 0.
                        if n.nest == 0 {
                            break;
                        }
                    }
                    Some(Ok(Update::Snapshot(_))) => resyncs += 1,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => panic!("console: {e}"),
                    None => break,
                }
            }
            let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
            drop(c);
            (got, resyncs, secs)
        }));
    }
    let engine = daemon.engine().clone();
    let t0 = Instant::now();
    for i in 0..EVENTS {
        engine.publish_for_load_test(Event::Nest(nest(1 + (i % 16) as u32, i)));
        if i % 256 == 255 {
            // Flow control: no more than 1 024 ahead of the slowest console.
            while counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .min()
                .unwrap_or(0)
                + 1024
                < i
            {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    }
    // The end marker, sent until every console has seen it (one that fell behind may have
    // skipped a copy in a resync).
    let marker = async {
        loop {
            engine.publish_for_load_test(Event::Nest(nest(0, EVENTS)));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let results = tokio::select! {
        r = futures_join(consoles) => r,
        _ = marker => unreachable!(),
    };
    let published_s = t0.elapsed().as_secs_f64();
    let delivered: u64 = results.iter().map(|r| r.0).sum();
    let resyncs: u64 = results.iter().map(|r| r.1).sum();
    let per_console: Vec<f64> = results
        .iter()
        .map(|r| if r.2 > 0.0 { r.0 as f64 / r.2 } else { 0.0 })
        .collect();
    println!(
        "{}",
        serde_json::json!({"metric": "events_per_second", "consoles": CONSOLES, "published": EVENTS,
            "delivered_total": delivered, "per_console": per_console,
            "total_per_second": delivered as f64 / published_s, "resyncs": resyncs, "seconds": published_s})
    );
    drop(client);
    daemon.stop().await.unwrap();
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, f64)>>,
) -> Vec<(u64, u64, f64)> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
