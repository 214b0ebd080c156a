//! The report as one self-contained HTML file: inline CSS and SVG charts, no script, no font or
//! image from anywhere else, laid out to print on A4 (the PDF is Chromium's print of it). The
//! numbers an auditor or a test looks for carry `id`s; all of them also travel as JSON in the
//! `report-data` element, so that a program can read exactly what the page shows.

use std::fmt::Write;

use super::{BatchReport, Verdict};

/// HTML-escapes text (element content and attribute values alike).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = "
@page { size: A4; margin: 14mm 12mm; }
* { box-sizing: border-box; }
body { font-family: 'DejaVu Sans', Arial, sans-serif; font-size: 10pt; color: #1b1f24; margin: 0 auto; max-width: 190mm; background: #fff; }
h1 { font-size: 17pt; margin: 0 0 2mm; }
h2 { font-size: 13pt; margin: 7mm 0 2mm; border-bottom: 1px solid #9aa4ae; padding-bottom: 1mm; page-break-after: avoid; }
h3 { font-size: 11pt; margin: 4mm 0 1mm; page-break-after: avoid; }
p { margin: 1mm 0 2mm; }
table { border-collapse: collapse; width: 100%; margin: 1mm 0 3mm; }
th, td { border: 1px solid #c5ccd3; padding: 1mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
tr { page-break-inside: avoid; }
table.reqs { table-layout: fixed; }
td.rid { font-weight: bold; font-size: 8.5pt; overflow-wrap: anywhere; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: 'DejaVu Sans Mono', monospace; font-size: 8.5pt; word-break: break-all; }
.banner { padding: 3mm 4mm; border-radius: 2mm; margin: 2mm 0 4mm; font-size: 12pt; font-weight: bold; }
.banner.ok { background: #e3f4e6; border: 2px solid #2e7d32; color: #1b5e20; }
.banner.bad { background: #fde7e7; border: 3px solid #c62828; color: #8e0000; font-size: 14pt; }
.facts { display: grid; grid-template-columns: repeat(4, 1fr); gap: 2mm; margin: 2mm 0 3mm; }
.fact { border: 1px solid #c5ccd3; border-radius: 1.5mm; padding: 2mm; }
.fact b { display: block; font-size: 15pt; }
.v-met { color: #1b5e20; font-weight: bold; }
.v-failed, .v-not_shown { color: #b71c1c; font-weight: bold; }
.v-not_applicable { color: #5f6b76; }
.small { font-size: 8.5pt; color: #45505a; }
.chart { margin: 1mm 0 3mm; }
svg text { font-family: 'DejaVu Sans', Arial, sans-serif; font-size: 9px; fill: #1b1f24; }
";

fn fmt_ms(ms: i64) -> String {
    if ms >= 60_000 {
        format!("{}:{:02} min", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{:.2} s", ms as f64 / 1000.0)
    }
}

/// What `station report` exits with for this report: 2 when the log fails, 3 when a check fails.
pub fn exit_code(r: &BatchReport) -> u8 {
    if !r.audit.ok() {
        2
    } else if r.requirements.iter().any(|q| q.verdict == Verdict::Failed) {
        3
    } else {
        0
    }
}

/// The top of an axis that shows `max` in four even steps of 1, 2 or 5 × 10ⁿ.
fn nice_top(max: f64) -> f64 {
    let raw = (max / 4.0).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|st| *st >= raw)
        .unwrap_or(10.0 * mag);
    // Counts come in whole numbers.
    let step = if max >= 4.0 {
        step.max(1.0).round()
    } else {
        step.max(0.25)
    };
    step * 4.0
}

/// A bar chart: one bar (or stack of two) per label.
fn bars(
    title: &str,
    rows: &[(String, f64, f64)],
    two: (&str, &str),
    mark: Option<(f64, &str)>,
) -> String {
    let (w, h, left, bottom, top) = (700.0, 190.0, 46.0, 34.0, 14.0);
    let mut s = String::new();
    let max = nice_top(
        rows.iter()
            .map(|r| r.1 + r.2)
            .chain(mark.map(|m| m.0))
            .fold(0.0f64, f64::max)
            .max(1.0),
    );
    let n = rows.len().max(1) as f64;
    // Few bars stay narrow, from the left.
    let bw = ((w - left - 8.0) / n).min(56.0);
    let _ = write!(
        s,
        "<svg class=\"chart\" role=\"img\" aria-label=\"{}\" viewBox=\"0 0 {w} {h}\" width=\"100%\">",
        esc(title)
    );
    let plot_h = h - bottom - top;
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e1e5ea\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - 4.0,
            left - 3.0,
            y + 3.0,
            (v * 100.0).round() / 100.0
        );
    }
    let every = (rows.len() / 16).max(1);
    for (i, (label, a, b)) in rows.iter().enumerate() {
        let x = left + bw * i as f64;
        let ha = plot_h * a / max;
        let hb = plot_h * b / max;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{ha:.1}\" fill=\"#3d7bbf\"><title>{}: {a}</title></rect>",
            x + 1.0,
            top + plot_h - ha,
            (bw - 2.0).max(1.0),
            esc(label)
        );
        if *b > 0.0 {
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hb:.1}\" fill=\"#d84a3a\"><title>{}: {b}</title></rect>",
                x + 1.0,
                top + plot_h - ha - hb,
                (bw - 2.0).max(1.0),
                esc(label)
            );
        }
        if i % every == 0 {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x + bw / 2.0,
                h - bottom + 12.0,
                esc(label)
            );
        }
    }
    if let Some((v, what)) = mark {
        // A vertical marker at value v on a histogram's x axis is drawn by the caller's labels;
        // here v is a horizontal line.
        let y = top + plot_h - plot_h * v / max;
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#222\" stroke-dasharray=\"5 3\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - 4.0,
            w - 6.0,
            y - 3.0,
            esc(what)
        );
    }
    let mut x = left;
    for (label, colour) in [(two.0, "#3d7bbf"), (two.1, "#d84a3a")] {
        if label.is_empty() {
            continue;
        }
        let _ = write!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"9\" height=\"9\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            h - 12.0,
            x + 12.0,
            h - 4.0,
            esc(label)
        );
        x += 180.0;
    }
    s.push_str("</svg>");
    s
}

/// The cycle-time histogram with the theoretical minimum as a dashed vertical line.
fn histogram(r: &BatchReport) -> String {
    let c = &r.cycle;
    if c.histogram.is_empty() {
        return "<p>No meter was done.</p>".into();
    }
    let (w, h, left, bottom, top) = (700.0, 190.0, 46.0, 34.0, 14.0);
    let lo = c.histogram[0].0 as f64;
    let hi = c.histogram[c.histogram.len() - 1].1 as f64;
    let max = nice_top(c.histogram.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64);
    let plot_w = w - left - 8.0;
    let plot_h = h - bottom - top;
    let x_of = |ms: f64| left + plot_w * (ms - lo) / (hi - lo).max(1.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" role=\"img\" aria-label=\"cycle time distribution\" viewBox=\"0 0 {w} {h}\" width=\"100%\">"
    );
    for i in 0..=4 {
        let y = top + plot_h - plot_h * f64::from(i) / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e1e5ea\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>",
            w - 4.0,
            left - 3.0,
            y + 3.0,
            max * f64::from(i) / 4.0
        );
    }
    for (a, b, n) in &c.histogram {
        let x0 = x_of(*a as f64);
        let x1 = x_of(*b as f64);
        let bh = plot_h * *n as f64 / max;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3d7bbf\"><title>{}–{}: {n}</title></rect>",
            x0 + 0.5,
            top + plot_h - bh,
            (x1 - x0 - 1.0).max(0.5),
            fmt_ms(*a),
            fmt_ms(*b)
        );
    }
    for i in 0..=4 {
        let ms = lo + (hi - lo) * f64::from(i) / 4.0;
        let anchor = match i {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
            x_of(ms),
            h - bottom + 12.0,
            if hi - lo < 2_000.0 {
                format!("{:.2} s", ms / 1000.0)
            } else {
                fmt_ms(ms as i64)
            }
        );
    }
    if let Some(f) = c.floor_ms {
        let x = x_of(f as f64);
        let _ = write!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{:.1}\" stroke=\"#222\" stroke-width=\"1.5\" stroke-dasharray=\"5 3\"/><text x=\"{:.1}\" y=\"{:.1}\">theoretical minimum {}</text>",
            top + plot_h,
            x + 4.0,
            top + 10.0,
            fmt_ms(f)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{left}\" y=\"{}\">meters per bar; cycle time from the meter's start to its release</text></svg>",
        h - 4.0
    );
    s
}

fn verdict_class(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "v-met",
        Verdict::Failed => "v-failed",
        Verdict::NotShown => "v-not_shown",
        Verdict::NotApplicable => "v-not_applicable",
    }
}

