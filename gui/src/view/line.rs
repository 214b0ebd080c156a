//! The line view: the batch header with its counts and cycle times, start and stop, and one tile
//! per nest whose state reads at arm's length (colour, and the word: PASS, FAIL, BUSY, IDLE…).

use eframe::egui::{self, Align, Layout, RichText, Ui, Vec2};
use station::auth::Action;
use station::engine::{NestState, NestView};
use station::{Command, LineView};

use super::widgets::{self, Kind};
use crate::state::{AppState, UiCommand};
use crate::theme::{self, colour};

/// Narrowest tile, in points.
const MIN_TILE_WIDTH: f32 = 220.0;
/// Gap between tiles.
const GAP: f32 = 12.0;
/// Room for three lines of a failure reason.
const REASON_HEIGHT: f32 = 66.0;

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    batch_header(ui, &s.line);
    ui.add_space(4.0);
    controls(ui, s, out);
    ui.add_space(8.0);
    let may_run = s.may(Action::RunLine);
    let may_clear = s.may(Action::ClearNest);
    tiles(ui, &s.line.nests, may_run, may_clear, out);
}

/// Seconds with one decimal.
pub(super) fn seconds(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "–".into(),
    }
}

fn batch_header(ui: &mut Ui, line: &LineView) {
    egui::Frame::new()
        .stroke(egui::Stroke::new(1.0, colour::BORDER))
        .inner_margin(12)
        .show(ui, |ui| {
            ui.set_width(ui.available_width());
            let Some(b) = &line.batch else {
                ui.label(
                    RichText::new("No batch is open: a supervisor opens one (Batch and rework).")
                        .size(24.0)
                        .strong(),
                );
                return;
            };
            ui.horizontal_wrapped(|ui| {
                ui.label(
                    RichText::new(format!("Work order {}", b.work_order))
                        .size(26.0)
                        .strong(),
                );
                ui.separator();
                ui.label(RichText::new(format!("Model {}", b.model)).size(22.0));
                ui.separator();
                ui.label(RichText::new(format!("Firmware {}", b.firmware_version)).size(22.0));
                ui.separator();
                ui.label(RichText::new(format!("Customer {}", b.customer)).size(22.0));
            });
            ui.horizontal_wrapped(|ui| {
                let yield_text = b
                    .yield_percent()
                    .map(|y| format!("{y:.1} %"))
                    .unwrap_or_else(|| "–".into());
                for (label, value) in [
                    ("Produced", format!("{} of {}", b.done, b.quantity)),
                    ("Failed", b.failed.to_string()),
                    ("Remaining", b.remaining().to_string()),
                    ("Yield", yield_text),
                    ("Last cycle", seconds(line.last_cycle_ms)),
                    ("Average cycle", seconds(line.avg_cycle_ms)),
                ] {
                    ui.label(RichText::new(format!("{label}:")).color(colour::WEAK_TEXT));
                    ui.label(RichText::new(value).size(24.0).strong());
                    ui.add_space(12.0);
                }
            });
        });
}

fn controls(ui: &mut Ui, s: &AppState, out: &mut Vec<UiCommand>) {
    ui.horizontal(|ui| {
        let (word, fill) = if s.line.running {
            ("LINE RUNNING", colour::PASS)
        } else if s.line.halted.is_some() {
            ("LINE STOPPED BY THE STATION", colour::FAIL)
        } else {
            ("LINE STOPPED", colour::STOPPED)
        };
        egui::Frame::new()
            .fill(fill)
            .inner_margin(egui::Margin::symmetric(16, 10))
            .show(ui, |ui| {
                ui.label(
                    RichText::new(word)
                        .size(26.0)
                        .strong()
                        .color(colour::ON_DARK),
                );
            });
        if let Some(op) = &s.line.operator {
            ui.label(format!("started by {op}"));
        }

        if s.may(Action::RunLine) {
            ui.add_space(16.0);
            if s.line.running {
                if widgets::button(ui, "Stop line", Kind::Danger, 180.0).clicked() {
                    out.push(UiCommand::Run(Command::StopLine));
                }
            } else if widgets::button(ui, "Start line", Kind::Primary, 180.0).clicked() {
                out.push(UiCommand::Run(Command::StartLine));
            }
        }
    });
    if let Some(why) = &s.line.halted {
        ui.add(
            egui::Label::new(
                RichText::new(format!("{why}. Fix it, then start the line again."))
                    .size(20.0)
                    .color(colour::BAD_TEXT),
            )
            .wrap(),
        );
    }
}

