//! The line's PLC drives the nests over Modbus TCP (schemas/plc-modbus.md), played by a client
//! we did not write: Python's `pymodbus`, over a real socket to the daemon's server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use e2e::{Cell, CellOptions};

/// A PLC program: for each nest, START when READY, wait for BUSY, then PASS or FAIL, drop
/// START; until `want` meters passed. Prints what it saw as JSON.
const PLC: &str = r#"
import json, sys, time
from pymodbus.client import ModbusTcpClient

host, port, nests, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
source = (sys.argv[5], 0) if len(sys.argv) > 5 else None
c = ModbusTcpClient(host, port=port, source_address=source, timeout=2, retries=0)
if not c.connect():
    print(json.dumps({"refused": "connect"}))
    sys.exit(0)
try:
    head = c.read_input_registers(0, count=3)
except Exception as e:  # the server closed the connection
    print(json.dumps({"refused": repr(e)}))
    sys.exit(0)
if head.isError():
    print(json.dumps({"refused": str(head)}))
    sys.exit(0)
log, state, busy_seen = [], ["low"] * nests, [False] * nests
passes = fails = 0
deadline = time.time() + 120
while passes < want and time.time() < deadline:
    bits = c.read_discrete_inputs(0, count=4 * nests).bits
    for n in range(nests):
        ready, busy, ok, bad = bits[4 * n:4 * n + 4]
        if state[n] == "low" and ready:
            c.write_coil(n, True)
            state[n] = "high"
            log.append([n + 1, "START"])
        elif state[n] == "high":
            if busy and not busy_seen[n]:
                busy_seen[n] = True
                log.append([n + 1, "BUSY"])
            if ok or bad:
                log.append([n + 1, "PASS" if ok else "FAIL"])
                passes += int(ok)
                fails += int(bad)
                c.write_coil(n, False)
                state[n] = "low"
                busy_seen[n] = False
    time.sleep(0.01)
bad_address = c.read_input_registers(16 + 4 * nests, count=1)
print(json.dumps({
    "head": head.registers, "log": log, "passes": passes, "fails": fails,
    "counters": c.read_input_registers(16, count=4 * nests).registers,
    "beyond_the_map": bad_address.isError(),
}))
"#;

fn plc(
    addr: std::net::SocketAddr,
    nests: u32,
    want: u32,
    source: Option<&str>,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("plc.py");
    std::fs::write(&script, PLC).unwrap();
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(nests.to_string())
        .arg(want.to_string());
    if let Some(s) = source {
        cmd.arg(s);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the PLC script failed (pymodbus missing? run through `cargo xtask test`): {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plc_drives_the_batch_with_start_busy_pass_and_fail() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 4,
        firmware_kib: 8,
        faults: vec![(2, "wrong-hash".into())],
        extra_config:
            "\n[plc]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\nstart = \"plc\"\n".into(),
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let addr = daemon.plc_addr().expect("the PLC's server listens");
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    client
        .execute(&oper, station::Command::StartLine)
        .await
        .unwrap();
    // The line runs, the meters sit in their nests: nothing starts without the PLC.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let db = cell.db();
    let q = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q("SELECT count(*) FROM meters"),
        0,
        "a nest started without START"
    );
    let nests = daemon.engine().snapshot().nests;
    assert!(
        nests
            .iter()
            .all(|n| n.message.as_deref() == Some("waiting for the PLC's START")),
        "{nests:?}"
    );

    let seen = tokio::task::spawn_blocking(move || plc(addr, 2, 4, None))
        .await
        .unwrap();
    assert_eq!(seen["head"], serde_json::json!([1, 2, 1]), "{seen}");
    assert_eq!(seen["passes"], 4, "{seen}");
    assert_eq!(seen["beyond_the_map"], true);
    // Each nest's cycles: START, then BUSY, then PASS or FAIL; a PASS always after BUSY. (A
    // FAIL may come without a BUSY the PLC saw: a nest started when the batch had just got all
    // its meters refuses its meter at once.)
    for nest in [1, 2] {
        let events: Vec<String> = seen["log"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e[0] == nest)
            .map(|e| e[1].as_str().unwrap().to_string())
            .collect();
        let mut cycles: Vec<Vec<&str>> = Vec::new();
        for e in &events {
            if e == "START" {
                cycles.push(Vec::new());
            }
            cycles
                .last_mut()
                .expect("a cycle begins with START")
                .push(e);
        }
        // The PLC stops when the batch is complete: a nest's last cycle may still be running.
        if cycles
            .last()
            .is_some_and(|c| !c.contains(&"PASS") && !c.contains(&"FAIL"))
        {
            cycles.pop();
        }
        for c in &cycles {
            match c[..] {
                ["START", "BUSY", "PASS"] | ["START", "BUSY", "FAIL"] | ["START", "FAIL"] => {}
                _ => panic!("nest {nest}: {events:?}"),
            }
        }
        if nest == 2 {
            assert_eq!(
                cycles[0],
                ["START", "BUSY", "FAIL"],
                "the first meter of nest 2 is faulted"
            );
        }
    }
    // What the PLC saw agrees with the journal: every done meter passed, every failed record
    // failed (a refused meter has no record).
    let counters = seen["counters"].as_array().unwrap();
    let done = counters[2].as_i64().unwrap() + counters[6].as_i64().unwrap();
    let failed = counters[3].as_i64().unwrap() + counters[7].as_i64().unwrap();
    assert_eq!(done, q("SELECT count(*) FROM meters WHERE state = 'done'"));
    assert!(failed >= q("SELECT count(*) FROM meters WHERE state = 'failed'"));
    assert_eq!(seen["fails"].as_i64().unwrap(), failed);
    assert_eq!(done, 4, "the batch is complete, driven by the PLC alone");

    // Modbus has no log-in: a connection from another address is closed and audited.
    let refused = tokio::task::spawn_blocking(move || plc(addr, 2, 0, Some("127.0.0.2")))
        .await
        .unwrap();
    assert!(refused.get("refused").is_some(), "{refused}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(q("SELECT count(*) FROM audit WHERE kind = 'plc.refused'") >= 1);
    let _ = client.logout(&oper).await;
    daemon.stop().await.unwrap();
}
