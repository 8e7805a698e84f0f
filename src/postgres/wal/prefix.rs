//! Summaries of complete WAL prefixes (see
//! [`crate::repo::layout::WalPrefixSummary`]): written by the archiver once
//! the last segment of a 4 GiB prefix is stored, checked against one listing
//! of the prefix; deleted before any segment of the prefix is (by `expire`,
//! and by `wal-push --replace-invalid`, which changes a segment's key).

use bytes::Bytes;

use super::super::PgError;
use crate::repo::Repository;
use crate::repo::layout::{MAX_SEG, ObjectKey, TimelineId, WalPrefixSummary, WalSuffix};

/// What one listing of a prefix says: its summary, if all 256 segments are
/// there once each as complete segments with archive times.
pub fn complete_prefix(objects: &[crate::store::ObjectInfo]) -> Option<(u32, WalPrefixSummary)> {
    let mut seen = vec![None; MAX_SEG as usize + 1];
    let mut at = None;
    for o in objects {
        let Ok(ObjectKey::Wal {
            segment,
            suffix: WalSuffix::None,
            hash,
            ..
        }) = o.key.parse::<ObjectKey>()
        else {
            continue;
        };
        if at.is_some_and(|a| a != (segment.timeline.0, segment.log)) {
            return None; // not one prefix
        }
        at = Some((segment.timeline.0, segment.log));
        let slot = seen.get_mut(segment.seg as usize)?;
        if slot.is_some() {
            return None; // two copies of a segment: let a listing decide
        }
        *slot = Some((hash, o.modified?));
    }
    let (tli, log) = at?;
    let (first_hash, first_time) = seen.first()?.clone()?;
    let (last_hash, last_time) = seen.last()?.clone()?;
    if seen.iter().any(Option::is_none) {
        return None;
    }
    Some((
        tli,
        WalPrefixSummary {
            log,
            first_hash,
            last_hash,
            first_time,
            last_time,
        },
    ))
}

/// Writes the summary of prefix `log` of `timeline` if one listing shows it
/// complete; the key written, or `None` when it is not complete. Call it
/// after storing a segment numbered `MAX_SEG` (`wal-push` does; a streamer
/// storing complete segments should too): one listing per 256 segments.
pub async fn summarise_prefix(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    timeline: u32,
    log: u32,
) -> Result<Option<String>, PgError> {
    let prefix = format!(
        "pg/{cluster}/{system_id}/wal/{}/{log:08X}/",
        TimelineId(timeline)
    );
    let (_, objects) = repo.regions.list(&prefix).await?;
    let Some((tli, summary)) = complete_prefix(&objects) else {
        return Ok(None);
    };
    if (tli, summary.log) != (timeline, log) {
        return Ok(None);
    }
    let key = ObjectKey::WalPrefixSummary {
        cluster: cluster.to_string(),
        system_id,
        timeline: TimelineId(timeline),
        summary,
    }
    .to_string();
    repo.regions.put_bytes(&key, Bytes::new()).await?;
    Ok(Some(key))
}

/// Deletes every summary of prefix `log` of `timeline`, in every region,
/// before a segment in it is replaced: a summary names its boundary
/// segments' keys, and must never vouch for a segment that is gone.
pub async fn forget_prefix(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    timeline: u32,
    log: u32,
) -> Result<(), PgError> {
    let dir = format!("pg/{cluster}/{system_id}/wal/{}/", TimelineId(timeline));
    let failed = |e: crate::store::StoreError| {
        PgError::Other(format!(
            "cannot remove the summary of WAL prefix {log:08X} of timeline {timeline} \
             before replacing a segment in it: {e}; retry when the region answers"
        ))
    };
    for r in repo.regions.iter() {
        let listing = r.store.list_dirs(&dir).await.map_err(failed)?;
        for o in &listing.objects {
            if let Ok(ObjectKey::WalPrefixSummary { summary, .. }) = o.key.parse::<ObjectKey>()
                && summary.log == log
            {
                r.store.delete(&o.key).await.map_err(failed)?;
            }
        }
    }
    Ok(())
}
