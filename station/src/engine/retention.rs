//! Retention: a closed batch's wrapped meter keys are obsolete once the utility has had them for
//! `retention.wrapped_keys_days` after the batch's newest export, and are then deleted.
//!
//! - **From the journal**, in one transaction per batch: the rows are deleted with
//!   `secure_delete` (their pages overwritten), the batch records the time, and a `keys.purged`
//!   entry says how many keys went and which export directories held them. The write-ahead log
//!   is then checkpointed and truncated, so that no older page image of a key survives in it
//!   (and again at every later sweep, in case a reader kept it from being emptied).
//! - **From the export directories**: the files that carry the keys (`manifest.json`,
//!   `manifest.p7m`, the PSKC container) are overwritten with zeros, synced, then removed. The
//!   CRL and the evidence report stay. Symbolic links are removed, never followed. Every sweep
//!   does this again for every batch already purged, so a crash between the journal and the
//!   files only delays it.
//!
//! The sweep runs when the engine starts and every hour after. The batch transport key the
//! wrapped keys are under left the HSM when the batch closed; only the utility can open them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::params;

use super::{Error, Inner, Result};
use crate::audit::{NewEvent, Severity};
use crate::db::{now_ms, rfc3339};

/// The files of an export that carry wrapped keys.
pub(crate) const KEY_FILES: [&str; 3] =
    ["manifest.json", "manifest.p7m", crate::manifest::pskc::FILE];

/// How often the daemon sweeps.
const EVERY: Duration = Duration::from_secs(3600);

/// One day, ms.
const DAY_MS: i64 = 86_400_000;

/// One batch whose keys a sweep deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Purged {
    /// The batch's work order.
    pub work_order: String,
    /// Wrapped keys deleted from the journal.
    pub keys: usize,
}

/// Why a purged batch's export cannot be had any more, if it was purged.
pub(crate) fn purged_reason(c: &rusqlite::Connection, batch: i64) -> Result<Option<String>> {
    use rusqlite::OptionalExtension as _;
    let row: Option<(String, Option<i64>)> = c
        .query_row(
            "SELECT work_order, keys_purged_at FROM batches WHERE id = ?1",
            [batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        Some((wo, Some(at))) => Some(format!(
            "the wrapped keys of batch {wo} were deleted at {} once its retention period had passed; the utility has its export, and the station holds it no more",
            rfc3339(at)
        )),
        _ => None,
    })
}

/// The daemon's task: a sweep every hour until the engine stops.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut stop = inner.stop_rx();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        if let Err(e) = sweep(&inner).await {
            tracing::warn!(error = %e, "the retention sweep failed; it runs again within the hour");
        }
    }
}

