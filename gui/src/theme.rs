//! How the console looks and feels on a factory touch screen: hit targets sized in millimetres,
//! large type, high-contrast colours with every state also in words, and click settings that
//! forgive a gloved finger that slides or lingers.
//!
//! Nothing here knows about the engine; [`apply`] is called once on the egui context.

use eframe::egui::{self, Color32, FontFamily, FontId, TextStyle};
use station::engine::NestState;

/// What the console is shown on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Touch {
    /// Pixel density of the screen (dots per inch).
    pub dpi: f32,
    /// egui zoom factor (points to pixels).
    pub scale: f32,
}

impl Default for Touch {
    fn default() -> Self {
        // 110 dpi covers the 15" 1024×768 (85 dpi) to 21.5" 1920×1080 (102 dpi) panels found
        // beside lines, with margin: targets sized for it are at least 12 mm on all of them.
        Touch {
            dpi: 110.0,
            scale: 1.0,
        }
    }
}

/// The smallest hit target, in millimetres.
pub const MIN_TARGET_MM: f32 = 12.0;

impl Touch {
    /// The smallest hit target in points: [`MIN_TARGET_MM`] at this density and scale.
    pub fn target(&self) -> f32 {
        let px = MIN_TARGET_MM / 25.4 * self.dpi;
        (px / self.scale).ceil()
    }
}

/// Colours. Text on each fill is chosen for contrast (WCAG AA or better).
pub mod colour {
    use super::Color32;

    /// Passed.
    pub const PASS: Color32 = Color32::from_rgb(0x1b, 0x6e, 0x2f);
    /// Failed.
    pub const FAIL: Color32 = Color32::from_rgb(0xb7, 0x1c, 0x1c);
    /// Working.
    pub const BUSY: Color32 = Color32::from_rgb(0x0d, 0x47, 0xa1);
    /// Waiting for a meter.
    pub const IDLE: Color32 = Color32::from_rgb(0x5f, 0x63, 0x68);
    /// Stopped or disabled.
    pub const STOPPED: Color32 = Color32::from_rgb(0x37, 0x3b, 0x40);
    /// Port problem: needs a technician, not a meter decision.
    pub const OFFLINE: Color32 = Color32::from_rgb(0xe6, 0x7e, 0x00);
    /// Critical alarm banner.
    pub const ALARM: Color32 = Color32::from_rgb(0xb7, 0x1c, 0x1c);
    /// Text on dark fills.
    pub const ON_DARK: Color32 = Color32::WHITE;
    /// Text on light fills.
    pub const ON_LIGHT: Color32 = Color32::BLACK;
    /// The empty part of a progress bar.
    pub const TRACK: Color32 = Color32::from_rgb(0xcf, 0xd8, 0xe3);
    /// Page background.
    pub const PAGE: Color32 = Color32::from_rgb(0xf2, 0xf2, 0xf2);
    /// Tile and panel background.
    pub const PANEL: Color32 = Color32::WHITE;
    /// Ordinary buttons.
    pub const BUTTON: Color32 = Color32::from_rgb(0xd6, 0xdb, 0xe1);
    /// The action a screen is for.
    pub const PRIMARY: Color32 = Color32::from_rgb(0x0d, 0x47, 0xa1);
    /// A good outcome in a message.
    pub const GOOD_TEXT: Color32 = Color32::from_rgb(0x1b, 0x5e, 0x20);
    /// A bad outcome in a message.
    pub const BAD_TEXT: Color32 = Color32::from_rgb(0xb7, 0x1c, 0x1c);
    /// A warning in text.
    pub const WARN_TEXT: Color32 = Color32::from_rgb(0x8a, 0x4b, 0x00);
    /// Secondary text.
    pub const WEAK_TEXT: Color32 = Color32::from_rgb(0x42, 0x42, 0x42);
    /// Borders.
    pub const BORDER: Color32 = Color32::from_rgb(0x75, 0x75, 0x75);
}

