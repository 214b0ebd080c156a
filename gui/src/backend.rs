//! The console's link to the engine, on the tokio runtime: a bridge task that forwards engine
//! events to the console and wakes it, and the execution of the console's commands, whose
//! results come back as events too. This is the only place the console calls the engine.
//!
//! The bridge drops nest events that change nothing (an idle nest reports each poll) and wakes
//! the console at most every [`PROGRESS_REPAINT`] for progress-only changes, so that an idle
//! line costs no frames and a busy one a bounded number.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use eframe::egui;
use station::engine::NestView;
use station::{Command, Engine, Event, Session};
use tokio::runtime::Handle;
use tokio::sync::broadcast::error::RecvError;

use crate::state::{Failure, FailureKind, SignedIn, UiCommand, UiEvent};

/// Longest wait before a progress-only change is drawn.
pub const PROGRESS_REPAINT: Duration = Duration::from_millis(50);

/// Where the console sends its commands.
pub trait CommandSink {
    /// Carries out `cmd`; the result comes back as a [`UiEvent`].
    fn send(&self, cmd: UiCommand);
}

/// The engine, seen from the console.
#[derive(Debug)]
pub struct Backend {
    engine: Engine,
    rt: Handle,
    events: mpsc::Sender<UiEvent>,
    ctx: egui::Context,
    /// The console's session. Only the backend holds it: the state and view see the user's
    /// name and role.
    session: Arc<Mutex<Option<Arc<Session>>>>,
    /// Commands that change something run one at a time, in the order given.
    ordered: tokio::sync::mpsc::UnboundedSender<(Command, Arc<Session>)>,
}

impl Backend {
    /// Starts the bridge and the command worker on `rt`; returns the backend and the receiver
    /// of the console's events.
    pub fn start(
        engine: Engine,
        rt: Handle,
        ctx: egui::Context,
    ) -> (Backend, mpsc::Receiver<UiEvent>) {
        let (tx, rx) = mpsc::channel();
        rt.spawn(bridge(engine.clone(), tx.clone(), ctx.clone()));
        let (otx, orx) = tokio::sync::mpsc::unbounded_channel();
        let session = Arc::new(Mutex::new(None));
        rt.spawn(worker(
            engine.clone(),
            orx,
            tx.clone(),
            ctx.clone(),
            Arc::clone(&session),
        ));
        (
            Backend {
                engine,
                rt,
                events: tx,
                ctx,
                session,
                ordered: otx,
            },
            rx,
        )
    }
}

/// Sends an event to the console and wakes it. False when the console is gone.
fn deliver(tx: &mpsc::Sender<UiEvent>, ctx: &egui::Context, ev: UiEvent) -> bool {
    let ok = tx.send(ev).is_ok();
    ctx.request_repaint();
    ok
}

/// A fresh read of the line (it reads the journal: off the async threads).
async fn snapshot(engine: &Engine) -> Option<station::LineView> {
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.snapshot()).await.ok()
}

