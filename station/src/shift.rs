//! The shift at a glance, for the supervisor's dashboards: where the yield goes (per nest and per
//! step, over time), which failure reasons weigh most (a Pareto), how the cycle time runs against
//! its theoretical minimum, and which nest fails more than chance explains (a worn pogo pin or a
//! loose cable is the classic cause).
//!
//! Everything is computed here, from the journal's meters, so that the console draws a few
//! hundred numbers whatever the length of the shift: a shift of 100 000 meters is as cheap to
//! draw as one of ten.

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use crate::db::DbError;
use crate::engine::Step;

/// The steps of a meter in order, as the dashboards name them.
pub const STEPS: [Step; 10] = [
    Step::Hello,
    Step::Channel,
    Step::Check,
    Step::Assign,
    Step::Keys,
    Step::Anchors,
    Step::Firmware,
    Step::Seal,
    Step::Attest,
    Step::Release,
];

/// How many time bins a shift is cut into (at least a minute each).
pub const BINS: i64 = 48;
/// The most bins or steps a reply from elsewhere may carry that the console will draw.
pub const MAX_BINS: usize = 1440;

/// A nest is flagged when its failure rate is this many standard errors above the rest of the
/// cell's (a two-proportion z-test) ...
pub const FLAG_Z: f64 = 3.0;
/// ... and it failed at least this many meters (a nest that failed two is not a pattern).
pub const FLAG_MIN_FAILED: u32 = 4;

/// The shift's production, aggregated.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ShiftView {
    /// Start of the window, Unix ms.
    pub since_ms: i64,
    /// End of the window, Unix ms.
    pub until_ms: i64,
    /// Width of a time bin, ms; bin `i` starts at `since_ms + i * bin_ms`.
    pub bin_ms: i64,
    /// The steps' names, in order; `NestShift::failed_at` is indexed like this.
    pub steps: Vec<String>,
    /// One entry per configured nest, in order.
    pub nests: Vec<NestShift>,
    /// Failure reasons, most frequent first: (reason, meters).
    pub causes: Vec<(String, u32)>,
    /// Cycle time of the meters done, per time bin (bins without a meter done are left out).
    pub cycle: Vec<CycleBin>,
    /// The theoretical minimum cycle time, ms: the wire time of the batch's firmware image
    /// (deflated, when that is smaller) at the cell's fastest line, 10 bits per byte. No meter
    /// can be provisioned faster than its image crosses the wire.
    pub floor_ms: Option<u32>,
}

/// One nest over the shift.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NestShift {
    /// Nest number (from 1).
    pub nest: u32,
    /// Meters done.
    pub done: u32,
    /// Meters failed.
    pub failed: u32,
    /// Meters failed at each step ([`ShiftView::steps`]); failures whose step was not recorded
    /// are in `failed` only.
    pub failed_at: Vec<u32>,
    /// (done, failed) per time bin.
    pub bins: Vec<(u32, u32)>,
    /// Why the nest stands out, in words, when it does.
    pub flag: Option<String>,
}

/// The cycle times of the meters done in one time bin.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CycleBin {
    /// Start of the bin, Unix ms.
    pub at_ms: i64,
    /// Meters done in it.
    pub meters: u32,
    /// Shortest cycle, ms.
    pub min_ms: u32,
    /// Median cycle, ms.
    pub median_ms: u32,
    /// 90th percentile, ms.
    pub p90_ms: u32,
}

/// One finished meter, as the dashboards need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// When it finished, Unix ms.
    pub finished_ms: i64,
    /// Nest number (from 1).
    pub nest: u32,
    /// Done (true) or failed.
    pub done: bool,
    /// From start to finish, ms.
    pub cycle_ms: u32,
    /// The step it failed at, when recorded.
    pub step: Option<Step>,
    /// Why it failed.
    pub reason: Option<String>,
}

