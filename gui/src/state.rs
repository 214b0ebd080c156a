//! What the console knows: a plain value that [`AppState::apply`] changes as engine events and
//! command results arrive, and that the view reads and edits (form fields, the PIN being typed).
//!
//! It holds no engine, no channel and no thread: everything it learns comes in as a [`UiEvent`],
//! and everything it wants done goes out as a [`UiCommand`]. That makes it easy to test and to
//! render from made-up data (the snapshot tests do).

use std::collections::VecDeque;

use station::audit::{Entry, Verification};
use station::auth::{Action, AuthError, Role};
use station::engine::{Health, NestView};
use station::records::{BatchRow, CustomerRow, FirmwareRow};
use station::{Command, Event, LineView, Reply};
use zeroize::Zeroizing;

/// Failed meters kept for the rework list.
const FAILED_KEPT: usize = 50;

/// Something that happened, for the console to show.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a few per second at most
pub enum UiEvent {
    /// From the engine's event stream.
    Engine(Event),
    /// The whole line, read afresh.
    Snapshot(LineView),
    /// Cycle times from a fresh read of the line (the events carry single cycles only).
    CycleTimes {
        /// Last cycle, ms.
        last: Option<u64>,
        /// Average cycle, ms.
        avg: Option<u64>,
    },
    /// What the daemon says of the cell at log-in (just before [`UiEvent::LoggedIn`]).
    Cell(CellInfo),
    /// A log-in succeeded (the backend keeps the session itself).
    LoggedIn(SignedIn),
    /// A log-in was refused.
    LoginRefused(Failure),
    /// The session ended at the user's request.
    LoggedOut,
    /// A command finished.
    Replied {
        /// What was asked, in words ("start line").
        what: String,
        /// The answer.
        result: Result<Reply, Failure>,
    },
    /// A supervisor's acknowledgement of an alarm finished.
    AlarmAck {
        /// The alarm.
        id: i64,
        /// Who acknowledged it, or why not.
        result: Result<String, Failure>,
    },
}

/// Something the view asks for.
#[derive(Debug, Clone)]
pub enum UiCommand {
    /// Log in.
    Login {
        /// User name.
        user: String,
        /// PIN.
        pin: Zeroizing<String>,
    },
    /// End the session.
    Logout,
    /// Run an engine command as the logged-in user.
    Run(Command),
    /// Acknowledge an alarm as a supervisor who is not necessarily the logged-in user: log that
    /// user in, acknowledge with their session, log them out again.
    AckAlarm {
        /// Alarm id.
        id: i64,
        /// User name.
        user: String,
        /// PIN.
        pin: Zeroizing<String>,
    },
}

/// Who is logged in. The session token stays with the backend: the view never sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// User name.
    pub name: String,
    /// Role.
    pub role: Role,
}

/// The cell, as the daemon describes it at log-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellInfo {
    /// Station id.
    pub station: String,
    /// Meter models of the cell.
    pub models: Vec<String>,
    /// The manufacturer's FLAG ID.
    pub flag_id: String,
    /// Sessions end after this long without a command.
    pub idle_timeout: std::time::Duration,
}

/// Why something was refused, as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What happened and what to do, in words.
    pub message: String,
    /// What kind of refusal.
    pub kind: FailureKind,
}

/// Kinds of refusal the console reacts to differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The session ended: back to the log-in screen.
    Expired,
    /// The role may not do this.
    Forbidden,
    /// Wrong user or PIN.
    BadCredentials,
    /// Locked out.
    Locked,
    /// Anything else.
    Other,
}

impl Failure {
    /// From an engine error.
    pub fn from_error(e: &station::Error) -> Failure {
        let kind = match e {
            station::Error::Auth(AuthError::Expired) => FailureKind::Expired,
            station::Error::Auth(AuthError::Forbidden { .. }) => FailureKind::Forbidden,
            station::Error::Auth(AuthError::BadCredentials { .. }) => FailureKind::BadCredentials,
            station::Error::Auth(AuthError::Locked { .. }) => FailureKind::Locked,
            _ => FailureKind::Other,
        };
        Failure {
            message: e.to_string(),
            kind,
        }
    }

