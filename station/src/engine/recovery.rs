//! Start-up recovery: a meter found in flight was interrupted (the station stopped or crashed
//! while it was in a nest). It is failed with reason "interrupted", its certificates are voided
//! and its wrapped keys deleted, in one transaction with the audit entry that records it. No
//! meter is ever left half-done. The same happens, before the line starts again, to a meter
//! whose failure could not be journalled at the time (the journal or the HSM was failing).

use std::sync::Arc;

use crate::audit::{NewEvent, Severity};
use crate::db::now_ms;
use crate::records;

use super::{Inner, Result};

/// Fails every meter in flight; returns how many.
pub(super) async fn recover(inner: &Arc<Inner>) -> Result<usize> {
    fail_in_flight(inner, None).await
}

/// Fails the meters whose failure could not be journalled when it happened (the journal or the
/// HSM was failing), before the line starts again. Returns how many.
pub(super) async fn fail_orphans(inner: &Arc<Inner>) -> Result<usize> {
    let ids = inner.take_orphans();
    if ids.is_empty() {
        return Ok(0);
    }
    match fail_in_flight(inner, Some(ids.clone())).await {
        Ok(n) => Ok(n),
        Err(e) => {
            for id in ids {
                inner.add_orphan(id);
            }
            Err(e)
        }
    }
}

/// Fails the meters in flight (only those of `only` when given) in one transaction.
async fn fail_in_flight(inner: &Arc<Inner>, only: Option<Vec<i64>>) -> Result<usize> {
    let audit = inner.audit.clone();
    let source = inner.source.clone();
    inner
        .db
        .call(move |c| -> Result<usize> {
            let mut in_flight = records::meters_in_flight(c)?;
            if let Some(ids) = &only {
                in_flight.retain(|m| ids.contains(&m.id));
            }
            if in_flight.is_empty() {
                return Ok(0);
            }
            let tx = c.transaction()?;
            let now = now_ms();
            let mut voided = 0;
            let mut keys = 0;
            let mut meters = Vec::new();
            let mut may_have_sealed = 0;
            for m in &in_flight {
                // SEAL was sent (or the seal recorded): the meter may hold its keys sealed, and
                // only a rework brings it back; without, it never sealed.
                let seal_sent: Option<i64> = tx.query_row(
                    "SELECT seal_sent_at FROM meters WHERE id = ?1",
                    [m.id],
                    |r| r.get(0),
                )?;
                let sealed = seal_sent.is_some() || m.state == "sealed";
                let reason = if sealed {
                    may_have_sealed += 1;
                    "interrupted after SEAL was sent: the meter may be sealed; take it out for rework"
                } else {
                    "interrupted"
                };
                let (v, k) = records::fail_meter(&tx, m.id, reason, None, now)?;
                voided += v;
                keys += k;
                meters.push(serde_json::json!({"uid": m.uid, "serial": m.serial, "nest": m.nest, "step": m.state, "may_have_sealed": sealed}));
            }
            audit.append(
                &tx,
                &NewEvent::new(
                    &source,
                    "station.recovery",
                    Severity::Warning,
                    "system",
                    serde_json::json!({
                        "message": if only.is_some() {
                            format!("{} meter(s) whose failure could not be journalled were failed as interrupted", in_flight.len())
                        } else {
                            format!("{} meter(s) found in flight at start-up were failed as interrupted", in_flight.len())
                        },
                        "meters": meters,
                        "may_have_sealed": may_have_sealed,
                        "certificates_voided": voided,
                        "wrapped_keys_deleted": keys,
                    }),
                ),
            )?;
            tx.commit()?;
            Ok(in_flight.len())
        })
        .await
}
