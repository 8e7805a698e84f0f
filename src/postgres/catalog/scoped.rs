//! Restore planning from the part of the history a target needs: backups
//! from their summaries (one listing), timelines and 4 GiB WAL prefixes one
//! level at a time, and in full only the prefixes from the chosen backup's
//! start to the target. Whatever this cannot decide as the whole catalog
//! would (several system ids, diverged or unreachable timelines, a target
//! outside the window, a backup other than the newest before the target,
//! an unreadable manifest) is planned from the whole catalog instead, so a
//! plan and its refusals never depend on which way it was made.

use super::*;
use crate::repo::layout::{BackupSummary, MAX_SEG, TimelineId};
use crate::store::Listing;

/// What a restore replays, with the chosen backup's own manifest.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// The backup to restore (its manifest as stored).
    pub backup: PgManifest,
    /// The timeline recovery follows (`recovery_target_timeline`).
    pub timeline: u32,
    /// For `latest` under `accept_gap`: what was left behind.
    pub gave_up: Option<String>,
    /// Stop right after this commit record (see [`Plan::stop_after_lsn`]).
    pub stop_after_lsn: Option<Lsn>,
    /// Stop at consistency (see [`Plan::stop_at_backup_end`]).
    pub stop_at_backup_end: bool,
    /// The window the target lies in. Planned from part of the history, its
    /// end may be earlier than the whole window's: it reaches the target.
    pub window: Window,
    /// Newest complete segment read on the timeline, and when.
    newest_read: Option<(String, DateTime<Utc>)>,
    /// The timeline's newest WAL prefix, where planning did not read it.
    newest_prefix: Option<String>,
    /// Whether only part of the history was read.
    pub scoped: bool,
}

impl RestorePlan {
    /// The newest complete WAL segment archived on the plan's timeline, and
    /// when: for reports. A plan to a past time did not read that far, so
    /// this lists the timeline's newest prefix then (one request).
    pub async fn wal_newest(
        &self,
        repo: &Repository,
    ) -> Result<Option<(String, DateTime<Utc>)>, PgError> {
        let Some(prefix) = &self.newest_prefix else {
            return Ok(self.newest_read.clone());
        };
        let (_, objects) = repo.regions.list(prefix).await?;
        let newest = objects
            .iter()
            .filter_map(|o| match o.key.parse::<ObjectKey>() {
                Ok(ObjectKey::Wal {
                    segment,
                    suffix: WalSuffix::None,
                    ..
                }) if segment.timeline.0 == self.timeline => Some((segment, o.modified)),
                _ => None,
            })
            .max_by_key(|(s, _)| *s)
            .map(|(s, at)| (s.to_string(), at.unwrap_or(self.backup.stop_time)));
        Ok(newest.or_else(|| self.newest_read.clone()))
    }
}

/// Backups without a summary read one by one before the whole catalog is
/// cheaper to load instead (it reads every manifest in one listing).
const MAX_UNSUMMARISED: usize = 16;

/// One system id's WAL, as listed a level at a time.
pub(super) struct Tree {
    /// `pg/<cluster>/<system-id>/`.
    pub(super) root: String,
    /// Each timeline's 4 GiB prefixes (the high 32 bits of the LSN), ascending.
    pub(super) logs: BTreeMap<u32, Vec<u32>>,
    /// Backups known from their summaries only (stand-ins).
    pub(super) stand_ins: std::collections::BTreeSet<String>,
    /// Sizes the stand-ins' summaries carry (older summaries carry none).
    pub(super) sizes: BTreeMap<String, crate::repo::layout::BackupSizes>,
    /// Summaries of complete prefixes, by (timeline, log).
    pub(super) complete: BTreeMap<(u32, u32), crate::repo::layout::WalPrefixSummary>,
}

impl Tree {
    pub(super) fn log_prefix(&self, tli: u32, log: u32) -> String {
        format!("{}wal/{}/{log:08X}/", self.root, TimelineId(tli))
    }
}

