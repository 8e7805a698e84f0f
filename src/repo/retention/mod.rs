//! Retention (`dr expire`): which backups, blocks, WAL and snapshots a policy
//! lets go, and deleting them safely.
//!
//! Rules, in order of precedence:
//! - the newest backup (snapshot) of every source is always kept;
//! - a backup is kept if `keep_full` (the N newest) or `keep_within` (every
//!   backup needed to restore to any point of the last D) keeps it;
//! - a data object referenced by any kept backup is kept, even if the backup
//!   that stored it expires (block-incremental backups share objects);
//! - WAL is kept from the start segment of the oldest kept backup on;
//! - a backup directory without a manifest belongs to a backup that may still
//!   be running until its newest object (the `started` marker written first,
//!   or data) is older than `orphan_age`; then it is an orphan and goes. While
//!   any backup of a cluster may be running, data of expired backups and WAL
//!   stay too (the running backup may reference those blocks and needs WAL
//!   from its start on); a later expire removes them;
//! - manifests are deleted before data, so a crash mid-expire never leaves a
//!   visible backup with missing data; a manifest that cannot be deleted (for
//!   example under S3 Object Lock) keeps its backup's data too.
//!
//! The plan is a pure function of what exists and the clock, so decisions can
//! be tested as tables.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A retention policy for one source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest backups (snapshots).
    pub keep: Option<usize>,
    /// Keep what is needed to restore to any point of this recent span.
    pub keep_within: Option<Duration>,
}

impl Policy {
    /// True when no rule is set (nothing may be deleted).
    pub fn is_empty(&self) -> bool {
        self.keep.is_none() && self.keep_within.is_none()
    }
}

/// What the planner needs to know about one backup or snapshot.
#[derive(Debug, Clone)]
pub struct Item {
    /// Backup or snapshot id (sorts by time).
    pub id: String,
    /// The earliest moment it can restore to (a backup's stop time, a
    /// snapshot's time).
    pub time: DateTime<Utc>,
}

/// Keep-or-delete for one item, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Item id.
    pub id: String,
    /// Kept?
    pub keep: bool,
    /// Why, for people.
    pub why: String,
}

/// Decides which items `policy` keeps at `now`. Items may come in any order;
/// decisions come newest first.
pub fn decide(items: &[Item], policy: &Policy, now: DateTime<Utc>) -> Vec<Decision> {
    let mut sorted: Vec<&Item> = items.iter().collect();
    sorted.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
    let cutoff = policy
        .keep_within
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| now - d);
    // The newest item older than the cutoff still covers the window's start.
    let window_base = cutoff.and_then(|c| sorted.iter().find(|i| i.time <= c).map(|i| &i.id));
    sorted
        .iter()
        .enumerate()
        .map(|(rank, item)| {
            let mut why = Vec::new();
            if rank == 0 {
                why.push("newest".to_string());
            }
            if let Some(n) = policy.keep
                && rank < n
            {
                why.push(format!("one of the {n} newest (keep_full/keep_snapshots)"));
            }
            if let Some(c) = cutoff {
                if item.time > c {
                    why.push(format!("inside keep_within (after {})", fmt(c)));
                } else if window_base == Some(&item.id) {
                    why.push(format!(
                        "base of the keep_within window (restores to {})",
                        fmt(c)
                    ));
                }
            }
            let keep = !why.is_empty() || policy.is_empty();
            if policy.is_empty() && why.is_empty() {
                why.push("no retention policy configured".into());
            }
            Decision {
                id: item.id.clone(),
                keep,
                why: if keep {
                    why.join("; ")
                } else {
                    format!("beyond the policy ({})", describe(policy))
                },
            }
        })
        .collect()
}

fn describe(p: &Policy) -> String {
    let mut parts = Vec::new();
    if let Some(n) = p.keep {
        parts.push(format!("keep {n}"));
    }
    if let Some(d) = p.keep_within {
        parts.push(format!("keep_within {}", humantime::format_duration(d)));
    }
    parts.join(", ")
}

fn fmt(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// One object to delete, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deletion {
    /// Object key.
    pub key: String,
    /// `manifest`, `data`, `wal` or `rdb`; manifests are deleted first.
    pub kind: String,
    /// Why it may go.
    pub why: String,
    /// Left by a backup that never wrote its manifest.
    pub orphan: bool,
}

/// Everything one source's expiry would do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourcePlan {
    /// `pg`, `redis` or `rabbitmq`.
    pub kind: String,
    /// Cluster or instance name.
    pub name: String,
    /// One decision per backup/snapshot.
    pub decisions: Vec<Decision>,
    /// Objects to delete, manifests first.
    pub deletions: Vec<Deletion>,
    /// Objects kept only because a kept backup references them.
    pub kept_shared: usize,
    /// Backups (snapshots) without a manifest whose newest object is younger
    /// than `orphan_age`: they may still be running, so nothing of theirs goes.
    pub running: Vec<String>,
    /// Deletions of expired data and WAL put off because a backup may still
    /// be running and need them; a later expire removes them.
    pub deferred: usize,
}

