//! The console's link to `stationd`, on the tokio runtime: the log-in, a bridge task that
//! forwards the daemon's event stream to the console and wakes it, and the execution of the
//! console's commands, whose results come back as events too. This is the only place the console
//! talks to the daemon; it holds the session token and nothing else (no PIN after the log-in
//! call, no journal, no HSM).
//!
//! The bridge runs while a user is logged in (the daemon streams to sessions only). It drops
//! nest events that change nothing (an idle nest reports each poll) and wakes the console at
//! most every [`PROGRESS_REPAINT`] for progress-only changes, so that an idle line costs no
//! frames and a busy one a bounded number.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use eframe::egui;
use station::api::client::{Client, ClientError};
use station::api::convert::Update;
use station::engine::NestView;
use station::{Command, Event, Session};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::state::{CellInfo, Failure, FailureKind, SignedIn, UiCommand, UiEvent};

/// Longest wait before a progress-only change is drawn.
pub const PROGRESS_REPAINT: Duration = Duration::from_millis(50);

/// Where the console sends its commands.
pub trait CommandSink {
    /// Carries out `cmd`; the result comes back as a [`UiEvent`].
    fn send(&self, cmd: UiCommand);
}

/// The logged-in session and the task following the line for it.
#[derive(Default)]
struct Held {
    session: Option<Arc<Session>>,
    bridge: Option<JoinHandle<()>>,
}

impl Held {
    /// Forgets the session and stops following the line.
    fn clear(&mut self) -> Option<Arc<Session>> {
        if let Some(b) = self.bridge.take() {
            b.abort();
        }
        self.session.take()
    }
}

/// The daemon, seen from the console.
pub struct Backend {
    client: Client,
    rt: Handle,
    events: mpsc::Sender<UiEvent>,
    ctx: egui::Context,
    /// The console's session. Only the backend holds it: the state and view see the user's
    /// name and role.
    held: Arc<Mutex<Held>>,
    /// Commands that change something run one at a time, in the order given.
    ordered: tokio::sync::mpsc::UnboundedSender<(Command, Arc<Session>)>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").finish_non_exhaustive()
    }
}