impl Catalog {
    /// Plans a restore to `target` (None = latest) reading what it needs:
    /// on S3 a handful of requests however long the history. Falls back to
    /// [`Catalog::load`] wherever part of the history could decide
    /// differently from the whole.
    pub async fn plan_restore(
        repo: &Repository,
        cluster: &str,
        target: Option<DateTime<Utc>>,
        accept_gap: bool,
        choice: TimelineChoice,
    ) -> Result<RestorePlan, PgError> {
        if let Some(p) = Self::plan_scoped(repo, cluster, target, accept_gap, choice).await? {
            return Ok(p);
        }
        let cat = Catalog::load(repo, cluster).await?;
        let p = cat.plan(target, accept_gap, choice)?;
        let window = cat
            .chosen_window(&p.backup.id, p.timeline, target)
            .cloned()
            .ok_or_else(|| {
                PgError::Other("catalog inconsistency: no window for the plan".into())
            })?;
        Ok(RestorePlan {
            backup: p.backup.clone(),
            timeline: p.timeline,
            gave_up: p.gave_up,
            stop_after_lsn: p.stop_after_lsn,
            stop_at_backup_end: p.stop_at_backup_end,
            newest_read: cat.newest_on(p.timeline, p.backup.stop_time),
            newest_prefix: None,
            window,
            scoped: false,
        })
    }

    /// The window [`Catalog::plan`] chose for `backup` on `timeline`.
    fn chosen_window(
        &self,
        backup: &str,
        timeline: u32,
        target: Option<DateTime<Utc>>,
    ) -> Option<&Window> {
        self.windows
            .iter()
            .rev()
            .filter(|w| w.backup == backup && w.timeline == timeline)
            .find(|w| target.is_none_or(|t| w.from <= t && t <= w.to))
    }

    /// Newest complete segment listed on `timeline`, and when it was
    /// archived (`or` where the store does not say).
    fn newest_on(&self, timeline: u32, or: DateTime<Utc>) -> Option<(String, DateTime<Utc>)> {
        let (seg, e) = self
            .wal
            .iter()
            .rev()
            .find(|(seg, _)| seg.timeline.0 == timeline)?;
        Some((seg.to_string(), e.archived.unwrap_or(or)))
    }

    /// The plan from part of the history, or `None` where only the whole
    /// catalog can say.
    async fn plan_scoped(
        repo: &Repository,
        cluster: &str,
        target: Option<DateTime<Utc>>,
        accept_gap: bool,
        choice: TimelineChoice,
    ) -> Result<Option<RestorePlan>, PgError> {
        let top = repo.regions.list_dirs(&format!("pg/{cluster}/")).await?;
        let [root] = top.dirs.as_slice() else {
            return Ok(None); // no backup at all, or several system ids
        };
        let Some((mut cat, tree)) = Self::index(repo, cluster, root).await? else {
            return Ok(None);
        };
        let pick = match target {
            Some(t) => cat.backups.iter().rev().find(|b| b.stop_time <= t),
            None => cat.backups.last(),
        };
        let Some(b) = pick.cloned() else {
            return Ok(None);
        };
        let (Ok(start), Ok(stop)) = (
            b.start_segment.parse::<WalSegmentName>(),
            b.stop_segment.parse::<WalSegmentName>(),
        ) else {
            return Ok(None);
        };
        let Some(scope) = cat.scope(repo, &tree, &b).await? else {
            return Ok(None);
        };
        let mut loaded: Option<u32> = None;
        let mut upto = match target {
            None => u32::MAX,
            Some(_) => stop.log,
        };
        let (p, w) = loop {
            for &tli in &scope {
                let logs = tree.logs.get(&tli).map(Vec::as_slice).unwrap_or_default();
                let fresh = logs
                    .iter()
                    .filter(|&&l| l >= start.log && l <= upto && loaded.is_none_or(|d| l > d));
                let listed = futures::future::join_all(fresh.map(|&l| {
                    let prefix = tree.log_prefix(tli, l);
                    async move { repo.regions.list(&prefix).await }
                }))
                .await;
                for r in listed {
                    let (_, objects) = r?;
                    for o in &objects {
                        if let Ok(ObjectKey::Wal {
                            segment, suffix, ..
                        }) = o.key.parse::<ObjectKey>()
                        {
                            cat.absorb_wal(o, segment, suffix);
                        }
                    }
                }
            }
            loaded = Some(upto);
            cat.settle();
            cat.end_windows_at_last_commit(repo).await;
            let more = scope.iter().any(|t| {
                tree.logs
                    .get(t)
                    .is_some_and(|l| l.last().is_some_and(|&m| m > upto))
            });
            let planned = cat.plan(target, accept_gap, choice).ok().and_then(|p| {
                let w = cat.chosen_window(&p.backup.id, p.timeline, target)?.clone();
                Some((p, w))
            });
            match (planned, target) {
                (Some((_, w)), Some(t)) if more && cat.may_reach_further(&w, t, upto, &tree) => {}
                (Some(pw), _) => break pw,
                (None, Some(_)) if more => {}
                (None, _) => return Ok(None),
            }
            // On to the next prefix that exists on any of these timelines.
            upto = scope
                .iter()
                .filter_map(|t| tree.logs.get(t)?.iter().copied().find(|&l| l > upto))
                .min()
                .unwrap_or(u32::MAX);
        };
        if p.backup.id != b.id {
            return Ok(None); // an older backup: the whole catalog says why
        }
        let (timeline, gave_up, stop_after_lsn, stop_at_backup_end) = (
            p.timeline,
            p.gave_up,
            p.stop_after_lsn,
            p.stop_at_backup_end,
        );
        // The newest segment on the timeline is for reports, read on demand.
        let newest_prefix = tree
            .logs
            .get(&timeline)
            .and_then(|l| l.last())
            .filter(|&&top| top > upto)
            .map(|&top| tree.log_prefix(timeline, top));
        let backup = if tree.stand_ins.contains(&b.id) {
            match real_manifest(repo, root, &b).await {
                Some(m) => m,
                None => return Ok(None),
            }
        } else {
            b.clone()
        };
        Ok(Some(RestorePlan {
            timeline,
            gave_up,
            stop_after_lsn,
            stop_at_backup_end,
            newest_read: cat.newest_on(timeline, backup.stop_time),
            newest_prefix,
            backup,
            window: w,
            scoped: true,
        }))
    }

