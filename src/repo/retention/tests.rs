//! Unit tests.

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