    /// From a refusal of the daemon.
    pub fn from_client(e: &station::api::client::ClientError) -> Failure {
        let kind = if e.is_locked() {
            FailureKind::Locked
        } else if e.is_bad_credentials() {
            FailureKind::BadCredentials
        } else if e.is_forbidden() {
            FailureKind::Forbidden
        } else if e.is_expired() {
            FailureKind::Expired
        } else {
            FailureKind::Other
        };
        Failure {
            message: e.message.clone(),
            kind,
        }
    }

    /// Anything else.
    pub fn other(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            kind: FailureKind::Other,
        }
    }
}

/// A message on screen: what the last action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Text.
    pub text: String,
    /// Good news or bad.
    pub good: bool,
}

impl Notice {
    fn good(text: impl Into<String>) -> Notice {
        Notice {
            text: text.into(),
            good: true,
        }
    }
    fn bad(text: impl Into<String>) -> Notice {
        Notice {
            text: text.into(),
            good: false,
        }
    }
}

/// The screens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tab {
    /// Nests and the batch.
    Line,
    /// Open and close batches, rework (supervisor).
    Batch,
    /// The audit log.
    Audit,
    /// HSM, ports, database.
    Health,
    /// The factory across cells, from the registry (supervisors, officers, auditors).
    Fleet,
    /// The shift's dashboards: yield per nest and step, failure reasons, cycle time.
    Shift,
}

impl Tab {
    /// Title.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Line => "Line",
            Tab::Batch => "Batch and rework",
            Tab::Audit => "Audit",
            Tab::Health => "Health",
            Tab::Fleet => "Factory",
            Tab::Shift => "Shift",
        }
    }
}

/// The log-in form.
#[derive(Debug, Default)]
pub struct LoginForm {
    /// User name.
    pub user: String,
    /// PIN typed so far.
    pub pin: Zeroizing<String>,
    /// Waiting for the engine.
    pub busy: bool,
    /// Result of the last attempt, or why the last session ended.
    pub notice: Option<Notice>,
}

/// The supervisor's acknowledgement of an alarm.
#[derive(Debug)]
pub struct AckForm {
    /// Alarm id.
    pub alarm: i64,
    /// Supervisor's name.
    pub user: String,
    /// PIN typed so far.
    pub pin: Zeroizing<String>,
    /// Waiting for the engine.
    pub busy: bool,
    /// Why the last attempt was refused.
    pub notice: Option<Notice>,
}

/// The batch screen's form and lists.
#[derive(Debug, Default)]
pub struct BatchForm {
    /// Lists requested (firmware, customers, batches).
    pub requested: bool,
    /// Firmware releases.
    pub firmware: Vec<FirmwareRow>,
    /// Customers.
    pub customers: Vec<CustomerRow>,
    /// Batches so far.
    pub batches: Vec<BatchRow>,
    /// Work order.
    pub work_order: String,
    /// Model.
    pub model: String,
    /// Chosen firmware (SHA-256).
    pub firmware_sha: Option<String>,
    /// Chosen customer.
    pub customer: Option<String>,
    /// Quantity.
    pub quantity: String,
    /// Serial prefix.
    pub serial_prefix: String,
    /// First serial.
    pub serial_first: String,
    /// Last serial.
    pub serial_last: String,
    /// Closing asked for, waiting for confirmation.
    pub confirm_close: bool,
    /// Serial fields were filled from the batches list.
    pub prefilled: bool,
    /// The serial number whose label is to be printed again.
    pub reprint: String,
}

/// Severity filter of the audit screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeverityFilter {
    /// Everything.
    #[default]
    All,
    /// Warnings and critical.
    Warnings,
    /// Critical only.
    Critical,
}

impl SeverityFilter {
    /// Does an entry of this severity pass?
    pub fn passes(self, severity: &str) -> bool {
        match self {
            SeverityFilter::All => true,
            SeverityFilter::Warnings => matches!(severity, "warning" | "critical"),
            SeverityFilter::Critical => severity == "critical",
        }
    }
}