    /// Whether the whole history could end `w` later than the loaded part
    /// does, or put the target on a timeline branching beyond it: the
    /// window stops at the last loaded prefix, and the target is not
    /// strictly inside it (or a branch that may hold it starts further on).
    fn may_reach_further(&self, w: &Window, t: DateTime<Utc>, upto: u32, tree: &Tree) -> bool {
        let at_edge = w.last_segment.parse::<WalSegmentName>().is_ok_and(|s| {
            s.log == upto
                && s.seg == MAX_SEG
                && tree
                    .logs
                    .get(&s.timeline.0)
                    .is_some_and(|l| l.last().is_some_and(|&m| m > upto))
        });
        let branch_beyond = self.timelines.values().any(|i| {
            i.switch_time.is_some_and(|st| st <= t)
                && i.switch_lsn().is_some_and(|l| (l.0 >> 32) as u32 > upto)
        });
        // An end at the archive time of the last segment (no commit found)
        // may lie after commits further on: only a commit end is a bound.
        (at_edge && (t >= w.to || w.end_basis == WindowEnd::ArchiveTime)) || branch_beyond
    }

    /// Backups (from summaries, or manifests where there is none), timeline
    /// histories and each timeline's WAL prefixes, without listing a WAL key.
    pub(super) async fn index(
        repo: &Repository,
        cluster: &str,
        root: &str,
    ) -> Result<Option<(Catalog, Tree)>, PgError> {
        let (b, s, w) = (
            format!("{root}backups/"),
            format!("{root}summaries/"),
            format!("{root}wal/"),
        );
        let (backups, summaries, wal) = tokio::join!(
            repo.regions.list_dirs(&b),
            repo.regions.list(&s),
            repo.regions.list_dirs(&w),
        );
        let (backups, (_, summaries), wal) = (backups?, summaries?, wal?);
        let mut said: BTreeMap<String, BackupSummary> = BTreeMap::new();
        for o in &summaries {
            if let Ok(ObjectKey::PgSummary { summary, .. }) = o.key.parse::<ObjectKey>() {
                said.insert(summary.backup.to_string(), summary);
            }
        }
        let Some(Ok(system_id)) = root
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .map(str::parse::<u64>)
        else {
            return Ok(None);
        };
        let mut cat = Catalog::empty();
        let mut unsummarised = Vec::new();
        let mut stand_ins = std::collections::BTreeSet::new();
        let mut sizes = BTreeMap::new();
        // A summary counts only while its backup's directory exists: one
        // left behind by an interrupted expire names nothing.
        for dir in &backups.dirs {
            let id = dir[root.len() + "backups/".len()..].trim_end_matches('/');
            match said.get(id) {
                Some(s) => {
                    cat.backups.push(stand_in(cluster, system_id, s));
                    stand_ins.insert(id.to_string());
                    if let Some(z) = s.sizes {
                        sizes.insert(id.to_string(), z);
                    }
                }
                None => unsummarised.push(dir.clone()),
            }
        }
        if unsummarised.len() > MAX_UNSUMMARISED {
            return Ok(None);
        }
        // Taken before summaries existed, cut short between manifest and
        // summary, or still running (no manifest yet: not a backup). A HEAD
        // each, not a listing of a directory of data objects.
        for dir in unsummarised {
            let key = format!("{dir}manifest");
            let mut size = None;
            for r in repo.regions.iter() {
                match r.store.head(&key).await {
                    Ok(Some(n)) => {
                        size = Some(n);
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(region = %r.name, key, error = %e,
                            "cannot tell whether a manifest exists: planning from the whole catalog");
                        return Ok(None);
                    }
                }
            }
            let Some(size) = size else { continue };
            match read_manifest(repo, &key, size).await {
                Ok(m) => cat.backups.push(m),
                Err(e) => {
                    tracing::debug!(key, error = %e,
                        "unreadable manifest: planning from the whole catalog");
                    return Ok(None);
                }
            }
        }
        let mut histories = Vec::new();
        for o in &wal.objects {
            if let Ok(ObjectKey::TimelineHistory { timeline, .. }) = o.key.parse::<ObjectKey>() {
                histories.push((timeline.0, o.clone()));
            }
        }
        let timelines: Vec<u32> = wal
            .dirs
            .iter()
            .filter_map(|d| {
                d[root.len() + "wal/".len()..]
                    .trim_end_matches('/')
                    .parse()
                    .ok()
            })
            .map(|t: TimelineId| t.0)
            .collect();
        let listed: Vec<Result<Listing, _>> =
            futures::future::join_all(timelines.iter().map(|t| async move {
                repo.regions
                    .list_dirs(&format!("{root}wal/{}/", TimelineId(*t)))
                    .await
            }))
            .await;
        let mut logs = BTreeMap::new();
        let mut complete = BTreeMap::new();
        for (t, l) in timelines.iter().zip(listed) {
            let l = l?;
            for o in &l.objects {
                if let Ok(ObjectKey::WalPrefixSummary {
                    timeline, summary, ..
                }) = o.key.parse::<ObjectKey>()
                    && timeline.0 == *t
                {
                    complete.insert((*t, summary.log), summary);
                }
            }
            let prefix = format!("{root}wal/{}/", TimelineId(*t));
            let v: Vec<u32> = l
                .dirs
                .iter()
                .filter_map(|d| d.get(prefix.len()..)?.trim_end_matches('/').parse().ok())
                .map(|x: TimelineId| x.0)
                .collect();
            logs.insert(*t, v);
        }
        cat.read_histories(repo, histories).await;
        if !cat.unreadable.is_empty() {
            return Ok(None);
        }
        let tree = Tree {
            root: root.to_string(),
            logs,
            stand_ins,
            sizes,
            complete,
        };
        Ok(Some((cat, tree)))
    }

