//! Retention against real servers: what `dr expire` deletes, that every kept
//! backup still restores, and that Object Lock is respected.

mod common;

use std::collections::BTreeSet;

use common::pg::{TestPg, fs_repo, mark, restore_and_check};
use common::redis::{DrSetup, TestRedis};
use common::{require_env, s3_region_toml, unique};

use common::json_of as json;

fn add_to_config(pg: &TestPg, text: &str) {
    let mut c = std::fs::read_to_string(&pg.cfg).expect("cfg");
    c.push_str(text);
    std::fs::write(&pg.cfg, c).expect("cfg");
}

fn backup_ids(pg: &TestPg) -> Vec<String> {
    let v = json(&pg.dr(&["--json", "list", "pg"]));
    v["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn expire_keeps_shared_blocks_and_wal_and_every_kept_backup_restores() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    add_to_config(&pg, "\n[postgres.main.retention]\nkeep_full = 2\n");
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "300", "-n"]);
    pg.archive_now();
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "300", "-n"]);
    let m2 = mark(&pg);
    pg.pgbench(&["-t", "300", "-n"]);
    pg.archive_now();
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "300", "-n"]);
    let m3 = mark(&pg);
    pg.pgbench(&["-t", "100", "-n"]);
    let last_balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let last_history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();
    let ids = backup_ids(&pg);
    assert_eq!(ids.len(), 3);

    // The dry run: the oldest backup goes; the blocks later backups read stay.
    let v = json(&pg.dr(&["--json", "expire", "--dry-run"]));
    let plan = &v["plans"][0];
    let decisions: Vec<(String, bool)> = plan["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .map(|d| (d["id"].as_str().expect("id").to_string(), d["keep"] == true))
        .collect();
    assert_eq!(
        decisions,
        [
            (ids[2].clone(), true),
            (ids[1].clone(), true),
            (ids[0].clone(), false)
        ]
    );
    assert!(
        plan["kept_shared"].as_u64().expect("kept_shared") > 0,
        "{plan}"
    );
    let planned: BTreeSet<String> = plan["deletions"]
        .as_array()
        .expect("deletions")
        .iter()
        .map(|d| d["key"].as_str().expect("key").to_string())
        .collect();
    let kinds: BTreeSet<&str> = plan["deletions"]
        .as_array()
        .expect("deletions")
        .iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect();
    // Data objects of the expired backup go only if no kept backup reads
    // them; after small changes every one of its objects is still read.
    assert!(
        kinds.contains("manifest") && kinds.contains("wal"),
        "{plan}"
    );
    assert!(
        kinds.is_subset(&BTreeSet::from(["manifest", "marker", "data", "wal"])),
        "{plan}"
    );
    assert_eq!(
        plan["deletions"][0]["kind"], "manifest",
        "manifests go first"
    );
    // The human table says the same, and nothing changed.
    let text = String::from_utf8_lossy(&pg.dr(&["expire", "--dry-run"]).stdout).into_owned();
    assert!(
        text.contains("ID") && text.contains("ACTION") && text.contains("WHY"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&ids[0]) && l.contains("delete")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} object(s) would be deleted", planned.len())),
        "{text}"
    );
    assert_eq!(backup_ids(&pg).len(), 3);

    let v = json(&pg.dr(&["--json", "expire"]));
    let done = &v["expire"][0];
    let deleted: BTreeSet<String> = done["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .map(|k| k.as_str().expect("key").to_string())
        .collect();
    assert_eq!(deleted, planned, "expire did exactly what the dry run said");
    assert_eq!(backup_ids(&pg), ids[1..].to_vec());

    // Every kept backup restores to points in its window, including the one
    // whose unchanged blocks live in the expired backup's objects.
    restore_and_check(&mut pg, &m2.at, "r2", &m2.balance, &m2.history);
    restore_and_check(&mut pg, &m3.at, "r3", &m3.balance, &m3.history);
    restore_and_check(&mut pg, "latest", "rl", &last_balance, &last_history);
    assert_eq!(
        json(&pg.dr(&["--json", "verify", "--read-data"]))["ok"],
        true
    );
    // Expiry is audited.
    let recs = dr::audit::AuditLog::at(pg.dir.path().join("audit.jsonl"))
        .read_all()
        .expect("audit");
    assert!(
        recs.iter()
            .any(|r| r.action == "expire" && r.phase == "finished" && r.outcome == "ok"),
        "{recs:?}"
    );
}

#[test]
fn expire_skips_objects_under_object_lock_and_keeps_the_backup_whole() {
    let fs = tempfile::tempdir().expect("tempdir");
    let locked = s3_region_toml(
        "locked",
        &require_env("DR_TEST_MOTO_ENDPOINT", "moto (S3 with Object Lock)"),
        &require_env("DR_TEST_MOTO_LOCK_BUCKET", "moto (S3 with Object Lock)"),
        &unique("x"),
        &require_env("DR_TEST_MOTO_REGION", "moto (S3 with Object Lock)"),
        "DR_TEST_MOTO_ACCESS_KEY_ID",
        "DR_TEST_MOTO_SECRET_ACCESS_KEY",
        "object_lock_days = 1\nobject_lock_mode = \"governance\"",
    );
    let mut pg = TestPg::new(&format!("{}\n{locked}", fs_repo(&fs)));
    add_to_config(&pg, "\n[postgres.main.retention]\nkeep_full = 1\n");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "200", "-n"]);
    let m = mark(&pg);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    pg.dr(&["backup", "pg"]);
    let ids = backup_ids(&pg);
    assert_eq!(ids.len(), 2);

    let o = pg.dr(&["expire"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("locked until"), "{text}");
    assert!(text.contains("skipped"), "{text}");
    // The locked region still holds the old backup, whole: it stays listed
    // and restorable.
    assert_eq!(backup_ids(&pg), ids);
    restore_and_check(&mut pg, &m.at, "locked", &m.balance, &m.history);
}

#[test]
fn redis_snapshots_expire_by_count() {
    let src = TestRedis::start(&["repl-diskless-sync no"]);
    src.populate(1000);
    let repo = tempfile::tempdir().expect("tempdir");
    let section = format!(
        "[redis.cache]\nurl = \"{}\"\n\n[redis.cache.retention]\nkeep_snapshots = 2\n",
        src.url()
    );
    let dr = DrSetup::new(
        &common::fs_region_toml("local", &repo.path().join("repo")),
        &section,
    );
    for _ in 0..4 {
        dr.dr(&["backup", "redis"]);
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let before: Vec<String> = dr.dr_json(&["list", "redis"])["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(before.len(), 4);
    let v = dr.dr_json(&["expire"]);
    // Manifest, rdb and running marker of each of the two oldest.
    assert_eq!(
        v["expire"][0]["deleted"].as_array().map(|a| a.len()),
        Some(6)
    );
    let after: Vec<String> = dr.dr_json(&["list", "redis"])["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(after, before[2..].to_vec());
}
