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
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .expect("time")
    }

    fn table(p: &SourcePlan) -> String {
        let mut out = String::new();
        for d in &p.decisions {
            out.push_str(&format!(
                "{} {} {}\n",
                d.id,
                if d.keep { "keep  " } else { "delete" },
                d.why
            ));
        }
        for d in &p.deletions {
            out.push_str(&format!("  - {} {} ({})\n", d.kind, d.key, d.why));
        }
        out
    }

    fn backup(id: &str, time: &str, start: u32, reads: &[&str]) -> PgBackup {
        PgBackup {
            item: Item {
                id: id.into(),
                time: t(time),
            },
            manifest: format!("pg/main/7/backups/{id}/manifest"),
            system_id: 7,
            start_pos: (0, start),
            reads: reads.iter().map(|s| s.to_string()).collect(),
        }
    }

    const DAY: Duration = Duration::from_secs(86400);

    fn stored(id: &str, kind: &'static str, n: u32, modified: &str) -> Stored {
        let key = if kind == "marker" {
            format!("pg/main/7/backups/{id}/started")
        } else {
            format!("pg/main/7/backups/{id}/data/{n:08x}")
        };
        Stored {
            key,
            id: id.into(),
            kind,
            modified: Some(t(modified)),
        }
    }

    fn wal12() -> Vec<PgWal> {
        (1..=12)
            .map(|s| PgWal {
                key: format!("pg/main/7/wal/00000001/00000000/0000000100000000000000{s:02X}-h"),
                system_id: 7,
                pos: (0, s),
            })
            .collect()
    }

    #[test]
    fn pg_plan_keeps_shared_blocks_and_needed_wal() {
        let d = |id: &str, n: u32| format!("pg/main/7/backups/{id}/data/{n:08x}");
        let backups = vec![
            backup("b1", "2026-11-01T00:00:00Z", 2, &[&d("b1", 0), &d("b1", 1)]),
            backup("b2", "2026-11-10T00:00:00Z", 5, &[&d("b1", 1), &d("b2", 0)]),
            backup("b3", "2026-11-20T00:00:00Z", 8, &[&d("b1", 1), &d("b3", 0)]),
            backup(
                "b4",
                "2026-11-24T00:00:00Z",
                11,
                &[&d("b1", 1), &d("b4", 0)],
            ),
        ];
        // b0 crashed before its manifest, days ago.
        let old = "2026-10-31T00:00:00Z";
        let data: Vec<Stored> = [
            stored("b0", "data", 0, old),
            stored("b1", "data", 0, old),
            stored("b1", "data", 1, old),
            stored("b2", "data", 0, old),
            stored("b3", "data", 0, old),
            stored("b4", "data", 0, old),
        ]
        .into();
        let policy = Policy {
            keep: Some(1),
            keep_within: Some(Duration::from_secs(7 * 86400)),
        };
        let p = plan_pg(
            "main",
            &backups,
            &data,
            &wal12(),
            &policy,
            t("2026-11-25T00:00:00Z"),
            DAY,
        );
        let expected = "\
b4 keep   newest; one of the 1 newest (keep_full/keep_snapshots); inside keep_within (after 2026-11-18T00:00:00Z)
b3 keep   inside keep_within (after 2026-11-18T00:00:00Z)
b2 keep   base of the keep_within window (restores to 2026-11-18T00:00:00Z)
b1 delete beyond the policy (keep 1, keep_within 7days)
  - manifest pg/main/7/backups/b1/manifest (backup b1 expires: beyond the policy (keep 1, keep_within 7days))
  - data pg/main/7/backups/b1/data/00000000 (stored by expired backup b1, read by no kept backup)
  - data pg/main/7/backups/b0/data/00000000 (orphan: b0 has no manifest and was last written 2026-10-31T00:00:00Z, over orphan_age 1day ago)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000001-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000002-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000003-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000004-h (before the start of the oldest kept backup b2)
";
        assert_eq!(table(&p), expected);
        assert_eq!(p.kept_shared, 1, "b1's object 1 is read by kept backups");
        assert!(p.running.is_empty() && p.deferred == 0);
    }

    #[test]
    fn a_running_backup_keeps_its_data_and_what_it_may_read() {
        let d = |id: &str, n: u32| format!("pg/main/7/backups/{id}/data/{n:08x}");
        // b15 started before b2 and is still running (no manifest, written an
        // hour ago); b05 died three days ago; b1 expires now.
        let backups = vec![
            backup("b1", "2026-11-20T00:00:00Z", 2, &[&d("b1", 0)]),
            backup("b2", "2026-11-24T12:00:00Z", 5, &[&d("b2", 0)]),
        ];
        let (fresh, dead) = ("2026-11-24T23:00:00Z", "2026-11-22T00:00:00Z");
        let data: Vec<Stored> = [
            stored("b05", "marker", 0, dead),
            stored("b05", "data", 0, dead),
            stored("b1", "marker", 0, dead),
            stored("b1", "data", 0, dead),
            stored("b15", "marker", 0, dead),
            stored("b15", "data", 0, fresh),
            stored("b2", "data", 0, fresh),
        ]
        .into();
        let policy = Policy {
            keep: Some(1),
            keep_within: None,
        };
        let now = t("2026-11-25T00:00:00Z");
        let p = plan_pg("main", &backups, &data, &wal12(), &policy, now, DAY);
        let expected = "\
b2 keep   newest; one of the 1 newest (keep_full/keep_snapshots)
b1 delete beyond the policy (keep 1)
  - manifest pg/main/7/backups/b1/manifest (backup b1 expires: beyond the policy (keep 1))
  - marker pg/main/7/backups/b05/started (orphan: b05 has no manifest and was last written 2026-11-22T00:00:00Z, over orphan_age 1day ago)
  - data pg/main/7/backups/b05/data/00000000 (orphan: b05 has no manifest and was last written 2026-11-22T00:00:00Z, over orphan_age 1day ago)
";
        assert_eq!(table(&p), expected);
        assert_eq!(p.running, ["b15"]);
        // b1's marker and data, and WAL 1..=4 before b2's start.
        assert_eq!(p.deferred, 6);

        // Once b15 is older than orphan_age, it goes too, and so do b1's
        // objects and the old WAL.
        let later = now + chrono::Duration::days(2);
        let p = plan_pg("main", &backups, &data, &wal12(), &policy, later, DAY);
        assert!(p.running.is_empty());
        assert_eq!(p.deferred, 0);
        let keys: Vec<&str> = p.deletions.iter().map(|d| d.key.as_str()).collect();
        for k in [
            "pg/main/7/backups/b15/started",
            "pg/main/7/backups/b15/data/00000000",
            "pg/main/7/backups/b1/started",
            "pg/main/7/backups/b1/data/00000000",
            "pg/main/7/wal/00000001/00000000/000000010000000000000004-h",
        ] {
            assert!(keys.contains(&k), "{k} not in {keys:?}");
        }
    }

    #[test]
    fn unknown_age_counts_as_running_and_read_orphans_stay() {
        let d = |id: &str, n: u32| format!("pg/main/7/backups/{id}/data/{n:08x}");
        // b0's manifest expired earlier while b2 still read one of its blocks.
        let backups = vec![backup("b2", "2026-11-24T00:00:00Z", 5, &[&d("b0", 1)])];
        let mut unknown = stored("b3", "data", 0, "2026-01-01T00:00:00Z");
        unknown.modified = None;
        let data = vec![
            stored("b0", "data", 0, "2026-01-01T00:00:00Z"),
            stored("b0", "data", 1, "2026-01-01T00:00:00Z"),
            stored("b3", "marker", 0, "2026-01-01T00:00:00Z"),
            unknown,
        ];
        let p = plan_pg(
            "main",
            &backups,
            &data,
            &[],
            &Policy::default(),
            t("2026-11-25T00:00:00Z"),
            DAY,
        );
        let keys: Vec<&str> = p.deletions.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(keys, ["pg/main/7/backups/b0/data/00000000"]);
        assert_eq!(p.kept_shared, 1);
        assert_eq!(p.running, ["b3"]);
        assert!(!may_be_running(
            Some(t("2026-11-23T00:00:00Z")),
            t("2026-11-25T00:00:00Z"),
            DAY
        ));
        assert!(may_be_running(
            Some(t("2026-11-24T00:00:01Z")),
            t("2026-11-25T00:00:00Z"),
            DAY
        ));
    }

    #[test]
    fn no_policy_deletes_nothing_and_newest_always_stays() {
        let backups = vec![
            backup("b1", "2026-11-01T00:00:00Z", 2, &[]),
            backup("b2", "2026-11-10T00:00:00Z", 5, &[]),
        ];
        let p = plan_pg(
            "main",
            &backups,
            &[],
            &[],
            &Policy::default(),
            t("2026-12-01T00:00:00Z"),
            DAY,
        );
        assert!(p.deletions.is_empty());
        assert!(p.decisions.iter().all(|d| d.keep));
        // keep_within shorter than the age of every backup: the newest stays.
        let policy = Policy {
            keep: None,
            keep_within: Some(Duration::from_secs(3600)),
        };
        let p = plan_pg(
            "main",
            &backups,
            &[],
            &[],
            &policy,
            t("2026-12-01T00:00:00Z"),
            DAY,
        );
        let kept: Vec<&str> = p
            .decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(kept, ["b2"]);
    }

    #[test]
    fn redis_plan_deletes_manifests_before_rdbs() {
        let snaps: Vec<Snap> = (1..=4)
            .map(|i| Snap {
                item: Item {
                    id: format!("s{i}"),
                    time: t(&format!("2026-11-2{i}T00:00:00Z")),
                },
                manifest: format!("redis/c/snapshots/s{i}/manifest"),
            })
            .collect();
        let rdb = |id: &str, at: &str| Stored {
            key: format!("redis/c/snapshots/{id}/rdb"),
            id: id.into(),
            kind: "rdb",
            modified: Some(t(at)),
        };
        // s0 died long ago; s5 is being written now.
        let stored: Vec<Stored> = ["s0", "s1", "s2", "s3", "s4", "s5"]
            .iter()
            .map(|id| {
                let at = if *id == "s5" {
                    "2026-11-24T23:59:00Z"
                } else {
                    "2026-11-01T00:00:00Z"
                };
                rdb(id, at)
            })
            .collect();
        let policy = Policy {
            keep: Some(2),
            keep_within: None,
        };
        let p = plan_snapshots(
            "redis",
            "c",
            &snaps,
            &stored,
            &policy,
            t("2026-11-25T00:00:00Z"),
            DAY,
        );
        assert_eq!(p.running, ["s5"]);
        let kinds: Vec<(&str, &str)> = p
            .deletions
            .iter()
            .map(|d| (d.kind.as_str(), d.key.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("manifest", "redis/c/snapshots/s2/manifest"),
                ("manifest", "redis/c/snapshots/s1/manifest"),
                ("rdb", "redis/c/snapshots/s2/rdb"),
                ("rdb", "redis/c/snapshots/s1/rdb"),
                ("rdb", "redis/c/snapshots/s0/rdb"),
            ]
        );
    }
}