/// What the factory screen's command is called in replies.
pub const FLEET_VIEW: &str = "view the factory";

/// What the shift screen's command is called in replies.
pub const SHIFT_VIEW: &str = "view the shift";

/// How many hours the shift screen looks back.
pub const SHIFT_HOURS: u32 = 8;

/// The shift screen.
#[derive(Debug, Default)]
pub struct ShiftPage {
    /// The view was asked for (cleared to ask again).
    pub requested: bool,
    /// What the station answered.
    pub view: Option<station::shift::ShiftView>,
    /// Why it could not.
    pub error: Option<String>,
    /// Meters finished since the view was read (it is read again when the supervisor asks:
    /// reading it on a timer would keep an unattended session alive).
    pub finished_since: u32,
}

/// The factory screen.
#[derive(Debug, Default)]
pub struct FleetPage {
    /// The view was asked for (cleared to ask again).
    pub requested: bool,
    /// What the registry answered.
    pub view: Option<station::fleet::FleetView>,
    /// Why it could not answer.
    pub error: Option<String>,
    /// The serial number, system title or UID typed in the search box.
    pub find: String,
    /// What the shown matches were found for.
    pub found_for: Option<String>,
}

/// The audit screen.
#[derive(Debug, Default)]
pub struct AuditView {
    /// Entries requested.
    pub requested: bool,
    /// The newest entries, ascending.
    pub entries: Vec<Entry>,
    /// Verification of the whole log, if run.
    pub verification: Option<Verification>,
    /// Why verification could not run.
    pub verification_error: Option<String>,
    /// Text filter (kind, actor or details).
    pub filter: String,
    /// Severity filter.
    pub severity: SeverityFilter,
}

impl AuditView {
    /// The entries that pass the filters, newest first.
    pub fn filtered(&self) -> impl Iterator<Item = &Entry> {
        let needle = self.filter.trim().to_lowercase();
        self.entries.iter().rev().filter(move |e| {
            self.severity.passes(&e.severity)
                && (needle.is_empty()
                    || e.kind.to_lowercase().contains(&needle)
                    || e.actor.to_lowercase().contains(&needle)
                    || e.details.to_string().to_lowercase().contains(&needle))
        })
    }
}

/// A meter that failed, for the rework list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedMeter {
    /// Nest.
    pub nest: u32,
    /// UID, hex.
    pub uid: String,
    /// Serial, if one was assigned.
    pub serial: Option<String>,
    /// Why.
    pub reason: String,
    /// Rework approved from this console.
    pub reworked: bool,
}

/// Everything the console shows.
#[derive(Debug)]
pub struct AppState {
    /// Demo cell: show the demo users and PINs on the log-in screen.
    pub demo: bool,
    /// Models the cell is configured for.
    pub models: Vec<String>,
    /// The cell's manufacturer FLAG ID (default serial prefix).
    pub flag_id: String,
    /// The logged-in user.
    pub user: Option<SignedIn>,
    /// Users who logged in here recently, for one-touch name entry.
    pub recent_users: Vec<String>,
    /// The log-in form.
    pub login: LoginForm,
    /// The screen shown.
    pub tab: Tab,
    /// The line.
    pub line: LineView,
    /// The result of the last action.
    pub notice: Option<Notice>,
    /// Commands sent and not yet answered.
    pub pending: usize,
    /// An alarm acknowledgement in progress.
    pub ack: Option<AckForm>,
    /// The batch screen.
    pub batch: BatchForm,
    /// The audit screen.
    pub audit: AuditView,
    /// The factory screen.
    pub fleet: FleetPage,
    /// The shift screen.
    pub shift: ShiftPage,
    /// Recently failed meters.
    pub failed: VecDeque<FailedMeter>,
    /// The daemon ends a session after this long without a command (known after log-in).
    pub idle_timeout: Option<std::time::Duration>,
}

