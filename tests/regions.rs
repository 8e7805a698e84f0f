//! Multi-region repositories against real servers: one fs region, Garage and
//! moto (with S3 Object Lock). Degraded writes, repair with `dr repo sync`,
//! `dr verify --list/--read-data`, read fallback during restore.

mod common;

use common::walk_files as walk;

use common::pg::{TestPg, fs_repo, mark, restore_and_check};
use common::{Gate, require_env, s3_region_toml, unique};

fn garage_toml(name: &str, endpoint: &str, prefix: &str) -> String {
    s3_region_toml(
        name,
        endpoint,
        &require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
        prefix,
        &require_env("DR_TEST_S3_REGION", "Garage (S3)"),
        "DR_TEST_S3_ACCESS_KEY_ID",
        "DR_TEST_S3_SECRET_ACCESS_KEY",
        "",
    )
}

fn moto_toml(name: &str, bucket: &str, prefix: &str, extra: &str) -> String {
    s3_region_toml(
        name,
        &require_env("DR_TEST_MOTO_ENDPOINT", "moto (S3 with Object Lock)"),
        bucket,
        prefix,
        &require_env("DR_TEST_MOTO_REGION", "moto (S3 with Object Lock)"),
        "DR_TEST_MOTO_ACCESS_KEY_ID",
        "DR_TEST_MOTO_SECRET_ACCESS_KEY",
        extra,
    )
}

fn set_min_regions(pg: &TestPg, n: usize) {
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let text = text.replacen(
        "[repository]\n",
        &format!("[repository]\nmin_regions = {n}\n"),
        1,
    );
    std::fs::write(&pg.cfg, text).expect("cfg");
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn tally<'a>(v: &'a serde_json::Value, region: &str) -> &'a serde_json::Value {
    v["verify"]["regions"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["region"] == region))
        .unwrap_or_else(|| panic!("no region {region} in {v}"))
}