    /// The timelines whose WAL a restore of `b` may follow: its own and
    /// those branched from it after it ended. `None` where another timeline
    /// could change the answer (one branched before `b` ended, an unrelated
    /// one, or an ancestor that went on after the branch).
    async fn scope(
        &self,
        repo: &Repository,
        tree: &Tree,
        b: &PgManifest,
    ) -> Result<Option<Vec<u32>>, PgError> {
        let mut scope = vec![b.timeline];
        let own = self.timelines.get(&b.timeline);
        let all: std::collections::BTreeSet<u32> = tree
            .logs
            .keys()
            .chain(self.timelines.keys())
            .copied()
            .collect();
        for t in all.into_iter().filter(|&t| t != b.timeline) {
            let info = self.timelines.get(&t);
            if info.is_some_and(|i| i.descends_from(b.timeline)) {
                let leave = info
                    .map(|i| i.path())
                    .unwrap_or_default()
                    .iter()
                    .find(|(x, _)| *x == b.timeline)
                    .and_then(|(_, l)| *l);
                if leave.is_none_or(|l| l < b.stop_lsn) {
                    return Ok(None);
                }
                scope.push(t);
            } else if own.is_some_and(|i| i.descends_from(t)) {
                let Some(leave) = own
                    .map(|i| i.path())
                    .unwrap_or_default()
                    .iter()
                    .find(|(x, _)| *x == t)
                    .and_then(|(_, l)| *l)
                else {
                    return Ok(None);
                };
                if !self.ancestor_ends_at(repo, tree, t, leave).await? {
                    return Ok(None);
                }
            } else {
                return Ok(None);
            }
        }
        Ok(Some(scope))
    }

