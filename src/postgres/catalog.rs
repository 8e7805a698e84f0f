//! What exists for a cluster: backups (from manifests) and archived WAL, and
//! the recoverable window derived from them. Nothing here is stored; it is
//! rebuilt from listings every time.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use super::PgError;
use super::manifest::PgManifest;
use super::wal::next_segment;
use crate::codec::Expect;
use crate::repo::Repository;
use crate::repo::layout::{ObjectKey, WalSegmentName, WalSuffix};

/// One archived WAL segment.
#[derive(Debug, Clone)]
pub struct WalEntry {
    /// Object key.
    pub key: String,
    /// When it was archived (upper bound of the commit times it holds).
    pub archived: Option<DateTime<Utc>>,
}

/// A span of time that can be restored to.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Earliest restorable time (the backup's end).
    pub from: DateTime<Utc>,
    /// Latest restorable time (archive time of the last contiguous segment).
    pub to: DateTime<Utc>,
    /// Backup that starts it.
    pub backup: String,
    /// Timeline.
    pub timeline: u32,
    /// Last contiguous WAL segment.
    pub last_segment: String,
    /// Whether the window ends in a streamed segment that was never
    /// completed (restores replay up to its last streamed byte).
    pub streamed_tail: bool,
}

/// Backups and WAL of one cluster.
pub struct Catalog {
    /// Backups, oldest first.
    pub backups: Vec<PgManifest>,
    /// Complete segments.
    pub wal: BTreeMap<WalSegmentName, WalEntry>,
    /// Segments with streamed pieces from offset 0: when the newest piece
    /// was written.
    pub streamed: BTreeMap<WalSegmentName, Option<DateTime<Utc>>>,
    /// One window per usable backup.
    pub windows: Vec<Window>,
    /// Backups whose manifests could not be read (id, reason).
    pub unreadable: Vec<(String, String)>,
}

impl Catalog {
    /// Lists and reads everything stored for `cluster`.
    pub async fn load(repo: &Repository, cluster: &str) -> Result<Catalog, PgError> {
        let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
        let mut manifests = Vec::new();
        let mut wal = BTreeMap::new();
        let mut streamed: BTreeMap<WalSegmentName, Option<DateTime<Utc>>> = BTreeMap::new();
        let mut piece_times: BTreeMap<WalSegmentName, Option<DateTime<Utc>>> = BTreeMap::new();
        for o in &objects {
            match o.key.parse::<ObjectKey>() {
                Ok(ObjectKey::PgManifest { .. }) => manifests.push(o.clone()),
                Ok(ObjectKey::Wal {
                    segment,
                    suffix: WalSuffix::None,
                    ..
                }) => {
                    wal.insert(
                        segment,
                        WalEntry {
                            key: o.key.clone(),
                            archived: o.modified,
                        },
                    );
                }
                Ok(ObjectKey::Wal {
                    segment,
                    suffix: WalSuffix::Stream { start, .. },
                    ..
                }) => {
                    let t = piece_times.entry(segment).or_default();
                    *t = (*t).max(o.modified);
                    if start == 0 {
                        streamed.insert(segment, None);
                    }
                }
                _ => {}
            }
        }
        for (seg, t) in streamed.iter_mut() {
            *t = piece_times.get(seg).copied().flatten();
        }
        let read: Vec<(String, Result<PgManifest, PgError>)> = futures::stream::iter(manifests)
            .map(|o| async move {
                let res = read_manifest(repo, &o.key, o.size).await;
                (o.key, res)
            })
            .buffered(8)
            .collect()
            .await;
        let mut backups = Vec::new();
        let mut unreadable = Vec::new();
        for (key, r) in read {
            match r {
                Ok(m) => backups.push(m),
                Err(e) => unreadable.push((key, e.to_string())),
            }
        }
        // Ids have one-second resolution and a random suffix, so two backups
        // taken in the same second would otherwise be ordered by chance.
        backups.sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
        let mut cat = Catalog {
            backups,
            wal,
            streamed,
            windows: Vec::new(),
            unreadable,
        };
        cat.windows = cat.compute_windows();
        Ok(cat)
    }