/// A stored object of a backup or snapshot directory (data, rdb or running
/// marker), as the listing shows it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Object key.
    pub key: String,
    /// The backup or snapshot id whose directory holds it.
    pub id: String,
    /// `data`, `rdb` or `marker`.
    pub kind: &'static str,
    /// When the store says it was written (`None`: unknown).
    pub modified: Option<DateTime<Utc>>,
}

/// When each manifest-less directory was last written to: the newest of its
/// objects, `None` when the store does not tell the age of one of them.
fn last_writes<'a>(
    stored: &'a [Stored],
    known: &BTreeSet<&str>,
) -> BTreeMap<&'a str, Option<DateTime<Utc>>> {
    let mut last: BTreeMap<&str, Option<DateTime<Utc>>> = BTreeMap::new();
    for s in stored.iter().filter(|s| !known.contains(s.id.as_str())) {
        let e = last.entry(s.id.as_str()).or_insert(s.modified);
        *e = match (*e, s.modified) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    last
}

/// True while a manifest-less directory last written at `last` may belong to
/// a backup that is still running: younger than `orphan_age`, or of unknown
/// age (never delete what cannot be judged).
pub fn may_be_running(
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    orphan_age: Duration,
) -> bool {
    match (last, chrono::Duration::from_std(orphan_age)) {
        (Some(t), Ok(age)) => now - t < age,
        _ => true,
    }
}

/// Deletions of directory objects (data, rdb, markers): those of backups
/// expiring now and of orphans, except objects a kept backup reads.
struct DirPlan {
    deletions: Vec<Deletion>,
    kept_shared: usize,
    running: Vec<String>,
    deferred: usize,
}

fn plan_dirs(
    stored: &[Stored],
    known: &BTreeSet<&str>,
    expired: &BTreeSet<&str>,
    referenced: &BTreeSet<&str>,
    defer_expired_while_running: bool,
    now: DateTime<Utc>,
    orphan_age: Duration,
) -> DirPlan {
    let last = last_writes(stored, known);
    let running: Vec<String> = last
        .iter()
        .filter(|(_, t)| may_be_running(**t, now, orphan_age))
        .map(|(id, _)| id.to_string())
        .collect();
    let defer = defer_expired_while_running && !running.is_empty();
    let mut out = DirPlan {
        deletions: Vec::new(),
        kept_shared: 0,
        running,
        deferred: 0,
    };
    let mut found = Vec::new();
    for s in stored {
        let id = s.id.as_str();
        let (why, orphan) = if expired.contains(id) {
            if defer {
                out.deferred += 1;
                continue;
            }
            let why = format!("stored by expired backup {id}, read by no kept backup");
            (why, false)
        } else if let Some(t) = last.get(id) {
            if may_be_running(*t, now, orphan_age) {
                continue;
            }
            let why = format!(
                "orphan: {id} has no manifest and was last written {}, over orphan_age {} ago",
                t.map(fmt).unwrap_or_default(),
                humantime::format_duration(orphan_age)
            );
            (why, true)
        } else {
            continue;
        };
        if referenced.contains(s.key.as_str()) {
            out.kept_shared += 1;
        } else {
            found.push((
                id,
                Deletion {
                    key: s.key.clone(),
                    kind: s.kind.into(),
                    why,
                    orphan,
                },
            ));
        }
    }
    // Newest backup first, like the decisions.
    found.sort_by(|a, b| b.0.cmp(a.0));
    out.deletions = found.into_iter().map(|(_, d)| d).collect();
    out
}

/// A PostgreSQL backup as retention sees it.
#[derive(Debug, Clone)]
pub struct PgBackup {
    /// Id and time.
    pub item: Item,
    /// Manifest key.
    pub manifest: String,
    /// System identifier.
    pub system_id: u64,
    /// (log, seg) of its first needed WAL segment.
    pub start_pos: (u32, u32),
    /// Keys of every data object it reads (its own and other backups').
    pub reads: Vec<String>,
}

/// A stored WAL object (segment, partial, backup history) by position.
#[derive(Debug, Clone)]
pub struct PgWal {
    /// Object key.
    pub key: String,
    /// System identifier.
    pub system_id: u64,
    /// (log, seg).
    pub pos: (u32, u32),
}

