//! The task in `stationd` that keeps the factory registry up to date: it takes a new lease when
//! the station's numbers run low and pushes the outbox whenever the registry can be reached. It
//! never stops the line: an unreachable registry only grows the backlog the health screen shows
//! (a line that runs out of leased numbers is stopped by the assignment, not here).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use super::{FleetHealth, Inner};
use crate::audit::{NewEvent, Severity};
use crate::config::FleetSettings;
use crate::db::now_ms;
use crate::fleet::{self, Endpoint, FleetError};

/// The longest wait between attempts while the registry cannot be reached: a minute, or 16
/// push intervals if that is less.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

pub(crate) async fn run(inner: Arc<Inner>, f: FleetSettings) {
    let ep = Endpoint::station(&inner.cfg.station_id, &f);
    let mut stop = inner.stop_rx();
    let mut client: Option<Client> = None;
    let mut failures: u32 = 0;
    let mut down = false;
    let mut warned_low = false;
    loop {
        let outcome = cycle(&inner, &f, &ep, &mut client).await;
        let problem = match &outcome {
            Ok(()) => {
                if down {
                    note(
                        &inner,
                        "fleet.reachable",
                        Severity::Info,
                        serde_json::json!({"registry": format!("{}:{}", f.host, f.port)}),
                    )
                    .await;
                }
                down = false;
                warned_low = false;
                failures = 0;
                None
            }
            Err(e) => {
                // A fresh connection next time: cheap, and it never reuses one in a bad state.
                client = None;
                failures = failures.saturating_add(1);
                let why = e.to_string();
                tracing::warn!(error = %why, "the registry cannot take the outbox now");
                if !down {
                    note(
                        &inner,
                        "fleet.unreachable",
                        Severity::Warning,
                        serde_json::json!({"message": why}),
                    )
                    .await;
                }
                down = true;
                // Running low with no way to a new lease: say so before the line stops.
                let left = inner.db.call(|c| fleet::leased_left(c)).await.unwrap_or(0);
                if !warned_low && left < i64::from(f.lease_low_water) {
                    warned_low = true;
                    note(
                        &inner,
                        "fleet.leases_low",
                        Severity::Warning,
                        serde_json::json!({
                            "message": format!("{left} leased numbers left and the registry cannot be reached: the line stops when they are used"),
                            "left": left,
                        }),
                    )
                    .await;
                }
                let w = why.clone();
                let _ = inner.db.call(move |c| fleet::push_failed(c, &w)).await;
                Some(why)
            }
        };
        publish_health(&inner, outcome.is_ok(), problem).await;
        let wait = if outcome.is_ok() {
            Duration::from_secs(f.push_interval_s)
        } else {
            backoff(failures, f.push_interval_s)
        };
        // A meter that drew a number wakes it early (the leases may be running low), unless it
        // is backing off from an unreachable registry.
        let wake = async {
            if outcome.is_ok() {
                inner.fleet_wake.notified().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = wake => {}
        }
    }
}

/// 1, 2, 4 … times the push interval, at most a minute, with up to a quarter more at random so
/// that the stations of a plant do not all come back at the same instant.
fn backoff(failures: u32, interval_s: u64) -> Duration {
    let interval = Duration::from_secs(interval_s);
    let base = interval
        .saturating_mul(1u32 << failures.saturating_sub(1).min(6))
        .min(MAX_BACKOFF)
        .min(interval.saturating_mul(16));
    let mut r = [0u8; 2];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut r);
    base + base.mul_f64(f64::from(u16::from_le_bytes(r)) / 65535.0 / 4.0)
}

/// Records an event of the registry task in the audit log (kept for later if the log cannot
/// take it now).
async fn note(inner: &Arc<Inner>, kind: &str, severity: Severity, details: serde_json::Value) {
    inner
        .record_or_keep(NewEvent::new(
            &inner.source,
            kind,
            severity,
            "system",
            details,
        ))
        .await;
}