fn s3_store(
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    region: &str,
    key: &str,
    secret: &str,
    object_lock: Option<dr::config::ObjectLock>,
) -> dr::store::Store {
    let cfg = dr::config::S3Region {
        endpoint: Some(endpoint.to_string()),
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        s3_region: region.to_string(),
        path_style: true,
        access_key_id: Some(dr::config::SecretSource::Literal(key.to_string())),
        secret_access_key: Some(dr::config::SecretSource::Literal(secret.to_string())),
        part_size: 8 << 20,
        object_lock,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    dr::store::Store::S3(
        rt.block_on(dr::store::S3Store::connect(&cfg))
            .expect("s3 client"),
    )
}

#[test]
fn degraded_region_then_sync_and_object_lock() {
    let garage = require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)");
    let gate = Gate::start(common::endpoint_port(&garage));
    let via_gate = format!("http://127.0.0.1:{}", gate.port);
    let fs = tempfile::tempdir().expect("tempdir");
    let (gprefix, mprefix) = (unique("g"), unique("m"));
    let lock_bucket = require_env("DR_TEST_MOTO_LOCK_BUCKET", "moto (S3 with Object Lock)");
    let regions = format!(
        "{}\n{}\n{}",
        fs_repo(&fs),
        garage_toml("garage", &via_gate, &gprefix),
        moto_toml(
            "locked",
            &lock_bucket,
            &mprefix,
            "object_lock_days = 1\nobject_lock_mode = \"governance\""
        ),
    );
    let mut pg = TestPg::new(&regions);
    set_min_regions(&pg, 2);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "200", "-n"]);
    pg.archive_now();

    // Garage becomes unreachable mid-way through the workload.
    gate.set_open(false);
    pg.pgbench(&["-t", "200", "-n"]);
    pg.archive_now();
    let o = pg.dr(&["--json", "backup", "pg"]);
    let v = json(&o);
    assert_eq!(v["degraded"][0]["region"], "garage", "{v}");
    pg.pgbench(&["-t", "200", "-n"]);
    let m = mark(&pg);
    // Recovery proves it reached the target only by replaying a later commit.
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    // Archiving kept up: the last segment is in the two healthy regions.
    let failed = pg.sql("SELECT failed_count FROM pg_stat_archiver");
    assert_eq!(
        failed, "0",
        "archive_command failed while one region was down"
    );
    let o = pg.dr_raw(&["--json", "check"]);
    let v = json(&o);
    let quorum = v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "write quorum"))
        .unwrap_or_else(|| panic!("no quorum line: {v}"));
    assert_eq!(quorum["status"], "warn", "{v}");
    let o = pg.dr_raw(&["--json", "verify", "--list"]);
    assert!(!o.status.success());
    assert!(tally(&json(&o), "garage")["unreachable"].is_string());

    // Back up: garage lacks what was written meanwhile, sync copies it.
    gate.set_open(true);
    let o = pg.dr_raw(&["--json", "verify", "pg", "--list"]);
    assert!(!o.status.success());
    let v = json(&o);
    let missing = tally(&v, "garage")["missing"].as_u64().expect("missing");
    assert!(missing > 0, "{v}");
    assert_eq!(tally(&v, "local")["missing"], 0);
    assert_eq!(tally(&v, "locked")["missing"], 0);
    let o = pg.dr(&["--json", "repo", "sync"]);
    let v = json(&o);
    let g = v["sync"]["regions"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["region"] == "garage"))
        .expect("garage in sync report");
    assert!(g["copied"].as_u64().expect("copied") >= missing, "{v}");
    let o = pg.dr(&["--json", "verify", "--list"]);
    assert_eq!(json(&o)["ok"], true);

    // Restore exactly, now that all regions are complete.
    restore_and_check(&mut pg, &m.at, "after-sync", &m.balance, &m.history);

    // Object Lock: the locked region's objects cannot be deleted, and dr says so.
    let locked = s3_store(
        &require_env("DR_TEST_MOTO_ENDPOINT", "moto"),
        &lock_bucket,
        &mprefix,
        &require_env("DR_TEST_MOTO_REGION", "moto"),
        &require_env("DR_TEST_MOTO_ACCESS_KEY_ID", "moto"),
        &require_env("DR_TEST_MOTO_SECRET_ACCESS_KEY", "moto"),
        Some(dr::config::ObjectLock {
            days: 1,
            compliance: false,
        }),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let objects = rt.block_on(locked.list("pg/")).expect("list locked region");
    let data = objects
        .iter()
        .find(|o| o.key.contains("/data/"))
        .expect("a data object in the locked region");
    let err = rt
        .block_on(locked.delete(&data.key))
        .expect_err("deleting a locked object must fail");
    assert!(err.to_string().contains("locked until"), "{err}");
    assert_eq!(
        rt.block_on(locked.head(&data.key)).expect("head"),
        Some(data.size)
    );
    let o = pg.dr(&["--json", "repo", "selftest", "--size", "100000"]);
    let v = json(&o);
    assert_eq!(v["selftest"]["cleaned_up"], false);
    assert!(
        v["selftest"]["cleanup_notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("[locked]") && n.contains("locked until")),
        "{v}"
    );
}

#[test]
fn verify_names_bad_copies_restore_reads_good_ones_and_sync_repairs() {
    let fs = tempfile::tempdir().expect("tempdir");
    let garage = require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)");
    let gprefix = unique("g");
    let regions = format!(
        "{}\n{}\n{}",
        fs_repo(&fs),
        garage_toml("garage", &garage, &gprefix),
        moto_toml("moto", &unique("plain"), "r", ""),
    );
    let mut pg = TestPg::new(&regions);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "300", "-n"]);
    let m = mark(&pg);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    let o = pg.dr(&["--json", "verify", "--read-data"]);
    assert_eq!(json(&o)["ok"], true);

    // A flipped byte in the fs copy of a data object.
    let data_dir = walk(&fs.path().join("repo/pg"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/data/"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a data object");
    let mut bytes = std::fs::read(&data_dir).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&data_dir, &bytes).expect("write");
    let flipped_key = data_dir
        .strip_prefix(fs.path().join("repo"))
        .expect("prefix")
        .to_string_lossy()
        .into_owned();

    // A WAL segment the restore needs, deleted from Garage.
    let store = s3_store(
        &garage,
        &require_env("DR_TEST_S3_BUCKET", "Garage"),
        &gprefix,
        &require_env("DR_TEST_S3_REGION", "Garage"),
        &require_env("DR_TEST_S3_ACCESS_KEY_ID", "Garage"),
        &require_env("DR_TEST_S3_SECRET_ACCESS_KEY", "Garage"),
        None,
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let wal: Vec<_> = rt
        .block_on(store.list("pg/"))
        .expect("list")
        .into_iter()
        .filter(|o| o.key.contains("/wal/") && !o.key.contains(".history"))
        .collect();
    let victim = wal.get(wal.len() / 2).expect("WAL in garage").key.clone();
    rt.block_on(store.delete(&victim)).expect("delete");

    let o = pg.dr_raw(&["--json", "verify", "--read-data"]);
    assert!(!o.status.success(), "verify must fail");
    let v = json(&o);
    let problems = v["verify"]["problems"].as_array().expect("problems");
    let has = |region: &str, key: &str, kind: &str| {
        problems
            .iter()
            .any(|p| p["region"] == region && p["key"] == key && p["kind"] == kind)
    };
    assert!(has("local", &flipped_key, "corrupt"), "{v}");
    assert!(has("garage", &victim, "missing"), "{v}");
    assert_eq!(problems.len(), 2, "{v}");
    let text = String::from_utf8_lossy(&pg.dr_raw(&["verify", "--read-data"]).stdout).into_owned();
    assert!(
        text.contains(&flipped_key) && text.contains(&victim),
        "{text}"
    );

    // Restore reads the good copies (local is preferred but bad).
    restore_and_check(&mut pg, &m.at, "fallback", &m.balance, &m.history);

    let o = pg.dr(&["--json", "repo", "sync", "--read-data"]);
    let v = json(&o);
    let region = |n: &str| {
        v["sync"]["regions"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["region"] == n))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(region("local")["replaced"], 1, "{v}");
    assert_eq!(region("garage")["copied"], 1, "{v}");
    let o = pg.dr(&["--json", "verify", "--read-data"]);
    assert_eq!(json(&o)["ok"], true);
}