/// `plan_pg` against a model: random histories of finished, running and
/// orphaned backups (block-incremental, reading each other's objects), WAL
/// of one or two systems, and random policies. The oracle states what each
/// thing needs in the model's own terms and checks that the plan never
/// deletes a needed object and deletes exactly the rest it may delete.
#[cfg(test)]
mod model_tests {
    use super::*;
    use proptest::prelude::*;

    const HOUR: i64 = 3600;

    #[derive(Debug, Clone)]
    struct B {
        /// Hours before now.
        age: i64,
        /// Data objects it stores itself.
        own: u32,
        /// Objects of earlier finished backups it reads (picked by index).
        refs: Vec<prop::sample::Index>,
        /// Finished (has a manifest)?
        manifest: bool,
        /// Hours before now of its last write, when it has no manifest;
        /// `None`: the store does not tell.
        last_write: Option<i64>,
        /// Wrote its `started` marker?
        marker: bool,
        /// System id 8 instead of 7 (a re-initialised cluster).
        other_system: bool,
    }

    fn backup() -> impl Strategy<Value = B> {
        (
            0i64..400,
            0u32..3,
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            prop::bool::weighted(0.75),
            prop::option::weighted(0.85, 0i64..60),
            any::<bool>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(
                |(age, own, refs, manifest, last_write, marker, other_system)| B {
                    age,
                    own,
                    refs,
                    manifest,
                    last_write,
                    marker,
                    other_system,
                },
            )
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            prop::option::of(1usize..5),
            prop::option::of((1u64..300).prop_map(|h| Duration::from_secs(h * 3600))),
        )
            .prop_map(|(keep, keep_within)| Policy { keep, keep_within })
    }

