//! One task per nest: open the port, poll for a meter, run it, release it, wait for the next.
//!
//! A nest never affects another: its port, its link and its meter are its own; a failing meter,
//! jig or link ends in this nest's state and the audit log. The task idles while the line is
//! stopped, the nest is disabled or the batch has all its meters, and it is woken by any change.

use std::sync::Arc;
use std::time::Duration;

use line_protocol::host::HostConfig;
use line_protocol::io::{self, HostLink, LinkError, PortAddr};
use line_protocol::timing::LinkTiming;

use super::provision::{Ctx, Outcome};
use super::{Event, Inner, NestState};
use crate::plc::{Handshake, PlcTable};

/// How long an empty nest waits for an answer to one HELLO.
const PROBE_ATTEMPTS: u32 = 1;

/// After the PLC's START, how long a nest waits for a meter to answer before it reports FAIL.
const PLC_NO_METER: Duration = Duration::from_secs(10);

/// The PLC's side of a nest before a meter may start: `true` when the nest may go on (START is
/// held, BUSY shown); otherwise it waits (for START, or for START to drop after a result).
async fn plc_gate(
    inner: &Inner,
    plc: &PlcTable,
    i: usize,
    wake: &mut tokio::sync::watch::Receiver<u64>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    since: &mut Option<std::time::Instant>,
) -> bool {
    let start = plc.start(i);
    match plc.handshake(i) {
        Handshake::Busy => return true,
        Handshake::Ready if start => {
            plc.set(i, Handshake::Busy);
            *since = Some(std::time::Instant::now());
            return true;
        }
        Handshake::Result { .. } if !start => {
            // The PLC has taken the result: the nest is ready for the next START.
            plc.set(i, Handshake::Ready);
            inner.update_nest(i, |n| {
                n.message = Some("waiting for the PLC's START".into())
            });
        }
        Handshake::Ready => {
            inner.update_nest(i, |n| {
                if n.state != NestState::Pass && n.state != NestState::Fail {
                    n.state = NestState::Idle;
                }
                n.message = Some("waiting for the PLC's START".into());
            });
        }
        Handshake::Result { .. } => {}
    }
    tokio::select! {
        _ = plc.changed() => {}
        _ = tokio::time::sleep(Duration::from_millis(inner.cfg.line.poll_ms)) => {}
        _ = wake.changed() => {}
        _ = stop.changed() => {}
    }
    false
}

/// Opens the nest's port.
pub(super) async fn connect(inner: &Inner, i: usize) -> Result<HostLink, String> {
    let n = &inner.cfg.nests[i];
    let addr = PortAddr::parse(&n.port).map_err(|e| e.to_string())?;
    let port = io::open(&addr, n.baud).await.map_err(|e| e.to_string())?;
    // The X9.63 key transport is offered when the HSM does it (found by a probe at open).
    let x963 = if inner.hsm.mechanisms().ktk_x963 {
        line_protocol::msg::FEATURE_KTK_X963
    } else {
        0
    };
    let cfg = HostConfig {
        max_payload: inner.cfg.line.max_payload,
        window: inner.cfg.line.window,
        features: HostConfig::default().features | x963,
    };
    Ok(HostLink::new(
        port,
        cfg,
        LinkTiming {
            baud: n.baud,
            latency_ms: inner.cfg.line.latency_ms,
        },
    ))
}

/// Reopens the port if the link has closed (used when resuming a transfer).
pub(super) async fn reconnect_if_closed(
    inner: &Arc<Inner>,
    i: usize,
    link: &mut HostLink,
) -> Result<(), String> {
    // A closed link shows on the next read; a fresh one costs little, so always reopen after an
    // i/o failure and keep the link otherwise.
    if link.is_closed() {
        *link = connect(inner, i).await?;
    }
    Ok(())
}

