//! The cell's own resources failing under a running batch: the disk holding the journal fills up,
//! the HSM goes away. Each time the station stops the line with the reason, loses nothing it had
//! committed, and finishes the batch once the resource is back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::Duration;

use e2e::{Cell, CellOptions, assert_journal_consistent, run_batch};
use station::Session;
use station::api::client::Client;
use station::engine::Event;
use station::run::{Summary, run_line};

/// A small tmpfs mounted for the life of the value (the journal's "disk").
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(path: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let out = Process::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a small tmpfs for the journal needs root (as `cargo xtask test` runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Fills the disk, then frees `headroom` bytes.
    fn fill(&self, headroom: u64) -> PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        drop(f);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .unwrap();
        f.set_len(written.saturating_sub(headroom)).unwrap();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Process::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A cell of two nests with a small firmware image, for a batch of `quantity` meters.
async fn two_nest_cell(quantity: i64) -> Cell {
    Cell::new(CellOptions {
        nests: 2,
        quantity,
        firmware_kib: 8,
        ..CellOptions::default()
    })
    .await
}

/// Runs the line through the daemon's API until the batch completes or the station stops it;
/// returns the summary.
async fn run_for_a_while(client: &Client, oper: &Session) -> Summary {
    tokio::time::timeout(
        Duration::from_secs(300),
        run_line(client, oper, false, true),
    )
    .await
    .expect("the line neither completed nor stopped")
    .unwrap()
}

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_the_line_and_loses_nothing() {
    let quantity = 12;
    let cell = two_nest_cell(quantity).await;
    // Move the journal onto a disk of its own, nearly full.
    let disk = SmallDisk::mount(&cell.path("journal"), "16m");
    for f in ["station.db", "station.db-wal"] {
        if cell.path(f).exists() {
            std::fs::copy(cell.path(f), disk.path.join(f)).unwrap();
            std::fs::remove_file(cell.path(f)).unwrap();
        }
    }
    let _ = std::fs::remove_file(cell.path("station.db-shm"));
    let text = std::fs::read_to_string(&cell.config).unwrap();
    std::fs::write(
        &cell.config,
        text.replace(
            "database = \"station.db\"",
            "database = \"journal/station.db\"",
        ),
    )
    .unwrap();
    let filler = disk.fill(600 * 1024);
    let journal = || rusqlite::Connection::open(disk.path.join("station.db")).unwrap();

    // The line runs until the journal cannot take the next commit, then the station stops it.
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let summary = run_for_a_while(&client, &oper).await;
    drop(client);
    let _ = daemon.stop().await;
    let why = summary
        .halted
        .clone()
        .expect("the station stopped the line");
    assert!(why.contains("disk holding the journal is full"), "{why}");
    assert!(!summary.batch_complete, "{summary}");
    assert!(
        summary.to_string().contains("THE STATION STOPPED THE LINE"),
        "{summary}"
    );
    assert!(summary.done >= 1, "some meters fit before the disk filled");
    let done_before = count(
        &journal(),
        "SELECT count(*) FROM meters WHERE state = 'done'",
    );
    assert_eq!(
        done_before, summary.done,
        "every meter reported done is in the journal"
    );

    // Meters that had a record when the disk filled (the full disk may as well have stopped the
    // next meters before their record, which leaves them untouched).
    let in_flight = count(
        &journal(),
        "SELECT count(*) FROM meters WHERE state NOT IN ('done', 'failed')",
    );

    // Space is freed; the station starts again, fails what was in flight, finishes the batch.
    std::fs::remove_file(&filler).unwrap();
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let db = journal();
    assert_journal_consistent(&db, quantity);
    let recovered = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'station.recovery'",
    );
    assert_eq!(
        recovered > 0,
        in_flight > 0,
        "the {in_flight} meters in flight when the disk filled were failed at the restart"
    );
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_hsm_that_goes_away_stops_the_line_until_it_is_back() {
    let quantity = 10;
    let cell = two_nest_cell(quantity).await;
    let daemon = cell.daemon().await;
    let engine = daemon.engine().clone();
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let mut events = engine.subscribe();
    let tokens = hsm::testkit::dir().unwrap().join("tokens");
    let away = hsm::testkit::dir().unwrap().join("tokens-away");
    // After the second meter, the token is unplugged: its files are gone and the library is
    // reset, as when a network HSM drops every session.
    let unplug = async {
        let mut done = 0;
        while done < 2 {
            if let Ok(Event::MeterFinished { ok: true, .. }) = events.recv().await {
                done += 1;
            }
        }
        std::fs::rename(&tokens, &away).unwrap();
        std::fs::create_dir(&tokens).unwrap();
        hsm::testkit::pkcs11().unwrap().finalize().unwrap();
    };
    let (summary, ()) = tokio::join!(run_for_a_while(&client, &oper), unplug);
    let why = summary
        .halted
        .clone()
        .expect("the station stopped the line");
    assert!(why.contains("HSM"), "{why}");
    assert!(!summary.batch_complete, "{summary}");
    assert!(!engine.snapshot().running);

    // Starting again without the HSM is refused with the reason; nothing moves.
    let refused = run_line(&client, &oper, false, true).await;
    let still_down = match refused {
        Err(e) => e.to_string(),
        Ok(s) => s.halted.unwrap_or_default(),
    };
    assert!(still_down.contains("HSM"), "{still_down}");

    // The token is plugged back in: the same engine finds it, fails the meters it could not
    // journal while the HSM was gone, and finishes the batch.
    std::fs::remove_dir(&tokens).unwrap();
    std::fs::rename(&away, &tokens).unwrap();
    let summary = run_for_a_while(&client, &oper).await;
    assert!(summary.batch_complete, "{summary}");
    let db = cell.db();
    assert_journal_consistent(&db, quantity);
    assert!(
        count(
            &db,
            "SELECT count(*) FROM audit WHERE kind = 'station.halted'"
        ) >= 1,
        "the halt is audited"
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM alarms WHERE kind = 'station.halted'"
        ) >= 1,
        "and raised an alarm"
    );
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    drop(client);
    daemon.stop().await.unwrap();
}