    struct World {
        backups: Vec<PgBackup>,
        stored: Vec<Stored>,
        wal: Vec<PgWal>,
        /// Every object a manifest-less backup that may still be running
        /// needs: its own, what it reads, the WAL from its start on.
        running_needs: BTreeSet<String>,
        running: BTreeSet<String>,
        /// Objects of each manifest-less directory, by id.
        orphan_objects: BTreeMap<String, Vec<String>>,
        /// Own objects (data and marker) of each finished backup, by id.
        own_objects: BTreeMap<String, Vec<String>>,
    }

    fn build(hist: &[B], now: DateTime<Utc>, orphan_age: Duration, wal_segs: u32) -> World {
        let mut hist = hist.to_vec();
        hist.sort_by_key(|b| std::cmp::Reverse(b.age));
        let mut w = World {
            backups: Vec::new(),
            stored: Vec::new(),
            wal: Vec::new(),
            running_needs: BTreeSet::new(),
            running: BTreeSet::new(),
            orphan_objects: BTreeMap::new(),
            own_objects: BTreeMap::new(),
        };
        // Objects that finished backups made readable so far.
        let mut readable: Vec<String> = Vec::new();
        let mut systems = BTreeSet::new();
        for (rank, b) in hist.iter().enumerate() {
            let sys = if b.other_system { 8 } else { 7 };
            systems.insert(sys);
            let id = format!("{:06}-{rank:02}", 1_000_000 - b.age);
            let time = now - chrono::Duration::seconds(b.age * HOUR);
            let start = (0u32, 2 * rank as u32 + 1);
            let dir = format!("pg/main/{sys}/backups/{id}");
            let modified = if b.manifest {
                Some(time)
            } else {
                b.last_write
                    .map(|h| now - chrono::Duration::seconds(h * HOUR))
            };
            let mut own: Vec<String> = (0..b.own).map(|n| format!("{dir}/data/{n:08x}")).collect();
            let mut objects: Vec<(String, &'static str)> =
                own.iter().map(|k| (k.clone(), "data")).collect();
            if b.marker || (!b.manifest && b.own == 0) {
                objects.push((format!("{dir}/started"), "marker"));
            }
            for (key, kind) in &objects {
                w.stored.push(Stored {
                    key: key.clone(),
                    id: id.clone(),
                    kind,
                    modified,
                });
            }
            let refs: Vec<String> = if readable.is_empty() {
                Vec::new()
            } else {
                b.refs
                    .iter()
                    .map(|i| readable[i.index(readable.len())].clone())
                    .collect()
            };
            let keys: Vec<String> = objects.into_iter().map(|(k, _)| k).collect();
            if b.manifest {
                own.extend(refs);
                w.backups.push(PgBackup {
                    item: Item {
                        id: id.clone(),
                        time,
                    },
                    manifest: format!("{dir}/manifest"),
                    system_id: sys,
                    start_pos: start,
                    reads: own.clone(),
                });
                readable.extend(keys.iter().filter(|k| k.contains("/data/")).cloned());
                w.own_objects.insert(id, keys);
            } else {
                // The model's own rule, not the planner's: a directory
                // written to within orphan_age, or of unknown age, may
                // belong to a backup still running.
                let age = chrono::Duration::from_std(orphan_age).expect("age");
                if modified.is_none_or(|t| now - t < age) {
                    w.running.insert(id.clone());
                    w.running_needs.extend(keys.iter().cloned());
                    w.running_needs.extend(refs);
                    for s in start.1..wal_segs {
                        w.running_needs.insert(wal_key(sys, s));
                    }
                }
                w.orphan_objects.insert(id, keys);
            }
        }
        for sys in systems {
            for s in 0..wal_segs {
                w.wal.push(PgWal {
                    key: wal_key(sys, s),
                    system_id: sys,
                    pos: (0, s),
                });
            }
        }
        w
    }

    fn wal_key(sys: u64, s: u32) -> String {
        format!("pg/main/{sys}/wal/00000001/00000000/00000001000000000000{s:04X}-h")
    }

    /// The backups a policy keeps, stated as what it promises: the newest,
    /// the `keep` newest, and every point of the last `keep_within`
    /// restorable (so the newest backup at or before its start too).
    fn kept_by_policy(backups: &[PgBackup], p: &Policy, now: DateTime<Utc>) -> BTreeSet<String> {
        let mut newest_first: Vec<&PgBackup> = backups.iter().collect();
        newest_first.sort_by(|a, b| (b.item.time, &b.item.id).cmp(&(a.item.time, &a.item.id)));
        let mut kept = BTreeSet::new();
        for (rank, b) in newest_first.iter().enumerate() {
            let t = b.item.time;
            let by_count = p.keep.is_some_and(|n| rank < n);
            let by_window = p.keep_within.is_some_and(|d| {
                let start = now - chrono::Duration::from_std(d).expect("duration");
                // Inside the window, or the last backup before its start
                // (no other backup lies between it and the start).
                t > start
                    || !newest_first.iter().any(|o| {
                        o.item.time <= start && (o.item.time, &o.item.id) > (t, &b.item.id)
                    })
            });
            if rank == 0 || by_count || by_window || p.is_empty() {
                kept.insert(b.item.id.clone());
            }
        }
        kept
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn expire_never_deletes_what_is_needed_and_deletes_the_rest(
            hist in prop::collection::vec(backup(), 0..9),
            p in policy(),
            orphan_age_h in 1u64..48,
            wal_segs in 0u32..24,
        ) {
            let now = DateTime::from_timestamp(1_800_000_000, 0).expect("now");
            let orphan_age = Duration::from_secs(orphan_age_h * 3600);
            let w = build(&hist, now, orphan_age, wal_segs);
            let plan = plan_pg("main", &w.backups, &w.stored, &w.wal, &p, now, orphan_age);
            let deleted: BTreeSet<&str> = plan.deletions.iter().map(|d| d.key.as_str()).collect();
            prop_assert_eq!(deleted.len(), plan.deletions.len(), "a key planned twice");

            // What is needed.
            let kept = kept_by_policy(&w.backups, &p, now);
            let mut needed: BTreeSet<String> = w.running_needs.clone();
            let mut oldest_start: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
            for b in w.backups.iter().filter(|b| kept.contains(&b.item.id)) {
                needed.insert(b.manifest.clone());
                needed.extend(b.reads.iter().cloned());
                let e = oldest_start.entry(b.system_id).or_insert(b.start_pos);
                *e = (*e).min(b.start_pos);
            }
            for wal in &w.wal {
                if oldest_start.get(&wal.system_id).is_some_and(|s| wal.pos >= *s) {
                    needed.insert(wal.key.clone());
                }
            }
            // With no backup at all, WAL is all there is.
            if kept.is_empty() {
                needed.extend(w.wal.iter().map(|x| x.key.clone()));
            }
            for k in &deleted {
                prop_assert!(!needed.contains(*k), "{} is needed but planned for deletion", k);
            }
            let running: BTreeSet<String> = plan.running.iter().cloned().collect();
            prop_assert_eq!(&running, &w.running);

            // What may go, and so must: manifests of expired backups; their
            // data and orphans' objects unless a kept backup reads them;
            // WAL no kept backup needs. Expired data and WAL wait while a
            // backup may be running.
            let mut expect: BTreeSet<String> = BTreeSet::new();
            let reads: BTreeSet<&String> = w
                .backups
                .iter()
                .filter(|b| kept.contains(&b.item.id))
                .flat_map(|b| &b.reads)
                .collect();
            let quiet = w.running.is_empty();
            for b in w.backups.iter().filter(|b| !kept.contains(&b.item.id)) {
                expect.insert(b.manifest.clone());
                if quiet {
                    expect.extend(w.own_objects[&b.item.id].iter().filter(|k| !reads.contains(k)).cloned());
                }
            }
            for (id, keys) in &w.orphan_objects {
                if !w.running.contains(id) {
                    expect.extend(keys.iter().filter(|k| !reads.contains(k)).cloned());
                }
            }
            if quiet && !kept.is_empty() {
                expect.extend(w.wal.iter().filter(|x| !needed.contains(&x.key)).map(|x| x.key.clone()));
            }
            let got: BTreeSet<String> = deleted.iter().map(|k| k.to_string()).collect();
            prop_assert_eq!(got, expect);

            // Manifests go first.
            let first_other = plan.deletions.iter().position(|d| d.kind != "manifest").unwrap_or(plan.deletions.len());
            prop_assert!(plan.deletions[first_other..].iter().all(|d| d.kind != "manifest"));
            let decided: BTreeSet<String> = plan.decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect();
            prop_assert_eq!(decided, kept);
        }
    }
}