impl AppState {
    /// A console for `line` (a snapshot of the engine) and the cell's configured `models`.
    pub fn new(line: LineView, models: Vec<String>, flag_id: String, demo: bool) -> AppState {
        let model = models.first().cloned().unwrap_or_default();
        AppState {
            demo,
            models,
            batch: BatchForm {
                model,
                quantity: "100".into(),
                serial_prefix: flag_id.clone(),
                ..BatchForm::default()
            },
            flag_id,
            user: None,
            recent_users: Vec::new(),
            login: LoginForm::default(),
            tab: Tab::Line,
            line,
            notice: None,
            pending: 0,
            ack: None,
            audit: AuditView::default(),
            fleet: FleetPage::default(),
            shift: ShiftPage::default(),
            failed: VecDeque::new(),
            idle_timeout: None,
        }
    }

    /// An empty line view, before the first snapshot.
    pub fn empty_line(station: &str) -> LineView {
        LineView {
            station: station.into(),
            running: false,
            halted: None,
            operator: None,
            batch: None,
            nests: Vec::new(),
            alarms: Vec::new(),
            health: Health::default(),
            last_cycle_ms: None,
            avg_cycle_ms: None,
        }
    }

    /// May the logged-in user do `action` (per the engine's permission table)? The engine
    /// checks again; this only decides what to offer.
    pub fn may(&self, action: Action) -> bool {
        self.user
            .as_ref()
            .is_some_and(|u| station::auth::allowed(u.role, action))
    }

    /// The logged-in user's role.
    pub fn role(&self) -> Option<Role> {
        self.user.as_ref().map(|u| u.role)
    }

    /// The screens this user may see.
    pub fn tabs(&self) -> Vec<Tab> {
        let mut t = vec![Tab::Line];
        if self.may(Action::OpenBatch) || self.may(Action::Rework) {
            t.push(Tab::Batch);
        }
        if self.may(Action::ViewAudit) {
            t.push(Tab::Audit);
        }
        // Only a station with a registry has a factory to show.
        if self.may(Action::ViewFleet) && self.line.health.fleet.is_some() {
            t.push(Tab::Fleet);
        }
        if self.may(Action::ViewShift) {
            t.push(Tab::Shift);
        }
        t.push(Tab::Health);
        t
    }

    /// Takes in one event.
    pub fn apply(&mut self, ev: UiEvent) {
        match ev {
            UiEvent::Engine(e) => self.apply_engine(e),
            UiEvent::Snapshot(line) => self.line = line,
            UiEvent::CycleTimes { last, avg } => {
                self.line.last_cycle_ms = last;
                self.line.avg_cycle_ms = avg;
            }
            UiEvent::Cell(c) => {
                if self.models != c.models {
                    self.batch.model = c.models.first().cloned().unwrap_or_default();
                    self.models = c.models;
                }
                if self.flag_id != c.flag_id {
                    self.batch.serial_prefix = c.flag_id.clone();
                    self.flag_id = c.flag_id;
                }
                self.line.station = c.station;
                self.idle_timeout = Some(c.idle_timeout);
            }
            UiEvent::LoggedIn(user) => {
                self.login.busy = false;
                self.login.pin = Zeroizing::default();
                self.login.notice = None;
                self.recent_users.retain(|u| *u != user.name);
                self.recent_users.insert(0, user.name.clone());
                self.recent_users.truncate(6);
                self.notice = None;
                self.tab = Tab::Line;
                self.user = Some(user);
            }
            UiEvent::LoginRefused(f) => {
                self.login.busy = false;
                self.login.pin = Zeroizing::default();
                self.login.notice = Some(Notice::bad(f.message));
            }
            UiEvent::LoggedOut => self.end_session(None),
            UiEvent::Replied { what, result } => {
                self.pending = self.pending.saturating_sub(1);
                match result {
                    Ok(reply) => self.apply_reply(&what, reply),
                    Err(f) => self.refused(&what, f),
                }
            }
            UiEvent::AlarmAck { id, result } => match result {
                Ok(by) => {
                    self.line.alarms.retain(|a| a.id != id);
                    self.ack = None;
                    self.notice = Some(Notice::good(format!(
                        "alarm {id} acknowledged by {by} (recorded in the audit log)"
                    )));
                }
                Err(f) => {
                    if let Some(form) = &mut self.ack {
                        form.busy = false;
                        form.pin = Zeroizing::default();
                        form.notice = Some(Notice::bad(f.message));
                    }
                }
            },
        }
    }

