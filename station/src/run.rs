//! Running the line headless (`station run`, and the demo), as a client of `stationd`: start
//! the line, show a progress bar per nest from the daemon's event stream, stop cleanly on Ctrl-C
//! or when the batch is complete, print a summary.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::api::client::Client;
use crate::api::convert::Update;
use crate::engine::{Command, Event, NestState, NestView, Session};

/// What a run did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Meters done in this run.
    pub done: i64,
    /// Meters failed in this run.
    pub failed: i64,
    /// Meters refused (not taken into the batch).
    pub refused: i64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Average cycle time of the meters done, ms.
    pub avg_cycle_ms: Option<u64>,
    /// Meters per hour over the run.
    pub meters_per_hour: f64,
    /// The batch is complete.
    pub batch_complete: bool,
    /// Failure reasons seen, with counts.
    pub failures: Vec<(String, u32)>,
    /// The station stopped the line itself, and why (the journal or the HSM failed).
    pub halted: Option<String>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "meters done: {}   failed: {}   refused: {}",
            self.done, self.failed, self.refused
        )?;
        if let Some(c) = self.avg_cycle_ms {
            writeln!(f, "average cycle time: {:.2} s", c as f64 / 1000.0)?;
        }
        writeln!(
            f,
            "throughput: {:.0} meters/hour over {:.1} s",
            self.meters_per_hour, self.elapsed_s
        )?;
        for (reason, n) in &self.failures {
            writeln!(f, "  {n} × {reason}")?;
        }
        if let Some(why) = &self.halted {
            writeln!(
                f,
                "THE STATION STOPPED THE LINE: {why}\n  fix the cause, then run again: meters in progress were failed and nothing committed was lost"
            )?;
        }
        write!(
            f,
            "batch {}",
            if self.batch_complete {
                "complete"
            } else {
                "not complete"
            }
        )
    }
}

/// `station run`: log in, run until the batch is complete (or Ctrl-C), print the summary.
pub async fn run(
    client: &Client,
    (user, pin): (String, Zeroizing<String>),
    keep_running: bool,
    plain: bool,
) -> anyhow::Result<bool> {
    let session = client.login(&user, &pin).await?.session;
    drop(pin);
    let summary = run_line(client, &session, keep_running, plain).await;
    let _ = client.logout(&session).await;
    let summary = summary?;
    println!("{summary}");
    Ok(summary.batch_complete)
}

fn describe(n: &NestView) -> String {
    let mut s = format!("{:<7}", n.state.word());
    if let Some(serial) = &n.serial {
        s.push_str(&format!(" {serial}"));
    }
    if n.state == NestState::Busy
        && let Some(step) = n.step
    {
        s.push_str(&format!(" {}", step.word()));
    }
    if let Some(m) = &n.message {
        s.push_str(&format!(" — {m}"));
    }
    s
}

