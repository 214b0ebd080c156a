//! The console driven as a person would, through its accessibility tree, over a real demo cell:
//! a SoftHSM token, emulated meters on pseudo-terminals, the cell's daemon in-process and the
//! console its client over the daemon's socket.

use std::time::Duration;

use crate::util::{
    Cell, click, fill, isolated, log_in, pin, wait_for, wait_for_label, wait_for_text,
};
use egui_kittest::kittest::{NodeT as _, Queryable};
use station::engine::NestState;
use station::{Command, Reply};

const SIZE: [f32; 2] = [1280.0, 800.0];
const ENGINE: Duration = Duration::from_secs(20);
const METERS: Duration = Duration::from_secs(120);

#[test]
fn login_refuses_a_wrong_pin_locks_out_and_ends_expired_sessions() {
    isolated(
        "console::login_refuses_a_wrong_pin_locks_out_and_ends_expired_sessions",
        || {
            let cell = Cell::new(1, &[], 50);
            let mut h = cell.console(SIZE);
            h.run_steps(3);
            // The demo users are offered on a demo cell.
            assert!(h.query_by_label("oper 111111 (operator)").is_some());

            // A wrong PIN: refused as an unknown user would be (the answer tells nobody whether
            // the user exists), and still on the log-in screen.
            log_in(&mut h, "oper", "999999");
            wait_for_text(&mut h, "wrong user name or PIN", ENGINE);
            assert!(
                h.query_all_by_label_contains("attempts left")
                    .next()
                    .is_none()
            );
            assert!(h.query_by_label("Log out").is_none());

            // The right PIN: the user and role are shown on every screen.
            log_in(&mut h, "oper", "111111");
            wait_for_label(&mut h, "oper (operator)", ENGINE);
            assert!(h.query_by_label("Start line").is_some());
            // An operator has no supervisor screen.
            assert!(h.query_by_label("Batch and rework").is_none());
            click(&mut h, "Log out");
            wait_for_label(&mut h, "Not logged in", ENGINE);

            // Five wrong PINs lock the user out; each reads as any wrong PIN, and only the right
            // PIN learns of the lock-out.
            for _ in 0..5 {
                log_in(&mut h, "super", "000000");
                wait_for_text(&mut h, "wrong user name or PIN", ENGINE);
            }
            log_in(&mut h, "super", "222222");
            wait_for_text(&mut h, "user super is locked out", ENGINE);

            // The lock-out raised a critical alarm, shown to whoever logs in next.
            log_in(&mut h, "oper", "111111");
            wait_for_label(&mut h, "oper (operator)", ENGINE);
            wait_for_text(&mut h, "auth.lockout", ENGINE);
            assert!(h.query_by_label("CRITICAL ALARM").is_some());

            // A session idle for longer than the daemon allows: the next command finds it
            // ended and sends the user back to log in. (Idle time is made, not waited for.)
            let aged = cell.engine().db().with(|c| {
                c.execute(
                    "UPDATE sessions SET last_seen = 0 WHERE ended_at IS NULL",
                    [],
                )
            });
            assert!(aged.expect("age the open sessions") > 0);
            click(&mut h, "Start line");
            wait_for_text(&mut h, "session has ended", ENGINE);
            assert!(h.query_by_label("Not logged in").is_some());
            assert!(!cell.engine().snapshot().running);
        },
    );
}

#[test]
fn a_supervisor_opens_a_batch_and_the_line_runs_it_to_pass() {
    isolated(
        "console::a_supervisor_opens_a_batch_and_the_line_runs_it_to_pass",
        || {
            let cell = Cell::new(2, &[], 50);
            let mut h = cell.console(SIZE);
            h.run_steps(3);
            log_in(&mut h, "super", "222222");
            wait_for_label(&mut h, "super (supervisor)", ENGINE);

            // Close the demo's batch, then open the next one from the lists.
            click(&mut h, "Batch and rework");
            wait_for_label(&mut h, "Close batch WO-DEMO-0001", ENGINE);
            click(&mut h, "Close batch WO-DEMO-0001");
            click(&mut h, "Confirm close of WO-DEMO-0001");
            wait_for_label(&mut h, "Open batch", ENGINE);
            wait_for_text(&mut h, "Firmware 1.0.0", ENGINE);
            fill(&mut h, "Work order", "WO-GUI-0002");
            fill(&mut h, "Quantity", "3");
            h.get_by_label_contains("Firmware 1.0.0").click();
            click(&mut h, "Customer demo-utility");
            click(&mut h, "Open batch");
            wait_for_text(&mut h, "batch WO-GUI-0002 is open", ENGINE);
            let batch = cell.engine().snapshot().batch.expect("a batch is open");
            assert_eq!(batch.work_order, "WO-GUI-0002");
            assert_eq!(batch.quantity, 3);
            assert_eq!(batch.customer, "demo-utility");
            // The serials follow the demo batch's.
            assert!(batch.serial_first > cell.demo().batch.serial_last);

            // Run it: the tiles go BUSY, then PASS.
            click(&mut h, "Line");
            wait_for_text(&mut h, "Work order WO-GUI-0002", ENGINE);
            click(&mut h, "Start line");
            wait_for_label(&mut h, "LINE RUNNING", ENGINE);
            wait_for_label(&mut h, "Nest 1: BUSY", METERS);
            wait_for_label(&mut h, "Nest 1: PASS", METERS);
            wait_for(&mut h, "all three meters produced", METERS, |h| {
                h.state()
                    .state()
                    .line
                    .batch
                    .as_ref()
                    .is_some_and(|b| b.done == 3)
            });
            wait_for_text(&mut h, "3 of 3", ENGINE);
            // The cycle times come from the engine.
            wait_for(&mut h, "the average cycle time", ENGINE, |h| {
                h.state().state().line.avg_cycle_ms.is_some()
            });
            click(&mut h, "Stop line");
            wait_for_label(&mut h, "LINE STOPPED", ENGINE);
            assert!(!cell.engine().snapshot().running);
        },
    );
}

