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
}

/// Everything one source's expiry would do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourcePlan {
    /// `pg` or `redis`.
    pub kind: String,
    /// Cluster or instance name.
    pub name: String,
    /// One decision per backup/snapshot.
    pub decisions: Vec<Decision>,
    /// Objects to delete, manifests first.
    pub deletions: Vec<Deletion>,
    /// Objects kept only because a kept backup references them.
    pub kept_shared: usize,
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

/// Plans one PostgreSQL cluster. `data` is every data-object key of every
/// backup directory (listed), so objects of expired backups are found even
/// when no manifest lists them any more.
pub fn plan_pg(
    name: &str,
    backups: &[PgBackup],
    data: &[String],
    wal: &[PgWal],
    policy: &Policy,
    now: DateTime<Utc>,
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
            });
            expired.insert(d.id.as_str());
        }
    }
    let referenced: BTreeSet<&str> = backups
        .iter()
        .filter(|b| kept.contains(b.item.id.as_str()))
        .flat_map(|b| b.reads.iter().map(String::as_str))
        .collect();
    // A data object may go when its backup expires now, or when its backup
    // has no manifest (interrupted, or expired earlier while still read) and
    // is older than the newest complete backup (a running backup has no
    // manifest yet either) — and in both cases no kept backup reads it.
    let known: BTreeSet<&str> = backups.iter().map(|b| b.item.id.as_str()).collect();
    let newest = known.iter().next_back().copied();
    let mut kept_shared = 0;
    let mut data_deletions = Vec::new();
    for key in data {
        let Some(id) = key.split('/').nth(4) else {
            continue;
        };
        let why = if expired.contains(id) {
            format!("stored by expired backup {id}, read by no kept backup")
        } else if !known.contains(id) && newest.is_some_and(|n| id < n) {
            format!("left by backup {id}, which has no manifest, read by no kept backup")
        } else {
            continue;
        };
        if referenced.contains(key.as_str()) {
            kept_shared += 1;
        } else {
            data_deletions.push((
                id,
                Deletion {
                    key: key.clone(),
                    kind: "data".into(),
                    why,
                },
            ));
        }
    }
    // Newest backup first, like the decisions.
    data_deletions.sort_by(|a, b| b.0.cmp(a.0));
    deletions.extend(data_deletions.into_iter().map(|(_, d)| d));
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
    // Only when something was kept: with no backups at all, WAL is all there is.
    if !kept.is_empty() {
        for w in wal {
            let why = match oldest.get(&w.system_id) {
                Some((pos, id)) if w.pos < *pos => {
                    format!("before the start of the oldest kept backup {id}")
                }
                Some(_) => continue,
                None => format!("system {} has no kept backup", w.system_id),
            };
            deletions.push(Deletion {
                key: w.key.clone(),
                kind: "wal".into(),
                why,
            });
        }
    }
    SourcePlan {
        kind: "pg".into(),
        name: name.into(),
        decisions,
        deletions,
        kept_shared,
    }
}

/// A Redis snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct RedisSnap {
    /// Id and time.
    pub item: Item,
    /// Manifest key.
    pub manifest: String,
    /// RDB key.
    pub rdb: String,
}

/// Plans one Redis instance.
pub fn plan_redis(
    name: &str,
    snaps: &[RedisSnap],
    policy: &Policy,
    now: DateTime<Utc>,
) -> SourcePlan {
    let items: Vec<Item> = snaps.iter().map(|s| s.item.clone()).collect();
    let decisions = decide(&items, policy, now);
    let by_id: BTreeMap<&str, &RedisSnap> = snaps.iter().map(|s| (s.item.id.as_str(), s)).collect();
    let mut manifests = Vec::new();
    let mut rdbs = Vec::new();
    for d in decisions.iter().filter(|d| !d.keep) {
        if let Some(s) = by_id.get(d.id.as_str()) {
            let why = format!("snapshot {} expires: {}", d.id, d.why);
            manifests.push(Deletion {
                key: s.manifest.clone(),
                kind: "manifest".into(),
                why: why.clone(),
            });
            rdbs.push(Deletion {
                key: s.rdb.clone(),
                kind: "rdb".into(),
                why,
            });
        }
    }
    manifests.extend(rdbs);
    SourcePlan {
        kind: "redis".into(),
        name: name.into(),
        decisions,
        deletions: manifests,
        kept_shared: 0,
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
        // b0 crashed before its manifest; b5 is running now.
        let data: Vec<String> = [
            d("b0", 0),
            d("b1", 0),
            d("b1", 1),
            d("b2", 0),
            d("b3", 0),
            d("b4", 0),
            d("b5", 0),
        ]
        .into();
        let wal: Vec<PgWal> = (1..=12)
            .map(|s| PgWal {
                key: format!("pg/main/7/wal/00000001/00000000/0000000100000000000000{s:02X}-h"),
                system_id: 7,
                pos: (0, s),
            })
            .collect();
        let policy = Policy {
            keep: Some(1),
            keep_within: Some(Duration::from_secs(7 * 86400)),
        };
        let p = plan_pg(
            "main",
            &backups,
            &data,
            &wal,
            &policy,
            t("2026-11-25T00:00:00Z"),
        );
        let expected = "\
b4 keep   newest; one of the 1 newest (keep_full/keep_snapshots); inside keep_within (after 2026-11-18T00:00:00Z)
b3 keep   inside keep_within (after 2026-11-18T00:00:00Z)
b2 keep   base of the keep_within window (restores to 2026-11-18T00:00:00Z)
b1 delete beyond the policy (keep 1, keep_within 7days)
  - manifest pg/main/7/backups/b1/manifest (backup b1 expires: beyond the policy (keep 1, keep_within 7days))
  - data pg/main/7/backups/b1/data/00000000 (stored by expired backup b1, read by no kept backup)
  - data pg/main/7/backups/b0/data/00000000 (left by backup b0, which has no manifest, read by no kept backup)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000001-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000002-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000003-h (before the start of the oldest kept backup b2)
  - wal pg/main/7/wal/00000001/00000000/000000010000000000000004-h (before the start of the oldest kept backup b2)
";
        assert_eq!(table(&p), expected);
        assert_eq!(p.kept_shared, 1, "b1's object 1 is read by kept backups");
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
        let snaps: Vec<RedisSnap> = (1..=4)
            .map(|i| RedisSnap {
                item: Item {
                    id: format!("s{i}"),
                    time: t(&format!("2026-11-2{i}T00:00:00Z")),
                },
                manifest: format!("redis/c/snapshots/s{i}/manifest"),
                rdb: format!("redis/c/snapshots/s{i}/rdb"),
            })
            .collect();
        let policy = Policy {
            keep: Some(2),
            keep_within: None,
        };
        let p = plan_redis("c", &snaps, &policy, t("2026-11-25T00:00:00Z"));
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
            ]
        );
    }
}
