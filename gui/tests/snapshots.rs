//! Pictures of the main screens at the two screen sizes the console must fit, rendered on the
//! CPU (Mesa's lavapipe or llvmpipe through wgpu) and compared with `tests/snapshots/*.png`.
//! `UPDATE_SNAPSHOTS=1` rewrites them after an intended change.
//!
//! The console is the real one (theme, panels, view) fed made-up state, so the pictures do not
//! depend on timing, random UIDs or the clock.

use std::sync::mpsc;
use std::time::Duration;

use egui_kittest::kittest::Queryable;
use egui_kittest::{Harness, SnapshotOptions, SnapshotResults};
use gui::ConsoleApp;
use gui::backend::CommandSink;
use gui::state::{AppState, FailedMeter, SignedIn, Tab, UiCommand};
use gui::theme::Touch;
use serde_json::json;
use station::audit::{Alarm, Entry, Verification};
use station::auth::Role;
use station::engine::{Health, NestState, NestView, Step};
use station::records::{BatchRow, CustomerRow, FirmwareRow};

/// The two screens the console must fit.
const SIZES: [(&str, [f32; 2]); 2] = [
    ("1024x768", [1024.0, 768.0]),
    ("1920x1080", [1920.0, 1080.0]),
];

/// Commands go nowhere: these tests only look.
struct Nowhere;

impl CommandSink for Nowhere {
    fn send(&self, _cmd: UiCommand) {}
}

fn nest(n: u32, state: NestState) -> NestView {
    let mut v = NestView {
        nest: n,
        name: format!("N{n}"),
        port: format!("/dev/serial/by-path/jig-{n}"),
        enabled: true,
        state,
        uid: None,
        serial: None,
        step: None,
        progress: None,
        message: None,
        port_open: true,
        last_cycle_ms: None,
    };
    match state {
        NestState::Busy => {
            v.uid = Some(format!("0451{n:04}aa00ff10"));
            v.serial = Some(format!("DMW{:09}", 120 + n));
            v.step = Some(Step::Firmware);
            v.progress = Some(0.1 * f32::from(n as u8 % 10));
        }
        NestState::Pass => {
            v.serial = Some(format!("DMW{:09}", 100 + n));
            v.last_cycle_ms = Some(11_800 + u64::from(n) * 37);
        }
        NestState::Fail => {
            v.serial = Some(format!("DMW{:09}", 110 + n));
            v.message = Some(
                "meter reported image hash 22bd413ac6814ae8 but was sent ddbd413ac6814ae8".into(),
            );
        }
        NestState::Idle => v.message = Some("waiting for a meter".into()),
        NestState::Offline => {
            v.port_open = false;
            v.message = Some("port unavailable: no such device".into());
        }
        NestState::Stopped => v.enabled = false,
    }
    v
}

fn batch() -> BatchRow {
    BatchRow {
        id: 2,
        work_order: "WO-2026-0417".into(),
        model: "EM-300".into(),
        firmware_id: 1,
        firmware_version: "1.4.2".into(),
        firmware_sha256: "43ff91b2".repeat(8),
        customer_id: 1,
        customer: "Northern Grid".into(),
        quantity: 500,
        serial_prefix: "DMW".into(),
        serial_first: 101,
        serial_last: 700,
        next_serial: 236,
        state: "open".into(),
        transport_key: "batch-2-transport".into(),
        oaep_hash: "sha256".into(),
        done: 131,
        failed: 4,
        in_flight: 6,
        opened_at: "2026-11-21T07:02:11.000Z".into(),
        opened_by: "super".into(),
        closed_at: None,
        closed_by: None,
        exported_at: None,
        keys_deleted_at: None,
    }
}

fn alarm() -> Alarm {
    Alarm {
        id: 7,
        audit_seq: 912,
        kind: "security.firmware_mismatch".into(),
        message: "meter reported image hash 22bd413ac6814ae8 but was sent ddbd413ac6814ae8".into(),
        nest: Some(3),
        raised_at: "2026-11-21T09:14:03.512Z".into(),
    }
}

/// A running line of 16 nests in every state, one alarm open, an operator logged in.
fn line_state() -> AppState {
    let states = [
        NestState::Busy,
        NestState::Pass,
        NestState::Fail,
        NestState::Busy,
        NestState::Idle,
        NestState::Busy,
        NestState::Pass,
        NestState::Busy,
        NestState::Busy,
        NestState::Pass,
        NestState::Offline,
        NestState::Busy,
        NestState::Stopped,
        NestState::Busy,
        NestState::Pass,
        NestState::Busy,
    ];
    let mut line = AppState::empty_line("cell-a3");
    line.running = true;
    line.operator = Some("oper".into());
    line.batch = Some(batch());
    line.nests = states
        .iter()
        .enumerate()
        .map(|(i, s)| nest(i as u32 + 1, *s))
        .collect();
    line.alarms = vec![alarm()];
    line.health = Health {
        hsm: true,
        hsm_detail: "cell-a3-hsm".into(),
        database: true,
        fleet: None,
    };
    line.last_cycle_ms = Some(11_912);
    line.avg_cycle_ms = Some(12_340);
    let mut s = AppState::new(
        line,
        vec!["EM-300".into(), "EM-310".into()],
        "DMW".into(),
        false,
    );
    s.user = Some(SignedIn {
        name: "oper".into(),
        role: Role::Operator,
    });
    s
}