/// Fill and text colour of a nest state.
pub fn state_colours(state: NestState) -> (Color32, Color32) {
    match state {
        NestState::Pass => (colour::PASS, colour::ON_DARK),
        NestState::Fail => (colour::FAIL, colour::ON_DARK),
        NestState::Busy => (colour::BUSY, colour::ON_DARK),
        NestState::Idle => (colour::IDLE, colour::ON_DARK),
        NestState::Stopped => (colour::STOPPED, colour::ON_DARK),
        NestState::Offline => (colour::OFFLINE, colour::ON_LIGHT),
    }
}

/// The large state word's text style.
pub fn state_font() -> FontId {
    FontId::new(36.0, FontFamily::Proportional)
}

/// Sets fonts, sizes, colours and touch input options.
pub fn apply(ctx: &egui::Context, touch: Touch) {
    ctx.set_theme(egui::Theme::Light);
    ctx.set_zoom_factor(touch.scale);
    let target = touch.target();
    ctx.all_styles_mut(|style| {
        style.text_styles = [
            (
                TextStyle::Small,
                FontId::new(16.0, FontFamily::Proportional),
            ),
            (TextStyle::Body, FontId::new(20.0, FontFamily::Proportional)),
            (
                TextStyle::Button,
                FontId::new(22.0, FontFamily::Proportional),
            ),
            (
                TextStyle::Heading,
                FontId::new(28.0, FontFamily::Proportional),
            ),
            (
                TextStyle::Monospace,
                FontId::new(18.0, FontFamily::Monospace),
            ),
        ]
        .into();
        let s = &mut style.spacing;
        s.item_spacing = egui::vec2(12.0, 12.0);
        s.button_padding = egui::vec2(16.0, 10.0);
        s.interact_size = egui::vec2(target, target);
        s.text_edit_width = 320.0;
        s.icon_width = 28.0;
        s.icon_width_inner = 18.0;
        s.scroll.bar_width = 24.0;
        s.scroll.floating = false;
        let v = &mut style.visuals;
        *v = egui::Visuals::light();
        v.panel_fill = colour::PAGE;
        v.window_fill = colour::PANEL;
        v.extreme_bg_color = Color32::WHITE;
        v.override_text_color = Some(colour::ON_LIGHT);
        v.widgets.inactive.weak_bg_fill = colour::BUTTON;
        v.widgets.inactive.bg_fill = colour::BUTTON;
        v.widgets.inactive.bg_stroke = egui::Stroke::new(1.0, colour::BORDER);
        v.widgets.hovered.bg_stroke = egui::Stroke::new(2.0, colour::ON_LIGHT);
        v.widgets.active.bg_stroke = egui::Stroke::new(3.0, colour::ON_LIGHT);
        v.selection.bg_fill = colour::PRIMARY;
        v.selection.stroke = egui::Stroke::new(2.0, colour::ON_DARK);
        // Touch screens have no hover: nothing may depend on it.
        style.interaction.show_tooltips_only_when_still = true;
        // No animation: a frame is drawn only when something changed.
        style.animation_time = 0.0;
        style.scroll_animation = egui::style::ScrollAnimation::none();
    });
    ctx.options_mut(|o| {
        // A gloved finger slides a few millimetres and lingers: still a click.
        o.input_options.max_click_dist = 24.0;
        o.input_options.max_click_duration = 2.0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_at_least_twelve_millimetres() {
        for (dpi, scale) in [(85.0, 1.0), (102.0, 1.0), (110.0, 1.0), (160.0, 1.5)] {
            let t = Touch { dpi, scale };
            let mm = t.target() * scale / dpi * 25.4;
            assert!(mm >= MIN_TARGET_MM, "{dpi} dpi ×{scale}: {mm} mm");
        }
        assert_eq!(Touch::default().target(), 52.0);
    }
}
