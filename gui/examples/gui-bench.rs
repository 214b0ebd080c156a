//! `cargo xtask bench gui`: how long the console takes to draw a screen that changes every
//! frame, and how much CPU it uses while nothing changes. Two screens, one JSON line each:
//! `{"screen": "line", "nests": 16, "frame_ms_p50": F, "frame_ms_p99": F, "idle_cpu_percent": F}`
//! - `line`: the line view of 16 nests that all change every frame (an operator);
//! - `shift`: the supervisor's dashboards over a shift of 10 000 meters on 16 nests (one of them
//!   flagged), with a meter finishing every frame.
//!
//! `GUI_BENCH_SCREEN=line|shift` runs one of them.
//!
//! It runs the real console (theme, view, glow renderer) in a real window; without a display it
//! starts itself again under `xvfb-run`, so the figures are those of Mesa's software renderer.
//! Frame time is the interval between consecutive frames drawn as fast as possible (no vsync):
//! state update, layout, tessellation, rasterisation and buffer swap. Idle CPU is read from
//! `/proc/self/stat` over a few seconds in which nothing changes.
//!
//! The window is 1920×1080 (`GUI_BENCH_SIZE=1024x768` for another); `GUI_BENCH_DETAIL=1` also
//! prints the time spent in the console's own code (state and layout) per frame, on stderr;
//! `GUI_BENCH_FLOOR=1` draws an empty window instead of the console, for the renderer's floor.

use std::process::{Command, ExitCode};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;
use gui::ConsoleApp;
use gui::backend::CommandSink;
use gui::state::{AppState, SignedIn, Tab, UiCommand, UiEvent};
use gui::theme::Touch;
use station::auth::Role;
use station::engine::{Health, NestState, NestView, Step};
use station::records::BatchRow;
use station::{Event, LineView};

const NESTS: u32 = 16;
const WARMUP_FRAMES: usize = 60;
const FRAMES: usize = 600;
const IDLE: Duration = Duration::from_secs(6);
const SIZE: [f32; 2] = [1920.0, 1080.0];
const CHILD: &str = "GUI_BENCH_UNDER_XVFB";
const SCREEN: &str = "GUI_BENCH_SCREEN";
/// The meters of the shift the dashboards show.
const SHIFT_METERS: u32 = 10_000;

struct Nowhere;

impl CommandSink for Nowhere {
    fn send(&self, _cmd: UiCommand) {}
}

fn nest(n: u32, frame: usize) -> NestView {
    // Each nest runs its own cycle of 120 frames: 100 of firmware progress, then PASS, and every
    // fifth cycle of nest 3 a FAIL with its reason.
    let phase = (frame + n as usize * 7) % 120;
    let cycle = (frame + n as usize * 7) / 120;
    let (state, progress, message) = if phase < 100 {
        (NestState::Busy, Some(phase as f32 / 100.0), None)
    } else if n == 3 && cycle.is_multiple_of(5) {
        (
            NestState::Fail,
            None,
            Some("meter reported image hash 22bd413ac6814ae8 but was sent ddbd413ac6814ae8".into()),
        )
    } else {
        (NestState::Pass, None, None)
    };
    NestView {
        nest: n,
        name: format!("N{n}"),
        port: format!("/dev/ttyUSB{n}"),
        enabled: true,
        state,
        uid: Some(format!("0451{n:04}{cycle:08x}")),
        serial: Some(format!("DMW{:09}", cycle * 16 + n as usize)),
        step: (state == NestState::Busy).then_some(Step::Firmware),
        progress,
        message,
        port_open: true,
        last_cycle_ms: Some(11_000 + u64::from(n) * 13),
    }
}

