//! The view: draws [`AppState`] and returns what the user asked for. It reads no clock, calls
//! no engine and keeps nothing of its own, so that tests can render any state.
//!
//! Layout: a header (station, line state, health summary, user and role, log out), the alarm
//! banner when an alarm is open, the screen tabs, the screen, and a message line at the bottom.

mod audit;
mod batch;
mod fleet;
mod health;
mod line;
mod login;
mod shift;
pub mod widgets;

use eframe::egui::{self, RichText, Ui};
use zeroize::Zeroizing;

use crate::state::{AckForm, AppState, Tab, UiCommand};
use crate::theme::colour;
use widgets::{Kind, PadAction};

/// Draws the console; returns the commands the user gave this frame.
pub fn view(ui: &mut Ui, s: &mut AppState) -> Vec<UiCommand> {
    let mut out = Vec::new();
    egui::Panel::top("header")
        .frame(
            egui::Frame::new()
                .inner_margin(egui::Margin::symmetric(12, 8))
                .stroke(egui::Stroke::new(1.0, colour::BORDER)),
        )
        .show(ui, |ui| header(ui, s, &mut out));
    if !s.line.alarms.is_empty() {
        egui::Panel::top("alarm")
            .frame(
                egui::Frame::new()
                    .fill(colour::ALARM)
                    .inner_margin(egui::Margin::symmetric(12, 10)),
            )
            .show(ui, |ui| alarm_banner(ui, s));
    }
    if let Some(n) = s.notice.clone() {
        egui::Panel::bottom("notice")
            .frame(
                egui::Frame::new()
                    .fill(colour::PANEL)
                    .inner_margin(egui::Margin::symmetric(12, 6))
                    .stroke(egui::Stroke::new(1.0, colour::BORDER)),
            )
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    if widgets::button(ui, "Dismiss message", Kind::Normal, 0.0).clicked() {
                        s.notice = None;
                    }
                    let c = if n.good {
                        colour::GOOD_TEXT
                    } else {
                        colour::BAD_TEXT
                    };
                    ui.label(RichText::new(&n.text).strong().color(c));
                });
            });
    }
    // No fill: the window is cleared to the page colour already, and on a software
    // rasteriser every full-screen layer costs milliseconds per frame.
    egui::CentralPanel::default()
        .frame(egui::Frame::new().inner_margin(12))
        .show(ui, |ui| {
            // Everything below the header scrolls (a finger drags it), so that no control is
            // out of reach on a small screen.
            egui::ScrollArea::vertical()
                .id_salt(("screen", s.tab, s.user.is_some(), s.ack.is_some()))
                .auto_shrink([false, false])
                .show(ui, |ui| {
                    if s.ack.is_some() {
                        ack_form(ui, s, &mut out);
                    } else if s.user.is_none() {
                        login::show(ui, s, &mut out);
                    } else {
                        match s.tab {
                            Tab::Line => line::show(ui, s, &mut out),
                            Tab::Batch => batch::show(ui, s, &mut out),
                            Tab::Audit => audit::show(ui, s, &mut out),
                            Tab::Health => health::show(ui, &s.line),
                            Tab::Fleet => fleet::show(ui, s, &mut out),
                            Tab::Shift => shift::show(ui, s, &mut out),
                        }
                    }
                });
        });
    out
}

/// Alarms shown in the banner; the rest are counted.
const BANNER_ALARMS: usize = 3;

/// The open alarms, oldest first, each with its own acknowledgement.
fn alarm_banner(ui: &mut Ui, s: &mut AppState) {
    for (i, a) in s.line.alarms.iter().take(BANNER_ALARMS).enumerate() {
        ui.horizontal(|ui| {
            let title = if i == 0 { "CRITICAL ALARM" } else { "ALARM" };
            ui.add_sized(
                [230.0, widgets::target(ui)],
                egui::Label::new(
                    RichText::new(title)
                        .size(28.0)
                        .strong()
                        .color(colour::ON_DARK),
                ),
            );
            let label = format!("Acknowledge alarm {}", a.id);
            let b = egui::Button::new(RichText::new(&label).strong().color(colour::ON_LIGHT))
                .fill(colour::PANEL)
                .min_size(egui::vec2(0.0, widgets::target(ui)));
            if ui.add_enabled(s.ack.is_none(), b).clicked() {
                s.ack = Some(AckForm {
                    alarm: a.id,
                    user: String::new(),
                    pin: Zeroizing::default(),
                    busy: false,
                    notice: None,
                });
            }
            // What to do, in words; the technical kind and message under it, smaller.
            ui.vertical(|ui| {
                ui.add(
                    egui::Label::new(
                        RichText::new(a.in_words())
                            .size(22.0)
                            .strong()
                            .color(colour::ON_DARK),
                    )
                    .wrap(),
                );
                ui.add(
                    egui::Label::new(
                        RichText::new(format!("{}: {}", a.kind, a.message))
                            .size(15.0)
                            .color(colour::ON_DARK),
                    )
                    .wrap(),
                );
            });
        });
    }
    let more = s.line.alarms.len().saturating_sub(BANNER_ALARMS);
    if more > 0 {
        ui.label(
            RichText::new(format!("and {more} more open alarm(s)"))
                .size(22.0)
                .color(colour::ON_DARK),
        );
    }
}

