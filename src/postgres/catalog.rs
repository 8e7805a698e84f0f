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
}

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
        let mut manifests = Vec::new();
        let mut wal = BTreeMap::new();
        let mut streamed: BTreeMap<WalSegmentName, Option<DateTime<Utc>>> = BTreeMap::new();
        let mut piece_times: BTreeMap<WalSegmentName, Option<DateTime<Utc>>> = BTreeMap::new();
        let mut histories = Vec::new();
        let mut pieces: BTreeMap<WalSegmentName, Vec<crate::store::ObjectInfo>> = BTreeMap::new();
        for o in &objects {
            match o.key.parse::<ObjectKey>() {
                Ok(ObjectKey::PgManifest { .. }) => manifests.push(o.clone()),
                Ok(ObjectKey::TimelineHistory { timeline, .. }) => {
                    histories.push((timeline.0, o.clone()))
                }
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
                    pieces.entry(segment).or_default().push(o.clone());
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
        let mut timelines = BTreeMap::new();
        for (tli, o) in histories {
            let expect = Expect {
                key: o.key.clone(),
                stored_size: Some(o.size),
                plain_hash: o.key.rsplit('-').next().map(str::to_string),
                plain_size: None,
            };
            let history = match repo.get_verified(&o.key, expect).await {
                Ok((_, text)) => parse_history(&String::from_utf8_lossy(&text))
                    .map_err(|e| format!("{}: not a timeline history file: {e}", o.key)),
                Err(e) => Err(e.to_string()),
            };
            match history {
                Ok(history) => {
                    timelines.insert(tli, timeline_info(tli, history, o.modified));
                }
                // Without it the branch cannot be followed; said, not hidden.
                Err(e) => unreadable.push((o.key.clone(), e)),
            }
        }
        for seg in wal.keys() {
            let t = timelines
                .entry(seg.timeline.0)
                .or_insert_with(|| timeline_info(seg.timeline.0, Vec::new(), None));
            let name = seg.to_string();
            t.first_segment.get_or_insert_with(|| name.clone());
            t.last_segment = Some(name);
            t.segments += 1;
        }
        // Ids have one-second resolution and a random suffix, so two backups
        // taken in the same second would otherwise be ordered by chance.
        backups.sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
        let mut cat = Catalog {
            backups,
            wal,
            streamed,
            pieces,
            windows: Vec::new(),
            timelines,
            unreadable,
        };
        cat.windows = cat.compute_windows();
        Ok(cat)
    }

    /// Holes in the archived WAL: per timeline, runs of segments missing
    /// between two archived ones (a restore cannot replay across them).
    pub fn wal_gaps(&self) -> Vec<WalGap> {
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let number = |s: &WalSegmentName| u64::from(s.log) * per_log + u64::from(s.seg);
        let mut out = Vec::new();
        let mut prev: Option<(&WalSegmentName, &WalEntry)> = None;
        for (seg, entry) in &self.wal {
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
                if let Some(w) = self.walk(b, start, stop, &path) {
                    out.push(w);
                }
            }
        }
        out
    }

    /// Ends each window at the last commit its WAL holds. Recovery to a time
    /// stops at the first commit after it and fails when there is none, so a
    /// window ending at the archive time of its last segment promised times
    /// no restore can reach. Segments are read newest first (a few, usually
    /// one) and each at most once; a window ending in streamed pieces of an
    /// unfinished segment reads them assembled, as `wal-fetch` serves them.
    async fn end_windows_at_last_commit(&mut self, repo: &Repository) {
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
                if let Some(t) = self.tail_last_commit(repo, seg, segno(&seg)).await {
                    found = Some(t);
                }
                searched += 1;
            }
            while found.is_none() {
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
                let prev =
                    super::wal::walfile_name(seg.timeline.0, Lsn(segno(&seg) * WAL_SEGMENT_SIZE));
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
    /// `wal-fetch` serves them.
    async fn tail_last_commit(
        &self,
        repo: &Repository,
        seg: WalSegmentName,
        n: u64,
    ) -> Option<LastCommit> {
        let listed = self.pieces.get(&seg)?;
        let key = &listed.first()?.key;
        let prefix = &key[..key.find(".stream.")? + ".stream.".len()];
        match super::wal::streamed_segment(repo, prefix, listed).await {
            Ok(Some((data, _))) => {
                tokio::task::spawn_blocking(move || super::wal_records::last_commit(&data, n))
                    .await
                    .ok()
                    .flatten()
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(segment = %seg, error = %e, "cannot read streamed pieces for their commit times");
                None
            }
        }
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
            while n < end {
                match self.wal.get(&name(*tli, n)) {
                    Some(e) => last = Some((name(*tli, n), e)),
                    None => break,
                }
                n += 1;
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

    /// The backup to restore for `target` (None = latest): the newest one that
    /// ended before the target and whose WAL reaches it, on the timeline that
    /// holds the target. `latest` is refused when it would stop short of
    /// archived WAL (see [`Catalog::plan`]).
    pub fn pick(&self, target: Option<DateTime<Utc>>) -> Result<&PgManifest, PgError> {
        self.plan(target, false, TimelineChoice::Auto)
            .map(|p| p.backup)
    }

    /// What a restore to `target` (None = latest) replays: the backup, the
    /// timeline to follow, and for `latest` what stands between the newest
    /// reachable point and the newest archived WAL (refused unless
    /// `accept_gap`, then returned so the report says what was given up).
    pub fn plan(
        &self,
        target: Option<DateTime<Utc>>,
        accept_gap: bool,
        choice: TimelineChoice,
    ) -> Result<Plan<'_>, PgError> {
        let covers = |w: &&Window| target.is_none_or(|t| w.from <= t && t <= w.to);
        let own = |w: &Window| {
            self.backups
                .iter()
                .any(|b| b.id == w.backup && b.timeline == w.timeline)
        };
        let timeline = match choice {
            TimelineChoice::Id(n) => {
                if !self.windows.iter().any(|w| w.timeline == n) {
                    return Err(PgError::Other(format!(
                        "--timeline {n}: no backup reaches timeline {n} through archived WAL; {}",
                        self.timelines_text()
                    )));
                }
                n
            }
            TimelineChoice::Latest => match self.windows.iter().map(|w| w.timeline).max() {
                Some(n) => n,
                None => return Err(PgError::Other(self.outside_message(target))),
            },
            TimelineChoice::Current => {
                match self.windows.iter().rev().filter(|w| own(w)).find(covers) {
                    Some(w) => w.timeline,
                    None => return Err(PgError::Other(self.outside_message(target))),
                }
            }
            TimelineChoice::Auto => self.auto_timeline(target)?,
        };
        let chosen = self
            .windows
            .iter()
            .rev()
            .filter(|w| w.timeline == timeline)
            .filter(|w| choice != TimelineChoice::Current || own(w))
            .find(covers);
        let Some(w) = chosen else {
            return Err(PgError::Other(format!(
                "{} on timeline {timeline}",
                self.outside_message(target)
            )));
        };
        let backup = self
            .backups
            .iter()
            .find(|b| b.id == w.backup)
            .ok_or_else(|| PgError::Other("catalog inconsistency".into()))?;
        let shortfall = if target.is_none() {
            self.shortfall(w)
        } else {
            None
        };
        match shortfall {
            Some(s) if !accept_gap => Err(PgError::Other(format!(
                "--to latest would stop short: {s}. Restore to a time inside the window \
                 (`dr list pg`), repair the repository (`dr repo sync` from a region that \
                 holds the objects), or pass --accept-gap to restore up to {} and give \
                 the rest up",
                w.to.format("%Y-%m-%dT%H:%M:%SZ")
            ))),
            gave_up => Ok(Plan {
                backup,
                timeline,
                gave_up,
                stop_at_backup_end: target.is_some() && w.end_basis == WindowEnd::BackupEnd,
                stop_after_lsn: w.end_lsn.filter(|_| target.is_some_and(|t| t >= w.to)),
            }),
        }
    }

    /// The timeline that holds `target`: among those with a window covering
    /// it, a branch is set aside for its ancestor while the target precedes
    /// the branch, and for `latest` an ancestor is set aside for a branch
    /// when it holds no WAL past the switch point. Two left means two
    /// histories diverge there: refused, naming both.
    fn auto_timeline(&self, target: Option<DateTime<Utc>>) -> Result<u32, PgError> {
        let covering: Vec<&Window> = self
            .windows
            .iter()
            .filter(|w| target.is_none_or(|t| w.from <= t && t <= w.to))
            .collect();
        let mut candidates: Vec<u32> = covering.iter().map(|w| w.timeline).collect();
        candidates.sort_unstable();
        candidates.dedup();
        let info = |t: u32| self.timelines.get(&t);
        let keep: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&y| match target {
                Some(t) => {
                    // Before the branch, its history is its ancestor's.
                    let before_branch =
                        info(y).and_then(|i| i.switch_time).is_some_and(|st| t < st);
                    let ancestor_covers = candidates
                        .iter()
                        .any(|&x| x != y && info(y).is_some_and(|i| i.descends_from(x)));
                    !(before_branch && ancestor_covers)
                }
                None => !candidates
                    .iter()
                    .any(|&z| z != y && self.superseded_by(y, z)),
            })
            .collect();
        match keep.as_slice() {
            [] => Err(PgError::Other(self.outside_message(target))),
            [one] => Ok(*one),
            many => {
                let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
                let list = many
                    .iter()
                    .map(|t| {
                        let end = covering
                            .iter()
                            .filter(|w| w.timeline == *t)
                            .map(|w| w.to)
                            .max();
                        let branch = info(*t)
                            .and_then(|i| Some((i.parent()?, i.switch_lsn()?)))
                            .map(|(p, l)| format!(", branched from {p} at {l}"))
                            .unwrap_or_default();
                        format!(
                            "timeline {t} (WAL to {}{branch})",
                            end.map(|e| fmt(&e)).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" and ");
                let what = match target {
                    Some(t) => format!("target {}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
                    None => "latest".to_string(),
                };
                Err(PgError::Other(format!(
                    "{what} is ambiguous: {list} both hold WAL for it after they diverged. \
                     Choose one with --timeline {} (`dr list pg` shows every timeline)",
                    many.iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(" or --timeline ")
                )))
            }
        }
    }

    /// Whether timeline `x` committed nothing after `y` (one of its
    /// descendants) branched off it, so `y` simply continues its history:
    /// judged by `x`'s last commit where it is known, else by segment (no
    /// WAL past the switch segment).
    fn superseded_by(&self, x: u32, y: u32) -> bool {
        let Some(yi) = self.timelines.get(&y) else {
            return false;
        };
        let Some(leave) = yi
            .path()
            .iter()
            .find(|(t, _)| *t == x)
            .and_then(|(_, l)| *l)
        else {
            return false;
        };
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        self.windows.iter().filter(|w| w.timeline == x).all(|w| {
            match (w.end_lsn, w.end_basis) {
                // The last commit on `x` is known: diverged only if it
                // committed after `y` branched off.
                (Some(last_commit), _) => last_commit < leave,
                (None, WindowEnd::BackupEnd) => self
                    .backups
                    .iter()
                    .any(|b| b.id == w.backup && b.stop_lsn <= leave),
                // Otherwise by segment: nothing past the switch segment.
                _ => w.last_segment.parse::<WalSegmentName>().is_ok_and(|s| {
                    u64::from(s.log) * per_log + u64::from(s.seg) <= leave.0 / WAL_SEGMENT_SIZE
                }),
            }
        })
    }

    /// One line per timeline, for errors.
    fn timelines_text(&self) -> String {
        let list: Vec<String> = self
            .timelines
            .values()
            .map(|t| {
                let windows: Vec<String> = self
                    .windows
                    .iter()
                    .filter(|w| w.timeline == t.id)
                    .map(|w| {
                        format!(
                            "{} .. {}",
                            w.from.format("%Y-%m-%dT%H:%M:%SZ"),
                            w.to.format("%Y-%m-%dT%H:%M:%SZ")
                        )
                    })
                    .collect();
                format!(
                    "timeline {}: {}",
                    t.id,
                    if windows.is_empty() {
                        "not restorable".to_string()
                    } else {
                        windows.join(", ")
                    }
                )
            })
            .collect();
        format!("timelines: {}", list.join("; "))
    }

    /// What the newest point reachable from `w` leaves behind: WAL archived
    /// on its timeline beyond a missing segment, with the manifests that
    /// could not be read (they may be backups that would bridge the gap).
    pub fn shortfall(&self, w: &Window) -> Option<String> {
        let end = w.last_segment.parse::<WalSegmentName>().ok()?;
        let missing = next_segment(end);
        let later: Vec<(&WalSegmentName, &WalEntry)> = self
            .wal
            .range(missing..)
            .filter(|(l, _)| l.timeline == end.timeline)
            .collect();
        let (newest, entry) = later.last()?;
        let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let lost = entry
            .archived
            .map(|a| {
                let secs = (a - w.to).num_seconds().max(0);
                format!(
                    ", archived {} ({} of WAL after the reachable end {})",
                    fmt(&a),
                    humantime::format_duration(std::time::Duration::from_secs(secs as u64)),
                    fmt(&w.to)
                )
            })
            .unwrap_or_default();
        let mut s = format!(
            "WAL segment {missing} is missing in every region, so replay ends at {end}; \
             {} later segment(s) are archived up to {newest}{lost}",
            later.len()
        );
        if !self.unreadable.is_empty() {
            let keys: Vec<&str> = self.unreadable.iter().map(|(k, _)| k.as_str()).collect();
            s.push_str(&format!(
                "; unreadable manifest(s): {} ({})",
                keys.join(", "),
                self.unreadable[0].1
            ));
        }
        Some(s)
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

/// The last commit time in one archived segment; `None` when it holds none
/// or cannot be read (the window then ends earlier, never later).
async fn segment_last_commit(repo: &Repository, key: &str, segno: u64) -> Option<LastCommit> {
    let expect = Expect {
        key: key.to_string(),
        plain_hash: key.rsplit('-').next().map(str::to_string),
        plain_size: Some(WAL_SEGMENT_SIZE),
        ..Expect::default()
    };
    match repo.get_verified(key, expect).await {
        Ok((_, data)) => {
            tokio::task::spawn_blocking(move || super::wal_records::last_commit(&data, segno))
                .await
                .ok()
                .flatten()
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "cannot read a WAL segment for its commit times");
            None
        }
    }
}

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
    if !repo.codec.can_decrypt() {
        return Err(PgError::Other(format!(
            "manifests are encrypted and the catalog needs the private key: {}",
            repo.codec.cannot_decrypt_because()
        )));
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

#[cfg(test)]
mod model_tests {
    //! The catalog against a brute-force model: random histories of one
    //! timeline and a branch (with gaps, short stray branches and backups on
    //! either side), checked segment by segment without the catalog's walk.
    use super::*;
    use crate::postgres::timeline::HistoryEntry;
    use crate::repo::layout::TimelineId;
    use proptest::prelude::*;

    const SEG: u64 = WAL_SEGMENT_SIZE;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("time")
    }

    fn seg(tl: u32, n: u64) -> WalSegmentName {
        let per_log = 0x1_0000_0000u64 / SEG;
        WalSegmentName {
            timeline: TimelineId(tl),
            log: (n / per_log) as u32,
            seg: (n % per_log) as u32,
        }
    }

    fn manifest(id: &str, tl: u32, start: u64, stop: u64) -> PgManifest {
        PgManifest {
            kind: "dr-pg-backup".into(),
            version: super::super::manifest::MANIFEST_VERSION,
            cluster: "main".into(),
            system_id: 1,
            id: id.into(),
            server_version: 150000,
            // Segment n is archived at second 10n; a backup ends inside its
            // stop segment.
            start_time: at(10 * start as i64 - 5),
            stop_time: at(10 * stop as i64 - 5),
            start_lsn: Lsn(start * SEG + 40),
            stop_lsn: Lsn(stop * SEG + 100),
            timeline: tl,
            start_segment: seg(tl, start).to_string(),
            stop_segment: seg(tl, stop).to_string(),
            wal_segment_size: SEG,
            backup_label: String::new(),
            tablespace_map: String::new(),
            dirs: Vec::new(),
            files: Vec::new(),
            objects: Vec::new(),
            size: 0,
            stored_size: 0,
            duration_seconds: 0.0,
            checksum_failures: Vec::new(),
            tablespaces: Vec::new(),
            server_manifest: None,
        }
    }

    /// A history: timeline 1 has segments 1..=n1 minus `gaps1`; timeline 2
    /// branches at `k` (inside segment k) and has segments k..=n2 minus
    /// `gaps2`, archived `delay` seconds later than timeline 1's would be.
    #[derive(Debug, Clone)]
    struct History {
        n1: u64,
        gaps1: Vec<u64>,
        branch: Option<(u64, u64, Vec<u64>, i64)>,
        backups: Vec<(u32, u64)>,
    }

    fn history() -> impl Strategy<Value = History> {
        (4u64..14, prop::collection::vec(1u64..14, 0..2))
            .prop_flat_map(|(n1, gaps1)| {
                let branch = prop::option::of((
                    2u64..n1,
                    0u64..6,
                    prop::collection::vec(0u64..20, 0..2),
                    0i64..200,
                ));
                let backups = prop::collection::vec((1u32..3, 1u64..n1), 1..4);
                (Just(n1), Just(gaps1), branch, backups)
            })
            .prop_map(|(n1, gaps1, branch, backups)| History {
                n1,
                gaps1,
                branch: branch.map(|(k, len, gaps, delay)| (k, k + len, gaps, delay)),
                backups,
            })
    }

    fn catalog(h: &History) -> Catalog {
        let mut wal = BTreeMap::new();
        for n in 1..=h.n1 {
            if !h.gaps1.contains(&n) {
                let e = WalEntry {
                    key: format!("tl1-{n}"),
                    archived: Some(at(10 * n as i64)),
                };
                wal.insert(seg(1, n), e);
            }
        }
        let mut timelines = BTreeMap::new();
        if let Some((k, n2, gaps, delay)) = &h.branch {
            for n in *k..=*n2 {
                if !gaps.contains(&(n - k)) {
                    let e = WalEntry {
                        key: format!("tl2-{n}"),
                        archived: Some(at(10 * n as i64 + delay)),
                    };
                    wal.insert(seg(2, n), e);
                }
            }
            let mut t2 = timeline_info(
                2,
                vec![HistoryEntry {
                    parent: 1,
                    switch: Lsn(k * SEG + 200),
                }],
                Some(at(10 * *k as i64 + delay)),
            );
            t2.segments = 1;
            timelines.insert(2, t2);
        }
        timelines.insert(1, timeline_info(1, Vec::new(), None));
        let mut backups = Vec::new();
        for (i, (tl, start)) in h.backups.iter().enumerate() {
            let (tl, start) = match (&h.branch, tl) {
                (Some((k, n2, _, _)), 2) if *start > *k && *start < *n2 => (2, *start),
                _ => (1, *start),
            };
            backups.push(manifest(&format!("b{i}"), tl, start, start + 1));
        }
        backups.sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
        let mut cat = Catalog {
            backups,
            wal,
            streamed: BTreeMap::new(),
            pieces: BTreeMap::new(),
            windows: Vec::new(),
            timelines,
            unreadable: Vec::new(),
        };
        cat.windows = cat.compute_windows();
        cat
    }

    /// Which timeline holds segment n on the way to `target`.
    fn holder(h: &History, target: u32, n: u64) -> u32 {
        match (&h.branch, target) {
            (Some((k, ..)), 2) if n >= *k => 2,
            _ => 1,
        }
    }

    /// The model's window of backup `b` on `target`: the last segment
    /// reachable one by one from the backup's start.
    fn model_window(
        h: &History,
        cat: &Catalog,
        b: &PgManifest,
        target: u32,
    ) -> Option<(u64, DateTime<Utc>)> {
        let per_log = 0x1_0000_0000u64 / SEG;
        let n_of = |s: &str| {
            s.parse::<WalSegmentName>()
                .map(|s| u64::from(s.log) * per_log + u64::from(s.seg))
        };
        let start = n_of(&b.start_segment).ok()?;
        let stop = n_of(&b.stop_segment).ok()?;
        if target == 1 && b.timeline == 2 {
            return None;
        }
        if let (2, Some((k, ..))) = (target, &h.branch)
            && b.timeline == 1
            && b.stop_lsn.0 > k * SEG + 200
        {
            return None; // the backup ended after timeline 1 was left
        }
        if target == 2 && h.branch.is_none() {
            return None;
        }
        let mut n = start;
        let mut last = None;
        while let Some(e) = cat.wal.get(&seg(holder(h, target, n), n)) {
            last = Some((n, e.archived?));
            n += 1;
        }
        let (ln, t) = last?;
        if ln < stop || holder(h, target, ln) != target {
            return None;
        }
        Some((ln, t.max(b.stop_time)))
    }

    proptest! {
        #[test]
        fn windows_match_the_model(h in history()) {
            let cat = catalog(&h);
            let mut expect = Vec::new();
            for b in &cat.backups {
                for target in [1, 2] {
                    if let Some((ln, to)) = model_window(&h, &cat, b, target) {
                        expect.push((b.id.clone(), target, seg(target, ln).to_string(), to));
                    }
                }
            }
            let mut got: Vec<_> = cat
                .windows
                .iter()
                .map(|w| (w.backup.clone(), w.timeline, w.last_segment.clone(), w.to))
                .collect();
            expect.sort();
            got.sort();
            prop_assert_eq!(got, expect);
        }

        #[test]
        fn an_accepted_target_is_reachable_on_the_chosen_timeline(h in history(), t in 0i64..250) {
            let cat = catalog(&h);
            let target = at(t);
            match cat.plan(Some(target), false, TimelineChoice::Auto) {
                Ok(p) => {
                    // Covered by a model window of that backup on that timeline.
                    let w = model_window(&h, &cat, p.backup, p.timeline);
                    prop_assert!(w.is_some_and(|(_, to)| p.backup.stop_time <= target && target <= to),
                        "{:?} accepted {} via {} on {}", h, target, p.backup.id, p.timeline);
                    // No other timeline holds a different history at the target.
                    for other in [1u32, 2] {
                        if other == p.timeline { continue; }
                        let diverged = h.branch.as_ref().is_some_and(|(k, _, _, d)| target >= at(10 * *k as i64 + d));
                        let covers = cat.backups.iter().any(|b| model_window(&h, &cat, b, other)
                            .is_some_and(|(_, to)| b.stop_time <= target && target <= to));
                        prop_assert!(!(diverged && covers), "{:?}: {} is ambiguous but was accepted", h, target);
                    }
                }
                Err(e) => {
                    // Refused: no model window covers it, or two diverged ones do.
                    let covering: Vec<u32> = [1u32, 2].into_iter().filter(|tl| cat.backups.iter().any(|b| {
                        model_window(&h, &cat, b, *tl).is_some_and(|(_, to)| b.stop_time <= target && target <= to)
                    })).collect();
                    let ambiguous = covering.len() == 2
                        && h.branch.as_ref().is_some_and(|(k, _, _, d)| target >= at(10 * *k as i64 + d));
                    prop_assert!(covering.is_empty() || ambiguous, "{:?}: {} refused: {}", h, target, e);
                }
            }
        }
    }
}