fn console(state: AppState, size: [f32; 2]) -> Harness<'static, ConsoleApp> {
    let mut h = Harness::builder().with_size(size).build_eframe(move |cc| {
        let (_tx, events) = mpsc::channel();
        ConsoleApp::with_parts(
            &cc.egui_ctx,
            state,
            events,
            Box::new(Nowhere),
            Duration::from_secs(15 * 60),
            Touch::default(),
        )
        .paint_background(true)
    });
    h.run_steps(4);
    h
}

/// Tolerant of rasteriser differences in anti-aliased edges; a moved widget fails.
fn options() -> SnapshotOptions {
    SnapshotOptions::new().threshold(1.0).max_failed_pixels(400)
}

fn snap(name: &str, state: impl Fn() -> AppState) {
    let mut results = SnapshotResults::new();
    for (size_name, size) in SIZES {
        let mut h = console(state(), size);
        results.add(h.try_snapshot_options(format!("{name}-{size_name}"), &options()));
        // The harness's own results (none here) are merged too, so that all are reported.
        results.extend_harness(&mut h);
    }
    if let Err(e) = results.into_result() {
        panic!("{name}: {:?}", e.into_inner());
    }
}

#[test]
fn login_screen() {
    snap("login", || {
        let mut s = line_state();
        s.user = None;
        s.demo = true;
        s.line.alarms.clear();
        s.recent_users = vec!["oper".into()];
        s.login.user = "oper".into();
        s.login.pin = "1234".to_string().into();
        s.login.notice = Some(gui::state::Notice {
            text: "wrong user name or PIN (4 attempts left before lock-out)".into(),
            good: false,
        });
        s
    });
}

#[test]
fn line_view_with_sixteen_nests_and_an_alarm() {
    snap("line", line_state);
}

#[test]
fn supervisor_acknowledges_an_alarm() {
    snap("alarm-ack", || {
        let mut s = line_state();
        s.user = Some(SignedIn {
            name: "super".into(),
            role: Role::Supervisor,
        });
        s.ack = Some(gui::state::AckForm {
            alarm: 7,
            user: "super".into(),
            pin: "22".to_string().into(),
            busy: false,
            notice: None,
        });
        s
    });
}

#[test]
fn supervisor_opens_a_batch() {
    snap("batch", || {
        let mut s = line_state();
        s.user = Some(SignedIn {
            name: "super".into(),
            role: Role::Supervisor,
        });
        s.tab = Tab::Batch;
        s.line.running = false;
        s.line.batch = None;
        s.line.alarms.clear();
        let f = &mut s.batch;
        f.requested = true;
        f.firmware = vec![FirmwareRow {
            id: 1,
            sha256: "43ff91b2".repeat(8),
            version: "1.4.2".into(),
            size: 98_816,
            signer_key_hash: "ab".repeat(32),
            imported_at: "2026-11-02T10:00:00.000Z".into(),
            imported_by: "officer".into(),
        }];
        f.customers = ["Northern Grid", "Coastal Power"]
            .iter()
            .enumerate()
            .map(|(i, n)| CustomerRow {
                id: i as i64 + 1,
                name: (*n).into(),
                fingerprint: "cd".repeat(32),
                imported_at: "2026-11-02T10:05:00.000Z".into(),
                imported_by: "officer".into(),
            })
            .collect();
        f.firmware_sha = Some("43ff91b2".repeat(8));
        f.customer = Some("Northern Grid".into());
        f.work_order = "WO-2026-0418".into();
        f.quantity = "500".into();
        f.serial_first = "701".into();
        f.serial_last = "1260".into();
        f.prefilled = true;
        s.failed.push_back(FailedMeter {
            nest: 3,
            uid: "04510003aa00ff10".into(),
            serial: Some("DMW000000113".into()),
            reason: "meter reported image hash 22bd413ac6814ae8 but was sent ddbd413ac6814ae8"
                .into(),
            reworked: false,
        });
        s
    });
}

