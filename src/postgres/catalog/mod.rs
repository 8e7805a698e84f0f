//! What exists for a cluster: backups (from manifests) and archived WAL, and
//! the recoverable window derived from them. Nothing here is stored; it is
//! rebuilt from listings every time.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use super::manifest::PgManifest;
use super::timeline::{TimelineChoice, TimelineInfo, parse_history};
use super::wal::next_segment;
use super::wal_records::LastCommit;
use super::{Lsn, PgError, WAL_SEGMENT_SIZE};
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

/// Segments missing between two archived ones of a timeline.
#[derive(Debug, Clone, Serialize)]
pub struct WalGap {
    /// Timeline.
    pub timeline: u32,
    /// The first missing segment.
    pub first_missing: String,
    /// How many are missing in a row.
    pub missing: u64,
    /// Archive time of the segment before the gap.
    pub after: Option<DateTime<Utc>>,
    /// Archive time of the segment after the gap.
    pub before: Option<DateTime<Utc>>,
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
    /// Timeline the window ends on (the backup's own, or one branched from
    /// it whose WAL the backup reaches through the switch points).
    pub timeline: u32,
    /// Last contiguous WAL segment.
    pub last_segment: String,
    /// Whether the window ends in a streamed segment that was never
    /// completed (restores replay up to its last streamed byte).
    pub streamed_tail: bool,
    /// What `to` is.
    pub end_basis: WindowEnd,
    /// Where the last commit record starts, when `to` is its time: a time
    /// target stops only before a later commit, so `to` itself is reached
    /// by stopping right after this record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<Lsn>,
}

/// What the end of a window (`to`) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WindowEnd {
    /// The archive time of the last segment: commits were not read (more
    /// segments without a commit than are searched).
    #[serde(rename = "archive time of the last segment")]
    ArchiveTime,
    /// The last commit in the archived WAL: what a time target can reach.
    #[serde(rename = "last commit in the archived WAL")]
    LastCommit,
    /// Nothing committed since the backup ended: its end is the window.
    #[serde(rename = "backup end (nothing committed since)")]
    BackupEnd,
}

/// What a restore replays.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// The backup to restore.
    pub backup: &'a PgManifest,
    /// The timeline recovery follows (`recovery_target_timeline`).
    pub timeline: u32,
    /// For `latest` under `accept_gap`: what was left behind.
    pub gave_up: Option<String>,
    /// The target is the window's end, the last commit: recovery stops
    /// right after that record (`recovery_target_lsn`), since a time target
    /// is only known reached once a later commit is seen.
    pub stop_after_lsn: Option<Lsn>,
    /// The target time lies where nothing committed after the backup ended:
    /// recovery stops at consistency (`recovery_target = 'immediate'`),
    /// since a time target needs a later commit to know it was reached.
    pub stop_at_backup_end: bool,
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
    /// The streamed pieces of each segment, as listed.
    pieces: BTreeMap<WalSegmentName, Vec<crate::store::ObjectInfo>>,
    /// One window per usable backup and timeline it reaches.
    pub windows: Vec<Window>,
    /// Every timeline with archived WAL or a history file.
    pub timelines: BTreeMap<u32, TimelineInfo>,
    /// Backups whose manifests could not be read (id, reason).
    pub unreadable: Vec<(String, String)>,
    /// Unfinished segments whose streamed WAL (pieces or journal) could not
    /// be read, with why: a window ending there ends before them.
    pub damaged_tails: BTreeMap<WalSegmentName, String>,
    /// WAL prefixes (timeline, log) filled from their summaries: only the
    /// boundary segments' keys and times are known, the rest is listed
    /// when needed (see [`Catalog::materialise`]).
    hinted: std::collections::BTreeSet<(u32, u32)>,
    /// A listing contradicted a prefix summary: this catalog is not the
    /// whole catalog's, and its reader loads the whole one instead.
    hint_broken: bool,
    /// `pg/<cluster>/<system-id>/` of the hinted prefixes.
    root: String,
}

mod commits;
mod listing;
pub use listing::Listed;
mod plan;
mod scoped;
pub use scoped::RestorePlan;
#[cfg(test)]
mod tests;