/// The failure reason's words before its first detail (a colon, a parenthesis, a word with a
/// digit in it, or " during " and what follows): "meter stopped answering during firmware (FW_BLOCK unanswered
/// after 80 ms)" is counted as "meter stopped answering", so that the Pareto adds up meters that
/// failed for the same reason with different particulars.
pub fn cause(reason: &str) -> String {
    let mut end = reason.len();
    for stop in [" during ", ":", " (", " — ", ";"] {
        if let Some(i) = reason.find(stop) {
            end = end.min(i);
        }
    }
    // A word with a digit in it (a number, a hash, a model or frame name) is a particular, not
    // part of the reason.
    let words: Vec<&str> = reason[..end]
        .split_whitespace()
        .take_while(|w| !w.chars().any(|c| c.is_ascii_digit()))
        .collect();
    let c = words.join(" ");
    if c.is_empty() { "unknown".into() } else { c }
}

fn step_of(word: &str) -> Option<Step> {
    STEPS.iter().copied().find(|s| s.word() == word)
}

/// Reads the meters finished in `[since_ms, until_ms)` and aggregates them; `bauds` are the
/// nests' line speeds (their count is the number of nests).
pub fn read(
    c: &Connection,
    since_ms: i64,
    until_ms: i64,
    bauds: &[u32],
) -> Result<ShiftView, DbError> {
    let mut st = c.prepare_cached(
        "SELECT finished_at, nest, state = 'done', finished_at - started_at, fail_step, failure
           FROM meters
          WHERE finished_at >= ?1 AND finished_at < ?2 AND state IN ('done', 'failed')",
    )?;
    let rows = st
        .query_map([since_ms, until_ms], |r| {
            let step: Option<String> = r.get(4)?;
            Ok(Outcome {
                finished_ms: r.get(0)?,
                nest: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                done: r.get(2)?,
                cycle_ms: u32::try_from(r.get::<_, i64>(3)?.max(0)).unwrap_or(u32::MAX),
                step: step.as_deref().and_then(step_of),
                reason: r.get(5)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let floor_ms = floor(c, bauds)?;
    let nests = u32::try_from(bauds.len()).unwrap_or(u32::MAX);
    Ok(build(&rows, since_ms, until_ms, nests, floor_ms))
}

/// The theoretical minimum cycle of the newest batch's firmware at the fastest line.
fn floor(c: &Connection, bauds: &[u32]) -> Result<Option<u32>, DbError> {
    let newest: Option<i64> = c
        .query_row(
            "SELECT firmware_id FROM batches ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match newest {
        Some(id) => floor_of(c, id, bauds),
        None => Ok(None),
    }
}

/// The theoretical minimum cycle of firmware release `firmware_id` at the fastest of `bauds`,
/// ms: its wire time, 10 bits a byte, deflated when that is smaller.
pub fn floor_of(c: &Connection, firmware_id: i64, bauds: &[u32]) -> Result<Option<u32>, DbError> {
    let Some(baud) = bauds.iter().copied().max().filter(|b| *b > 0) else {
        return Ok(None);
    };
    let image: Option<(String, Vec<u8>)> = match c.query_row(
        "SELECT sha256, image FROM firmware WHERE id = ?1",
        [firmware_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ) {
        Ok(v) => Some(v),
        Err(rusqlite::Error::QueryReturnedNoRows) => None,
        Err(e) => return Err(e.into()),
    };
    let Some((sha, image)) = image else {
        return Ok(None);
    };
    let bytes = wire_bytes(&sha, &image);
    let ms = bytes as f64 * 10.0 * 1000.0 / f64::from(baud);
    Ok(Some(ms.round().min(f64::from(u32::MAX)) as u32))
}

/// The bytes of an image on the wire at best: its deflated size when smaller (remembered per
/// image, deflating a large image takes a while).
pub(crate) fn wire_bytes(sha: &str, image: &[u8]) -> usize {
    static LAST: std::sync::Mutex<Option<(String, usize)>> = std::sync::Mutex::new(None);
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((s, n)) = last.as_ref()
        && s == sha
    {
        return *n;
    }
    let n = miniz_oxide::deflate::compress_to_vec(image, 6)
        .len()
        .min(image.len());
    *last = Some((sha.to_string(), n));
    n
}

/// Aggregates finished meters into the dashboards' figures.
pub fn build(
    rows: &[Outcome],
    since_ms: i64,
    until_ms: i64,
    nests: u32,
    floor_ms: Option<u32>,
) -> ShiftView {
    let span = (until_ms - since_ms).max(1);
    let bin_ms = (span + BINS - 1) / BINS;
    let bin_ms = ((bin_ms + 59_999) / 60_000 * 60_000).max(60_000);
    let bins = usize::try_from((span + bin_ms - 1) / bin_ms)
        .unwrap_or(1)
        .max(1);
    let mut out: Vec<NestShift> = (1..=nests)
        .map(|nest| NestShift {
            nest,
            failed_at: vec![0; STEPS.len()],
            bins: vec![(0, 0); bins],
            ..NestShift::default()
        })
        .collect();
    let mut causes: std::collections::BTreeMap<String, u32> = Default::default();
    let mut cycles: Vec<Vec<u32>> = vec![Vec::new(); bins];
    for r in rows {
        let Some(n) = r
            .nest
            .checked_sub(1)
            .and_then(|i| out.get_mut(usize::try_from(i).ok()?))
        else {
            continue;
        };
        let b = usize::try_from((r.finished_ms - since_ms).max(0) / bin_ms)
            .unwrap_or(0)
            .min(bins - 1);
        if r.done {
            n.done += 1;
            n.bins[b].0 += 1;
            cycles[b].push(r.cycle_ms);
        } else {
            n.failed += 1;
            n.bins[b].1 += 1;
            if let Some(i) = r.step.and_then(|s| STEPS.iter().position(|x| *x == s)) {
                n.failed_at[i] += 1;
            }
            *causes
                .entry(cause(r.reason.as_deref().unwrap_or("")))
                .or_default() += 1;
        }
    }
    flag(&mut out);
    let mut causes: Vec<(String, u32)> = causes.into_iter().collect();
    causes.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let cycle = cycles
        .into_iter()
        .enumerate()
        .filter(|(_, c)| !c.is_empty())
        .map(|(i, mut c)| {
            c.sort_unstable();
            let at = |q: f64| c[((c.len() - 1) as f64 * q).round() as usize];
            CycleBin {
                at_ms: since_ms + i as i64 * bin_ms,
                meters: c.len() as u32,
                min_ms: c[0],
                median_ms: at(0.5),
                p90_ms: at(0.9),
            }
        })
        .collect();
    ShiftView {
        since_ms,
        until_ms,
        bin_ms,
        steps: STEPS.iter().map(|s| s.word().to_string()).collect(),
        nests: out,
        causes,
        cycle,
        floor_ms,
    }
}

/// A made-up but plausible shift, the same every time: `meters` meters over eight hours on
/// `nests` nests, about 1 % failing for a mix of reasons, the nest `worn` (if any) failing more
/// and more at the firmware step as its contacts wear, and a slower hour in the middle. The
/// console's snapshots and its benchmark draw it.
pub fn sample(nests: u32, meters: u32, worn: Option<u32>, until_ms: i64) -> ShiftView {
    let span = 8 * 3_600_000;
    let since = until_ms - span;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let reasons = [
        (Step::Keys, "meter refused KEY_PUT during keys: bad MAC"),
        (
            Step::Hello,
            "meter stopped answering during identify (HELLO unanswered after 200 ms)",
        ),
        (
            Step::Check,
            "meter model EM-200 is not the batch's model EM-300",
        ),
        (
            Step::Firmware,
            "meter reported image hash 22bd413a but was sent ddbd413a",
        ),
        (
            Step::Attest,
            "attestation refused: the meter's report is not signed by its key",
        ),
    ];
    let rows: Vec<Outcome> = (0..meters)
        .map(|m| {
            let nest = m % nests.max(1) + 1;
            let at = since + i64::from(m) * span / i64::from(meters.max(1));
            let hour = (at - since) as f64 / 3_600_000.0;
            let slow = if (4.0..5.0).contains(&hour) {
                900.0
            } else {
                0.0
            };
            let cycle = (5_200.0 + slow + next() * 600.0 + next().powi(8) * 4_000.0) as u32;
            let wear = if Some(nest) == worn {
                0.02 + 0.02 * hour
            } else {
                0.0
            };
            let (done, step, why) = if next() < wear {
                (
                    false,
                    Some(Step::Firmware),
                    "meter stopped answering during firmware (FW_BLOCK unanswered after 80 ms)",
                )
            } else if next() < 0.012 {
                let (st, why) = reasons[(next() * reasons.len() as f64) as usize % reasons.len()];
                (false, Some(st), why)
            } else {
                (true, None, "")
            };
            Outcome {
                finished_ms: at,
                nest,
                done,
                cycle_ms: cycle,
                step,
                reason: (!done).then(|| why.to_string()),
            }
        })
        .collect();
    build(&rows, since, until_ms, nests, Some(4_870))
}

/// Flags the nests whose failure rate stands out from the rest of the cell's.
fn flag(nests: &mut [NestShift]) {
    let total: u32 = nests.iter().map(|n| n.done + n.failed).sum();
    let failed: u32 = nests.iter().map(|n| n.failed).sum();
    let steps: Vec<&str> = STEPS.iter().map(|s| s.word()).collect();
    for n in nests.iter_mut() {
        let mine = n.done + n.failed;
        let (rest, rest_failed) = (total - mine, failed - n.failed);
        if mine == 0 || rest == 0 || n.failed < FLAG_MIN_FAILED {
            continue;
        }
        let (p1, p2) = (
            f64::from(n.failed) / f64::from(mine),
            f64::from(rest_failed) / f64::from(rest),
        );
        let pool = f64::from(failed) / f64::from(total);
        let se = (pool * (1.0 - pool) * (1.0 / f64::from(mine) + 1.0 / f64::from(rest))).sqrt();
        if se > 0.0 && (p1 - p2) / se >= FLAG_Z {
            let at = n
                .failed_at
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| **c)
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| format!(", most at {} ({c})", steps[i]))
                .unwrap_or_default();
            n.flag = Some(format!(
                "fails {:.1} % of its meters, the other nests {:.1} %{at} — check its contacts (pogo pins) and cable",
                100.0 * p1,
                100.0 * p2
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(
        at: i64,
        nest: u32,
        done: bool,
        cycle: u32,
        step: Option<Step>,
        why: &str,
    ) -> Outcome {
        Outcome {
            finished_ms: at,
            nest,
            done,
            cycle_ms: cycle,
            step,
            reason: (!done).then(|| why.to_string()),
        }
    }

    #[test]
    fn causes_drop_the_particulars() {
        for (reason, c) in [
            (
                "meter stopped answering during firmware (FW_BLOCK unanswered after 80 ms)",
                "meter stopped answering",
            ),
            (
                "meter refused KEY_PUT during keys: bad MAC",
                "meter refused KEY_PUT",
            ),
            (
                "meter reported image hash 22bd413ac6814ae8 but was sent ddbd",
                "meter reported image hash",
            ),
            ("interrupted", "interrupted"),
            ("", "unknown"),
            ("42 things", "unknown"),
            (
                "meter reported image hash b9ed24c852b7a1d2 but was sent ddbd",
                "meter reported image hash",
            ),
            (
                "meter model EM-200 is not the batch's model EM-300",
                "meter model",
            ),
        ] {
            assert_eq!(cause(reason), c, "{reason}");
        }
    }

    #[test]
    fn a_nest_failing_well_above_the_rest_is_flagged_and_only_it() {
        // Four nests, 100 meters each over an hour; nest 3 fails 12 at firmware, the others 1.
        let mut rows = Vec::new();
        for nest in 1..=4u32 {
            for i in 0..100i64 {
                let fail = if nest == 3 {
                    i % 8 == 0 && i < 96
                } else {
                    i == 50
                };
                rows.push(outcome(
                    i * 36_000,
                    nest,
                    !fail,
                    5_000 + (i as u32 % 7) * 100,
                    fail.then_some(Step::Firmware),
                    "meter stopped answering during firmware (FW_BLOCK unanswered after 80 ms)",
                ));
            }
        }
        let v = build(&rows, 0, 3_600_000, 4, Some(4_000));
        assert_eq!(v.nests[2].failed, 12);
        let flagged: Vec<u32> = v
            .nests
            .iter()
            .filter(|n| n.flag.is_some())
            .map(|n| n.nest)
            .collect();
        assert_eq!(flagged, [3]);
        let why = v.nests[2].flag.as_deref().unwrap();
        assert!(
            why.contains("12.0 %") && why.contains("1.0 %") && why.contains("firmware (12)"),
            "{why}"
        );
        assert_eq!(v.causes, [("meter stopped answering".to_string(), 15)]);
        assert_eq!(v.nests[2].failed_at[6], 12);
        assert_eq!(v.bin_ms, 120_000);
        assert_eq!(v.nests[0].bins.len(), 30);
        let done: u32 = v.cycle.iter().map(|c| c.meters).sum();
        assert_eq!(done, 400 - 15);
        assert!(
            v.cycle
                .iter()
                .all(|c| c.min_ms <= c.median_ms && c.median_ms <= c.p90_ms)
        );
        assert!(v.cycle.iter().all(|c| (5_000..=5_600).contains(&c.min_ms)));
    }

    #[test]
    fn an_even_cell_flags_nobody_and_a_few_failures_are_not_a_pattern() {
        let mut rows = Vec::new();
        for nest in 1..=4u32 {
            for i in 0..50i64 {
                // Nest 2 fails 4 of 50, the others 1 each: above the rest, not beyond chance.
                let fail = nest == 2 && i < 3 || i == 10;
                rows.push(outcome(i * 1000, nest, !fail, 5_000, None, "interrupted"));
            }
        }
        let v = build(&rows, 0, 60_000, 4, None);
        assert!(v.nests.iter().all(|n| n.flag.is_none()), "{:?}", v.nests);
        // No step recorded: counted as failed, at no step.
        assert_eq!(v.nests[1].failed, 4);
        assert_eq!(v.nests[1].failed_at.iter().sum::<u32>(), 0);
        assert_eq!(v.bin_ms, 60_000);
    }

    #[test]
    fn the_sample_shift_flags_its_worn_nest() {
        let v = sample(16, 10_000, Some(5), 1_800_000_000_000);
        let flagged: Vec<u32> = v
            .nests
            .iter()
            .filter(|n| n.flag.is_some())
            .map(|n| n.nest)
            .collect();
        assert_eq!(flagged, [5]);
        assert_eq!(
            v.nests.iter().map(|n| n.done + n.failed).sum::<u32>(),
            10_000
        );
        assert_eq!(v.causes[0].0, "meter stopped answering");
        assert_eq!(
            v,
            sample(16, 10_000, Some(5), 1_800_000_000_000),
            "the same every time"
        );
    }

    #[test]
    fn rows_outside_the_nests_are_ignored() {
        let rows = [
            outcome(10, 0, true, 1, None, ""),
            outcome(10, 9, true, 1, None, ""),
        ];
        let v = build(&rows, 0, 1000, 2, None);
        assert!(v.nests.iter().all(|n| n.done == 0));
        assert!(v.cycle.is_empty());
    }
}
