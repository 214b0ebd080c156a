//! Touch widgets: buttons at least one hit target high, the PIN pad, labelled text fields, and
//! choice buttons. Every widget carries its visible text as its accessible name.

use eframe::egui::{self, Color32, RichText, Ui, Vec2};
use zeroize::Zeroizing;

use crate::theme::colour;

/// The smallest hit target, in points (the theme sets it as the interact size).
pub fn target(ui: &Ui) -> f32 {
    ui.spacing().interact_size.y
}

/// What a button is for, which decides its colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An ordinary action.
    Normal,
    /// The action the screen is for.
    Primary,
    /// Stops or ends something.
    Danger,
}

/// A button at least one hit target high and `width` wide (0 for its text's width).
pub fn button(ui: &mut Ui, text: &str, kind: Kind, width: f32) -> egui::Response {
    button_enabled(ui, text, kind, width, true)
}

/// [`button`] that can be greyed out.
pub fn button_enabled(
    ui: &mut Ui,
    text: &str,
    kind: Kind,
    width: f32,
    enabled: bool,
) -> egui::Response {
    let (fill, fg) = match kind {
        Kind::Normal => (colour::BUTTON, colour::ON_LIGHT),
        Kind::Primary => (colour::PRIMARY, colour::ON_DARK),
        Kind::Danger => (colour::FAIL, colour::ON_DARK),
    };
    let t = target(ui);
    let b = egui::Button::new(RichText::new(text).color(fg).strong())
        .fill(fill)
        .min_size(Vec2::new(width, t));
    ui.add_enabled(enabled, b)
}

/// A button whose visible text is short ("Stop") because where it is says the rest, and whose
/// accessible name says everything ("Stop nest 3").
pub fn named_button(ui: &mut Ui, text: &str, name: &str, width: f32) -> egui::Response {
    let r = button(ui, text, Kind::Normal, width);
    r.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, r.enabled(), name));
    r
}

/// A choice among several: selected ones are filled.
pub fn choice(ui: &mut Ui, text: &str, selected: bool) -> egui::Response {
    let t = target(ui);
    let (fill, fg) = if selected {
        (colour::PRIMARY, colour::ON_DARK)
    } else {
        (colour::BUTTON, colour::ON_LIGHT)
    };
    let shown = if selected {
        format!("• {text}")
    } else {
        text.to_string()
    };
    let r = ui.add(
        egui::Button::new(RichText::new(shown).color(fg))
            .fill(fill)
            .min_size(Vec2::new(0.0, t)),
    );
    // The tick is decoration: the accessible name is the choice itself, and its state says
    // whether it is selected.
    r.widget_info(|| egui::WidgetInfo::selected(egui::Role::Button, true, selected, text));
    r
}

/// A labelled single-line text field, `width` wide.
pub fn field(ui: &mut Ui, label: &str, value: &mut String, width: f32) -> egui::Response {
    ui.horizontal(|ui| {
        let l = ui.label(label);
        let t = target(ui);
        ui.add_sized(
            [width, t],
            egui::TextEdit::singleline(value).align(egui::Align2::LEFT_CENTER),
        )
        .labelled_by(l.id)
    })
    .inner
}

/// A label in a colour.
pub fn coloured(ui: &mut Ui, text: impl Into<String>, colour: Color32) -> egui::Response {
    ui.label(RichText::new(text).color(colour))
}

/// What the PIN pad did this frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadAction {
    /// Nothing.
    None,
    /// "Enter" was pressed.
    Enter,
}

/// Longest PIN the pad takes.
pub const MAX_PIN: usize = 16;

/// An on-screen PIN pad: the digits shown as dots, 1–9, Delete, 0 and `enter` (the action the
/// PIN is for, e.g. "Log in"). Keyboard digits, Backspace and Enter work too.
pub fn pin_pad(ui: &mut Ui, pin: &mut Zeroizing<String>, enter: &str, busy: bool) -> PadAction {
    // Room for the longest PIN up front: growing the string would leave copies behind that
    // are never wiped.
    if pin.capacity() < MAX_PIN {
        pin.reserve_exact(MAX_PIN);
    }
    let t = target(ui) * 1.15;
    let dots = if pin.is_empty() {
        "PIN: (type it on the pad)".to_string()
    } else {
        format!("PIN: {}", "• ".repeat(pin.chars().count()).trim_end())
    };
    ui.label(RichText::new(dots).size(28.0).strong());
    let mut action = PadAction::None;
    let key = |ui: &mut Ui, text: &str| {
        let size = if text.len() > 1 { 24.0 } else { 30.0 };
        ui.add_enabled_ui(!busy, |ui| {
            ui.add_sized(
                [t * 1.8, t],
                egui::Button::new(RichText::new(text).size(size).strong()),
            )
        })
        .inner
        .clicked()
    };
    egui::Grid::new(ui.scope_id().with("pin-pad"))
        .spacing([14.0, 14.0])
        .show(ui, |ui| {
            for row in [["1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"]] {
                for d in row {
                    if key(ui, d) && pin.len() < MAX_PIN {
                        pin.push_str(d);
                    }
                }
                ui.end_row();
            }
            if key(ui, "Delete") {
                pin.pop();
            }
            if key(ui, "0") && pin.len() < MAX_PIN {
                pin.push('0');
            }
            let b = egui::Button::new(
                RichText::new(enter)
                    .size(24.0)
                    .strong()
                    .color(colour::ON_DARK),
            )
            .fill(colour::PRIMARY);
            let enabled = !busy && !pin.is_empty();
            if ui
                .add_enabled_ui(enabled, |ui| ui.add_sized([t * 1.8, t], b))
                .inner
                .clicked()
            {
                action = PadAction::Enter;
            }
            ui.end_row();
        });
    // A physical keypad or keyboard, when the station has one. Typed text goes to a focused
    // text field instead.
    if !busy && ui.memory(|m| m.focused().is_none()) {
        ui.input(|i| {
            for e in &i.events {
                match e {
                    egui::Event::Text(t) => {
                        for c in t.chars().filter(char::is_ascii_digit) {
                            if pin.len() < MAX_PIN {
                                pin.push(c);
                            }
                        }
                    }
                    egui::Event::Key {
                        key: egui::Key::Backspace,
                        pressed: true,
                        ..
                    } => {
                        pin.pop();
                    }
                    egui::Event::Key {
                        key: egui::Key::Enter,
                        pressed: true,
                        ..
                    } if !pin.is_empty() => action = PadAction::Enter,
                    _ => {}
                }
            }
        });
    }
    action
}
