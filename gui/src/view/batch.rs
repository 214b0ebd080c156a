//! The supervisor's screen: the open batch and closing it, opening the next one (firmware
//! release and customer chosen from the cell's lists), and rework of failed meters.

use eframe::egui::{self, RichText, Ui};
use station::Command;
use station::auth::Action;
use station::engine::BatchSpec;

use super::widgets::{self, Kind};
use crate::state::{AppState, UiCommand};
use crate::theme::colour;

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    if !s.batch.requested {
        s.batch.requested = true;
        out.push(UiCommand::Run(Command::ListFirmware));
        out.push(UiCommand::Run(Command::ListCustomers));
        out.push(UiCommand::Run(Command::ListBatches));
    }
    ui.columns(2, |cols| {
        // Columns stretch their widgets to full width; keep buttons their own size.
        for c in cols.iter_mut() {
            *c = c.new_child(
                egui::UiBuilder::new()
                    .max_rect(c.max_rect())
                    .layout(egui::Layout::top_down(egui::Align::Min)),
            );
        }
        cols[0].heading("Batch");
        match s.line.batch.clone() {
            Some(b) => {
                let ui = &mut cols[0];
                ui.label(RichText::new(format!("Work order {} is open", b.work_order)).strong());
                ui.label(format!(
                    "{} × {}, firmware {}, customer {}",
                    b.quantity, b.model, b.firmware_version, b.customer
                ));
                ui.label(format!(
                    "serials {}{}–{}; produced {}, failed {}, in progress {}",
                    b.serial_prefix, b.serial_first, b.serial_last, b.done, b.failed, b.in_flight
                ));
                if s.may(Action::CloseBatch) {
                    if s.line.running {
                        ui.label("Stop the line to close the batch.");
                    } else if s.batch.confirm_close {
                        ui.label(
                            RichText::new("Close it? Meters can no longer be added to it.")
                                .strong(),
                        );
                        ui.horizontal(|ui| {
                            let text = format!("Confirm close of {}", b.work_order);
                            if widgets::button(ui, &text, Kind::Danger, 0.0).clicked() {
                                out.push(UiCommand::Run(Command::CloseBatch { id: b.id }));
                            }
                            if widgets::button(ui, "Keep it open", Kind::Normal, 0.0).clicked() {
                                s.batch.confirm_close = false;
                            }
                        });
                    } else {
                        let text = format!("Close batch {}", b.work_order);
                        if widgets::button(ui, &text, Kind::Normal, 0.0).clicked() {
                            s.batch.confirm_close = true;
                        }
                    }
                }
            }
            None if s.may(Action::OpenBatch) => open_form(&mut cols[0], s, out),
            None => {
                cols[0].label("No batch is open.");
            }
        }
        rework(&mut cols[1], s, out);
        cols[1].add_space(12.0);
        reprint(&mut cols[1], s, out);
    });
}

fn open_form(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    ui.label("No batch is open. Open the next one:");
    let f = &mut s.batch;
    widgets::field(ui, "Work order", &mut f.work_order, 260.0);
    ui.label("Model");
    ui.horizontal_wrapped(|ui| {
        for m in &s.models {
            if widgets::choice(ui, &format!("Model {m}"), f.model == *m).clicked() {
                f.model = m.clone();
            }
        }
    });
    ui.label("Firmware release");
    if f.firmware.is_empty() {
        ui.label(
            RichText::new("No firmware release imported: a security officer imports one.")
                .color(colour::BAD_TEXT),
        );
    }
    ui.horizontal_wrapped(|ui| {
        for fw in &f.firmware {
            let text = format!(
                "Firmware {} ({})",
                fw.version,
                &fw.sha256[..fw.sha256.len().min(8)]
            );
            if widgets::choice(ui, &text, f.firmware_sha.as_deref() == Some(&fw.sha256)).clicked() {
                f.firmware_sha = Some(fw.sha256.clone());
            }
        }
    });
    ui.label("Customer");
    if f.customers.is_empty() {
        ui.label(
            RichText::new("No customer imported: a security officer imports one.")
                .color(colour::BAD_TEXT),
        );
    }
    ui.horizontal_wrapped(|ui| {
        for c in &f.customers {
            let text = format!("Customer {}", c.name);
            if widgets::choice(ui, &text, f.customer.as_deref() == Some(&c.name)).clicked() {
                f.customer = Some(c.name.clone());
            }
        }
    });
    widgets::field(ui, "Quantity", &mut f.quantity, 140.0);
    widgets::field(ui, "Serial prefix", &mut f.serial_prefix, 140.0);
    widgets::field(ui, "First serial", &mut f.serial_first, 160.0);
    widgets::field(ui, "Last serial", &mut f.serial_last, 160.0);
    let spec = || -> Result<BatchSpec, String> {
        let num = |what: &str, v: &str| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| format!("{what} must be a whole number"))
        };
        Ok(BatchSpec {
            work_order: f.work_order.trim().to_string(),
            model: f.model.clone(),
            firmware: f.firmware_sha.clone().ok_or("choose a firmware release")?,
            customer: f.customer.clone().ok_or("choose a customer")?,
            quantity: num("the quantity", &f.quantity)?,
            serial_prefix: f.serial_prefix.trim().to_string(),
            serial_first: num("the first serial", &f.serial_first)?,
            serial_last: num("the last serial", &f.serial_last)?,
        })
    };
    let spec = spec();
    if let Err(why) = &spec {
        widgets::coloured(ui, format!("To open: {why}."), colour::WEAK_TEXT);
    }
    if widgets::button_enabled(ui, "Open batch", Kind::Primary, 220.0, spec.is_ok()).clicked()
        && let Ok(spec) = spec
    {
        out.push(UiCommand::Run(Command::OpenBatch(spec)));
    }
}

/// A done meter's label printed again (supervisor; the daemon audits it).
fn reprint(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    if !s.may(Action::ReprintLabel) {
        return;
    }
    ui.heading("Labels");
    ui.horizontal_wrapped(|ui| {
        widgets::field(ui, "Serial number", &mut s.batch.reprint, 260.0);
        let serial = s.batch.reprint.trim().to_string();
        if widgets::button(ui, "Reprint label", Kind::Normal, 0.0).clicked() && !serial.is_empty() {
            out.push(UiCommand::Run(Command::ReprintLabel { serial }));
            s.batch.reprint.clear();
        }
    });
}

fn rework(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    ui.heading("Failed meters");
    if s.failed.is_empty() {
        ui.label("No meter has failed since this console started.");
        return;
    }
    let may = s.may(Action::Rework);
    if may {
        ui.label("Rework lets a failed meter be provisioned again once it is put back in a nest.");
    }
    for f in &s.failed {
        egui::Frame::new()
            .fill(colour::PANEL)
            .stroke(egui::Stroke::new(1.0, colour::BORDER))
            .inner_margin(8)
            .show(ui, |ui| {
                ui.set_width(ui.available_width());
                let serial = f.serial.as_deref().unwrap_or("no serial");
                ui.label(
                    RichText::new(format!("Nest {} · {serial} · UID {}", f.nest, f.uid)).strong(),
                );
                ui.label(RichText::new(format!("Reason: {}", f.reason)).color(colour::BAD_TEXT));
                if f.reworked {
                    widgets::coloured(ui, "Rework approved", colour::GOOD_TEXT);
                } else if may {
                    let text = format!("Rework meter {}", f.uid);
                    if widgets::button(ui, &text, Kind::Normal, 0.0).clicked() {
                        out.push(UiCommand::Run(Command::Rework { uid: f.uid.clone() }));
                    }
                }
            });
    }
}
