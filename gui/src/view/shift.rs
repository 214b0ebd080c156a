//! The shift screen: the supervisor's first questions on a bad shift — which nest, which step,
//! which reason? — as four dashboards over the last hours (yield per nest over time, yield per
//! step with the failures per nest and step, a Pareto of failure reasons, cycle time against its
//! theoretical minimum) and a warning above them for every nest whose failure rate stands out.
//!
//! The station aggregates (a few hundred numbers whatever the length of the shift), so a frame
//! costs the same for ten meters as for a hundred thousand. The plots do not pan or zoom: a
//! finger dragging over them scrolls the screen.

use eframe::egui::{self, Color32, RichText, Ui};
use egui_plot::{Bar, BarChart, Corner, HLine, Legend, Line, LineStyle, Plot, PlotPoints};
use station::Command;
use station::shift::ShiftView;

use super::widgets::{self, Kind};
use crate::state::{AppState, SHIFT_HOURS, UiCommand};
use crate::theme::colour;

/// Colours of the nests that do not stand out (muted, so the flagged one is seen first).
const NEST_COLOURS: [Color32; 4] = [
    Color32::from_rgb(0x0d, 0x47, 0xa1),
    Color32::from_rgb(0x00, 0x69, 0x5c),
    Color32::from_rgb(0x5e, 0x35, 0xb1),
    Color32::from_rgb(0x6d, 0x4c, 0x41),
];

/// Width below which the dashboards stack in one column.
const TWO_COLUMNS: f32 = 1200.0;

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    if !s.shift.requested {
        s.shift.requested = true;
        out.push(UiCommand::Run(Command::ShiftView { hours: SHIFT_HOURS }));
    }
    ui.horizontal_wrapped(|ui| {
        ui.heading(format!("The shift: the last {SHIFT_HOURS} hours"));
        ui.add_space(16.0);
        if widgets::button(ui, "Refresh", Kind::Normal, 0.0).clicked() {
            s.shift.requested = false;
        }
        if s.shift.finished_since > 0 {
            ui.label(format!(
                "{} meters finished since these figures were read",
                s.shift.finished_since
            ));
        }
    });
    if let Some(e) = &s.shift.error {
        widgets::coloured(
            ui,
            format!("The station could not read the shift: {e}"),
            colour::FAIL,
        );
    }
    let Some(v) = &s.shift.view else {
        if s.shift.error.is_none() {
            ui.label("Reading the shift…");
        }
        return;
    };
    summary(ui, v);
    let wide = ui.available_width() >= TWO_COLUMNS;
    let h = if wide { 300.0 } else { 240.0 };
    if wide {
        ui.columns(2, |c| {
            yield_per_nest(&mut c[0], v, h);
            cycle_time(&mut c[1], v, h);
        });
        ui.columns(2, |c| {
            yield_per_step(&mut c[0], v, h);
            pareto(&mut c[1], v, h);
        });
    } else {
        yield_per_nest(ui, v, h);
        cycle_time(ui, v, h);
        yield_per_step(ui, v, h);
        pareto(ui, v, h);
    }
    ui.add_space(8.0);
    nest_table(ui, v);
}

fn percent(done: u32, failed: u32) -> Option<f64> {
    let all = done + failed;
    (all > 0).then(|| 100.0 * f64::from(done) / f64::from(all))
}

/// Totals, and a warning for every nest that stands out.
fn summary(ui: &mut Ui, v: &ShiftView) {
    let done: u32 = v.nests.iter().map(|n| n.done).sum();
    let failed: u32 = v.nests.iter().map(|n| n.failed).sum();
    ui.label(
        RichText::new(match percent(done, failed) {
            Some(y) => format!("{done} meters done, {failed} failed: yield {y:.1} %"),
            None => "No meter has finished in these hours.".into(),
        })
        .strong(),
    );
    for n in v.nests.iter() {
        if let Some(why) = &n.flag {
            egui::Frame::new()
                .fill(colour::FAIL)
                .inner_margin(egui::Margin::symmetric(10, 6))
                .show(ui, |ui| {
                    ui.label(
                        RichText::new(format!("Nest {} {why}", n.nest))
                            .strong()
                            .color(colour::ON_DARK),
                    );
                });
        }
    }
    ui.add_space(6.0);
}

fn title(ui: &mut Ui, t: &str) {
    ui.add_space(6.0);
    ui.label(RichText::new(t).strong());
}

/// A plot that neither pans nor zooms (a drag scrolls the screen), with a legend when asked.
fn plot(id: &str, h: f32, legend: Option<Corner>) -> Plot<'static> {
    let p = Plot::new(id.to_string())
        .height(h)
        .allow_drag(false)
        .allow_zoom(false)
        .allow_scroll(false)
        .allow_boxed_zoom(false)
        .allow_double_click_reset(false)
        .show_crosshair(false)
        // The page colour shows through: a filled plot area is a full-size layer per plot for
        // the software rasteriser.
        .show_background(false)
        // Fewer, wider-spaced grid lines: easier to read, and each line costs the software
        // rasteriser a full-height (or full-width) stroke.
        .grid_spacing(egui::Rangef::new(24.0, 200.0));
    match legend {
        Some(corner) => p.legend(Legend::default().position(corner)),
        None => p,
    }
}