impl Catalog {
    /// Lists and reads everything stored for `cluster`; windows end at the
    /// last commit their WAL holds.
    pub async fn load(repo: &Repository, cluster: &str) -> Result<Catalog, PgError> {
        let mut cat = Catalog::load_backups(repo, cluster).await?;
        cat.end_windows_at_last_commit(repo).await;
        Ok(cat)
    }

    /// Lists and reads everything, but leaves the windows ending at the
    /// archive time of their last segment: for retention, which reads only
    /// backups and WAL names and need not decode a segment per window.
    pub async fn load_backups(repo: &Repository, cluster: &str) -> Result<Catalog, PgError> {
        let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
        let mut cat = Catalog::empty();
        let mut manifests = Vec::new();
        let mut histories = Vec::new();
        for o in &objects {
            match o.key.parse::<ObjectKey>() {
                Ok(ObjectKey::PgManifest { .. }) => manifests.push(o.clone()),
                Ok(ObjectKey::TimelineHistory { timeline, .. }) => {
                    histories.push((timeline.0, o.clone()))
                }
                Ok(ObjectKey::Wal {
                    segment, suffix, ..
                }) => cat.absorb_wal(o, segment, suffix),
                _ => {}
            }
        }
        let read: Vec<(String, Result<PgManifest, PgError>)> = futures::stream::iter(manifests)
            .map(|o| async move {
                let res = read_manifest(repo, &o.key, o.size).await;
                (o.key, res)
            })
            .buffered(8)
            .collect()
            .await;
        for (key, r) in read {
            match r {
                Ok(m) => cat.backups.push(m),
                Err(e) => cat.unreadable.push((key, e.to_string())),
            }
        }
        cat.read_histories(repo, histories).await;
        cat.settle();
        Ok(cat)
    }

    /// A catalog of nothing, to be filled from listings.
    fn empty() -> Catalog {
        Catalog {
            backups: Vec::new(),
            wal: BTreeMap::new(),
            streamed: BTreeMap::new(),
            pieces: BTreeMap::new(),
            windows: Vec::new(),
            timelines: BTreeMap::new(),
            unreadable: Vec::new(),
            damaged_tails: BTreeMap::new(),
            hinted: Default::default(),
            hint_broken: false,
            root: String::new(),
        }
    }

    /// Files one listed WAL object (complete segments and streamed pieces;
    /// `.partial` and `.backup` files play no part in windows).
    fn absorb_wal(
        &mut self,
        o: &crate::store::ObjectInfo,
        segment: WalSegmentName,
        suffix: WalSuffix,
    ) {
        match suffix {
            WalSuffix::None => {
                self.wal.insert(
                    segment,
                    WalEntry {
                        key: o.key.clone(),
                        archived: o.modified,
                    },
                );
            }
            WalSuffix::Stream { start, .. } | WalSuffix::Journal { start } => {
                self.pieces.entry(segment).or_default().push(o.clone());
                if start == 0 {
                    self.streamed.insert(segment, None);
                }
            }
            _ => {}
        }
    }

    /// Reads the timeline history files; one that cannot be read is said,
    /// not hidden, since without it the branch cannot be followed.
    async fn read_histories(
        &mut self,
        repo: &Repository,
        histories: Vec<(u32, crate::store::ObjectInfo)>,
    ) {
        for (tli, o) in histories {
            let expect = Expect {
                key: o.key.clone(),
                stored_size: Some(o.size),
                plain_hash: o.key.rsplit('-').next().map(str::to_string),
                plain_size: None,
                pieces: None,
            };
            let history = match repo.get_verified(&o.key, expect).await {
                Ok((_, text)) => parse_history(&String::from_utf8_lossy(&text))
                    .map_err(|e| format!("{}: not a timeline history file: {e}", o.key)),
                Err(e) => Err(e.to_string()),
            };
            match history {
                Ok(history) => {
                    self.timelines
                        .insert(tli, timeline_info(tli, history, o.modified));
                }
                Err(e) => self.unreadable.push((o.key.clone(), e)),
            }
        }
    }

