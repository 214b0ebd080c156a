//! Health: is the HSM there and logged in, is each jig port open, can the journal be written.
//! Each line says OK or the problem in words, with the colour as a second cue.

use eframe::egui::{self, RichText, Ui};
use station::LineView;
use station::engine::NestState;

use crate::theme::colour;

/// How one part is.
#[derive(Clone, Copy)]
enum Status {
    Ok,
    Fault,
    /// Not in use now (a port while the line is stopped).
    Closed,
}

impl From<bool> for Status {
    fn from(ok: bool) -> Status {
        if ok { Status::Ok } else { Status::Fault }
    }
}

/// One health line: a coloured OK/FAULT box and what it is about.
fn row(ui: &mut Ui, status: impl Into<Status>, what: &str, detail: &str) {
    ui.horizontal(|ui| {
        let (word, fill) = match status.into() {
            Status::Ok => ("OK", colour::PASS),
            Status::Fault => ("FAULT", colour::FAIL),
            Status::Closed => ("CLOSED", colour::STOPPED),
        };
        egui::Frame::new()
            .fill(fill)
            .inner_margin(egui::Margin::symmetric(12, 6))
            .show(ui, |ui| {
                ui.set_min_width(90.0);
                let r = ui.label(
                    RichText::new(word)
                        .strong()
                        .size(24.0)
                        .color(colour::ON_DARK),
                );
                let name = format!("{what}: {word}");
                r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Label, true, &name));
            });
        ui.label(RichText::new(what).strong().size(22.0));
        ui.label(detail);
    });
}

pub(super) fn show(ui: &mut Ui, line: &LineView) {
    ui.heading("Health of the cell");
    let h = &line.health;
    row(
        ui,
        h.hsm,
        "HSM",
        &if h.hsm {
            format!("token {} connected, user logged in", h.hsm_detail)
        } else {
            format!(
                "token {} does not answer: call the security officer",
                h.hsm_detail
            )
        },
    );
    row(
        ui,
        h.database,
        "Database",
        if h.database {
            "journal writable"
        } else {
            "the journal cannot be written: the line cannot record meters"
        },
    );
    if let Some(f) = &h.fleet {
        let (state, more) = registry_detail(f);
        row(ui, f.reachable, "Registry", &state);
        ui.horizontal(|ui| {
            ui.add_space(138.0);
            ui.label(more);
        });
    }
    ui.add_space(8.0);
    ui.heading("Jig ports");
    {
        {
            for n in &line.nests {
                let (status, detail) = if n.port_open {
                    (Status::Ok, format!("{} open", n.port))
                } else if n.state == NestState::Offline {
                    let why = n.message.as_deref().unwrap_or("cannot be opened");
                    (Status::Fault, format!("{}: {why}", n.port))
                } else {
                    (
                        Status::Closed,
                        format!("{} (opened when the line starts)", n.port),
                    )
                };
                row(ui, status, &format!("Port of {}", n.name), &detail);
            }
        }
    }
}

/// The registry lines: whether it is reached; then the backlog with its oldest record's age and
/// the numbers left in the leases. An unreachable registry never stops the line; running out of
/// numbers does.
fn registry_detail(f: &station::engine::FleetHealth) -> (String, String) {
    let backlog = match (f.backlog, f.oldest_unsent_s) {
        (0, _) => "every record sent".to_string(),
        (n, Some(age)) => format!("{n} records waiting, the oldest {}", age_words(age)),
        (n, None) => format!("{n} records waiting"),
    };
    let state = if f.reachable {
        "reached".to_string()
    } else {
        format!(
            "cannot be reached ({}): the line goes on",
            f.problem.as_deref().unwrap_or("no answer")
        )
    };
    (
        state,
        format!("{backlog} · {} leased numbers left", f.leased_left),
    )
}

fn age_words(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s old"),
        120..=7199 => format!("{} min old", s / 60),
        _ => format!("{} h old", s / 3600),
    }
}

/// A one-line summary for the header: "HSM OK · Database OK · Ports 4 of 4 open".
pub(super) fn summary(line: &LineView) -> (String, bool) {
    let h = &line.health;
    let open = line.nests.iter().filter(|n| n.port_open).count();
    let ports_ok = !line.nests.iter().any(|n| n.state == NestState::Offline);
    let ok = h.hsm && h.database && ports_ok;
    let word = |b: bool| if b { "OK" } else { "FAULT" };
    (
        format!(
            "HSM {} · Database {} · Ports {open} of {} open",
            word(h.hsm),
            word(h.database),
            line.nests.len()
        ),
        ok,
    )
}