#[test]
fn auditor_reads_the_verified_audit_log() {
    snap("audit", || {
        let mut s = line_state();
        s.user = Some(SignedIn {
            name: "audit".into(),
            role: Role::Auditor,
        });
        s.tab = Tab::Audit;
        s.line.alarms.clear();
        s.audit.requested = true;
        s.audit.verification = Some(Verification {
            entries: 912,
            checkpoints: 18,
            first_bad: None,
            signatures_checked: 912,
        });
        let kinds = [
            ("auth.success", "info", "oper", json!({"role": "operator"})),
            (
                "line.started",
                "notice",
                "oper",
                json!({"batch": "WO-2026-0417"}),
            ),
            (
                "meter.provisioned",
                "info",
                "oper",
                json!({"nest": 1, "serial": "DMW000000101"}),
            ),
            (
                "auth.failure",
                "warning",
                "super",
                json!({"message": "wrong PIN or unknown user"}),
            ),
            (
                "security.firmware_mismatch",
                "critical",
                "system",
                json!({"nest": 3}),
            ),
            ("alarm.acknowledged", "notice", "super", json!({"alarm": 7})),
        ];
        s.audit.entries = kinds
            .iter()
            .cycle()
            .take(24)
            .enumerate()
            .map(|(i, (kind, sev, actor, details))| Entry {
                seq: 889 + i as i64,
                time: format!("2026-11-21T09:{:02}:{:02}.000Z", 10 + i / 6, (i * 7) % 60),
                ts: 0,
                source: "gui".into(),
                kind: (*kind).into(),
                severity: (*sev).into(),
                actor: (*actor).into(),
                details: details.clone(),
            })
            .collect();
        s
    });
}

#[test]
fn health_screen() {
    snap("health", || {
        let mut s = line_state();
        s.tab = Tab::Health;
        s.line.alarms.clear();
        s.line.nests.truncate(4);
        s.line.nests[2] = nest(3, NestState::Offline);
        s.line.health.fleet = Some(station::engine::FleetHealth {
            reachable: false,
            backlog: 132,
            oldest_unsent_s: Some(610),
            leased_left: 8_400,
            problem: Some("connection refused".into()),
        });
        s
    });
}

#[test]
fn a_line_the_station_stopped_says_why() {
    let halted = || {
        let mut s = line_state();
        s.line.running = false;
        s.line.operator = None;
        s.line.halted = Some(
            "journal error during firmware: the disk holding the journal is full; free space and retry"
                .into(),
        );
        for n in &mut s.line.nests {
            if n.state == NestState::Busy {
                n.state = NestState::Stopped;
            }
        }
        s
    };
    let h = console(halted(), SIZES[0].1);
    assert!(h.query_by_label("LINE STOPPED BY THE STATION").is_some());
    assert!(
        h.query_by_label_contains("the disk holding the journal is full")
            .is_some()
    );
    // Once the cause is fixed, the operator starts the line again.
    assert!(h.query_by_label("Start line").is_some());
    snap("line-halted", halted);
}

#[test]
fn supervisor_sees_the_shift() {
    let shift = || {
        let mut s = line_state();
        s.user = Some(SignedIn {
            name: "super".into(),
            role: Role::Supervisor,
        });
        s.line.alarms.clear();
        s.tab = Tab::Shift;
        s.shift.requested = true;
        s.shift.finished_since = 12;
        // Eight nests over eight hours, nest 3's contacts wearing out.
        s.shift.view = Some(station::shift::sample(8, 4_000, Some(3), 1_796_000_000_000));
        s
    };
    let h = console(shift(), SIZES[0].1);
    assert!(
        h.query_by_label_contains("Nest 3 fails").is_some(),
        "the worn nest is named above the dashboards"
    );
    assert!(
        h.query_by_label_contains("meter stopped answering")
            .is_some()
    );
    assert!(
        h.query_by_label_contains("12 meters finished since")
            .is_some()
    );
    snap("shift", shift);
}

#[test]
fn supervisor_sees_the_factory() {
    snap("fleet", || {
        let mut s = line_state();
        s.user = Some(SignedIn {
            name: "super".into(),
            role: Role::Supervisor,
        });
        s.line.alarms.clear();
        s.line.health.fleet = Some(station::engine::FleetHealth {
            reachable: true,
            leased_left: 6_200,
            ..Default::default()
        });
        s.tab = Tab::Fleet;
        s.fleet.requested = true;
        s.fleet.find = "DMW000004217".into();
        s.fleet.found_for = Some("DMW000004217".into());
        let row = |st: &str, nest: i32, done: i64, failed: i64| {
            (st.to_string(), Some(nest), done, failed)
        };
        s.fleet.view = Some(station::fleet::FleetView {
            batches: vec![
                ("WO-2211".into(), "cell-a3".into(), 1_184, 16),
                ("WO-2211".into(), "cell-b1".into(), 1_171, 29),
                ("WO-2212".into(), "cell-c2".into(), 640, 8),
            ],
            yields: vec![
                row("cell-a3", 1, 297, 3),
                row("cell-a3", 2, 296, 4),
                row("cell-b1", 1, 298, 2),
                row("cell-b1", 2, 279, 21),
                row("cell-c2", 1, 320, 4),
            ],
            found: vec![station::fleet::Found {
                station: "cell-b1".into(),
                work_order: Some("WO-2211".into()),
                nest: Some(2),
                uid: "3A91C0FFEE0042".into(),
                state: "done".into(),
                serial: Some("DMW000004217".into()),
                system_title: Some("444D570000001079".into()),
                operator: Some("oper".into()),
                finished_at: Some("2026-11-29 14:02:11+00".into()),
                failure: None,
            }],
        });
        s
    });
}