    fn apply_engine(&mut self, e: Event) {
        match e {
            Event::Nest(n) => self.apply_nest(n),
            Event::Batch(b) => self.line.batch = b,
            Event::Alarm(a) if !self.line.alarms.iter().any(|x| x.id == a.id) => {
                self.line.alarms.push(a);
            }
            Event::Alarm(_) => {}
            Event::AlarmAcked { id, .. } => {
                self.line.alarms.retain(|a| a.id != id);
                if self.ack.as_ref().is_some_and(|f| f.alarm == id && !f.busy) {
                    self.ack = None;
                }
            }
            Event::Line { running, halted } => {
                self.line.running = running;
                self.line.halted = halted;
                if !running {
                    self.line.operator = None;
                }
            }
            Event::Health(h) => self.line.health = h,
            Event::MeterFinished {
                nest,
                uid,
                serial,
                ok,
                reason,
                cycle_ms,
            } => {
                self.shift.finished_since = self.shift.finished_since.saturating_add(1);
                if ok {
                    self.line.last_cycle_ms = Some(cycle_ms);
                } else {
                    self.failed.retain(|f| f.uid != uid);
                    self.failed.push_front(FailedMeter {
                        nest,
                        uid,
                        serial,
                        reason: reason.unwrap_or_else(|| "no reason given".into()),
                        reworked: false,
                    });
                    self.failed.truncate(FAILED_KEPT);
                }
            }
            // The engine's event set may grow; a new kind is shown after the next snapshot.
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    fn apply_nest(&mut self, n: NestView) {
        let i = n.nest as usize;
        if i == 0 {
            return;
        }
        if self.line.nests.len() < i {
            // A nest the snapshot did not list yet: keep the list dense and ordered.
            return;
        }
        self.line.nests[i - 1] = n;
    }

    fn apply_reply(&mut self, what: &str, reply: Reply) {
        match reply {
            Reply::Firmwares(f) => {
                if self.batch.firmware_sha.is_none() {
                    self.batch.firmware_sha = f.last().map(|f| f.sha256.clone());
                }
                self.batch.firmware = f;
            }
            Reply::Customers(c) => {
                if self.batch.customer.is_none() && c.len() == 1 {
                    self.batch.customer = c.first().map(|c| c.name.clone());
                }
                self.batch.customers = c;
            }
            Reply::Batches(b) => {
                self.batch.batches = b;
                self.prefill_serials();
            }
            Reply::Entries(e) => self.audit.entries = e,
            Reply::Verification(v) => {
                self.audit.verification_error = None;
                self.audit.verification = Some(v);
            }
            Reply::Alarms(a) => self.line.alarms = a,
            Reply::Fleet(v) => {
                self.fleet.error = None;
                self.fleet.view = Some(v);
            }
            Reply::Shift(v) => {
                self.shift.error = None;
                self.shift.view = Some(v);
                self.shift.finished_since = 0;
            }
            Reply::Batch(b) => {
                let open = b.state == "open";
                self.notice = Some(Notice::good(format!(
                    "{what}: batch {} {}",
                    b.work_order,
                    if open { "is open" } else { "is closed" }
                )));
                self.batch.confirm_close = false;
                if open {
                    self.batch.work_order.clear();
                    self.line.batch = Some(b.clone());
                } else if self.line.batch.as_ref().is_some_and(|x| x.id == b.id) {
                    self.line.batch = None;
                }
                // The serial range of the next batch starts after this one.
                self.batch.batches.retain(|x| x.id != b.id);
                self.batch.batches.push(b);
                self.batch.prefilled = false;
                self.prefill_serials();
            }
            _ => {
                if what.starts_with("rework ") {
                    let uid = what.trim_start_matches("rework ");
                    for f in self.failed.iter_mut().filter(|f| f.uid == uid) {
                        f.reworked = true;
                    }
                }
                self.notice = Some(Notice::good(format!("{what}: done")));
            }
        }
    }

    fn refused(&mut self, what: &str, f: Failure) {
        match f.kind {
            FailureKind::Expired => self.end_session(Some(Notice::bad(f.message))),
            _ => {
                if what == "verify audit log" {
                    self.audit.verification_error = Some(f.message.clone());
                }
                if what == FLEET_VIEW {
                    self.fleet.error = Some(f.message.clone());
                }
                if what == SHIFT_VIEW {
                    self.shift.error = Some(f.message.clone());
                }
                self.notice = Some(Notice::bad(format!("{what} refused: {}", f.message)));
            }
        }
    }

    /// Back to the log-in screen; what the user typed and saw goes with the session.
    fn end_session(&mut self, why: Option<Notice>) {
        self.user = None;
        self.notice = None;
        self.pending = 0;
        self.tab = Tab::Line;
        self.login.busy = false;
        self.login.pin = Zeroizing::default();
        self.login.notice = why;
        self.batch.confirm_close = false;
        self.batch.requested = false;
        self.audit = AuditView::default();
        self.fleet = FleetPage::default();
        self.shift = ShiftPage::default();
        self.ack = None;
    }

    /// First and last serial of the next batch, after every batch with the same prefix.
    fn prefill_serials(&mut self) {
        if self.batch.prefilled {
            return;
        }
        let prefix = self.batch.serial_prefix.clone();
        let next = self
            .batch
            .batches
            .iter()
            .filter(|b| b.serial_prefix == prefix)
            .map(|b| b.serial_last + 1)
            .max()
            .unwrap_or(1);
        let quantity = self.batch.quantity.trim().parse::<i64>().unwrap_or(100);
        self.batch.serial_first = next.to_string();
        // Failed meters use serial numbers too: leave room for one in ten.
        self.batch.serial_last = (next + quantity + quantity / 10 + 10 - 1).to_string();
        self.batch.prefilled = true;
    }

    /// Records that a command went out.
    pub fn sent(&mut self) {
        self.pending += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use station::engine::NestState;

    fn nest(n: u32, state: NestState) -> NestView {
        NestView {
            nest: n,
            name: format!("N{n}"),
            port: format!("/dev/ttyUSB{n}"),
            enabled: true,
            state,
            uid: None,
            serial: None,
            step: None,
            progress: None,
            message: None,
            port_open: true,
            last_cycle_ms: None,
        }
    }

    fn state() -> AppState {
        let mut line = AppState::empty_line("cell");
        line.nests = vec![nest(1, NestState::Idle), nest(2, NestState::Idle)];
        AppState::new(line, vec!["EM-300".into()], "DMW".into(), false)
    }

    #[test]
    fn the_factory_screen_is_offered_with_a_registry_to_roles_that_may_see_it() {
        let mut s = state();
        s.user = Some(SignedIn {
            name: "super".into(),
            role: Role::Supervisor,
        });
        assert!(!s.tabs().contains(&Tab::Fleet), "no registry, no factory");
        s.line.health.fleet = Some(station::engine::FleetHealth::default());
        assert!(s.tabs().contains(&Tab::Fleet));
        s.user = Some(SignedIn {
            name: "oper".into(),
            role: Role::Operator,
        });
        assert!(!s.tabs().contains(&Tab::Fleet));
        // The registry's refusal shows on the screen; a later answer replaces it.
        s.apply(UiEvent::Replied {
            what: FLEET_VIEW.into(),
            result: Err(Failure::from_error(&station::Error::Unavailable(
                "the registry at db:5432/registry cannot be reached".into(),
            ))),
        });
        assert!(
            s.fleet
                .error
                .as_deref()
                .is_some_and(|e| e.contains("cannot be reached"))
        );
        s.apply(UiEvent::Replied {
            what: FLEET_VIEW.into(),
            result: Ok(Reply::Fleet(station::fleet::FleetView::default())),
        });
        assert!(s.fleet.error.is_none() && s.fleet.view.is_some());
    }

    #[test]
    fn the_line_event_carries_why_the_station_stopped_it() {
        let mut s = state();
        s.line.running = true;
        s.line.operator = Some("oper".into());
        s.apply(UiEvent::Engine(Event::Line {
            running: false,
            halted: Some("HSM error during keys".into()),
        }));
        assert!(!s.line.running);
        assert_eq!(s.line.operator, None);
        assert_eq!(s.line.halted.as_deref(), Some("HSM error during keys"));
        s.apply(UiEvent::Engine(Event::Line {
            running: true,
            halted: None,
        }));
        assert!(s.line.running);
        assert_eq!(s.line.halted, None);
    }

    #[test]
    fn nest_events_replace_their_tile_only() {
        let mut s = state();
        let mut n = nest(2, NestState::Fail);
        n.message = Some("firmware hash mismatch".into());
        s.apply(UiEvent::Engine(Event::Nest(n.clone())));
        assert_eq!(s.line.nests[1], n);
        assert_eq!(s.line.nests[0].state, NestState::Idle);
        // A nest the view does not know is ignored, not a panic.
        s.apply(UiEvent::Engine(Event::Nest(nest(9, NestState::Busy))));
        s.apply(UiEvent::Engine(Event::Nest(nest(0, NestState::Busy))));
        assert_eq!(s.line.nests.len(), 2);
    }

    #[test]
    fn an_expired_session_goes_back_to_the_login_screen_with_the_reason() {
        let mut s = state();
        s.tab = Tab::Audit;
        s.audit.filter = "auth".into();
        s.apply(UiEvent::Replied {
            what: "start line".into(),
            result: Err(Failure::from_error(&station::Error::Auth(
                AuthError::Expired,
            ))),
        });
        assert!(s.user.is_none());
        assert_eq!(s.tab, Tab::Line);
        assert!(s.audit.filter.is_empty());
        let n = s.login.notice.expect("a reason on the login screen");
        assert!(!n.good);
        assert!(n.text.contains("ended"), "{}", n.text);
    }

    #[test]
    fn failed_meters_are_listed_newest_first_once_each() {
        let mut s = state();
        for (nest, uid) in [(1, "aa"), (2, "bb"), (1, "aa")] {
            s.apply(UiEvent::Engine(Event::MeterFinished {
                nest,
                uid: uid.into(),
                serial: None,
                ok: false,
                reason: Some("bad proof of possession".into()),
                cycle_ms: 0,
            }));
        }
        let uids: Vec<_> = s.failed.iter().map(|f| f.uid.as_str()).collect();
        assert_eq!(uids, ["aa", "bb"]);
    }

    #[test]
    fn serials_of_the_next_batch_follow_the_last_batch_with_the_prefix() {
        let mut s = state();
        s.batch.quantity = "20".into();
        let row = |prefix: &str, first, last| BatchRow {
            id: 1,
            work_order: "WO".into(),
            model: "EM-300".into(),
            firmware_id: 1,
            firmware_version: "1.0.0".into(),
            firmware_sha256: "00".into(),
            customer_id: 1,
            customer: "u".into(),
            quantity: 10,
            serial_prefix: prefix.into(),
            serial_first: first,
            serial_last: last,
            next_serial: first,
            state: "closed".into(),
            transport_key: String::new(),
            oaep_hash: String::new(),
            done: 0,
            failed: 0,
            in_flight: 0,
            opened_at: String::new(),
            opened_by: String::new(),
            closed_at: None,
            closed_by: None,
            exported_at: None,
            keys_deleted_at: None,
        };
        s.apply(UiEvent::Replied {
            what: "list batches".into(),
            result: Ok(Reply::Batches(vec![row("DMW", 1, 70), row("XYZ", 1, 900)])),
        });
        assert_eq!(s.batch.serial_first, "71");
        assert_eq!(s.batch.serial_last, "102");
    }
}
