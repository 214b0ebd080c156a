//! The harness of the console tests: a demo cell per test process, the real console over it in
//! egui_kittest, and bounded waits that say what they were waiting for.
//!
//! A demo cell points this process's SoftHSM at its token (an environment variable read once),
//! so each test that builds one needs a process of its own: cargo-nextest gives each test one;
//! under plain `cargo test`, [`isolated`] runs the test again in a child process.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT as _, Queryable};
use gui::theme::Touch;
use gui::{ConsoleApp, ConsoleOptions};
use station::demo::{DemoArgs, DemoCell};

/// Set in the child process [`isolated`] starts.
const CHILD: &str = "GUI_TEST_CHILD";

/// Runs `body` in a process of its own: here under nextest (one process per test), else in a
/// child process running only the test `name` (its path in the test binary, e.g.
/// `console::login_…`).
pub fn isolated(name: &str, body: impl FnOnce()) {
    if let Some(marker) = std::env::var_os(CHILD) {
        body();
        std::fs::write(marker, name).expect("write the child's marker");
        return;
    }
    if std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|m| m == "process-per-test") {
        body();
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = dir.path().join("ran");
    let exe = std::env::current_exe().expect("the test binary's path");
    let status = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, &marker)
        .status()
        .expect("start the test in its own process");
    assert!(
        status.success(),
        "{name} failed in its own process (its output is above)"
    );
    // A wrong name would run no test and pass: the child proves it ran this one.
    assert_eq!(
        std::fs::read_to_string(&marker).ok().as_deref(),
        Some(name),
        "the child process did not run {name}"
    );
}

/// A demo cell (its daemon in this process) and the runtime it runs on.
#[derive(Debug)]
pub struct Cell {
    cell: Option<DemoCell>,
    pub rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Cell {
    /// A demo cell of `nests` nests with `faults` ("2:wrong-hash"), its batch open, line stopped;
    /// the emulated operator swaps a released meter after `insert_delay_ms`.
    pub fn new(nests: u32, faults: &[&str], insert_delay_ms: u64) -> Cell {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let args = DemoArgs {
            meters: 2,
            nests,
            baud: 921_600,
            out: dir.path().join("cell"),
            plain: true,
            firmware_kib: 16,
            known_pins: true,
            insert_delay_ms,
            faults: faults.iter().map(|f| f.to_string()).collect(),
            ..DemoArgs::default()
        };
        station::demo::prepare(&args).expect("prepare the demo cell directory");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let cell = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(180), station::demo::build(&args)).await
            })
            .expect("the demo cell was not set up within 3 minutes")
            .expect("set up the demo cell");
        Cell {
            cell: Some(cell),
            rt,
            _dir: dir,
        }
    }

    /// The demo cell.
    pub fn demo(&self) -> &DemoCell {
        self.cell.as_ref().expect("the cell is running")
    }

    /// The daemon's engine (the tests look inside, as nobody else can).
    pub fn engine(&self) -> &station::Engine {
        self.demo()
            .engine()
            .expect("the demo daemon runs in this process")
    }

    /// The real console over this cell's daemon, in a window of `size` points.
    pub fn console(&self, size: [f32; 2]) -> Harness<'static, ConsoleApp> {
        let client = self.demo().client.clone();
        let rt = self.rt.handle().clone();
        Harness::builder().with_size(size).build_eframe(move |cc| {
            ConsoleApp::new(
                client,
                "demo-cell",
                rt,
                &cc.egui_ctx,
                ConsoleOptions {
                    demo: true,
                    touch: Touch::default(),
                },
            )
        })
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            let _ = self.rt.block_on(async move {
                tokio::time::timeout(Duration::from_secs(60), cell.stop()).await
            });
        }
    }
}

/// Every label on screen, for failure messages.
pub fn screen(h: &Harness<'_, ConsoleApp>) -> String {
    let mut labels: Vec<String> = h
        .root()
        .children_recursive()
        .filter_map(|n| {
            let n = n.accesskit_node();
            n.label().or_else(|| n.value())
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    labels.dedup();
    labels.join(" | ")
}

/// Steps the console until `cond` holds, for at most `limit`; panics naming `what` and showing
/// the screen otherwise.
pub fn wait_for(
    h: &mut Harness<'_, ConsoleApp>,
    what: &str,
    limit: Duration,
    cond: impl Fn(&Harness<'_, ConsoleApp>) -> bool,
) {
    let start = Instant::now();
    loop {
        h.step();
        if cond(h) {
            // One more frame, so that the accessibility tree matches the state.
            h.step();
            return;
        }
        assert!(
            start.elapsed() < limit,
            "waited {limit:?} for {what}; the screen shows: {}",
            screen(h)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a node labelled exactly `label` is on screen.
pub fn wait_for_label(h: &mut Harness<'_, ConsoleApp>, label: &str, limit: Duration) {
    let what = format!("{label:?} on screen");
    wait_for(h, &what, limit, |h| h.query_by_label(label).is_some());
}

/// Waits until a node whose label contains `part` is on screen.
pub fn wait_for_text(h: &mut Harness<'_, ConsoleApp>, part: &str, limit: Duration) {
    let what = format!("a label containing {part:?}");
    wait_for(h, &what, limit, |h| {
        h.query_all_by_label_contains(part).next().is_some()
    });
}

/// Clicks the node labelled `label` (scrolled into view first, as a person would) and lets the
/// console draw the result.
pub fn click(h: &mut Harness<'_, ConsoleApp>, label: &str) {
    h.get_by_label(label).scroll_to_me();
    // The scroll is applied after the frame that handles it; the tree shows it a frame later.
    h.run_steps(4);
    h.get_by_label(label).click();
    h.run_steps(2);
    // Every screen the tests reach has a name for every control.
    h.check_accessibility();
}

/// Types into the text field labelled `label`, replacing what it held.
pub fn fill(h: &mut Harness<'_, ConsoleApp>, label: &str, text: &str) {
    h.get_by_label(label).set_text_value_accesskit(text);
    h.run_steps(2);
}

/// Enters `pin` on the PIN pad.
pub fn pin(h: &mut Harness<'_, ConsoleApp>, pin: &str) {
    for d in pin.chars() {
        click(h, &d.to_string());
    }
}

/// Logs `user` in with `pin` on the log-in screen.
pub fn log_in(h: &mut Harness<'_, ConsoleApp>, user: &str, code: &str) {
    fill(h, "User name", user);
    pin(h, code);
    click(h, "Log in");
    // The pad is locked while the engine checks: wait for the answer, whatever it is.
    wait_for(
        h,
        "the answer to the log-in",
        Duration::from_secs(20),
        |h| !h.state().state().login.busy,
    );
}
