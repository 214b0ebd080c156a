//! Start-up recovery: a meter found in flight was interrupted (the station stopped or crashed
//! while it was in a nest). It is failed with reason "interrupted", its certificates are voided
//! and its wrapped keys deleted, in one transaction with the audit entry that records it. No
//! meter is ever left half-done.

use std::sync::Arc;

use crate::audit::{NewEvent, Severity};
use crate::db::now_ms;
use crate::records;

use super::{Inner, Result};

/// Fails every meter in flight; returns how many.
pub(super) async fn recover(inner: &Arc<Inner>) -> Result<usize> {
    let audit = inner.audit.clone();
    let source = inner.source.clone();
    inner
        .db
        .call(move |c| -> Result<usize> {
            let in_flight = records::meters_in_flight(c)?;
            if in_flight.is_empty() {
                return Ok(0);
            }
            let tx = c.transaction()?;
            let now = now_ms();
            let mut voided = 0;
            let mut keys = 0;
            let mut meters = Vec::new();
            for m in &in_flight {
                let (v, k) = records::fail_meter(&tx, m.id, "interrupted", now)?;
                voided += v;
                keys += k;
                meters.push(serde_json::json!({"uid": m.uid, "serial": m.serial, "nest": m.nest, "step": m.state}));
            }
            audit.append(
                &tx,
                &NewEvent::new(
                    &source,
                    "station.recovery",
                    Severity::Warning,
                    "system",
                    serde_json::json!({
                        "message": format!("{} meter(s) found in flight at start-up were failed as interrupted", in_flight.len()),
                        "meters": meters,
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