/// Hours before the end of the window, for the time axes.
fn hours_ago(v: &ShiftView, at_ms: i64) -> f64 {
    (at_ms - v.until_ms) as f64 / 3_600_000.0
}

fn time_axis(x: f64) -> String {
    if x.abs() < 1e-9 {
        "now".into()
    } else {
        format!("{x:.1} h")
    }
}

fn nest_colour(v: &ShiftView, i: usize) -> (Color32, f32) {
    if v.nests[i].flag.is_some() {
        (colour::FAIL, 3.0)
    } else {
        (NEST_COLOURS[i % NEST_COLOURS.len()], 1.5)
    }
}

/// Yield per nest over the hour up to each time bin (a bin alone holds too few meters to say
/// much); before a nest has finished anything there is no point.
fn yield_per_nest(ui: &mut Ui, v: &ShiftView, h: f32) {
    let flagged: Vec<String> = v
        .nests
        .iter()
        .filter(|n| n.flag.is_some())
        .map(|n| n.nest.to_string())
        .collect();
    title(
        ui,
        &if flagged.is_empty() {
            "Yield per nest over the shift (%, over the hour before each point)".to_string()
        } else {
            format!(
                "Yield per nest over the shift (%, over the hour before each point); in red: nest {}",
                flagged.join(", ")
            )
        },
    );
    let window = usize::try_from((3_600_000 + v.bin_ms - 1) / v.bin_ms.max(1))
        .unwrap_or(1)
        .max(1);
    plot("shift-yield-nest", h, None)
        .include_y(100.0)
        .include_x(hours_ago(v, v.since_ms))
        .include_x(0.0)
        .x_axis_formatter(|m, _| time_axis(m.value))
        .show(ui, |p| {
            for (i, n) in v.nests.iter().enumerate() {
                let (mut d, mut f) = (0u32, 0u32);
                let pts: Vec<[f64; 2]> = n
                    .bins
                    .iter()
                    .enumerate()
                    .filter_map(|(b, (bd, bf))| {
                        (d, f) = (d + bd, f + bf);
                        if let Some((od, of)) = b.checked_sub(window).map(|o| n.bins[o]) {
                            (d, f) = (d - od, f - of);
                        }
                        let end = v.since_ms + (b as i64 + 1) * v.bin_ms;
                        percent(d, f).map(|y| [hours_ago(v, end.min(v.until_ms)), y])
                    })
                    .collect();
                let (c, w) = nest_colour(v, i);
                p.line(
                    Line::new(format!("nest {}", n.nest), PlotPoints::new(pts))
                        .color(c)
                        .width(w),
                );
            }
        });
}

/// Median, 90th percentile and shortest cycle per bin, with the theoretical minimum.
fn cycle_time(ui: &mut Ui, v: &ShiftView, h: f32) {
    title(ui, "Cycle time over the shift (s)");
    let series = |f: fn(&station::shift::CycleBin) -> u32| -> PlotPoints<'static> {
        PlotPoints::new(
            v.cycle
                .iter()
                .map(|c| {
                    let mid = c.at_ms + v.bin_ms / 2;
                    [hours_ago(v, mid), f64::from(f(c)) / 1000.0]
                })
                .collect(),
        )
    };
    plot("shift-cycle", h, Some(Corner::RightBottom))
        .include_y(0.0)
        .include_x(hours_ago(v, v.since_ms))
        .include_x(0.0)
        .x_axis_formatter(|m, _| time_axis(m.value))
        .show(ui, |p| {
            p.line(
                Line::new("90 % of meters within", series(|c| c.p90_ms))
                    .color(colour::OFFLINE)
                    .width(1.5),
            );
            p.line(
                Line::new("median", series(|c| c.median_ms))
                    .color(colour::BUSY)
                    .width(2.5),
            );
            p.line(
                Line::new("shortest", series(|c| c.min_ms))
                    .color(colour::PASS)
                    .width(1.5),
            );
            if let Some(f) = v.floor_ms {
                p.hline(
                    HLine::new(
                        format!("theoretical minimum {:.2} s", f64::from(f) / 1000.0),
                        f64::from(f) / 1000.0,
                    )
                    .color(colour::ON_LIGHT)
                    .style(LineStyle::dashed_loose())
                    .width(2.0),
                );
            }
        });
}