#[test]
fn a_failed_meter_shows_its_reason_and_only_a_supervisor_acknowledges_the_alarm() {
    isolated(
        "console::a_failed_meter_shows_its_reason_and_only_a_supervisor_acknowledges_the_alarm",
        || {
            let cell = Cell::new(2, &["2:wrong-hash"], 4000);
            let mut h = cell.console(SIZE);
            h.run_steps(3);
            log_in(&mut h, "oper", "111111");
            wait_for_label(&mut h, "oper (operator)", ENGINE);
            click(&mut h, "Start line");

            // Nest 2's meter reports a wrong firmware hash: FAIL, with the reason in words.
            wait_for_label(&mut h, "Nest 2: FAIL", METERS);
            wait_for_text(&mut h, "Nest 2 message: Reason:", ENGINE);
            let node = h.get_by_label_contains("Nest 2 message:").accesskit_node();
            let reason = node.label().or_else(|| node.value()).unwrap_or_default();
            assert!(reason.contains("image hash"), "{reason}");
            // The operator clears the tile (the emulated operator takes the meter out only after
            // a few seconds, so the FAIL stays until then).
            click(&mut h, "Clear nest 2");
            wait_for(&mut h, "nest 2 cleared", ENGINE, |h| {
                h.state().state().line.nests[1].state != NestState::Fail
            });
            // The other nest goes on.
            wait_for_label(&mut h, "Nest 1: PASS", METERS);

            // The critical alarm cannot be missed.
            wait_for_text(&mut h, "security.firmware_mismatch", ENGINE);
            let alarm = cell
                .engine()
                .snapshot()
                .alarms
                .iter()
                .find(|a| a.kind == "security.firmware_mismatch")
                .expect("the firmware mismatch raised an alarm")
                .id;
            let ack = format!("Acknowledge alarm {alarm}");
            click(&mut h, &ack);

            // The operator's own PIN is not enough: refused, and the alarm stays.
            fill(&mut h, "Supervisor name", "oper");
            pin(&mut h, "111111");
            click(&mut h, "Acknowledge");
            wait_for_text(&mut h, "may not acknowledge alarms", ENGINE);
            assert!(
                cell.engine()
                    .snapshot()
                    .alarms
                    .iter()
                    .any(|a| a.id == alarm)
            );
            // The console's operator is still logged in.
            assert!(h.query_by_label("oper (operator)").is_some());

            // A supervisor acknowledges it.
            fill(&mut h, "Supervisor name", "super");
            pin(&mut h, "222222");
            click(&mut h, "Acknowledge");
            wait_for_text(&mut h, "acknowledged by super", ENGINE);
            assert!(h.query_by_label(&ack).is_none());
            assert!(
                !cell
                    .engine()
                    .snapshot()
                    .alarms
                    .iter()
                    .any(|a| a.id == alarm)
            );

            // The acknowledgement and the refusal are in the audit log.
            let auditor = cell
                .rt
                .block_on(cell.engine().login("audit", "444444"))
                .unwrap();
            let Reply::Entries(entries) = cell
                .rt
                .block_on(
                    cell.engine()
                        .execute(&auditor, Command::AuditTail { n: 200 }),
                )
                .unwrap()
            else {
                panic!("audit tail answered unexpectedly");
            };
            assert!(
                entries
                    .iter()
                    .any(|e| e.kind == "alarm.acknowledged" && e.actor == "super")
            );
            assert!(
                entries
                    .iter()
                    .any(|e| e.kind == "auth.forbidden" && e.actor == "oper")
            );

            // A supervisor approves the failed meter's rework from the list of failures.
            let uid = h
                .state()
                .state()
                .failed
                .front()
                .expect("the failed meter is listed")
                .uid
                .clone();
            click(&mut h, "Log out");
            wait_for_label(&mut h, "Not logged in", ENGINE);
            log_in(&mut h, "super", "222222");
            wait_for_label(&mut h, "super (supervisor)", ENGINE);
            click(&mut h, "Batch and rework");
            wait_for_text(&mut h, "image hash", ENGINE);
            click(&mut h, &format!("Rework meter {uid}"));
            wait_for_text(&mut h, &format!("rework {uid}: done"), ENGINE);
            wait_for_label(&mut h, "Rework approved", ENGINE);
        },
    );
}