/// Deletes the wrapped keys of every closed batch whose newest export is older than the
/// retention period, then the key files of every purged batch's exports.
pub(crate) async fn sweep(inner: &Arc<Inner>) -> Result<Vec<Purged>> {
    let days = inner.cfg.retention.wrapped_keys_days;
    let cutoff = now_ms() - i64::from(days) * DAY_MS;
    let due: Vec<(i64, String, i64)> = inner
        .db
        .call(move |c| -> Result<_> {
            let mut st = c.prepare(
                "SELECT b.id, b.work_order, MAX(e.created_at) FROM batches b JOIN exports e ON e.batch_id = b.id
                  WHERE b.state = 'closed' AND b.keys_purged_at IS NULL
                  GROUP BY b.id HAVING MAX(e.created_at) < ?1 ORDER BY b.id",
            )?;
            let rows = st.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await?;
    let mut purged = Vec::new();
    for (batch, work_order, last_export) in due {
        let (audit, src) = (inner.audit.clone(), inner.source.clone());
        let wo = work_order.clone();
        let keys = inner
            .db
            .call(move |c| -> Result<usize> {
                let tx = c.transaction()?;
                let dirs: Vec<String> = {
                    let mut st = tx.prepare(
                        "SELECT DISTINCT out_dir FROM exports WHERE batch_id = ?1 ORDER BY out_dir",
                    )?;
                    let rows = st.query_map([batch], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                let now = now_ms();
                let marked = tx.execute(
                    "UPDATE batches SET keys_purged_at = ?1 WHERE id = ?2 AND keys_purged_at IS NULL",
                    params![now, batch],
                )?;
                if marked != 1 {
                    return Err(Error::Conflict(format!(
                        "batch {wo} was purged meanwhile"
                    )));
                }
                let keys = tx.execute(
                    "DELETE FROM wrapped_keys WHERE meter_id IN (SELECT id FROM meters WHERE batch_id = ?1)",
                    [batch],
                )?;
                audit.append(
                    &tx,
                    &NewEvent::new(
                        &src,
                        "keys.purged",
                        Severity::Notice,
                        "system",
                        serde_json::json!({
                            "message": format!("the {keys} wrapped meter keys of batch {wo} were deleted, {days} days after its last export"),
                            "batch": batch,
                            "work_order": wo,
                            "keys": keys,
                            "last_export": rfc3339(last_export),
                            "retention_days": days,
                            "export_dirs": dirs,
                            "files": KEY_FILES,
                        }),
                    ),
                )?;
                tx.commit()?;
                Ok(keys)
            })
            .await?;
        tracing::info!(batch = %work_order, keys, "wrapped keys deleted after the retention period");
        purged.push(Purged { work_order, keys });
    }
    // Once any batch is purged, every sweep empties the log: one that a reader kept from being
    // emptied right after a purge is emptied by a later sweep.
    let any_purged = !purged.is_empty()
        || inner
            .db
            .call(|c| -> Result<bool> {
                Ok(c.query_row(
                    "SELECT EXISTS (SELECT 1 FROM batches WHERE keys_purged_at IS NOT NULL)",
                    [],
                    |r| r.get(0),
                )?)
            })
            .await?;
    let emptied = if any_purged {
        empty_wal(inner).await
    } else {
        Ok(())
    };
    remove_key_files(inner).await?;
    emptied?;
    Ok(purged)
}

/// Copies the write-ahead log into the database (whose pages `secure_delete` zeroed) and empties
/// it: older page images of deleted rows may still be in it. A reader holding the log (an
/// export's report) is waited for by the journal's busy timeout, three times over.
async fn empty_wal(inner: &Arc<Inner>) -> Result<()> {
    for _ in 0..3 {
        let busy = inner
            .db
            .call(|c| -> Result<i64> {
                Ok(c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?)
            })
            .await?;
        if busy == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(Error::Conflict(
        "the journal's write-ahead log could not be emptied: a reader kept holding it".into(),
    ))
}

/// Removes the key files of every purged batch's exports, and audits what could not be removed.
async fn remove_key_files(inner: &Arc<Inner>) -> Result<()> {
    let dirs: Vec<(String, String)> = inner
        .db
        .call(|c| -> Result<_> {
            let mut st = c.prepare(
                "SELECT DISTINCT e.out_dir, b.work_order FROM exports e JOIN batches b ON b.id = e.batch_id
                  WHERE b.keys_purged_at IS NOT NULL ORDER BY e.out_dir",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await?;
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for (dir, wo) in dirs {
            for name in KEY_FILES {
                let path = Path::new(&dir).join(name);
                if let Err(e) = shred(&path) {
                    failures.push((wo.clone(), path, e));
                }
            }
        }
        failures
    })
    .await
    .map_err(|e| Error::Invalid(format!("the retention sweep's file task failed: {e}")))?;
    for (wo, path, e) in failures {
        inner
            .record(NewEvent::new(
                &inner.source,
                "keys.purge_incomplete",
                Severity::Warning,
                "system",
                serde_json::json!({
                    "message": format!("{} of batch {wo} carries wrapped keys past their retention and could not be removed: {e}; the next sweep tries again", path.display()),
                    "work_order": wo,
                    "path": path.display().to_string(),
                }),
            ))
            .await?;
    }
    Ok(())
}

/// Overwrites a regular file with zeros, syncs it and removes it; removes anything else that is
/// not a directory without following it. A missing file is fine.
fn shred(path: &PathBuf) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_file() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let zeros = [0u8; 64 * 1024];
        let mut left = meta.len();
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    } else if meta.is_dir() {
        return Err(std::io::Error::other(
            "a directory stands where a file was written",
        ));
    }
    std::fs::remove_file(path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    #[test]
    fn a_key_file_is_zeroed_then_removed_and_a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.pskc");
        std::fs::write(&file, vec![0x5a; 200_000]).unwrap();
        // Another name for the same inode sees what the shredding wrote before the unlink.
        let witness = dir.path().join("witness");
        std::fs::hard_link(&file, &witness).unwrap();
        shred(&file).unwrap();
        assert!(!file.exists());
        let left = std::fs::read(&witness).unwrap();
        assert_eq!(left.len(), 200_000);
        assert!(left.iter().all(|b| *b == 0), "the content was overwritten");

        // Someone with the export directory's rights plants a link to a file of the station's:
        // the link goes, its target is untouched.
        let victim = dir.path().join("journal.db");
        std::fs::write(&victim, b"precious").unwrap();
        let link = dir.path().join("manifest.json");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        shred(&link).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        // Nothing there is nothing to do; a directory in a file's place is an error.
        shred(&dir.path().join("manifest.p7m")).unwrap();
        let d = dir.path().join("manifest.p7m");
        std::fs::create_dir(&d).unwrap();
        assert!(shred(&d).is_err());
    }
}