    /// Derives what follows from the listed objects: streamed segments'
    /// times, per-timeline segment counts, backup order and the windows.
    fn settle(&mut self) {
        for (seg, t) in self.streamed.iter_mut() {
            *t = self
                .pieces
                .get(seg)
                .and_then(|p| p.iter().filter_map(|o| o.modified).max());
        }
        for t in self.timelines.values_mut() {
            (t.first_segment, t.last_segment, t.segments) = (None, None, 0);
        }
        for seg in self.wal.keys() {
            let t = self
                .timelines
                .entry(seg.timeline.0)
                .or_insert_with(|| timeline_info(seg.timeline.0, Vec::new(), None));
            let name = seg.to_string();
            t.first_segment.get_or_insert_with(|| name.clone());
            t.last_segment = Some(name);
            t.segments += 1;
        }
        // Ids have one-second resolution and a random suffix, so two backups
        // taken in the same second would otherwise be ordered by chance.
        self.backups
            .sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
        self.windows = self.compute_windows();
    }

    /// Holes in the archived WAL: per timeline, runs of segments missing
    /// between two archived ones (a restore cannot replay across them). WAL
    /// below the start of every backup is needed by nothing (`expire`
    /// deletes it), so holes down there do not count.
    pub fn wal_gaps(&self) -> Vec<WalGap> {
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let number = |s: &WalSegmentName| u64::from(s.log) * per_log + u64::from(s.seg);
        let floor = self
            .backups
            .iter()
            .filter_map(|b| b.start_segment.parse::<WalSegmentName>().ok())
            .map(|s| number(&s))
            .min();
        let mut out = Vec::new();
        let mut prev: Option<(&WalSegmentName, &WalEntry)> = None;
        for (seg, entry) in self
            .wal
            .iter()
            .filter(|(s, _)| floor.is_none_or(|f| number(s) >= f))
        {
            if let Some((p, pe)) = prev
                && p.timeline == seg.timeline
                && number(seg) > number(p) + 1
            {
                out.push(WalGap {
                    timeline: seg.timeline.0,
                    first_missing: next_segment(*p).to_string(),
                    missing: number(seg) - number(p) - 1,
                    after: pe.archived,
                    before: entry.archived,
                });
            }
            prev = Some((seg, entry));
        }
        out
    }

