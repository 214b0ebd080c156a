//! The eframe application: owns the state, the event receiver and the command sink, and does
//! nothing but move events into the state, draw it, and hand the user's commands on.
//!
//! Frames are drawn only when something arrives (the backend wakes the context) or the user
//! touches the screen; the one timer is the session's idle deadline.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use eframe::egui;
use station::api::client::Client;

use crate::backend::{Backend, CommandSink};
use crate::state::{AppState, UiCommand, UiEvent};
use crate::theme::{self, Touch};
use crate::view;

/// After the session's idle time plus this, the console asks the daemon whether it has ended.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// The idle limit assumed until the daemon states its own at log-in.
const DEFAULT_IDLE: Duration = Duration::from_secs(15 * 60);

/// How the console runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleOptions {
    /// A demo cell: show the demo users and PINs.
    pub demo: bool,
    /// The screen.
    pub touch: Touch,
}

/// The touch console.
pub struct ConsoleApp {
    state: AppState,
    events: mpsc::Receiver<UiEvent>,
    sink: Box<dyn CommandSink>,
    /// The daemon ends a session after this much inactivity (until it says so at log-in).
    idle: Duration,
    /// When the session was last used.
    last_used: Instant,
    /// Paint the page colour under everything (a renderer that does not clear to
    /// [`eframe::App::clear_color`] needs it; eframe's does not).
    paint_background: bool,
}

impl std::fmt::Debug for ConsoleApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleApp")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl ConsoleApp {
    /// A console of the daemon `client` talks to, for the cell `station`, whose tasks run on
    /// `rt`, drawing into `ctx`. The line appears once a user has logged in (the daemon shows
    /// it to sessions only).
    pub fn new(
        client: Client,
        station: &str,
        rt: tokio::runtime::Handle,
        ctx: &egui::Context,
        opts: ConsoleOptions,
    ) -> ConsoleApp {
        let state = AppState::new(
            AppState::empty_line(station),
            Vec::new(),
            String::new(),
            opts.demo,
        );
        let (backend, events) = Backend::start(client, rt, ctx.clone());
        ConsoleApp::with_parts(
            ctx,
            state,
            events,
            Box::new(backend),
            DEFAULT_IDLE,
            opts.touch,
        )
    }

    /// A console from its parts: any source of events and any sink for commands (the
    /// benchmark feeds made-up events).
    pub fn with_parts(
        ctx: &egui::Context,
        state: AppState,
        events: mpsc::Receiver<UiEvent>,
        sink: Box<dyn CommandSink>,
        idle: Duration,
        touch: Touch,
    ) -> ConsoleApp {
        theme::apply(ctx, touch);
        ConsoleApp {
            state,
            events,
            sink,
            idle,
            last_used: Instant::now(),
            paint_background: false,
        }
    }

    /// Paints the page colour itself, for renderers that clear to transparent (egui_kittest's).
    /// eframe clears the window to the page colour, so the console skips that full-screen layer,
    /// which costs milliseconds per frame on a software rasteriser.
    pub fn paint_background(mut self, yes: bool) -> ConsoleApp {
        self.paint_background = yes;
        self
    }

    /// What the console shows.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Takes in one event, as if it had come from the engine.
    pub fn apply(&mut self, ev: UiEvent) {
        self.state.apply(ev);
    }

    /// Takes in every event that has arrived; returns how many.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while let Ok(ev) = self.events.try_recv() {
            self.state.apply(ev);
            n += 1;
        }
        n
    }

    /// Sends a command, as if the user had given it.
    pub fn command(&mut self, cmd: UiCommand) {
        match &cmd {
            UiCommand::Run(_) => {
                self.state.sent();
                self.last_used = Instant::now();
            }
            UiCommand::Login { .. } => self.last_used = Instant::now(),
            UiCommand::Logout | UiCommand::AckAlarm { .. } => {}
        }
        self.sink.send(cmd);
    }

    /// Once the session has been idle for the engine's limit, ask the engine (any command
    /// does): if it has ended the session, the answer sends the console back to log-in.
    fn check_expiry(&mut self, ctx: &egui::Context) {
        if self.state.user.is_none() {
            return;
        }
        let deadline = self.state.idle_timeout.unwrap_or(self.idle) + EXPIRY_MARGIN;
        let idle_for = self.last_used.elapsed();
        if idle_for >= deadline {
            self.command(UiCommand::Run(station::Command::ListAlarms));
        } else {
            ctx.request_repaint_after(deadline - idle_for);
        }
    }
}

impl eframe::App for ConsoleApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.drain();
        self.check_expiry(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        if self.paint_background {
            ui.painter()
                .rect_filled(ui.max_rect(), 0.0, theme::colour::PAGE);
        }
        for cmd in view::view(ui, &mut self.state) {
            self.command(cmd);
        }
    }

    fn clear_color(&self, _visuals: &egui::Visuals) -> [f32; 4] {
        theme::colour::PAGE.to_normalized_gamma_f32()
    }
}