async fn publish_health(inner: &Arc<Inner>, reachable: bool, problem: Option<String>) {
    let counts = inner
        .db
        .call(|c| -> Result<_, crate::db::DbError> {
            Ok((fleet::backlog(c)?, fleet::leased_left(c)?))
        })
        .await;
    let Ok(((backlog, oldest), left)) = counts else {
        return;
    };
    inner.set_fleet_health(FleetHealth {
        reachable,
        backlog: backlog.max(0) as u64,
        oldest_unsent_s: oldest.map(|t| ((now_ms() - t).max(0) / 1000) as u64),
        leased_left: left.max(0) as u64,
        problem,
    });
}

async fn cycle(
    inner: &Arc<Inner>,
    f: &FleetSettings,
    ep: &Endpoint,
    client: &mut Option<Client>,
) -> Result<(), FleetError> {
    if client.as_ref().is_none_or(Client::is_closed) {
        let c = fleet::connect(ep).await?;
        // What the registry holds may end before what it acknowledged: send the rest again.
        let have = fleet::registry_acked(&c).await?;
        if inner.db.call(move |db| fleet::rewind(db, have)).await? {
            tracing::warn!(
                registry_has = have,
                "the registry lacks records it acknowledged; sending them again"
            );
            note(inner, "fleet.resent", Severity::Warning, serde_json::json!({"message": format!("the registry holds this station's records up to {have} only, fewer than it had acknowledged: they are sent again"), "registry_has": have})).await;
        }
        // What the registry saw issued was issued: a journal put back from a backup must not
        // issue those numbers again.
        let used = fleet::registry_highest_number(&c).await?;
        let skipped = inner
            .db
            .call(move |db| fleet::skip_used_numbers(db, used))
            .await?;
        if skipped > 0 {
            tracing::warn!(
                skipped,
                used,
                "the leases were behind the numbers the registry saw issued"
            );
            note(
                inner,
                "fleet.numbers_skipped",
                Severity::Warning,
                serde_json::json!({
                    "message": format!("the registry holds meters of this station up to number {used}, beyond the journal's leases: {skipped} numbers are skipped so that none is issued twice (was the journal put back from a backup?)"),
                    "registry_highest": used,
                    "skipped": skipped,
                }),
            )
            .await;
        }
        *client = Some(c);
    }
    let Some(c) = client.as_mut() else {
        return Ok(());
    };
    // Leases first: the line needs numbers, the registry can wait for records.
    let left = inner.db.call(|c| fleet::leased_left(c)).await?;
    if left < i64::from(f.lease_low_water) {
        let block = f.lease_block;
        let (request, count) = inner
            .db
            .call(move |c| fleet::lease_request(c, block))
            .await?;
        let (id, first, last) = fleet::take_lease(c, &request, count).await?;
        let req = request.clone();
        if let Err(why) = inner
            .db
            .call(move |c| fleet::lease_granted(c, &req, id, first, last))
            .await?
        {
            note(inner, "fleet.registry_alarm", Severity::Critical, serde_json::json!({"message": why, "registry_lease": id, "first": first, "last": last})).await;
            return Err(FleetError::Refused(why));
        }
        note(inner, "fleet.lease_granted", Severity::Info, serde_json::json!({"request": request, "registry_lease": id, "first": first, "last": last})).await;
    }
    let limit = f.push_batch;
    loop {
        let recs = inner.db.call(move |c| fleet::pending(c, limit)).await?;
        if recs.is_empty() {
            return Ok(());
        }
        let report = fleet::push(c, &recs).await?;
        let acked = report.acked;
        inner.db.call(move |c| fleet::ack(c, acked)).await?;
        for (kind, seq, message) in report.alarms {
            tracing::error!(%kind, ?seq, %message, "the registry raised an alarm");
            note(
                inner,
                "fleet.registry_alarm",
                Severity::Critical,
                serde_json::json!({"registry_kind": kind, "outbox_seq": seq, "message": message}),
            )
            .await;
        }
    }
}