    fn compute_windows(&self) -> Vec<Window> {
        let runs = self.runs();
        let mut out = Vec::new();
        for b in &self.backups {
            let Ok(start) = b.start_segment.parse::<WalSegmentName>() else {
                continue;
            };
            let Ok(stop) = b.stop_segment.parse::<WalSegmentName>() else {
                continue;
            };
            // Its own timeline first, then every timeline branched from it
            // after the backup ended.
            let mut targets: Vec<u32> = vec![b.timeline];
            targets.extend(
                self.timelines
                    .values()
                    .filter(|t| t.id != b.timeline && t.descends_from(b.timeline))
                    .map(|t| t.id),
            );
            for tli in targets {
                let path = match self.timelines.get(&tli) {
                    Some(t) => t.path(),
                    None => vec![(tli, None)],
                };
                if let Some(w) = self.walk(b, start, stop, &path, &runs) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// Each timeline's runs of contiguous segments, first → last segment
    /// number: a walk jumps a run in one step instead of one lookup per
    /// segment (a thousand backups over 100k segments were 10^8 lookups).
    fn runs(&self) -> Runs {
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let mut runs: Runs = BTreeMap::new();
        let mut open: Option<(u32, u64, u64)> = None;
        for seg in self.wal.keys() {
            let n = u64::from(seg.log) * per_log + u64::from(seg.seg);
            open = match open {
                Some((t, a, b)) if t == seg.timeline.0 && n == b + 1 => Some((t, a, n)),
                other => {
                    if let Some((t, a, b)) = other {
                        runs.entry(t).or_default().insert(a, b);
                    }
                    Some((seg.timeline.0, n, n))
                }
            };
        }
        if let Some((t, a, b)) = open {
            runs.entry(t).or_default().insert(a, b);
        }
        runs
    }

    /// Follows `path` (timelines with the LSN where each is left) from the
    /// backup's first segment through contiguous archived WAL: the window on
    /// the last timeline of the path, if the walk gets there.
    fn walk(
        &self,
        b: &PgManifest,
        start: WalSegmentName,
        stop: WalSegmentName,
        path: &[(u32, Option<Lsn>)],
        runs: &Runs,
    ) -> Option<Window> {
        let from = path.iter().position(|(t, _)| *t == b.timeline)?;
        // The backup must end before its timeline is left on this path.
        if let Some(switch) = path[from].1
            && b.stop_lsn > switch
        {
            return None;
        }
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let segno = |s: &WalSegmentName| u64::from(s.log) * per_log + u64::from(s.seg);
        let name = |tli: u32, n: u64| WalSegmentName {
            timeline: crate::repo::layout::TimelineId(tli),
            log: (n / per_log) as u32,
            seg: (n % per_log) as u32,
        };
        let mut n = segno(&start);
        let mut last: Option<(WalSegmentName, &WalEntry)> = None;
        let (target, _) = *path.last()?;
        for (tli, leave) in &path[from..] {
            // On an ancestor, the segment holding the switch point is read
            // from the child timeline (PostgreSQL copies it there).
            let end = leave.map(|l| l.0 / WAL_SEGMENT_SIZE).unwrap_or(u64::MAX);
            // The run holding segment n, if archived: walk to its end.
            let run = runs
                .get(tli)
                .and_then(|r| r.range(..=n).next_back())
                .filter(|(_, e)| **e >= n);
            if let Some((_, &run_end)) = run
                && n < end
            {
                let to = run_end.min(end - 1);
                if let Some(e) = self.wal.get(&name(*tli, to)) {
                    last = Some((name(*tli, to), e));
                }
                n = to + 1;
            }
            if n < end && leave.is_some() {
                return None; // a gap before the switch: this branch is out of reach
            }
        }
        let (last_seg, last_entry) = last?;
        // A branch may so far exist only as streamed pieces of its first segment.
        let cur = name(target, n);
        let tail = self.streamed.get(&cur);
        let reached = last_seg.timeline.0 == target || tail.is_some();
        if !reached || segno(&last_seg) < segno(&stop) {
            return None; // never reached the branch, or a gap before consistency
        }
        let mut to = last_entry.archived.unwrap_or(b.stop_time).max(b.stop_time);
        let mut last_segment = last_seg.to_string();
        if let Some(t) = tail {
            to = to.max(t.unwrap_or(to));
            last_segment = cur.to_string();
        }
        Some(Window {
            from: b.stop_time,
            to,
            backup: b.id.clone(),
            timeline: target,
            last_segment,
            streamed_tail: tail.is_some(),
            end_basis: WindowEnd::ArchiveTime,
            end_lsn: None,
        })
    }
}

/// Per timeline, runs of contiguous segment numbers (first → last).
type Runs = BTreeMap<u32, BTreeMap<u64, u64>>;

fn timeline_info(
    id: u32,
    history: Vec<super::timeline::HistoryEntry>,
    switch_time: Option<DateTime<Utc>>,
) -> TimelineInfo {
    TimelineInfo {
        id,
        history,
        switch_time,
        first_segment: None,
        last_segment: None,
        segments: 0,
    }
}

/// Reads and decodes one manifest.
pub async fn read_manifest(
    repo: &Repository,
    key: &str,
    stored: u64,
) -> Result<PgManifest, PgError> {
    read_manifest_sized(repo, key, Some(stored)).await
}

/// Reads and decodes one manifest whose stored size may not be known (it
/// was not listed); the plaintext is still checked as any manifest is.
async fn read_manifest_sized(
    repo: &Repository,
    key: &str,
    stored: Option<u64>,
) -> Result<PgManifest, PgError> {
    if !repo.codec.can_decrypt() {
        return Err(PgError::Other(format!(
            "manifests are encrypted and the catalog needs the private key: {}",
            repo.codec.cannot_decrypt_because()
        )));
    }
    let expect = Expect {
        key: key.to_string(),
        stored_size: stored,
        ..Expect::default()
    };
    let (_, bytes) = repo.get_verified(key, expect).await?;
    let m: PgManifest = serde_json::from_slice(&bytes)
        .map_err(|e| PgError::Other(format!("{key}: not a dr PostgreSQL manifest ({e})")))?;
    if m.kind != "dr-pg-backup" || !(1..=super::manifest::MANIFEST_VERSION).contains(&m.version) {
        return Err(PgError::Other(format!(
            "{key}: manifest kind {:?} version {} is not supported by this dr",
            m.kind, m.version
        )));
    }
    Ok(m)
}