/// The nest task.
pub(super) async fn run(inner: Arc<Inner>, i: usize) {
    let nest = i as u32 + 1;
    let mut wake = inner.wake_rx();
    let mut stop = inner.stop_rx();
    let mut link: Option<HostLink> = None;
    // The UID this nest released last: until it leaves, the same meter is not started again.
    let mut released: Option<Vec<u8>> = None;
    // With a PLC that starts the nests: its handshake, and when it last said START.
    let plc = inner
        .plc
        .clone()
        .filter(|_| inner.cfg.plc.as_ref().is_some_and(|p| p.plc_starts));
    let mut started_at: Option<std::time::Instant> = None;
    loop {
        if inner.stopping() {
            return;
        }
        let (running, operator) = inner.running();
        if !running || !inner.nest_enabled(i) {
            inner.update_nest(i, |n| {
                if n.state != NestState::Pass && n.state != NestState::Fail {
                    n.state = NestState::Stopped;
                    n.step = None;
                    n.progress = None;
                }
            });
            tokio::select! {
                _ = wake.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let operator = operator.unwrap_or_else(|| "system".into());
        if link.is_none() {
            match connect(&inner, i).await {
                Ok(l) => {
                    link = Some(l);
                    inner.update_nest(i, |n| n.port_open = true);
                }
                Err(e) => {
                    inner.update_nest(i, |n| {
                        n.state = NestState::Offline;
                        n.port_open = false;
                        n.message = Some(format!("port unavailable: {e}"));
                    });
                    sleep_or_wake(&mut wake, &mut stop, Duration::from_secs(2)).await;
                    continue;
                }
            }
        }
        let Some(l) = link.as_mut() else { continue };
        if let Some(p) = &plc
            && !plc_gate(&inner, p, i, &mut wake, &mut stop, &mut started_at).await
        {
            continue;
        }
        let ack = match l.hello_attempts(PROBE_ATTEMPTS).await {
            Ok(ack) => ack,
            Err(LinkError::Timeout { .. }) => {
                released = None;
                if let Some(p) = &plc
                    && started_at.is_some_and(|t| t.elapsed() > PLC_NO_METER)
                {
                    // START with nothing in the nest: the PLC hears FAIL, the operator why.
                    p.set(i, Handshake::Result { pass: false });
                    inner.update_nest(i, |n| {
                        n.state = NestState::Fail;
                        n.message =
                            Some("the PLC said START but no meter answered in the nest".into());
                    });
                    continue;
                }
                inner.update_nest(i, |n| {
                    if n.state != NestState::Pass && n.state != NestState::Fail {
                        n.state = NestState::Idle;
                        n.message = Some("waiting for a meter".into());
                    }
                });
                sleep_or_wake(
                    &mut wake,
                    &mut stop,
                    Duration::from_millis(inner.cfg.line.poll_ms),
                )
                .await;
                continue;
            }
            Err(e @ (LinkError::Io(_) | LinkError::Closed)) => {
                link = None;
                inner.update_nest(i, |n| {
                    n.state = NestState::Offline;
                    n.port_open = false;
                    n.message = Some(format!("link lost: {e}"));
                });
                sleep_or_wake(&mut wake, &mut stop, Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                inner.update_nest(i, |n| {
                    n.message = Some(format!("meter answered badly: {e}"))
                });
                sleep_or_wake(
                    &mut wake,
                    &mut stop,
                    Duration::from_millis(inner.cfg.line.poll_ms),
                )
                .await;
                continue;
            }
        };
        if released.as_deref() == Some(ack.uid.as_slice()) {
            if let Some(p) = &plc {
                // START for a meter this nest has finished: it was not taken out.
                p.set(i, Handshake::Result { pass: false });
                inner.update_nest(i, |n| {
                    n.state = NestState::Fail;
                    n.message = Some("the finished meter is still in the nest: take it out".into());
                });
                continue;
            }
            inner.update_nest(i, |n| n.message = Some("remove the finished meter".into()));
            sleep_or_wake(
                &mut wake,
                &mut stop,
                Duration::from_millis(inner.cfg.line.poll_ms),
            )
            .await;
            continue;
        }
        inner.update_nest(i, |n| {
            n.state = NestState::Busy;
            n.uid = Some(hex::encode(&ack.uid));
            n.serial = None;
            n.message = None;
            n.progress = None;
        });
        let ctx = Ctx {
            inner: &inner,
            nest: i,
            operator,
        };
        let uid = ack.uid.clone();
        let outcome = ctx.provision(l, ack).await;
        if l.is_closed() {
            link = None;
        }
        if let Some(p) = &plc {
            match &outcome {
                Outcome::Done { .. } => p.set(i, Handshake::Result { pass: true }),
                // The same meter starts over in the nest: still BUSY.
                Outcome::Reworked { .. } => {}
                _ => p.set(i, Handshake::Result { pass: false }),
            }
        }
        match outcome {
            Outcome::Done { serial, cycle_ms } => {
                released = Some(uid.clone());
                inner.add_cycle(cycle_ms);
                inner.queue_label(&serial);
                inner.update_nest(i, |n| {
                    n.state = NestState::Pass;
                    n.step = None;
                    n.progress = None;
                    n.message = None;
                    n.last_cycle_ms = Some(cycle_ms);
                });
                inner.emit(Event::MeterFinished {
                    nest,
                    uid: hex::encode(&uid),
                    serial: Some(serial),
                    ok: true,
                    reason: None,
                    cycle_ms,
                });
            }
            Outcome::Failed { serial, reason } => {
                // A meter that the station stopped the line on before it had a record (the HSM
                // or the journal failed) is untouched: it is tried again when the line starts
                // again. Any other failed meter waits to be taken out.
                released = (serial.is_some() || !inner.is_halted()).then(|| uid.clone());
                inner.update_nest(i, |n| {
                    n.state = NestState::Fail;
                    n.progress = None;
                    n.message = Some(reason.clone());
                });
                inner.emit(Event::MeterFinished {
                    nest,
                    uid: hex::encode(&uid),
                    serial,
                    ok: false,
                    reason: Some(reason),
                    cycle_ms: 0,
                });
            }
            Outcome::Refused { reason } => {
                released = Some(uid.clone());
                inner.update_nest(i, |n| {
                    n.state = NestState::Fail;
                    n.progress = None;
                    n.message = Some(reason.clone());
                });
                inner.emit(Event::MeterFinished {
                    nest,
                    uid: hex::encode(&uid),
                    serial: None,
                    ok: false,
                    reason: Some(reason),
                    cycle_ms: 0,
                });
            }
            Outcome::Reworked { reason } => {
                // The same meter, blank again, stays in the nest: its next HELLO starts it over.
                released = None;
                inner.update_nest(i, |n| {
                    n.state = NestState::Busy;
                    n.progress = None;
                    n.message = Some(reason);
                });
            }
            Outcome::NoRoom { reason } => {
                inner.update_nest(i, |n| {
                    n.state = NestState::Idle;
                    n.uid = None;
                    n.message = Some(reason);
                });
                sleep_or_wake(&mut wake, &mut stop, Duration::from_secs(1)).await;
            }
        }
        inner.publish_batch().await;
    }
}

async fn sleep_or_wake(
    wake: &mut tokio::sync::watch::Receiver<u64>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    d: Duration,
) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = wake.changed() => {}
        _ = stop.changed() => {}
    }
}