/// Renders the report.
pub fn render(r: &BatchReport) -> String {
    let mut s = String::with_capacity(256 * 1024);
    let title = format!(
        "Batch evidence report — {} ({})",
        r.batch.work_order, r.station_id
    );
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><meta name=\"generator\" content=\"{}\"><style>{CSS}</style></head><body>\n",
        esc(&title),
        esc(&r.software)
    );

    // First page: the audit log's verdict, the batch and the checks.
    let _ = write!(s, "<h1>{}</h1>", esc(&title));
    if let Some((seq, why)) = &r.audit.first_bad {
        let _ = write!(
            s,
            "<div class=\"banner bad\" id=\"audit-verdict\" data-ok=\"false\">THE AUDIT LOG FAILED VERIFICATION at entry {seq}: {}. It has been tampered with or damaged: no entry from {seq} on, and nothing in this report drawn from the log, can be taken as evidence.</div>",
            esc(why)
        );
    } else {
        let _ = write!(
            s,
            "<div class=\"banner ok\" id=\"audit-verdict\" data-ok=\"true\">The audit log verifies: {} entries and {} signed checkpoints checked with the key of {}{}.</div>",
            r.audit.entries,
            r.audit.checkpoints,
            esc(&r.audit.verified_with),
            if r.audit.signatures_checked < r.audit.entries {
                format!(
                    "; the newest {} entries by their own signatures, the others through the signed checkpoint whose chain hash covers them (<code>station report</code> checks every signature)",
                    r.audit.signatures_checked
                )
            } else {
                String::new()
            }
        );
    }
    let count = |v: Verdict| r.requirements.iter().filter(|q| q.verdict == v).count();
    let checks_ok = r.checks.iter().filter(|c| c.ok).count();
    let _ = write!(
        s,
        "<p id=\"overall\" class=\"{}\">Overall: {checks_ok} of {} checks of this batch hold; of {} requirements {} met, {} FAILED, {} not shown, {} do not apply. <code>station report</code> exits {}.</p>",
        if exit_code(r) == 0 {
            "v-met"
        } else {
            "v-failed"
        },
        r.checks.len(),
        r.requirements.len(),
        count(Verdict::Met),
        count(Verdict::Failed),
        count(Verdict::NotShown),
        count(Verdict::NotApplicable),
        exit_code(r)
    );
    let b = &r.batch;
    let _ = write!(
        s,
        "<table><tr><th>Work order</th><td id=\"work-order\">{}</td><th>Model</th><td>{}</td></tr>\
         <tr><th>Utility</th><td>{}</td><th>Quantity ordered</th><td class=\"n\">{}</td></tr>\
         <tr><th>Opened</th><td>{} by {}</td><th>Closed</th><td>{}</td></tr>\
         <tr><th>Station</th><td>{}</td><th>Report made</th><td>{} by {}</td></tr></table>",
        esc(&b.work_order),
        esc(&b.model),
        esc(&b.customer),
        b.quantity,
        esc(&b.opened_at),
        esc(&b.opened_by),
        match (&b.closed_at, &b.closed_by) {
            (Some(at), Some(by)) => format!("{} by {}", esc(at), esc(by)),
            _ => "still open".into(),
        },
        esc(&r.station_id),
        esc(&r.generated_at),
        esc(&r.software)
    );
    let c = &r.counts;
    let met = r
        .requirements
        .iter()
        .filter(|q| q.verdict == Verdict::Met)
        .count();
    let applicable = r
        .requirements
        .iter()
        .filter(|q| q.requirement.applies)
        .count();
    s.push_str("<div class=\"facts\">");
    for (id, label, v) in [
        ("meters-done", "meters done", c.meters_done.to_string()),
        (
            "meters-failed",
            "meter records failed",
            c.meters_failed.to_string(),
        ),
        (
            "certificates-voided",
            "certificates voided",
            c.certificates_voided.to_string(),
        ),
        (
            "alarms",
            "alarms raised / acknowledged",
            format!("{} / {}", c.alarms, c.alarms_acknowledged),
        ),
        (
            "certificates-delivered",
            "certificates delivered",
            c.certificates_delivered.to_string(),
        ),
        (
            "wrapped-keys",
            "keys delivered wrapped",
            if c.keys_purged_at.is_some() {
                format!("{} held · {} deleted", c.wrapped_keys, c.keys_purged)
            } else {
                c.wrapped_keys.to_string()
            },
        ),
        (
            "cycle-median",
            "median cycle time",
            if r.cycle.meters > 0 {
                fmt_ms(r.cycle.median_ms)
            } else {
                "–".into()
            },
        ),
        (
            "requirements-met",
            "requirements met",
            format!("{met} of {applicable}"),
        ),
    ] {
        let _ = write!(
            s,
            "<div class=\"fact\"><b id=\"{id}\">{}</b>{}</div>",
            esc(&v),
            esc(label)
        );
    }
    s.push_str("</div>");
    s.push_str("<h3>Checks of this batch</h3><table><tr><th>check</th><th>holds</th><th>what was found</th></tr>");
    for k in &r.checks {
        let _ = write!(
            s,
            "<tr id=\"check-{}\"><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            esc(&k.name),
            esc(&k.name),
            if k.ok { "v-met" } else { "v-failed" },
            if k.ok { "yes" } else { "NO" },
            esc(&k.detail)
        );
    }
    s.push_str("</table>");

    // The requirement table.
    s.push_str("<h2>Requirements and their evidence</h2><p class=\"small\">Each requirement of the seed documents as the cell's requirement map (<code>schemas/requirements.toml</code>) holds it: how the cell meets it, where that lives, the tests of this build that prove it, and this batch's audit entries of the kinds that evidence it.</p>");
    let _ = write!(
        s,
        "<p class=\"small\">Requirement map SHA-256 <code id=\"map-sha256\">{}</code>.</p>",
        esc(&r.map_sha256)
    );
    for (name, d) in &r.documents {
        let _ = write!(
            s,
            "<p class=\"small\"><b>{}</b>: {} — {}</p>",
            esc(name),
            esc(&d.title),
            esc(&d.source)
        );
    }
    s.push_str("<table class=\"reqs\"><colgroup><col style=\"width:17%\"><col style=\"width:22%\"><col style=\"width:45%\"><col style=\"width:16%\"></colgroup><tr><th>id</th><th>requirement</th><th>how the cell meets it / evidence for this batch</th><th>verdict</th></tr>");
    for q in &r.requirements {
        let req = &q.requirement;
        let mut ev = String::new();
        if req.applies {
            let _ = write!(ev, "{}", esc(&req.how));
            if !req.places.is_empty() {
                let _ = write!(
                    ev,
                    "<br><span class=\"small\">where: {}</span>",
                    req.places
                        .iter()
                        .map(|p| format!("<code>{}</code>", esc(p)))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if !q.evidence.is_empty() {
                let _ = write!(
                    ev,
                    "<br><span class=\"small\">audit entries: {}</span>",
                    q.evidence
                        .iter()
                        .map(|(k, n)| format!("<code>{}</code> {n}", esc(k)))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if !req.checks.is_empty() {
                let _ = write!(
                    ev,
                    "<br><span class=\"small\">checks: {}</span>",
                    esc(&req.checks.join(", "))
                );
            }
            let _ = write!(
                ev,
                "<br><span class=\"small\">tests: {}</span>",
                req.tests
                    .iter()
                    .map(|t| format!("<code>{}</code>", esc(t)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        } else {
            let _ = write!(ev, "{}", esc(&req.reason));
        }
        let _ = write!(
            s,
            "<tr id=\"req-{}\"><td class=\"rid\">{}</td><td>{}</td><td>{ev}</td><td class=\"{}\">{}<br><span class=\"small\">{}</span></td></tr>",
            esc(&req.id),
            esc(&req.id),
            esc(&req.text),
            verdict_class(q.verdict),
            q.verdict.word(),
            esc(&q.why)
        );
    }
    s.push_str("</table>");

    // The batch's story.
    s.push_str("<h2>The batch in charts</h2><h3>Meters per hour</h3>");
    let hours: Vec<(String, f64, f64)> = r
        .per_hour
        .iter()
        .map(|h| {
            let t = crate::db::rfc3339(h.start_ms);
            (
                t.get(11..16).unwrap_or("").to_string(),
                h.done as f64,
                h.failed as f64,
            )
        })
        .collect();
    if hours.is_empty() {
        s.push_str("<p>No meter finished.</p>");
    } else {
        s.push_str(&bars("meters per hour", &hours, ("done", "failed"), None));
        s.push_str("<p class=\"small\">Hours in UTC, from the hour each meter finished.</p>");
    }
    let _ = write!(
        s,
        "<h3>Cycle time</h3><p>Cycle time is a meter's time from its start in the nest to its release. {} meters done: shortest <span id=\"cycle-min\">{}</span>, median {}, 90th percentile {}, longest {}; theoretical minimum {}.</p>",
        r.cycle.meters,
        fmt_ms(r.cycle.min_ms),
        fmt_ms(r.cycle.median_ms),
        fmt_ms(r.cycle.p90_ms),
        fmt_ms(r.cycle.max_ms),
        r.cycle
            .floor_ms
            .map(|f| format!(
                "<span id=\"cycle-floor\">{}</span> (the firmware's wire time at the fastest line, 10 bits a byte{})",
                fmt_ms(f),
                r.cycle
                    .floor_from
                    .map(|(baud, bytes)| format!(
                        ": {bytes} bytes on the wire (the image deflated, when that is smaller) at {baud} baud"
                    ))
                    .unwrap_or_default()
            ))
            .unwrap_or_else(|| "unknown (the lines' speeds were not given)".into())
    );
    s.push_str(&histogram(r));
    s.push_str("<h3>Failures by nest</h3>");
    let nests: Vec<(String, f64, f64)> = r
        .nests
        .iter()
        .map(|n| (format!("nest {}", n.nest), n.done as f64, n.failed as f64))
        .collect();
    if !nests.is_empty() {
        let failed: Vec<(String, f64, f64)> =
            nests.iter().map(|(l, _, f)| (l.clone(), 0.0, *f)).collect();
        s.push_str(&bars("failures by nest", &failed, ("", "failed"), None));
    }
    s.push_str("<table><tr><th>nest</th><th class=\"n\">done</th><th class=\"n\">failed</th><th class=\"n\">failed %</th></tr>");
    for n in &r.nests {
        let total = (n.done + n.failed).max(1);
        let _ = write!(
            s,
            "<tr id=\"nest-{}\"><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.1}</td></tr>",
            n.nest,
            n.nest,
            n.done,
            n.failed,
            100.0 * n.failed as f64 / total as f64
        );
    }
    s.push_str("</table><h3>Failures by reason</h3>");
    if r.failures_by_reason.is_empty() {
        s.push_str("<p>No meter failed.</p>");
    } else {
        let rows: Vec<(String, f64, f64)> = r
            .failures_by_reason
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("{}", i + 1), 0.0, t.count as f64))
            .collect();
        s.push_str(&bars(
            "failures by reason",
            &rows,
            ("", "meters failed"),
            None,
        ));
        s.push_str("<table><tr><th>#</th><th>reason</th><th class=\"n\">meters</th></tr>");
        for (i, t) in r.failures_by_reason.iter().enumerate() {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
                i + 1,
                esc(&t.label),
                t.count
            );
        }
        s.push_str("</table><table><tr><th>step</th><th class=\"n\">meters failed there</th></tr>");
        for t in &r.failures_by_step {
            let _ = write!(
                s,
                "<tr><td>{}</td><td class=\"n\">{}</td></tr>",
                esc(&t.label),
                t.count
            );
        }
        s.push_str("</table>");
    }
    s.push_str("<h3>Alarms and how long until acknowledged</h3>");
    if r.alarms.is_empty() {
        s.push_str("<p>No alarm was raised.</p>");
    } else {
        let rows: Vec<(String, f64, f64)> = r
            .alarms
            .iter()
            .map(|a| match a.ack_s {
                Some(x) => (format!("#{}", a.id), x, 0.0),
                None => (format!("#{}", a.id), 0.0, a.open_s.unwrap_or(0.0)),
            })
            .collect();
        s.push_str(&bars(
            "seconds until acknowledged",
            &rows,
            (
                "seconds until acknowledged",
                "not acknowledged: seconds open",
            ),
            None,
        ));
        s.push_str("<table><tr><th>#</th><th>raised</th><th>alarm</th><th>acknowledged</th><th class=\"n\">after</th></tr>");
        for a in &r.alarms {
            let _ = write!(
                s,
                "<tr id=\"alarm-{}\"><td>{}</td><td>{}</td><td>{}<br><span class=\"small\"><code>{}</code></span></td><td>{}</td><td class=\"n\">{}</td></tr>",
                a.id,
                a.id,
                esc(&a.raised_at),
                esc(&a.words),
                esc(&a.kind),
                match (&a.acked_at, &a.acked_by) {
                    (Some(t), Some(by)) => format!("{} by {}", esc(t), esc(by)),
                    _ => "<span class=\"v-failed\">NOT ACKNOWLEDGED</span>".into(),
                },
                match (a.ack_s, a.open_s) {
                    (Some(x), _) => format!("{x:.0} s"),
                    (None, Some(x)) => format!("open {x:.0} s when this report was made"),
                    _ => String::new(),
                }
            );
        }
        s.push_str("</table>");
    }

    // Voided certificates and the chain.
    let _ = write!(
        s,
        "<h2>Voided certificates</h2><p>{} certificate(s) of this batch were voided; each is also in the CRL of every later export.</p>",
        r.voided.len()
    );
    if !r.voided.is_empty() {
        s.push_str("<table><tr><th>certificate serial</th><th>meter</th><th>slot</th><th>reason</th><th>when</th></tr>");
        for v in &r.voided {
            let _ = write!(
                s,
                "<tr><td class=\"mono\">{}</td><td>{}<br><span class=\"mono\">{}</span></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.serial),
                esc(v.meter_serial.as_deref().unwrap_or("(no number yet)")),
                esc(&v.uid),
                esc(&v.slot),
                esc(&v.reason),
                esc(&v.at)
            );
        }
        s.push_str("</table>");
    }
    let recovered = r.failed_meters.iter().filter(|f| f.recovered).count();
    let _ = write!(
        s,
        "<h2>Failed meters, and what became of them</h2><p>{} meter record(s) of this batch failed; {recovered} of those meters were provisioned again and are done. A failed meter's keys were deleted and its certificates voided when it failed; it enters the line again only with a supervisor's rework approval.</p>",
        r.failed_meters.len()
    );
    if !r.failed_meters.is_empty() {
        s.push_str("<table id=\"failed-meters\"><tr><th>meter</th><th>nest</th><th>step</th><th>reason</th><th>when</th><th>what became of it</th></tr>");
        for f in &r.failed_meters {
            let _ = write!(
                s,
                "<tr><td>{}<br><span class=\"mono\">{}</span></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(f.serial.as_deref().unwrap_or("(no number yet)")),
                esc(&f.uid),
                f.nest,
                esc(&f.step),
                esc(&f.reason),
                esc(&f.at),
                if f.recovered { "v-met" } else { "" },
                esc(&f.fate)
            );
        }
        s.push_str("</table>");
    }
    s.push_str("<h2>From the manifest back to the audit log</h2><p>Each export names an audit checkpoint: a note signed by the audit key over the log's size, its RFC 6962 tree head and its chain hash. The note's signature is verified with the audit key, its chain hash compared with the stored entry's, and the entry that recorded the export found by the manifest's hash. The note is printed whole, its signature line included, for any C2SP note verifier.</p>");
    if r.exports.is_empty() {
        s.push_str("<p class=\"v-failed\">The batch has not been exported.</p>");
    }
    for e in &r.exports {
        let _ = write!(
            s,
            "<table><tr><th>manifest.json SHA-256</th><td class=\"mono\">{}</td></tr>\
             <tr><th>exported</th><td>{} by {} to <code>{}</code></td></tr>\
             <tr><th>checkpoint</th><td>entry {}<pre class=\"mono\">{}</pre></td></tr>\
             <tr><th>signature</th><td class=\"{}\">{}</td></tr>\
             <tr><th>chain hash</th><td class=\"{}\">{}</td></tr>\
             <tr><th>CRL</th><td><code>voided.crl</code> number {}</td></tr>\
             <tr><th>export entry</th><td>{}</td></tr></table>",
            esc(&e.manifest_sha256),
            esc(&e.at),
            esc(&e.by),
            esc(&e.out_dir),
            e.checkpoint_seq,
            esc(&e.checkpoint_text),
            if e.signature_ok { "v-met" } else { "v-failed" },
            if e.signature_ok {
                "verified with the audit key"
            } else {
                "DOES NOT VERIFY"
            },
            if e.chain_ok { "v-met" } else { "v-failed" },
            if e.chain_ok {
                "equals the stored entry's"
            } else {
                "DIFFERS FROM THE STORED ENTRY'S"
            },
            e.crl_number,
            match (e.exported_entry, &e.exported_kind) {
                (Some(s), Some(kind)) => format!("<code>{}</code> at entry {s}", esc(kind)),
                _ if e.pending => "written with this report (the export under way)".into(),
                _ =>
                    "<span class=\"v-failed\">NO ENTRY of the log records this export</span>".into(),
            }
        );
    }

    // Firmware, HSM, permissions.
    let f = &r.firmware;
    let _ = write!(
        s,
        "<h2>Firmware release</h2><table><tr><th>version</th><td>{}</td></tr><tr><th>image SHA-256</th><td class=\"mono\">{}</td></tr><tr><th>size</th><td>{} bytes</td></tr><tr><th>signer key SHA-256</th><td class=\"mono\">{}</td></tr><tr><th>imported</th><td>{} by {} (signature verified against the firmware verification certificate)</td></tr><tr><th>meters done reporting this image</th><td id=\"firmware-matching\">{} of {}</td></tr></table>",
        esc(&f.version),
        esc(&f.sha256),
        f.size,
        esc(&f.signer_key_hash),
        esc(&f.imported_at),
        esc(&f.imported_by),
        f.meters_matching,
        f.meters_matching + f.meters_other
    );
    s.push_str("<h2>HSM self-tests and key attributes read back</h2>");
    if r.hsm_self_tests.is_empty() {
        s.push_str(
            "<p class=\"v-failed\">No self-test was recorded before or during the batch.</p>",
        );
    }
    for t in &r.hsm_self_tests {
        let _ = write!(
            s,
            "<h3>Entry {} at {}: {} ({} checks)</h3>",
            t.seq,
            esc(&t.at),
            if t.passed { "passed" } else { "FAILED" },
            t.checks
        );
        if !t.findings.is_empty() {
            s.push_str("<table><tr><th>check</th><th>ok</th><th>read back</th></tr>");
            for (name, ok, detail) in &t.findings {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
                    esc(name),
                    if *ok { "v-met" } else { "v-failed" },
                    if *ok { "yes" } else { "NO" },
                    esc(detail)
                );
            }
            s.push_str("</table>");
        }
    }
    s.push_str("<h2>Permission table</h2><table><tr><th>action</th><th>roles allowed</th></tr>");
    for (a, roles) in &r.permissions {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(a),
            esc(&roles.join(", "))
        );
    }
    s.push_str("</table>");

    let _ = write!(
        s,
        "<h2>Audit entries of the batch</h2><p>Entries from {} to {}, per kind, with the first {} of each.</p><table><tr><th>kind</th><th class=\"n\">entries</th><th>first entries (sequence, time, actor, details)</th></tr>",
        esc(&crate::db::rfc3339(r.batch.window_ms.0)),
        esc(&crate::db::rfc3339(r.batch.window_ms.1)),
        super::EXAMPLES
    );
    for (k, e) in &r.audit_kinds {
        let ex = e
            .examples
            .iter()
            .map(|(seq, t, actor, d)| {
                format!(
                    "{seq} · {} · {}<br><code>{}</code>",
                    esc(t),
                    esc(actor),
                    esc(d)
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            s,
            "<tr id=\"kind-{}\"><td><code>{}</code></td><td class=\"n\">{}</td><td class=\"small\">{ex}</td></tr>",
            esc(k),
            esc(k),
            e.count
        );
    }
    s.push_str("</table>");

    // The numbers as data, for programs. `</` cannot occur inside: every `<` is escaped.
    let json = serde_json::to_string(r)
        .unwrap_or_default()
        .replace('<', "\\u003c");
    let _ = write!(
        s,
        "<script type=\"application/json\" id=\"report-data\">{json}</script>\n</body></html>\n"
    );
    s
}

/// Reads the numbers back out of a report's HTML (the `report-data` element).
pub fn data_of(html: &str) -> Option<BatchReport> {
    let start = html.find("id=\"report-data\">")? + "id=\"report-data\">".len();
    let end = start + html[start..].find("</script>")?;
    serde_json::from_str(&html[start..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_any_field_stays_text_and_the_data_reads_back() {
        let mut r = super::super::sample();
        r.batch.work_order = "<script>alert(1)</script>".into();
        r.failures_by_reason[0].label = "</script><b>x".into();
        let html = render(&r);
        assert!(!html.contains("<script>alert"));
        assert!(!html.contains("</script><b>"));
        assert_eq!(html.matches("</script>").count(), 1);
        assert_eq!(data_of(&html).unwrap(), r);
    }

    /// What a rogue board or a hostile journal could put into the text the report shows: a
    /// meter's refusal detail ends up in a failure reason, an alarm and a void's reason.
    #[test]
    fn hostile_text_in_every_field_never_becomes_markup() {
        let pieces = [
            "<x-evil>",
            "</script>",
            "<!--",
            "-->",
            "\"",
            "'",
            "&amp;",
            "&",
            "<",
            ">",
            "]]>",
            "\u{2028}",
            "</style><x-evil onload=1>",
            "<svg onload=x>",
            "é",
            "\\",
            "\n",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize
        };
        for _ in 0..200 {
            let mut text = || -> String {
                (0..1 + next() % 6)
                    .map(|_| pieces[next() % pieces.len()])
                    .collect()
            };
            let mut r = super::super::sample();
            r.batch.work_order = text();
            r.batch.customer = text();
            r.station_id = text();
            r.failures_by_reason[0].label = text();
            r.failures_by_step[0].label = text();
            r.alarms[0].words = text();
            r.alarms[0].kind = text();
            r.voided[0].reason = text();
            r.voided[0].meter_serial = Some(text());
            r.failed_meters[0].reason = text();
            r.failed_meters[0].fate = text();
            r.failed_meters[0].serial = Some(text());
            r.exports[0].checkpoint_text = text();
            r.exports[0].out_dir = text();
            r.hsm_self_tests[0].findings[0].2 = text();
            r.checks[0].detail = text();
            r.requirements[0].requirement.text = text();
            r.requirements[0].why = text();
            r.audit_kinds.insert(
                text(),
                crate::report::KindEvidence {
                    count: 1,
                    examples: vec![(1, text(), text(), text())],
                },
            );
            let html = render(&r);
            assert!(!html.contains("<x-evil"), "{html}");
            assert!(!html.contains("<svg onload"));
            assert!(!html.contains("<!--"));
            assert_eq!(html.matches("<script").count(), 1);
            assert_eq!(html.matches("</script>").count(), 1);
            assert_eq!(html.matches("</style>").count(), 1);
            assert_eq!(data_of(&html).as_ref(), Some(&r));
        }
    }

    #[test]
    fn an_export_no_entry_records_fails_its_check_and_says_so() {
        let mut r = super::super::sample();
        assert!(render(&r).contains("<code>manifest.exported</code> at entry 2430"));
        r.exports[0].exported_entry = None;
        r.exports[0].exported_kind = None;
        let check = super::super::check(&r, super::super::Check::Checkpoints);
        assert!(!check.ok, "{check:?}");
        assert!(render(&r).contains("NO ENTRY of the log records this export"));
        r.exports[0].pending = true;
        assert!(super::super::check(&r, super::super::Check::Checkpoints).ok);
        assert!(render(&r).contains("the export under way"));
    }

    #[test]
    fn a_failed_log_is_the_first_thing_on_the_page() {
        let mut r = super::super::sample();
        r.audit.first_bad = Some((17, "its hash does not chain".into()));
        let html = render(&r);
        let banner = html
            .find("THE AUDIT LOG FAILED VERIFICATION at entry 17")
            .unwrap();
        assert!(banner < html.find("Checks of this batch").unwrap());
        assert!(!render(&super::super::sample()).contains("FAILED VERIFICATION"));
    }
}
