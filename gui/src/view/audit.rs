//! The audit screen: the newest entries of the audit log, filtered by text and severity, and
//! whether the whole log verifies (hash chain and signed checkpoints).

use eframe::egui::{self, RichText, Ui};
use station::Command;
use station::auth::Action;

use super::widgets::{self, Kind};
use crate::state::{AppState, SeverityFilter, UiCommand};
use crate::theme::colour;

/// Entries read for the screen.
const TAIL: i64 = 500;
/// Entries shown after filtering.
const SHOWN: usize = 200;

pub(super) fn show(ui: &mut Ui, s: &mut AppState, out: &mut Vec<UiCommand>) {
    let may_verify = s.may(Action::VerifyAudit);
    if !s.audit.requested {
        s.audit.requested = true;
        out.push(UiCommand::Run(Command::AuditTail { n: TAIL }));
        if may_verify {
            out.push(UiCommand::Run(Command::AuditVerify));
        }
    }
    ui.horizontal(|ui| {
        let (text, c) = match (&s.audit.verification, &s.audit.verification_error) {
            (Some(v), _) if v.ok() => (
                format!(
                    "VERIFIED: {} entries and {} signed checkpoints check out",
                    v.entries, v.checkpoints
                ),
                colour::PASS,
            ),
            (Some(v), _) => (
                match &v.first_bad {
                    Some((seq, why)) => format!("NOT VERIFIED: entry {seq}: {why}"),
                    None => "NOT VERIFIED".into(),
                },
                colour::FAIL,
            ),
            (None, Some(e)) => (format!("Verification failed to run: {e}"), colour::FAIL),
            (None, None) if may_verify => ("Verifying…".into(), colour::STOPPED),
            (None, None) => (
                "Verification is for auditors and security officers".into(),
                colour::STOPPED,
            ),
        };
        egui::Frame::new()
            .fill(c)
            .inner_margin(egui::Margin::symmetric(12, 8))
            .show(ui, |ui| {
                ui.label(RichText::new(text).strong().color(colour::ON_DARK));
            });
        if widgets::button(ui, "Refresh audit log", Kind::Normal, 0.0).clicked() {
            s.audit.requested = false;
            s.audit.verification = None;
            s.audit.verification_error = None;
        }
    });
    ui.horizontal_wrapped(|ui| {
        widgets::field(ui, "Filter", &mut s.audit.filter, 260.0);
        for (f, text) in [
            (SeverityFilter::All, "All severities"),
            (SeverityFilter::Warnings, "Warnings and critical"),
            (SeverityFilter::Critical, "Critical only"),
        ] {
            if widgets::choice(ui, text, s.audit.severity == f).clicked() {
                s.audit.severity = f;
            }
        }
    });
    let entries: Vec<_> = s.audit.filtered().take(SHOWN).collect();
    ui.label(format!(
        "{} of the newest {} entries match, newest first",
        entries.len(),
        s.audit.entries.len()
    ));
    {
        {
            egui::Grid::new("audit-entries")
                .striped(true)
                .spacing([16.0, 6.0])
                .show(ui, |ui| {
                    for h in ["#", "time", "severity", "kind", "actor", "details"] {
                        ui.label(RichText::new(h).strong());
                    }
                    ui.end_row();
                    for e in entries {
                        ui.label(e.seq.to_string());
                        ui.label(e.time.replace('T', " "));
                        let c = match e.severity.as_str() {
                            "critical" => colour::BAD_TEXT,
                            "warning" => colour::WARN_TEXT,
                            _ => colour::ON_LIGHT,
                        };
                        ui.label(RichText::new(e.severity.to_uppercase()).color(c).strong());
                        ui.label(&e.kind);
                        ui.label(&e.actor);
                        ui.label(RichText::new(details(&e.details)).size(16.0));
                        ui.end_row();
                    }
                });
        }
    }
}

/// The details of an entry as `key: value` pairs.
fn details(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}: {other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}