/// Plans one PostgreSQL cluster. `stored` is every data object and running
/// marker of every backup directory (listed), so objects of expired and
/// interrupted backups are found even when no manifest lists them.
pub fn plan_pg(
    name: &str,
    backups: &[PgBackup],
    stored: &[Stored],
    wal: &[PgWal],
    policy: &Policy,
    now: DateTime<Utc>,
    orphan_age: Duration,
) -> SourcePlan {
    let items: Vec<Item> = backups.iter().map(|b| b.item.clone()).collect();
    let decisions = decide(&items, policy, now);
    let kept: BTreeSet<&str> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    let by_id: BTreeMap<&str, &PgBackup> =
        backups.iter().map(|b| (b.item.id.as_str(), b)).collect();
    let mut deletions = Vec::new();
    let mut expired = BTreeSet::new();
    for d in decisions.iter().filter(|d| !d.keep) {
        if let Some(b) = by_id.get(d.id.as_str()) {
            deletions.push(Deletion {
                key: b.manifest.clone(),
                kind: "manifest".into(),
                why: format!("backup {} expires: {}", d.id, d.why),
                orphan: false,
            });
            expired.insert(d.id.as_str());
        }
    }
    let referenced: BTreeSet<&str> = backups
        .iter()
        .filter(|b| kept.contains(b.item.id.as_str()))
        .flat_map(|b| b.reads.iter().map(String::as_str))
        .collect();
    let known: BTreeSet<&str> = backups.iter().map(|b| b.item.id.as_str()).collect();
    let dirs = plan_dirs(stored, &known, &expired, &referenced, true, now, orphan_age);
    deletions.extend(dirs.deletions);
    let mut deferred = dirs.deferred;
    // WAL older than the oldest kept backup's start is needed by nothing kept.
    let mut oldest: BTreeMap<u64, ((u32, u32), &str)> = BTreeMap::new();
    for b in backups.iter().filter(|b| kept.contains(b.item.id.as_str())) {
        let e = oldest
            .entry(b.system_id)
            .or_insert((b.start_pos, &b.item.id));
        if b.start_pos < e.0 {
            *e = (b.start_pos, &b.item.id);
        }
    }
    // Only when something was kept: with no backups at all, WAL is all there
    // is. A running backup needs WAL from its start, which only its manifest
    // will tell: WAL waits for a later expire.
    if !kept.is_empty() {
        for w in wal {
            let why = match oldest.get(&w.system_id) {
                Some((pos, id)) if w.pos < *pos => {
                    format!("before the start of the oldest kept backup {id}")
                }
                Some(_) => continue,
                None => format!("system {} has no kept backup", w.system_id),
            };
            if !dirs.running.is_empty() {
                deferred += 1;
                continue;
            }
            deletions.push(Deletion {
                key: w.key.clone(),
                kind: "wal".into(),
                why,
                orphan: false,
            });
        }
    }
    SourcePlan {
        kind: "pg".into(),
        name: name.into(),
        decisions,
        deletions,
        kept_shared: dirs.kept_shared,
        running: dirs.running,
        deferred,
    }
}

/// A snapshot (Redis, RabbitMQ) as retention sees it.
#[derive(Debug, Clone)]
pub struct Snap {
    /// Id and time.
    pub item: Item,
    /// Manifest key.
    pub manifest: String,
}

/// Plans one snapshot source of `kind` (`redis`, `rabbitmq`). `stored` is
/// every data object and running marker of every snapshot directory
/// (listed), so interrupted snapshots are found.
pub fn plan_snapshots(
    kind: &str,
    name: &str,
    snaps: &[Snap],
    stored: &[Stored],
    policy: &Policy,
    now: DateTime<Utc>,
    orphan_age: Duration,
) -> SourcePlan {
    let items: Vec<Item> = snaps.iter().map(|s| s.item.clone()).collect();
    let decisions = decide(&items, policy, now);
    let by_id: BTreeMap<&str, &Snap> = snaps.iter().map(|s| (s.item.id.as_str(), s)).collect();
    let mut deletions = Vec::new();
    let mut expired = BTreeSet::new();
    for d in decisions.iter().filter(|d| !d.keep) {
        if let Some(s) = by_id.get(d.id.as_str()) {
            deletions.push(Deletion {
                key: s.manifest.clone(),
                kind: "manifest".into(),
                why: format!("snapshot {} expires: {}", d.id, d.why),
                orphan: false,
            });
            expired.insert(d.id.as_str());
        }
    }
    // A snapshot reads only its own data object: nothing is shared, nothing deferred.
    let dirs = plan_dirs(
        stored,
        &by_id.keys().copied().collect(),
        &expired,
        &BTreeSet::new(),
        false,
        now,
        orphan_age,
    );
    deletions.extend(dirs.deletions);
    SourcePlan {
        kind: kind.into(),
        name: name.into(),
        decisions,
        deletions,
        kept_shared: 0,
        running: dirs.running,
        deferred: 0,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model_tests;