/// One row: the station, the screens (the health screen's tab says OK or FAULT, in red when a
/// part fails), and who is logged in. Without a session the health summary takes the tabs' place.
fn header(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    let (summary, ok) = health::summary(&s.line);
    ui.horizontal(|ui| {
        ui.label(RichText::new(&s.line.station).size(24.0).strong());
        ui.add_space(8.0);
        if s.user.is_some() && s.ack.is_none() {
            for t in s.tabs() {
                let clicked = if t == Tab::Health {
                    let title = if ok { "Health OK" } else { "Health FAULT" };
                    let r = widgets::choice(ui, title, s.tab == t);
                    if !ok {
                        // The colour repeats what the word says.
                        ui.painter().rect_stroke(
                            r.rect,
                            4.0,
                            egui::Stroke::new(4.0, colour::FAIL),
                            egui::StrokeKind::Inside,
                        );
                    }
                    r.clicked()
                } else {
                    widgets::choice(ui, t.title(), s.tab == t).clicked()
                };
                if clicked {
                    s.tab = t;
                }
            }
        } else {
            let c = if ok {
                colour::GOOD_TEXT
            } else {
                colour::BAD_TEXT
            };
            ui.label(RichText::new(summary).color(c).strong());
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if let Some(user) = &s.user {
                if widgets::button(ui, "Log out", Kind::Normal, 0.0).clicked() {
                    out.push(UiCommand::Logout);
                }
                let role = user.role.as_str().replace('_', " ");
                let text = format!("{} ({role})", user.name);
                // Where the screens leave too little room (five tabs on a 1024-point screen),
                // the name alone: the role shows in which screens there are.
                let room = ui.available_width();
                let wide = ui
                    .painter()
                    .layout_no_wrap(
                        text.clone(),
                        egui::FontId::proportional(22.0),
                        colour::ON_LIGHT,
                    )
                    .size()
                    .x;
                let shown = if wide + 8.0 <= room {
                    text
                } else {
                    user.name.clone()
                };
                ui.label(RichText::new(shown).size(22.0).strong());
            } else {
                ui.label(RichText::new("Not logged in").size(22.0).strong());
            }
            if s.pending > 0 {
                ui.label(RichText::new("Working…").color(colour::WEAK_TEXT));
            }
        });
    });
}

/// A supervisor acknowledges the alarm with their own name and PIN, whoever is logged in.
fn ack_form(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    let recent = s.recent_users.clone();
    let Some(form) = &mut s.ack else { return };
    let alarm = s.line.alarms.iter().find(|a| a.id == form.alarm).cloned();
    ui.heading(format!("Alarm {}: supervisor acknowledgement", form.alarm));
    match &alarm {
        Some(a) => {
            ui.label(RichText::new(format!("{}: {}", a.kind, a.message)).strong());
            ui.label(format!("raised {}", a.raised_at.replace('T', " ")));
        }
        None => {
            ui.label("This alarm is no longer open.");
        }
    }
    ui.label("A supervisor acknowledges it with their own name and PIN; the acknowledgement is recorded in the audit log.");
    ui.add_space(8.0);
    let mut cancel = false;
    ui.horizontal_top(|ui| {
        ui.vertical(|ui| {
            ui.set_max_width(420.0);
            widgets::field(ui, "Supervisor name", &mut form.user, 240.0);
            if !recent.is_empty() {
                ui.horizontal_wrapped(|ui| {
                    for name in recent {
                        let selected = form.user == name;
                        if widgets::choice(ui, &name, selected).clicked() {
                            form.user = name;
                        }
                    }
                });
            }
            if let Some(n) = &form.notice {
                ui.label(RichText::new(&n.text).strong().color(colour::BAD_TEXT));
            }
            if form.busy {
                ui.label("Checking…");
            }
            ui.add_space(16.0);
            cancel = widgets::button(ui, "Cancel acknowledgement", Kind::Normal, 0.0).clicked();
        });
        ui.add_space(24.0);
        ui.vertical(|ui| {
            let busy = form.busy;
            if widgets::pin_pad(ui, &mut form.pin, "Acknowledge", busy) == PadAction::Enter {
                let user = form.user.trim().to_string();
                if user.is_empty() {
                    form.notice = Some(crate::state::Notice {
                        text: "type the supervisor's name first".into(),
                        good: false,
                    });
                } else {
                    form.busy = true;
                    out.push(UiCommand::AckAlarm {
                        id: form.alarm,
                        user,
                        pin: std::mem::take(&mut form.pin),
                    });
                }
            }
        });
    });
    if cancel {
        s.ack = None;
    }
}