fn tiles(
    ui: &mut Ui,
    nests: &[NestView],
    may_run: bool,
    may_clear: bool,
    out: &mut Vec<UiCommand>,
) {
    if nests.is_empty() {
        ui.label("This cell has no nests configured.");
        return;
    }
    let avail = ui.available_width();
    let fit = ((avail + GAP) / (MIN_TILE_WIDTH + GAP)).floor().max(1.0) as usize;
    let cols = fit.min(nests.len());
    let width = ((avail - GAP * (cols as f32 - 1.0)) / cols as f32).floor();
    let height = tile_height(ui);
    for row in nests.chunks(cols) {
        ui.horizontal_top(|ui| {
            ui.spacing_mut().item_spacing.x = GAP;
            for n in row {
                ui.allocate_ui_with_layout(
                    Vec2::new(width, height),
                    Layout::top_down(Align::Min),
                    |ui| tile(ui, n, width, height, may_run, may_clear, out),
                );
            }
        });
        ui.add_space(GAP - ui.spacing().item_spacing.y);
    }
}

/// Every tile has the same height, whatever it shows, so the grid never jumps.
fn tile_height(ui: &Ui) -> f32 {
    let t = widgets::target(ui);
    // margins, name row, state band, step, progress, reason, buttons, and the gaps between
    2.0 * 13.0 + 30.0 + BAND_HEIGHT + 24.0 + 14.0 + REASON_HEIGHT + t + 6.0 * 6.0 + 2.0
}

/// Height of the coloured state band.
const BAND_HEIGHT: f32 = 58.0;