fn line() -> LineView {
    let mut line = AppState::empty_line("bench-cell");
    line.running = true;
    line.operator = Some("oper".into());
    line.batch = Some(BatchRow {
        id: 1,
        work_order: "WO-BENCH".into(),
        model: "EM-300".into(),
        firmware_id: 1,
        firmware_version: "1.0.0".into(),
        firmware_sha256: "00".repeat(32),
        customer_id: 1,
        customer: "demo-utility".into(),
        quantity: 100_000,
        serial_prefix: "DMW".into(),
        serial_first: 1,
        serial_last: 200_000,
        next_serial: 1,
        state: "open".into(),
        transport_key: String::new(),
        oaep_hash: "sha256".into(),
        done: 0,
        failed: 0,
        in_flight: 16,
        opened_at: String::new(),
        opened_by: "super".into(),
        closed_at: None,
        closed_by: None,
        exported_at: None,
        keys_deleted_at: None,
    });
    line.nests = (1..=NESTS).map(|n| nest(n, 0)).collect();
    line.health = Health {
        hsm: true,
        hsm_detail: "bench".into(),
        database: true,
        fleet: None,
    };
    line
}

/// The window: 1920×1080, or GUI_BENCH_SIZE=WxH.
fn size() -> [f32; 2] {
    std::env::var("GUI_BENCH_SIZE")
        .ok()
        .and_then(|s| {
            let (w, h) = s.split_once('x')?;
            Some([w.parse().ok()?, h.parse().ok()?])
        })
        .unwrap_or(SIZE)
}

/// CPU time of this process so far (all threads), from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // Linux reports in USER_HZ, which is 100 on every architecture it supports.
    Duration::from_millis(ticks * 10)
}

#[derive(Default)]
struct Results {
    frames: Vec<Duration>,
    ui: Vec<Duration>,
    idle_cpu_percent: Option<f64>,
}

struct Bench {
    app: ConsoleApp,
    frame: usize,
    last: Option<Instant>,
    results: Arc<Mutex<Results>>,
    idle_started: bool,
}