#[test]
fn check_warns_when_a_locked_bucket_is_used_without_object_lock_days() {
    let lock_bucket = require_env("DR_TEST_MOTO_LOCK_BUCKET", "moto (S3 with Object Lock)");
    let regions = moto_toml("locked", &lock_bucket, &unique("w"), "");
    let dr = common::redis::DrSetup::new(&regions, "");
    let o = dr.dr_raw(&["--json", "check"]);
    let v = json(&o);
    let item = v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "object lock in locked"))
        .unwrap_or_else(|| panic!("no object lock warning: {v}"));
    assert_eq!(item["status"], "warn");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("object_lock_days")),
        "{item}"
    );
}

#[test]
fn a_single_region_is_written_again_as_soon_as_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&dir));
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let segment = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let path = pg.data.join("pg_wal").join(&segment);
    let path = path.to_str().expect("utf8");
    let repo = dir.path().join("repo");
    let chmod = |mode: &str| {
        let st = std::process::Command::new("chmod")
            .args(["-R", mode])
            .arg(&repo)
            .status()
            .expect("chmod");
        assert!(st.success(), "chmod -R {mode}");
    };

    // The only region refuses writes (listing still works, so the failure
    // is the write's own and is remembered for the next runs).
    chmod("a-w");
    pg.sql("SELECT pg_switch_wal()");
    let o = pg.dr_raw(&["wal-push", path]);
    chmod("u+w");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "wal-push to a read-only region: {e}");
    let health = pg.dir.path().join("state/region-health.json");
    let remembered = std::fs::read_to_string(&health).unwrap_or_default();
    assert!(
        remembered.contains("local"),
        "no failure remembered in {health:?}: {remembered:?}; {e}"
    );

    // Writable again: the next run writes to it at once instead of skipping
    // it for a minute, since there is no other region to skip to.
    let o = pg.dr_raw(&["wal-push", path]);
    assert!(
        o.status.success(),
        "wal-push right after the region came back: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