async fn bridge(engine: Engine, tx: mpsc::Sender<UiEvent>, ctx: egui::Context) {
    // Subscribe first, then read: nothing that happens in between is lost.
    let mut rx = engine.subscribe();
    if let Some(line) = snapshot(&engine).await
        && !deliver(&tx, &ctx, UiEvent::Snapshot(line))
    {
        return;
    }
    let mut last: HashMap<u32, NestView> = HashMap::new();
    loop {
        match rx.recv().await {
            Ok(Event::Nest(n)) => {
                let progress_only = match last.get(&n.nest) {
                    Some(old) if *old == n => continue,
                    Some(old) => {
                        let mut o = old.clone();
                        o.progress = n.progress;
                        o == n
                    }
                    None => false,
                };
                last.insert(n.nest, n.clone());
                if tx.send(UiEvent::Engine(Event::Nest(n))).is_err() {
                    return;
                }
                if progress_only {
                    ctx.request_repaint_after(PROGRESS_REPAINT);
                } else {
                    ctx.request_repaint();
                }
            }
            Ok(ev @ Event::MeterFinished { .. }) => {
                if !deliver(&tx, &ctx, UiEvent::Engine(ev)) {
                    return;
                }
                // The events carry one cycle; the average is the engine's.
                if let Some(line) = snapshot(&engine).await {
                    let ev = UiEvent::CycleTimes {
                        last: line.last_cycle_ms,
                        avg: line.avg_cycle_ms,
                    };
                    if !deliver(&tx, &ctx, ev) {
                        return;
                    }
                }
            }
            Ok(ev) => {
                if !deliver(&tx, &ctx, UiEvent::Engine(ev)) {
                    return;
                }
            }
            Err(RecvError::Lagged(_)) => {
                // Missed events: read the whole line again.
                last.clear();
                if let Some(line) = snapshot(&engine).await
                    && !deliver(&tx, &ctx, UiEvent::Snapshot(line))
                {
                    return;
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}

async fn worker(
    engine: Engine,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Command, Arc<Session>)>,
    tx: mpsc::Sender<UiEvent>,
    ctx: egui::Context,
    held: Arc<Mutex<Option<Arc<Session>>>>,
) {
    while let Some((cmd, session)) = rx.recv().await {
        let ev = run(&engine, cmd, &session, &held).await;
        if !deliver(&tx, &ctx, ev) {
            return;
        }
    }
}

async fn run(
    engine: &Engine,
    cmd: Command,
    session: &Session,
    held: &Mutex<Option<Arc<Session>>>,
) -> UiEvent {
    let what = describe(&cmd);
    let result = engine
        .execute(session, cmd)
        .await
        .map_err(|e| Failure::from_error(&e));
    if let Err(f) = &result
        && f.kind == FailureKind::Expired
    {
        // The engine ended this session: forget it (unless a new log-in has replaced it).
        let mut h = lock(held);
        if h.as_ref().is_some_and(|s| std::ptr::eq(&**s, session)) {
            *h = None;
        }
    }
    UiEvent::Replied { what, result }
}

/// Commands that only read: they run at once, beside the ordered ones.
fn read_only(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::ListFirmware
            | Command::ListCustomers
            | Command::ListBatches
            | Command::ListAlarms
            | Command::BatchStatus { .. }
            | Command::AuditTail { .. }
            | Command::AuditVerify
    )
}

/// A command in words, for messages ("start nest 3").
pub fn describe(cmd: &Command) -> String {
    match cmd {
        Command::StartLine => "start line".into(),
        Command::StopLine => "stop line".into(),
        Command::EnableNest { nest, enabled } => {
            format!("{} nest {nest}", if *enabled { "start" } else { "stop" })
        }
        Command::ClearNest { nest } => format!("clear nest {nest}"),
        Command::OpenBatch(spec) => format!("open batch {}", spec.work_order),
        Command::CloseBatch { .. } => "close batch".into(),
        Command::Rework { uid } => format!("rework {uid}"),
        Command::AckAlarm { id } => format!("acknowledge alarm {id}"),
        Command::ListFirmware => "list firmware".into(),
        Command::ListCustomers => "list customers".into(),
        Command::ListBatches => "list batches".into(),
        Command::ListAlarms => "list alarms".into(),
        Command::AuditVerify => "verify audit log".into(),
        Command::AuditTail { .. } => "read audit log".into(),
        _ => "command".into(),
    }
}

fn lock(m: &Mutex<Option<Arc<Session>>>) -> std::sync::MutexGuard<'_, Option<Arc<Session>>> {
    // A plain value replaced whole: consistent even after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CommandSink for Backend {
    fn send(&self, cmd: UiCommand) {
        let (engine, tx, ctx) = (self.engine.clone(), self.events.clone(), self.ctx.clone());
        let held = Arc::clone(&self.session);
        let session = lock(&self.session).clone();
        match cmd {
            UiCommand::Login { user, pin } => {
                self.rt.spawn(async move {
                    let ev = match engine.login(&user, &pin).await {
                        Ok(s) => {
                            let who = SignedIn {
                                name: s.user.clone(),
                                role: s.role,
                            };
                            // A new log-in replaces the session before it.
                            let old = lock(&held).replace(Arc::new(s));
                            if let Some(old) = old {
                                let _ = engine.logout(&old).await;
                            }
                            UiEvent::LoggedIn(who)
                        }
                        Err(e) => UiEvent::LoginRefused(Failure::from_error(&e)),
                    };
                    deliver(&tx, &ctx, ev);
                });
            }
            UiCommand::Logout => {
                let session = lock(&self.session).take();
                self.rt.spawn(async move {
                    if let Some(s) = session {
                        // Ending a session that already expired is not an error for the user.
                        let _ = engine.logout(&s).await;
                    }
                    deliver(&tx, &ctx, UiEvent::LoggedOut);
                });
            }
            UiCommand::Run(cmd) => {
                let Some(session) = session else {
                    let what = describe(&cmd);
                    let result = Err(Failure::from_error(&station::Error::Auth(
                        station::auth::AuthError::Expired,
                    )));
                    deliver(&tx, &ctx, UiEvent::Replied { what, result });
                    return;
                };
                if read_only(&cmd) {
                    self.rt.spawn(async move {
                        let ev = run(&engine, cmd, &session, &held).await;
                        deliver(&tx, &ctx, ev);
                    });
                } else if self.ordered.send((cmd, session)).is_err() {
                    deliver(
                        &tx,
                        &ctx,
                        UiEvent::Replied {
                            what: "command".into(),
                            result: Err(Failure::other("the station engine has stopped")),
                        },
                    );
                }
            }
            UiCommand::AckAlarm { id, user, pin } => {
                self.rt.spawn(async move {
                    let result = match engine.login(&user, &pin).await {
                        Err(e) => Err(Failure::from_error(&e)),
                        Ok(sup) => {
                            let r = engine.execute(&sup, Command::AckAlarm { id }).await;
                            let _ = engine.logout(&sup).await;
                            r.map(|_| sup.user.clone())
                                .map_err(|e| Failure::from_error(&e))
                        }
                    };
                    deliver(&tx, &ctx, UiEvent::AlarmAck { id, result });
                });
            }
        }
    }
}
