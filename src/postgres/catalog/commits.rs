//! Where each window really ends: the last commit recorded in the archived
//! (or streamed) WAL, read from the WAL records themselves.

use super::*;

impl Catalog {
    /// Ends each window at the last commit its WAL holds. Recovery to a time
    /// stops at the first commit after it and fails when there is none, so a
    /// window ending at the archive time of its last segment promised times
    /// no restore can reach. Segments are read newest first (a few, usually
    /// one) and each at most once; a window ending in streamed pieces of an
    /// unfinished segment reads them assembled, as `wal-fetch` serves them.
    pub(super) async fn end_windows_at_last_commit(&mut self, repo: &Repository) {
        const MAX_SEGMENTS_BACK: usize = 64;
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let segno = |s: &WalSegmentName| u64::from(s.log) * per_log + u64::from(s.seg);
        let mut seen: BTreeMap<WalSegmentName, Option<LastCommit>> = BTreeMap::new();
        for i in 0..self.windows.len() {
            let w = &self.windows[i];
            let Some(b) = self.backups.iter().find(|b| b.id == w.backup) else {
                continue;
            };
            let Ok(mut seg) = w.last_segment.parse::<WalSegmentName>() else {
                continue;
            };
            let stop = b
                .stop_segment
                .parse::<WalSegmentName>()
                .map(|s| segno(&s))
                .unwrap_or(0);
            let from = w.from;
            let mut found = None;
            let mut searched = 0;
            if w.streamed_tail {
                // The newest commits are in the pieces of the unfinished segment.
                match self.tail_last_commit(repo, seg, segno(&seg)).await {
                    Ok(t) => found = t,
                    // Said, not hidden: `--to latest` refuses to stop short
                    // of it (see `shortfall`).
                    Err(e) => {
                        self.damaged_tails.insert(seg, e);
                    }
                }
                searched += 1;
            }
            while found.is_none() {
                if self.wal.get(&seg).is_some_and(|e| e.key.is_empty()) {
                    // Inside a summarised prefix: its keys come from a listing.
                    self.materialise(repo, seg.timeline.0, seg.log).await;
                }
                if let Some(e) = self.wal.get(&seg) {
                    let t = match seen.get(&seg) {
                        Some(t) => *t,
                        None => {
                            let t = segment_last_commit(repo, &e.key, segno(&seg)).await;
                            seen.insert(seg, t);
                            t
                        }
                    };
                    if t.is_some() {
                        found = t;
                        break;
                    }
                    searched += 1;
                }
                if segno(&seg) <= stop || searched >= MAX_SEGMENTS_BACK {
                    break;
                }
                let prev = crate::postgres::wal::walfile_name(
                    seg.timeline.0,
                    Lsn(segno(&seg) * WAL_SEGMENT_SIZE),
                );
                // Behind the first segment of a branch lies its parent's WAL.
                seg = if self.wal.contains_key(&prev) {
                    prev
                } else {
                    match self
                        .wal
                        .range(..seg)
                        .rev()
                        .find(|(s, _)| segno(s) == segno(&prev))
                    {
                        Some((s, _)) => *s,
                        None => break,
                    }
                };
            }
            let w = &mut self.windows[i];
            match found {
                Some(c) if c.time > from => {
                    w.to = c.time;
                    w.end_basis = WindowEnd::LastCommit;
                    w.end_lsn = Some(c.lsn);
                }
                Some(_) => {
                    w.to = from;
                    w.end_basis = WindowEnd::BackupEnd;
                }
                None if searched < MAX_SEGMENTS_BACK => {
                    w.to = from;
                    w.end_basis = WindowEnd::BackupEnd;
                }
                None => {}
            }
        }
    }

    /// The last commit in the streamed pieces of `seg`, assembled as
    /// `wal-fetch` serves them; an error when they cannot be read.
    pub(super) async fn tail_last_commit(
        &self,
        repo: &Repository,
        seg: WalSegmentName,
        n: u64,
    ) -> Result<Option<LastCommit>, String> {
        let Some(key) = self
            .pieces
            .get(&seg)
            .and_then(|l| l.first())
            .map(|o| &o.key)
        else {
            return Ok(None);
        };
        let listed = &self.pieces[&seg];
        // `…/<segment>`: the 24-digit name after the last slash.
        let Some(prefix) = key.rfind('/').and_then(|i| key.get(..i + 1 + 24)) else {
            return Ok(None);
        };
        match crate::postgres::pieces::streamed_segment(repo, prefix, listed).await {
            Ok(Some((data, _))) => Ok(tokio::task::spawn_blocking(move || {
                crate::postgres::wal_records::last_commit(&data, n)
            })
            .await
            .ok()
            .flatten()),
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(segment = %seg, error = %e, "cannot read the streamed WAL of an unfinished segment");
                Err(e.to_string())
            }
        }
    }
}

/// The last commit time in one archived segment; `None` when it holds none
/// or cannot be read (the window then ends earlier, never later).
pub(super) async fn segment_last_commit(
    repo: &Repository,
    key: &str,
    segno: u64,
) -> Option<LastCommit> {
    let expect = Expect {
        key: key.to_string(),
        plain_hash: key.rsplit('-').next().map(str::to_string),
        plain_size: Some(WAL_SEGMENT_SIZE),
        ..Expect::default()
    };
    match repo.get_verified(key, expect).await {
        Ok((_, data)) => tokio::task::spawn_blocking(move || {
            crate::postgres::wal_records::last_commit(&data, segno)
        })
        .await
        .ok()
        .flatten(),
        Err(e) => {
            tracing::warn!(key, error = %e, "cannot read a WAL segment for its commit times");
            None
        }
    }
}
