//! The log-in screen: user name (typed, or one touch on a recent user) and the PIN pad.

use eframe::egui::{RichText, Ui};
use zeroize::Zeroizing;

use super::widgets::{self, PadAction};
use crate::state::{AppState, UiCommand};
use crate::theme::colour;

/// The demo cell's users, as `station demo --known-pins` makes them.
const DEMO_USERS: [(&str, &str); 4] = [
    ("oper", "operator"),
    ("super", "supervisor"),
    ("officer", "security officer"),
    ("audit", "auditor"),
];

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    ui.heading("Log in to run the line");
    ui.add_space(8.0);
    ui.horizontal_top(|ui| {
        ui.vertical(|ui| {
            ui.set_max_width(420.0);
            widgets::field(ui, "User name", &mut s.login.user, 240.0);
            let names = user_choices(s);
            if !names.is_empty() {
                ui.label("or touch a name:");
                ui.horizontal_wrapped(|ui| {
                    for name in names {
                        let selected = s.login.user == name;
                        if widgets::choice(ui, &name, selected).clicked() {
                            s.login.user = name;
                        }
                    }
                });
            }
            if let Some(n) = &s.login.notice {
                ui.add_space(8.0);
                let c = if n.good {
                    colour::GOOD_TEXT
                } else {
                    colour::BAD_TEXT
                };
                ui.label(RichText::new(&n.text).color(c).strong());
            }
            if s.login.busy {
                ui.label("Checking…");
            }
            if s.demo {
                ui.add_space(12.0);
                ui.label(RichText::new("Demo cell users and PINs:").strong());
                for (name, role) in DEMO_USERS {
                    let pin = station::demo::known_pin(name).unwrap_or_default();
                    ui.label(format!("{name} {pin} ({role})"));
                }
            }
        });
        ui.add_space(24.0);
        ui.vertical(|ui| {
            let busy = s.login.busy;
            if widgets::pin_pad(ui, &mut s.login.pin, "Log in", busy) == PadAction::Enter {
                let user = s.login.user.trim().to_string();
                if user.is_empty() {
                    s.login.notice = Some(crate::state::Notice {
                        text: "type your user name (or touch it) first".into(),
                        good: false,
                    });
                } else {
                    s.login.busy = true;
                    out.push(UiCommand::Login {
                        user,
                        pin: std::mem::take(&mut s.login.pin),
                    });
                    s.login.pin = Zeroizing::default();
                }
            }
        });
    });
}

/// Recent users first, then (on a demo cell) the demo users.
fn user_choices(s: &AppState) -> Vec<String> {
    let mut names = s.recent_users.clone();
    if s.demo {
        for (n, _) in DEMO_USERS {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    names
}