impl eframe::App for Bench {
    fn logic(&mut self, ctx: &egui::Context, frame: &mut eframe::Frame) {
        let now = Instant::now();
        if self.frame < WARMUP_FRAMES + FRAMES {
            if let Some(last) = self.last
                && self.frame > WARMUP_FRAMES
                && let Ok(mut r) = self.results.lock()
            {
                r.frames.push(now - last);
            }
            self.last = Some(now);
            // Every nest changes every frame, and a meter finishes.
            for n in 1..=NESTS {
                self.app
                    .apply(UiEvent::Engine(Event::Nest(nest(n, self.frame))));
            }
            self.app.apply(UiEvent::Engine(Event::MeterFinished {
                nest: 1 + (self.frame as u32 % NESTS),
                uid: format!("0451{:08x}", self.frame),
                serial: Some(format!("DMW{:09}", self.frame)),
                ok: true,
                reason: None,
                cycle_ms: 5_300,
            }));
            self.frame += 1;
            ctx.request_repaint();
        } else if !self.idle_started {
            // Nothing changes from now on: measure what the console costs while it waits.
            self.idle_started = true;
            let ctx = ctx.clone();
            let results = Arc::clone(&self.results);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(1));
                let (c0, t0) = (cpu_time(), Instant::now());
                std::thread::sleep(IDLE);
                let (c1, t1) = (cpu_time(), Instant::now());
                let pct = 100.0 * (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
                if let Ok(mut r) = results.lock() {
                    r.idle_cpu_percent = Some(pct);
                }
                ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                ctx.request_repaint();
            });
        }
        self.app.logic(ctx, frame);
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let t = Instant::now();
        if std::env::var_os("GUI_BENCH_FLOOR").is_some() {
            // The floor: an empty window of the same size, cleared and swapped each frame.
            ui.label(self.frame.to_string());
            return;
        }
        self.app.ui(ui, frame);
        if let Ok(mut r) = self.results.lock() {
            r.ui.push(t.elapsed());
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Runs every screen in a process of its own (each a fresh window), under a virtual display
/// when there is none; `None` when this process is to run one screen itself.
fn children() -> Option<ExitCode> {
    if std::env::var_os(SCREEN).is_some()
        && (std::env::var_os("DISPLAY").is_some() || std::env::var_os(CHILD).is_some())
    {
        return None;
    }
    let Ok(exe) = std::env::current_exe() else {
        eprintln!("gui-bench: cannot find its own executable");
        return Some(ExitCode::FAILURE);
    };
    let screens = match std::env::var(SCREEN) {
        Ok(one) => vec![one],
        Err(_) => vec!["line".to_string(), "shift".to_string()],
    };
    for screen in screens {
        let mut c = if std::env::var_os("DISPLAY").is_some() {
            Command::new(&exe)
        } else {
            let [w, h] = size();
            let mut c = Command::new("xvfb-run");
            c.args(["-a", "-s", &format!("-screen 0 {w}x{h}x24")])
                .arg(&exe)
                .env(CHILD, "1");
            c
        };
        match c.env(SCREEN, &screen).status() {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("gui-bench: the {screen} run failed ({s})");
                return Some(ExitCode::FAILURE);
            }
            Err(e) => {
                eprintln!("gui-bench: cannot start the {screen} run ({e}); install xvfb");
                return Some(ExitCode::FAILURE);
            }
        }
    }
    Some(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    if let Some(code) = children() {
        return code;
    }
    let shift = std::env::var(SCREEN).is_ok_and(|s| s == "shift");
    let results = Arc::new(Mutex::new(Results::default()));
    let r2 = Arc::clone(&results);
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_inner_size(size())
            .with_decorations(false),
        renderer: eframe::Renderer::Glow,
        // Frames as fast as they can be drawn: the interval is the frame's cost.
        glow_options: eframe::egui_glow::GlowConfiguration {
            vsync: false,
            ..Default::default()
        },
        // As the console ships: flat colours need no dithering, which costs per pixel.
        dithering: false,
        ..eframe::NativeOptions::default()
    };
    let run = eframe::run_native(
        "gui-bench",
        native,
        Box::new(move |cc| {
            let (_tx, events) = mpsc::channel();
            let mut state = AppState::new(line(), vec!["EM-300".into()], "DMW".into(), false);
            if shift {
                state.apply(UiEvent::LoggedIn(SignedIn {
                    name: "super".into(),
                    role: Role::Supervisor,
                }));
                state.tab = Tab::Shift;
                state.shift.requested = true;
                state.shift.view = Some(station::shift::sample(
                    NESTS,
                    SHIFT_METERS,
                    Some(5),
                    1_796_000_000_000,
                ));
            } else {
                state.apply(UiEvent::LoggedIn(SignedIn {
                    name: "oper".into(),
                    role: Role::Operator,
                }));
            }
            let app = ConsoleApp::with_parts(
                &cc.egui_ctx,
                state,
                events,
                Box::new(Nowhere),
                Duration::from_secs(15 * 60),
                Touch::default(),
            );
            Ok(Box::new(Bench {
                app,
                frame: 0,
                last: None,
                results: r2,
                idle_started: false,
            }))
        }),
    );
    if let Err(e) = run {
        eprintln!("gui-bench: the window failed: {e}");
        return ExitCode::FAILURE;
    }
    let Ok(r) = results.lock() else {
        return ExitCode::FAILURE;
    };
    if std::env::var_os("GUI_BENCH_DETAIL").is_some() {
        let mut ui = r.ui.clone();
        ui.sort();
        eprintln!(
            "console code per frame: p50 {:.2} ms, p99 {:.2} ms",
            percentile(&ui, 0.5),
            percentile(&ui, 0.99)
        );
    }
    let mut frames = r.frames.clone();
    frames.sort();
    if frames.len() < FRAMES / 2 || r.idle_cpu_percent.is_none() {
        eprintln!(
            "gui-bench: the run ended early ({} frames measured)",
            frames.len()
        );
        return ExitCode::FAILURE;
    }
    let [w, h] = size();
    println!(
        "{{\"screen\": \"{}\", \"size\": \"{w}x{h}\", \"nests\": {NESTS}, \"shift_meters\": {}, \"frame_ms_p50\": {:.2}, \"frame_ms_p99\": {:.2}, \"idle_cpu_percent\": {:.2}}}",
        if shift { "shift" } else { "line" },
        if shift { SHIFT_METERS } else { 0 },
        percentile(&frames, 0.50),
        percentile(&frames, 0.99),
        r.idle_cpu_percent.unwrap_or(f64::NAN)
    );
    ExitCode::SUCCESS
}
