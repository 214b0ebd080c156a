//! `cargo xtask bench gui` (its OPC UA part): how soon a nest's state change reaches a
//! subscribed OPC UA client while 16 nests run. A cell of 16 emulated nests runs a batch; a
//! client we did not write (Python's `asyncua`) subscribes to every nest's `State` over
//! Basic256Sha256 SignAndEncrypt and measures, for each change it is told of, the time from the
//! value's source timestamp (set by the station when the engine reported the change) to its
//! arrival. Both run on this machine, so the clocks agree.
//!
//! Prints one JSON line: `{"metric": "opcua_state_latency", "nests": 16, "changes": N,
//! "p50_ms": F, "p99_ms": F, "max_ms": F, "meters": N, "seconds": F}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::{Cell, CellOptions};

const NESTS: u32 = 16;
const METERS: i64 = 320;

const CLIENT: &str = r#"
import asyncio, datetime, json, sys, time
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

url, d, pin, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
lat = []

class H:
    def datachange_notification(self, node, val, data):
        ts = data.monitored_item.Value.SourceTimestamp
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=datetime.timezone.utc)
        lat.append((time.time() - ts.timestamp()) * 1000.0)

async def main():
    c = Client(url, timeout=10)
    c.application_uri = "urn:test:mes"
    c.set_user("super")
    c.set_password(pin)
    await c.set_security(SecurityPolicyBasic256Sha256, f"{d}/bench.pem", f"{d}/bench-key.pem",
                         server_certificate=f"{d}/server.pem", mode=ua.MessageSecurityMode.SignAndEncrypt)
    await c.connect()
    ns = await c.get_namespace_index("urn:smart-meter-cell:station")
    mi = await c.get_namespace_index("http://opcfoundation.org/UA/Machinery/")
    cell = (await (await c.nodes.objects.get_child([f"{mi}:Machines"])).get_children())[0]
    nests = await (await cell.get_child([f"{ns}:Nests"])).get_children()
    states = [await n.get_child([f"{ns}:State"]) for n in nests]
    sub = await c.create_subscription(10, H())
    await sub.subscribe_data_change(states, queuesize=100)
    print("subscribed", flush=True)
    await asyncio.sleep(seconds)
    await c.disconnect()
    # The first notification of each item is its value at subscription time: not a change.
    changes = sorted(lat[len(states):])
    p = lambda q: changes[min(len(changes) - 1, int(round((len(changes) - 1) * q)))] if changes else float("nan")
    print(json.dumps({"changes": len(changes), "p50_ms": p(0.5), "p99_ms": p(0.99), "max_ms": changes[-1] if changes else float("nan")}), flush=True)

asyncio.run(main())
"#;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let cell = Cell::new(CellOptions {
        nests: NESTS,
        quantity: METERS,
        firmware_kib: 16,
        ..CellOptions::default()
    })
    .await;
    let d = cell.path("opcua-client");
    std::fs::create_dir_all(&d).unwrap();
    e2e::enable_opcua(&cell, &d, &[("bench", None, true)]).await;
    let script = cell.path("opcua_bench.py");
    std::fs::write(&script, CLIENT).unwrap();
    let daemon = cell.daemon().await;
    let addr = daemon.opcua_addr().unwrap();
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let seconds = 25.0;
    let mut child = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(format!("opc.tcp://127.0.0.1:{}/", addr.port()))
        .arg(&d)
        .arg(&cell.pins["super"])
        .arg(seconds.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .unwrap();
    assert_eq!(line.trim(), "subscribed", "the client did not subscribe");
    // The line runs while the client listens.
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let t0 = Instant::now();
    client
        .execute(&oper, station::Command::StartLine)
        .await
        .unwrap();
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut out, &mut rest)
        .await
        .unwrap();
    let status = child.wait().await.unwrap();
    assert!(status.success(), "the asyncua client failed");
    let elapsed = t0.elapsed();
    let _ = client.execute(&oper, station::Command::StopLine).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let meters: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM meters WHERE state = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    v["metric"] = "opcua_state_latency".into();
    v["nests"] = NESTS.into();
    v["meters"] = meters.into();
    v["seconds"] = ((elapsed.as_secs_f64() * 10.0).round() / 10.0).into();
    println!("{v}");
    daemon.stop().await.unwrap();
}