fn tile(
    ui: &mut Ui,
    n: &NestView,
    width: f32,
    height: f32,
    may_run: bool,
    may_clear: bool,
    out: &mut Vec<UiCommand>,
) {
    let (fill, fg) = theme::state_colours(n.state);
    let border: f32 = if n.state == NestState::Fail { 4.0 } else { 1.0 };
    let border_colour = if n.state == NestState::Fail {
        colour::FAIL
    } else {
        colour::BORDER
    };
    egui::Frame::new()
        // No fill: the page shows through. Tiles cover most of the screen, and a layer
        // that size costs milliseconds per frame on a software rasteriser; the border and
        // the state band carry the tile.
        .stroke(egui::Stroke::new(border, border_colour))
        // A thicker border takes its width from the margin: the content never moves.
        .inner_margin(13 - border as i8)
        .show(ui, |ui| {
            let inner = (width - 26.0).floor();
            ui.set_width(inner);
            ui.set_height(height - 26.0);
            ui.spacing_mut().item_spacing.y = 6.0;
            ui.horizontal(|ui| {
                ui.label(RichText::new(&n.name).size(26.0).strong());
                ui.with_layout(Layout::right_to_left(Align::Center), |ui| {
                    let serial = n.serial.as_deref().unwrap_or("");
                    ui.label(RichText::new(serial).size(18.0).monospace());
                });
            });
            // The state band: colour for a glance, the word for everyone.
            let word = state_word(n);
            let (band, _) =
                ui.allocate_exact_size(Vec2::new(inner, BAND_HEIGHT), egui::Sense::hover());
            ui.painter().rect_filled(band, 4.0, fill);
            let r = ui.put(
                band,
                egui::Label::new(RichText::new(word).font(theme::state_font()).color(fg)),
            );
            let name = format!("Nest {}: {word}", n.nest);
            r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, &name));

            let progress = n.progress.filter(|_| n.state == NestState::Busy);
            let step = match (n.state, n.step) {
                (NestState::Busy, Some(step)) => match progress {
                    Some(p) => format!("Step: {} · {:.0} %", step.word(), p * 100.0),
                    None => format!("Step: {}", step.word()),
                },
                (NestState::Busy, None) => "Step: starting".into(),
                (NestState::Pass, _) => match n.last_cycle_ms {
                    Some(ms) => format!("Done in {}", seconds(Some(ms))),
                    None => "Done".into(),
                },
                _ if !n.enabled => "Nest disabled".into(),
                _ => String::new(),
            };
            ui.add_sized(
                [inner, 24.0],
                egui::Label::new(RichText::new(step).size(20.0)).truncate(),
            );
            // The progress bar of a long step (firmware): track and fill, no text on it.
            let (bar, _) = ui.allocate_exact_size(Vec2::new(inner, 14.0), egui::Sense::hover());
            if let Some(p) = progress {
                // The track is an outline: a filled one is a layer the size of every bar.
                ui.painter().rect_stroke(
                    bar,
                    7.0,
                    egui::Stroke::new(2.0, colour::BORDER),
                    egui::StrokeKind::Inside,
                );
                let mut done = bar;
                done.set_width((bar.width() * p.clamp(0.0, 1.0)).max(14.0));
                ui.painter().rect_filled(done, 7.0, colour::BUSY);
            }
            let (text, colour) = match (&n.message, n.state) {
                (Some(m), NestState::Fail) => (format!("Reason: {m}"), colour::BAD_TEXT),
                (Some(m), NestState::Offline) => (m.clone(), colour::BAD_TEXT),
                (Some(m), _) => (m.clone(), colour::WEAK_TEXT),
                (None, _) => (String::new(), colour::WEAK_TEXT),
            };
            ui.allocate_ui_with_layout(
                Vec2::new(inner, REASON_HEIGHT),
                Layout::top_down(Align::Min),
                |ui| {
                    ui.set_min_size(Vec2::new(inner, REASON_HEIGHT));
                    if text.is_empty() {
                        return;
                    }
                    // Three lines at most, so that the grid never jumps; the whole reason is on
                    // the batch screen's list of failed meters.
                    let mut job = egui::text::LayoutJob::simple(
                        text.clone(),
                        egui::FontId::proportional(18.0),
                        colour,
                        inner,
                    );
                    job.wrap.max_rows = 3;
                    job.wrap.overflow_character = Some('…');
                    let r = ui.label(job);
                    let name = format!("Nest {} message: {text}", n.nest);
                    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, &name));
                },
            );
            ui.horizontal(|ui| {
                let half = ((inner - ui.spacing().item_spacing.x) / 2.0).floor();
                if may_run {
                    let (text, enable) = if n.enabled {
                        ("Stop", false)
                    } else {
                        ("Start", true)
                    };
                    let name = format!("{text} nest {}", n.nest);
                    if widgets::named_button(ui, text, &name, half).clicked() {
                        out.push(UiCommand::Run(Command::EnableNest {
                            nest: n.nest,
                            enabled: enable,
                        }));
                    }
                }
                if may_clear && matches!(n.state, NestState::Fail | NestState::Pass) {
                    let name = format!("Clear nest {}", n.nest);
                    if widgets::named_button(ui, "Clear", &name, half).clicked() {
                        out.push(UiCommand::Run(Command::ClearNest { nest: n.nest }));
                    }
                }
            });
        });
}

/// The word of a tile. A disabled nest says so rather than "STOPPED" like a stopped line.
fn state_word(n: &NestView) -> &'static str {
    if !n.enabled && n.state == NestState::Stopped {
        "DISABLED"
    } else {
        n.state.word()
    }
}
