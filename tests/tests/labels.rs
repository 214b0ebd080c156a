//! Rating-plate labels printed at the cell: a fake ZPL printer on a loopback TCP port receives one
//! label per done meter; each is parsed (text fields and the QR code's data, `^FH` escapes
//! decoded) and checked against the journal. Reprints are a supervisor's, audited; a printer
//! that is gone is audited and stops nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{Cell, CellOptions, run_batch};
use tokio::io::AsyncReadExt;

/// A label printer: every connection's bytes, as received.
async fn printer() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&got);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            g.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf).into_owned());
        }
    });
    (addr, got, task)
}

/// The fields of one ZPL label (`^FD…^FS`, `^FH` escapes `_XX` decoded).
fn fields(zpl: &str) -> Vec<String> {
    assert!(
        zpl.trim_start().starts_with("^XA") && zpl.trim_end().ends_with("^XZ"),
        "{zpl}"
    );
    assert_eq!(
        zpl.matches("^XA").count(),
        1,
        "one label per connection: {zpl}"
    );
    zpl.split("^FD")
        .skip(1)
        .map(|f| {
            let raw = f.split("^FS").next().unwrap();
            let b = raw.as_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'_' && i + 2 < b.len() {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        })
        .collect()
}

async fn wait_labels(got: &Mutex<Vec<String>>, n: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let v = got.lock().unwrap().clone();
        if v.len() >= n || t.elapsed() > Duration::from_secs(15) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_label_per_done_meter_and_reprints_are_a_supervisors() {
    let (addr, got, task) = printer().await;
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 4,
        firmware_kib: 8,
        extra_config: format!("\n[labels]\nprinter = \"{addr}\"\n"),
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
    assert!(summary.batch_complete, "{summary:?}");
    let db = cell.db();
    let done: BTreeMap<String, String> = db
        .prepare("SELECT serial, upper(system_title) FROM meters WHERE state = 'done'")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(done.len(), 4);
    let labels = wait_labels(&got, 4).await;
    assert_eq!(labels.len(), 4, "one label per done meter: {labels:?}");
    let mut printed = BTreeMap::new();
    for l in &labels {
        let f = fields(l);
        let serial = f
            .iter()
            .find_map(|x| x.strip_prefix("S/N "))
            .expect("a serial number line")
            .to_string();
        let title = f
            .iter()
            .find_map(|x| x.strip_prefix("System title "))
            .expect("a system title line")
            .to_string();
        let qr = f
            .iter()
            .find_map(|x| x.strip_prefix("LA,"))
            .expect("a QR code");
        assert!(l.contains("^BQN"), "the code is a QR code: {l}");
        assert!(
            qr.starts_with(&format!("SN:{serial};ST:{title};LDN:")),
            "{qr}"
        );
        assert_eq!(f[0], hsm::pki::DEMO_ORGANIZATION, "the manufacturer first");
        printed.insert(serial, title);
    }
    assert_eq!(printed, done, "each done meter's serial and system title");

    // A reprint: a supervisor's, audited; an operator's is refused; an unknown serial is not
    // printed.
    let client = cell.client().await;
    let (serial, _) = done.iter().next().unwrap();
    let reprint = async |who: &station::Session, serial: String| {
        client
            .execute(who, station::Command::ReprintLabel { serial })
            .await
    };
    let oper = cell.login(&client, "oper").await;
    let e = reprint(&oper, serial.clone()).await.unwrap_err();
    assert!(
        e.to_string().contains("not allowed") || e.to_string().contains("may not"),
        "{e}"
    );
    let sup = cell.login(&client, "super").await;
    reprint(&sup, serial.clone()).await.unwrap();
    let e = reprint(&sup, "E2E999999999".into()).await.unwrap_err();
    assert!(e.to_string().contains("no done meter"), "{e}");
    let labels = wait_labels(&got, 5).await;
    assert_eq!(labels.len(), 5);
    assert!(fields(&labels[4]).contains(&format!("S/N {serial}")));
    let reprinted: String = db
        .query_row(
            "SELECT actor || ' ' || details FROM audit WHERE kind = 'label.reprinted'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        reprinted.starts_with("super ") && reprinted.contains(serial.as_str()),
        "{reprinted}"
    );

    // The printer gone: the failure is audited, nothing stops.
    task.abort();
    let _ = task.await;
    reprint(&sup, serial.clone()).await.unwrap();
    let t = Instant::now();
    while db
        .query_row(
            "SELECT count(*) FROM audit WHERE kind = 'label.failed'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
        == 0
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no label.failed entry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(daemon.engine().snapshot().halted.is_none());
    daemon.stop().await.unwrap();
}