    fn compute_windows(&self) -> Vec<Window> {
        let mut out = Vec::new();
        for b in &self.backups {
            let Ok(start) = b.start_segment.parse::<WalSegmentName>() else {
                continue;
            };
            let Ok(stop) = b.stop_segment.parse::<WalSegmentName>() else {
                continue;
            };
            // Walk contiguous segments from the backup's start.
            let mut cur = start;
            let mut last = None;
            while let Some(e) = self.wal.get(&cur) {
                last = Some((cur, e));
                cur = next_segment(cur);
            }
            let Some((last_seg, last_entry)) = last else {
                continue;
            };
            if last_seg < stop {
                continue; // a gap before consistency: this backup cannot be restored
            }
            let mut to = last_entry.archived.unwrap_or(b.stop_time).max(b.stop_time);
            let mut last_segment = last_seg.to_string();
            let tail = self.streamed.get(&cur);
            if let Some(t) = tail {
                to = to.max(t.unwrap_or(to));
                last_segment = cur.to_string();
            }
            out.push(Window {
                from: b.stop_time,
                to,
                backup: b.id.clone(),
                timeline: b.timeline,
                last_segment,
                streamed_tail: tail.is_some(),
            });
        }
        out
    }

    /// The backup to restore for `target` (None = latest): the newest one that
    /// ended before the target and whose WAL reaches it.
    pub fn pick(&self, target: Option<DateTime<Utc>>) -> Result<&PgManifest, PgError> {
        let chosen = self
            .windows
            .iter()
            .rev()
            .find(|w| target.is_none_or(|t| w.from <= t && t <= w.to));
        match chosen {
            Some(w) => self
                .backups
                .iter()
                .find(|b| b.id == w.backup)
                .ok_or_else(|| PgError::Other("catalog inconsistency".into())),
            None => Err(PgError::Other(self.outside_message(target))),
        }
    }

    fn outside_message(&self, target: Option<DateTime<Utc>>) -> String {
        if self.windows.is_empty() {
            return format!(
                "no restorable backup: {} backup(s), none with the WAL it needs archived{}; \
                 take one with `dr backup pg` and check archive_command",
                self.backups.len(),
                if self.unreadable.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} manifest(s) unreadable: {})",
                        self.unreadable.len(),
                        self.unreadable[0].1
                    )
                }
            );
        }
        let Some(t) = target else {
            return "no restorable backup".into();
        };
        let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let windows = self
            .windows
            .iter()
            .map(|w| format!("{} .. {}", fmt(&w.from), fmt(&w.to)))
            .collect::<Vec<_>>()
            .join(", ");
        let first = self.windows.iter().map(|w| w.from).min().unwrap_or(t);
        let last = self.windows.iter().map(|w| w.to).max().unwrap_or(t);
        let why = if t < first {
            format!(
                "is before the end of the oldest usable backup ({})",
                fmt(&first)
            )
        } else if t > last {
            // Segments archived beyond the window mean one in between is gone.
            let newest_window = self.windows.iter().max_by_key(|w| w.to);
            let beyond = newest_window.and_then(|w| {
                let end = w.last_segment.parse::<WalSegmentName>().ok()?;
                let later = self
                    .wal
                    .range(next_segment(end)..)
                    .find(|(l, _)| l.timeline == end.timeline)?;
                Some((next_segment(end), later))
            });
            match beyond {
                Some((missing, (later, e))) => format!(
                    "is beyond a gap in the archived WAL: segment {missing} is missing in every region,                      so replay stops at {} although {later} was archived{}",
                    fmt(&last),
                    e.archived
                        .map(|a| format!(" ({})", fmt(&a)))
                        .unwrap_or_default()
                ),
                None => format!("is after the last archived WAL ({})", fmt(&last)),
            }
        } else {
            "falls in a gap in the archived WAL".into()
        };
        format!(
            "target {} {why}; the recoverable window is: {windows}",
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        )
    }
}

/// Reads and decodes one manifest.
pub async fn read_manifest(
    repo: &Repository,
    key: &str,
    stored: u64,
) -> Result<PgManifest, PgError> {
    if !repo.codec.can_decrypt() {
        return Err(PgError::Other(
            "manifests are encrypted and no identity_file is configured; the catalog needs the private key".into(),
        ));
    }
    let expect = Expect {
        key: key.to_string(),
        stored_size: Some(stored),
        ..Expect::default()
    };
    let (_, bytes) = repo.get_verified(key, expect).await?;
    let m: PgManifest = serde_json::from_slice(&bytes)
        .map_err(|e| PgError::Other(format!("{key}: not a dr PostgreSQL manifest ({e})")))?;
    if m.kind != "dr-pg-backup" || m.version != super::manifest::MANIFEST_VERSION {
        return Err(PgError::Other(format!(
            "{key}: manifest kind {:?} version {} is not supported by this dr",
            m.kind, m.version
        )));
    }
    Ok(m)
}