/// Yield per step: of the meters that reached a step, the share that failed there (the step's
/// yield is 100 % less this), first step on top.
fn yield_per_step(ui: &mut Ui, v: &ShiftView, h: f32) {
    title(
        ui,
        "Loss per step (%): of the meters that reached a step, the share that failed there",
    );
    let all: u32 = v.nests.iter().map(|n| n.done + n.failed).sum();
    let mut reached = all;
    let mut bars = Vec::new();
    let steps = v.steps.len();
    for (i, step) in v.steps.iter().enumerate() {
        let failed: u32 = v
            .nests
            .iter()
            .map(|n| n.failed_at.get(i).copied().unwrap_or(0))
            .sum();
        let loss = if reached > 0 {
            100.0 * f64::from(failed) / f64::from(reached)
        } else {
            0.0
        };
        let fill = if failed > 0 {
            colour::FAIL
        } else {
            colour::PASS
        };
        bars.push(
            Bar::new((steps - 1 - i) as f64, loss)
                .name(format!(
                    "{step}: {failed} of {reached} failed, yield {:.2} %",
                    100.0 - loss
                ))
                .fill(fill)
                .width(0.7)
                .horizontal(),
        );
        reached = reached.saturating_sub(failed);
    }
    let names = v.steps.clone();
    plot("shift-yield-step", h, None)
        .include_x(0.0)
        .include_x(1.0)
        .y_axis_min_width(110.0)
        .y_axis_formatter(move |m, _| {
            let i = m.value.round();
            if (m.value - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[names.len() - 1 - i as usize].clone()
            } else {
                String::new()
            }
        })
        .x_axis_formatter(|m, _| format!("{} %", m.value))
        .y_grid_spacer(egui_plot::uniform_grid_spacer(|_| [1.0, 1.0, 1.0]))
        .show(ui, |p| {
            p.bar_chart(BarChart::new("loss per step", bars).horizontal());
        });
}

/// Failure reasons, most frequent first, as a share of all failures, with the running total.
fn pareto(ui: &mut Ui, v: &ShiftView, h: f32) {
    title(ui, "Failure reasons (Pareto, % of failures)");
    let total: u32 = v.causes.iter().map(|c| c.1).sum();
    if total == 0 {
        ui.label("No meter failed in these hours.");
        return;
    }
    const SHOWN: usize = 8;
    let share = |n: u32| 100.0 * f64::from(n) / f64::from(total);
    let bars: Vec<Bar> = v
        .causes
        .iter()
        .take(SHOWN)
        .enumerate()
        .map(|(i, (cause, n))| {
            Bar::new(i as f64 + 1.0, share(*n))
                .name(format!("{cause}: {n}"))
                .fill(colour::FAIL)
                .width(0.7)
        })
        .collect();
    let mut run = 0.0;
    let cumulative: Vec<[f64; 2]> = v
        .causes
        .iter()
        .take(SHOWN)
        .enumerate()
        .map(|(i, (_, n))| {
            run += share(*n);
            [i as f64 + 1.0, run]
        })
        .collect();
    plot("shift-pareto", h * 0.6, Some(Corner::LeftTop))
        .include_y(0.0)
        .include_y(100.0)
        .x_axis_formatter(|m, _| {
            let i = m.value.round();
            if (m.value - i).abs() < 1e-6 && i >= 1.0 {
                format!("{i:.0}")
            } else {
                String::new()
            }
        })
        .show(ui, |p| {
            p.bar_chart(BarChart::new("share of failures", bars));
            p.line(
                Line::new("running total", PlotPoints::new(cumulative))
                    .color(colour::ON_LIGHT)
                    .width(2.0),
            );
        });
    egui::Grid::new("shift-causes")
        .striped(true)
        .spacing([16.0, 2.0])
        .show(ui, |ui| {
            let mut run = 0;
            for (i, (cause, n)) in v.causes.iter().take(SHOWN).enumerate() {
                run += n;
                ui.label(format!("{}", i + 1));
                ui.label(cause);
                ui.label(format!("{n}"));
                ui.label(format!("{:.0} %", share(run)));
                ui.end_row();
            }
            let rest: u32 = v.causes.iter().skip(SHOWN).map(|c| c.1).sum();
            if rest > 0 {
                ui.label("");
                ui.label(format!("{} other reasons", v.causes.len() - SHOWN));
                ui.label(format!("{rest}"));
                ui.label("100 %");
                ui.end_row();
            }
        });
}

/// Every nest: meters, yield, failures per step; a nest that stands out in red.
fn nest_table(ui: &mut Ui, v: &ShiftView) {
    title(ui, "Failures per nest and step");
    egui::Grid::new("shift-nests")
        .striped(true)
        .spacing([14.0, 4.0])
        .show(ui, |ui| {
            for h in ["nest", "done", "failed", "yield"] {
                ui.label(RichText::new(h).strong());
            }
            for s in &v.steps {
                ui.label(RichText::new(s).strong());
            }
            ui.end_row();
            for n in &v.nests {
                let c = if n.flag.is_some() {
                    colour::BAD_TEXT
                } else {
                    colour::ON_LIGHT
                };
                ui.label(RichText::new(n.nest.to_string()).color(c).strong());
                ui.label(n.done.to_string());
                ui.label(RichText::new(n.failed.to_string()).color(c));
                ui.label(
                    RichText::new(
                        percent(n.done, n.failed).map_or("-".into(), |y| format!("{y:.1} %")),
                    )
                    .color(c),
                );
                for f in &n.failed_at {
                    if *f > 0 {
                        ui.label(
                            RichText::new(f.to_string())
                                .color(colour::BAD_TEXT)
                                .strong(),
                        );
                    } else {
                        ui.label(RichText::new("·").color(colour::WEAK_TEXT));
                    }
                }
                ui.end_row();
            }
        });
}