impl Backend {
    /// Starts the command worker on `rt`; returns the backend and the receiver of the console's
    /// events.
    pub fn start(
        client: Client,
        rt: Handle,
        ctx: egui::Context,
    ) -> (Backend, mpsc::Receiver<UiEvent>) {
        let (tx, rx) = mpsc::channel();
        let (otx, orx) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::new(Mutex::new(Held::default()));
        rt.spawn(worker(
            client.clone(),
            orx,
            tx.clone(),
            ctx.clone(),
            Arc::clone(&held),
        ));
        (
            Backend {
                client,
                rt,
                events: tx,
                ctx,
                held,
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

/// Follows the line for `session` until the stream ends; a stream the daemon ended for the
/// session sends the console back to log-in.
async fn bridge(
    client: Client,
    session: Arc<Session>,
    tx: mpsc::Sender<UiEvent>,
    ctx: egui::Context,
) {
    let mut stream = match client.events(&session).await {
        Ok(s) => s,
        Err(e) => {
            deliver(&tx, &ctx, ended(&e));
            return;
        }
    };
    let mut last: HashMap<u32, NestView> = HashMap::new();
    loop {
        match stream.next().await {
            Some(Ok(Update::Snapshot(line))) => {
                last.clear();
                if !deliver(&tx, &ctx, UiEvent::Snapshot(line)) {
                    return;
                }
            }
            Some(Ok(Update::Event(Event::Nest(n)))) => {
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
            Some(Ok(Update::Event(ev @ Event::MeterFinished { .. }))) => {
                if !deliver(&tx, &ctx, UiEvent::Engine(ev)) {
                    return;
                }
                // The events carry one cycle; the average is the daemon's.
                if let Ok(line) = client.snapshot(&session).await {
                    let ev = UiEvent::CycleTimes {
                        last: line.last_cycle_ms,
                        avg: line.avg_cycle_ms,
                    };
                    if !deliver(&tx, &ctx, ev) {
                        return;
                    }
                }
            }
            Some(Ok(Update::Event(ev))) => {
                if !deliver(&tx, &ctx, UiEvent::Engine(ev)) {
                    return;
                }
            }
            Some(Err(e)) => {
                deliver(&tx, &ctx, ended(&e));
                return;
            }
            None => {
                deliver(
                    &tx,
                    &ctx,
                    ended(&ClientError {
                        code: station::api::client::Code::Unavailable,
                        reason: None,
                        message: "the station's service stopped; log in again when it is back"
                            .into(),
                    }),
                );
                return;
            }
        }
    }
}

/// The line can no longer be followed: the console goes back to log-in with the reason.
fn ended(e: &ClientError) -> UiEvent {
    UiEvent::Replied {
        what: "follow the line".into(),
        result: Err(Failure {
            message: e.message.clone(),
            kind: FailureKind::Expired,
        }),
    }
}

async fn worker(
    client: Client,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Command, Arc<Session>)>,
    tx: mpsc::Sender<UiEvent>,
    ctx: egui::Context,
    held: Arc<Mutex<Held>>,
) {
    while let Some((cmd, session)) = rx.recv().await {
        let ev = run(&client, cmd, &session, &held).await;
        if !deliver(&tx, &ctx, ev) {
            return;
        }
    }
}

async fn run(client: &Client, cmd: Command, session: &Arc<Session>, held: &Mutex<Held>) -> UiEvent {
    let what = describe(&cmd);
    let result = client
        .execute(session, cmd)
        .await
        .map_err(|e| Failure::from_client(&e));
    if let Err(f) = &result
        && f.kind == FailureKind::Expired
    {
        // The daemon ended this session: forget it (unless a new log-in has replaced it).
        let mut h = lock(held);
        if h.session.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            h.clear();
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
            | Command::FleetView { .. }
            | Command::ShiftView { .. }
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
        Command::ReprintLabel { serial } => format!("reprint the label of {serial}"),
        Command::AckAlarm { id } => format!("acknowledge alarm {id}"),
        Command::ListFirmware => "list firmware".into(),
        Command::ListCustomers => "list customers".into(),
        Command::ListBatches => "list batches".into(),
        Command::ListAlarms => "list alarms".into(),
        Command::AuditVerify => "verify audit log".into(),
        Command::AuditTail { .. } => "read audit log".into(),
        Command::FleetView { .. } => crate::state::FLEET_VIEW.into(),
        Command::ShiftView { .. } => crate::state::SHIFT_VIEW.into(),
        _ => "command".into(),
    }
}

fn lock(m: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    // Plain values replaced whole: consistent even after a panic elsewhere.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CommandSink for Backend {
    fn send(&self, cmd: UiCommand) {
        let (client, tx, ctx) = (self.client.clone(), self.events.clone(), self.ctx.clone());
        let held = Arc::clone(&self.held);
        let session = lock(&self.held).session.clone();
        match cmd {
            UiCommand::Login { user, pin } => {
                let rt = self.rt.clone();
                self.rt.spawn(async move {
                    let ev = match client.login(&user, &pin).await {
                        Ok(login) => {
                            let s = Arc::new(login.session);
                            let who = SignedIn {
                                name: s.user.clone(),
                                role: s.role,
                            };
                            deliver(
                                &tx,
                                &ctx,
                                UiEvent::Cell(CellInfo {
                                    station: login.station,
                                    models: login.models,
                                    flag_id: login.flag_id,
                                    idle_timeout: login.idle_timeout,
                                }),
                            );
                            // A new log-in replaces the session before it, and follows the line.
                            let bridge = rt.spawn(bridge(
                                client.clone(),
                                Arc::clone(&s),
                                tx.clone(),
                                ctx.clone(),
                            ));
                            let old = {
                                let mut h = lock(&held);
                                let old = h.clear();
                                h.session = Some(s);
                                h.bridge = Some(bridge);
                                old
                            };
                            if let Some(old) = old {
                                let _ = client.logout(&old).await;
                            }
                            UiEvent::LoggedIn(who)
                        }
                        Err(e) => UiEvent::LoginRefused(Failure::from_client(&e)),
                    };
                    deliver(&tx, &ctx, ev);
                });
            }
            UiCommand::Logout => {
                let session = lock(&self.held).clear();
                self.rt.spawn(async move {
                    if let Some(s) = session {
                        // Ending a session that already expired is not an error for the user.
                        let _ = client.logout(&s).await;
                    }
                    deliver(&tx, &ctx, UiEvent::LoggedOut);
                });
            }
            UiCommand::Run(cmd) => {
                let Some(session) = session else {
                    let what = describe(&cmd);
                    let result = Err(Failure {
                        message: "the session has ended; log in again".into(),
                        kind: FailureKind::Expired,
                    });
                    deliver(&tx, &ctx, UiEvent::Replied { what, result });
                    return;
                };
                if read_only(&cmd) {
                    self.rt.spawn(async move {
                        let ev = run(&client, cmd, &session, &held).await;
                        deliver(&tx, &ctx, ev);
                    });
                } else if self.ordered.send((cmd, session)).is_err() {
                    deliver(
                        &tx,
                        &ctx,
                        UiEvent::Replied {
                            what: "command".into(),
                            result: Err(Failure::other("the console's command worker has stopped")),
                        },
                    );
                }
            }
            UiCommand::AckAlarm { id, user, pin } => {
                self.rt.spawn(async move {
                    let result = match client.login(&user, &pin).await {
                        Err(e) => Err(Failure::from_client(&e)),
                        Ok(login) => {
                            let sup = login.session;
                            let r = client.execute(&sup, Command::AckAlarm { id }).await;
                            let _ = client.logout(&sup).await;
                            r.map(|_| sup.user.clone())
                                .map_err(|e| Failure::from_client(&e))
                        }
                    };
                    deliver(&tx, &ctx, UiEvent::AlarmAck { id, result });
                });
            }
        }
    }
}