/// Starts the line, follows it until the batch is complete (or Ctrl-C, unless `keep_running`
/// keeps it going until Ctrl-C only), stops it cleanly and sums up.
pub async fn run_line(
    client: &Client,
    session: &Session,
    keep_running: bool,
    plain: bool,
) -> anyhow::Result<Summary> {
    // Follow first, then start: nothing that happens in between is lost.
    let mut events = client.events(session).await?;
    let snapshot = match events.next().await {
        Some(Ok(Update::Snapshot(l))) => l,
        Some(Err(e)) => return Err(e.into()),
        _ => bail!("the daemon's event stream did not start with the line"),
    };
    let before = snapshot
        .batch
        .as_ref()
        .map(|b| (b.done, b.failed))
        .unwrap_or((0, 0));
    client.execute(session, Command::StartLine).await?;
    let started = Instant::now();
    let bars = !plain && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if bars {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:>6} [{bar:24}] {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let pbs: Vec<ProgressBar> = snapshot
        .nests
        .iter()
        .map(|n| {
            let pb = multi.add(ProgressBar::new(100));
            pb.set_style(style.clone());
            pb.set_prefix(n.name.clone());
            pb.set_message(describe(n));
            pb
        })
        .collect();
    let mut summary = Summary {
        done: 0,
        failed: 0,
        refused: 0,
        elapsed_s: 0.0,
        avg_cycle_ms: None,
        meters_per_hour: 0.0,
        batch_complete: false,
        failures: Vec::new(),
        halted: None,
    };
    let mut cycles = Vec::new();
    let mut batch = snapshot.batch.clone();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if !keep_running {
            if let Some(b) = &batch {
                if b.remaining() == 0 && b.in_flight == 0 {
                    summary.batch_complete = true;
                    break;
                }
            } else {
                break;
            }
        }
        tokio::select! {
            _ = &mut ctrl_c => {
                let _ = multi.println("stopping: the meters in progress finish first");
                break;
            }
            ev = events.next() => match ev {
                Some(Ok(Update::Snapshot(l))) => {
                    batch = l.batch;
                    for n in &l.nests {
                        if let Some(pb) = pbs.get(n.nest as usize - 1) {
                            pb.set_message(describe(n));
                        }
                    }
                }
                Some(Ok(Update::Event(Event::Batch(b)))) => batch = b,
                Some(Ok(Update::Event(Event::Nest(n)))) => {
                    if let Some(pb) = pbs.get(n.nest as usize - 1) {
                        pb.set_position((n.progress.unwrap_or(if n.state == NestState::Pass { 1.0 } else { 0.0 }) * 100.0) as u64);
                        pb.set_message(describe(&n));
                    }
                }
                Some(Ok(Update::Event(Event::MeterFinished { nest, serial, ok, reason, cycle_ms, uid }))) => {
                    if ok {
                        summary.done += 1;
                        cycles.push(cycle_ms);
                    } else if serial.is_some() {
                        summary.failed += 1;
                    } else {
                        summary.refused += 1;
                    }
                    if let Some(r) = &reason {
                        match summary.failures.iter_mut().find(|(x, _)| x == r) {
                            Some((_, n)) => *n += 1,
                            None => summary.failures.push((r.clone(), 1)),
                        }
                    }
                    if !bars {
                        match (ok, reason) {
                            (true, _) => println!("nest {nest}: PASS {} ({uid}) in {:.2} s", serial.unwrap_or_default(), cycle_ms as f64 / 1000.0),
                            (false, Some(r)) => println!("nest {nest}: FAIL {uid}: {r}"),
                            (false, None) => println!("nest {nest}: FAIL {uid}"),
                        }
                    }
                }
                Some(Ok(Update::Event(Event::Alarm(a)))) => {
                    let _ = multi.println(format!("ALARM {}: {} — a supervisor must acknowledge it", a.kind, a.message));
                }
                Some(Ok(Update::Event(Event::Line { running: false, halted }))) => {
                    if let Some(why) = halted {
                        let _ = multi.println(format!("the station stopped the line: {why}"));
                        summary.halted = Some(why);
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(anyhow::Error::new(e).context("the daemon ended the event stream"));
                }
                None => bail!("the daemon ended the event stream (did stationd stop?)"),
            },
        }
    }
    client.execute(session, Command::StopLine).await?;
    // The nests finish the meters they have.
    let deadline = Instant::now() + Duration::from_secs(300);
    while client
        .snapshot(session)
        .await
        .context("cannot read the line")?
        .nests
        .iter()
        .any(|n| n.state == NestState::Busy)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Whatever finished while stopping still gets its line.
    while let Ok(Some(Ok(Update::Event(ev)))) =
        tokio::time::timeout(Duration::from_millis(50), events.next()).await
    {
        if let Event::MeterFinished {
            nest,
            serial,
            ok,
            reason,
            cycle_ms,
            uid,
        } = ev
        {
            if ok {
                cycles.push(cycle_ms);
            }
            if !bars {
                match (ok, reason) {
                    (true, _) => println!(
                        "nest {nest}: PASS {} ({uid}) in {:.2} s",
                        serial.unwrap_or_default(),
                        cycle_ms as f64 / 1000.0
                    ),
                    (false, r) => println!("nest {nest}: FAIL {uid}: {}", r.unwrap_or_default()),
                }
            }
        }
    }
    for pb in &pbs {
        pb.finish();
    }
    // Counts come from the journal, which is the truth.
    let end = client.snapshot(session).await?;
    if let Some(b) = &end.batch {
        summary.done = b.done - before.0;
        summary.failed = b.failed - before.1;
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.avg_cycle_ms =
        (!cycles.is_empty()).then(|| cycles.iter().sum::<u64>() / cycles.len() as u64);
    summary.meters_per_hour = if summary.elapsed_s > 0.0 {
        summary.done as f64 * 3600.0 / summary.elapsed_s
    } else {
        0.0
    };
    if let Some(b) = end.batch {
        summary.batch_complete = b.remaining() == 0;
    }
    Ok(summary)
}
