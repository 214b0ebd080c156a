//! The factory screen: every cell's production from the factory registry, as this station may
//! read it — meters per batch and station, yield per station and nest (a nest well below its
//! station's yield is marked), and where one serial number, system title or UID was
//! provisioned. It reads through `stationd` (the console talks to nothing else).

use eframe::egui::{self, RichText, Ui};
use station::Command;

use super::widgets::{self, Kind};
use crate::state::{AppState, UiCommand};
use crate::theme::colour;

/// A nest is marked when its yield is this many points below its station's.
const NEST_BELOW: f64 = 3.0;

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    if !s.fleet.requested {
        s.fleet.requested = true;
        let find = s.fleet.found_for.clone();
        out.push(UiCommand::Run(Command::FleetView { find }));
    }
    ui.heading("The factory");
    ui.horizontal_wrapped(|ui| {
        widgets::field(ui, "Serial, system title or UID", &mut s.fleet.find, 300.0);
        if widgets::button(ui, "Find", Kind::Normal, 0.0).clicked() {
            s.fleet.found_for = Some(s.fleet.find.trim().to_string()).filter(|f| !f.is_empty());
            s.fleet.requested = false;
        }
        if widgets::button(ui, "Refresh", Kind::Normal, 0.0).clicked() {
            s.fleet.requested = false;
        }
    });
    if let Some(e) = &s.fleet.error {
        widgets::coloured(
            ui,
            format!("The registry cannot answer now: {e}"),
            colour::FAIL,
        );
    }
    let Some(v) = &s.fleet.view else {
        if s.fleet.error.is_none() {
            ui.label("Asking the registry…");
        }
        return;
    };
    if let Some(what) = &s.fleet.found_for {
        ui.add_space(6.0);
        ui.label(RichText::new(format!("Where {what} was provisioned")).strong());
        if v.found.is_empty() {
            ui.label(format!(
                "No meter with serial number, system title or UID {what} has reached the registry."
            ));
        }
        for f in &v.found {
            let failure = f
                .failure
                .as_deref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default();
            ui.label(format!(
                "{} {}: station {}, work order {}, nest {}, serial {}, system title {}, operator {}, {}{failure}",
                f.uid,
                f.state.to_uppercase(),
                f.station,
                f.work_order.as_deref().unwrap_or("-"),
                f.nest.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                f.serial.as_deref().unwrap_or("-"),
                f.system_title.as_deref().unwrap_or("-"),
                f.operator.as_deref().unwrap_or("-"),
                f.finished_at.as_deref().unwrap_or("-"),
            ));
        }
    }
    ui.add_space(8.0);
    ui.label(RichText::new("Meters per batch").strong());
    egui::Grid::new("fleet-batches")
        .striped(true)
        .spacing([24.0, 6.0])
        .show(ui, |ui| {
            for h in ["work order", "station", "done", "failed", "yield"] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for (wo, station, done, failed) in &v.batches {
                ui.label(wo);
                ui.label(station);
                ui.label(done.to_string());
                ui.label(failed.to_string());
                ui.label(percent(*done, *failed).map_or("-".into(), |p| format!("{p:.1} %")));
                ui.end_row();
            }
        });
    ui.add_space(8.0);
    ui.label(RichText::new("Yield per station and nest").strong());
    egui::Grid::new("fleet-yield")
        .striped(true)
        .spacing([24.0, 6.0])
        .show(ui, |ui| {
            for h in ["station", "nest", "done", "failed", "yield"] {
                ui.label(RichText::new(h).strong());
            }
            ui.end_row();
            for (station, nest, done, failed) in &v.yields {
                let of_station = station_yield(&v.yields, station);
                let y = percent(*done, *failed);
                ui.label(station);
                ui.label(nest.map_or("-".into(), |n| n.to_string()));
                ui.label(done.to_string());
                ui.label(failed.to_string());
                match (y, of_station) {
                    (Some(y), Some(st)) if st - y >= NEST_BELOW => {
                        widgets::coloured(
                            ui,
                            format!("{y:.1} % — below its station's {st:.1} %"),
                            colour::FAIL,
                        );
                    }
                    (Some(y), _) => {
                        ui.label(format!("{y:.1} %"));
                    }
                    (None, _) => {
                        ui.label("-");
                    }
                }
                ui.end_row();
            }
        });
}

fn percent(done: i64, failed: i64) -> Option<f64> {
    (done + failed > 0).then(|| 100.0 * done as f64 / (done + failed) as f64)
}

/// A station's yield over all its nests.
fn station_yield(rows: &[(String, Option<i32>, i64, i64)], station: &str) -> Option<f64> {
    let (d, f) = rows
        .iter()
        .filter(|r| r.0 == station)
        .fold((0, 0), |(d, f), r| (d + r.2, f + r.3));
    percent(d, f)
}