    /// Whether ancestor `t` holds no complete segment past the one where the
    /// path leaves it at `leave` (else it went on after the branch).
    async fn ancestor_ends_at(
        &self,
        repo: &Repository,
        tree: &Tree,
        t: u32,
        leave: Lsn,
    ) -> Result<bool, PgError> {
        let last = leave.0 / WAL_SEGMENT_SIZE;
        let log = (leave.0 >> 32) as u32;
        let logs = tree.logs.get(&t).map(Vec::as_slice).unwrap_or_default();
        if logs.iter().any(|&l| l > log) {
            return Ok(false);
        }
        if !logs.contains(&log) {
            return Ok(true);
        }
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        let (_, objects) = repo.regions.list(&tree.log_prefix(t, log)).await?;
        Ok(!objects.iter().any(|o| {
            matches!(o.key.parse::<ObjectKey>(), Ok(ObjectKey::Wal { segment, suffix: WalSuffix::None, .. })
                if u64::from(segment.log) * per_log + u64::from(segment.seg) > last)
        }))
    }
}

/// A manifest holding only what a summary says: enough to compute windows,
/// never restored from (see [`real_manifest`]).
fn stand_in(cluster: &str, system_id: u64, s: &BackupSummary) -> PgManifest {
    PgManifest {
        kind: "dr-pg-backup".into(),
        version: super::super::manifest::MANIFEST_VERSION,
        cluster: cluster.to_string(),
        system_id,
        id: s.backup.to_string(),
        server_version: 0,
        start_time: s.start_time,
        stop_time: s.stop_time,
        start_lsn: Lsn(s.start_lsn),
        stop_lsn: Lsn(s.stop_lsn),
        timeline: s.timeline,
        start_segment: s.start_segment.to_string(),
        stop_segment: s.stop_segment.to_string(),
        wal_segment_size: WAL_SEGMENT_SIZE,
        backup_label: String::new(),
        tablespace_map: String::new(),
        dirs: Vec::new(),
        files: Vec::new(),
        objects: Vec::new(),
        size: s.sizes.map_or(0, |z| z.size),
        stored_size: s.sizes.map_or(0, |z| z.stored_size),
        duration_seconds: 0.0,
        checksum_failures: Vec::new(),
        tablespaces: Vec::new(),
        server_manifest: None,
    }
}

/// The chosen backup's manifest as stored, if it says what its summary
/// said; a stand-in is never restored from.
async fn real_manifest(repo: &Repository, root: &str, b: &PgManifest) -> Option<PgManifest> {
    let key = format!("{root}backups/{}/manifest", b.id);
    match read_manifest_sized(repo, &key, None).await {
        // Positions and times only: a stand-in lists no files.
        Ok(m)
            if m.summary().map(BackupSummary::without_sizes)
                == b.summary().map(BackupSummary::without_sizes) =>
        {
            Some(m)
        }
        Ok(_) => {
            tracing::warn!(backup = %b.id, "backup summary disagrees with its manifest; planning from the whole catalog");
            None
        }
        Err(e) => {
            tracing::debug!(backup = %b.id, error = %e, "manifest unreadable; planning from the whole catalog");
            None
        }
    }
}
