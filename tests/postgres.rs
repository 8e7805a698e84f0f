//! PostgreSQL backup, WAL archiving and point-in-time restore against a real
//! PostgreSQL 15, with an fs repository and with a Garage S3 repository.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::pg::{TestPg, free_port, fs_repo, mark, restore_and_check};
use common::walk_files as walk;

fn exact_pitr(regions: &str) {
    let mut pg = TestPg::new(regions);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg"]);
    let mut marks = Vec::new();
    for _ in 0..3 {
        pg.pgbench(&["-t", "300", "-c", "2", "-n"]);
        marks.push(mark(&pg));
    }
    pg.pgbench(&["-t", "300", "-n"]);
    let final_balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let final_history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();

    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(v["backups"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(v["windows"].as_array().map(|a| a.len()), Some(1));

    for (i, m) in marks.iter().enumerate() {
        restore_and_check(&mut pg, &m.at, &format!("r{i}"), &m.balance, &m.history);
    }
    restore_and_check(&mut pg, "latest", "rlatest", &final_balance, &final_history);

    // Every restore left a started and a finished line in the audit log.
    let log = dr::audit::AuditLog::at(pg.dir.path().join("audit.jsonl"));
    let recs = log.read_all().expect("audit log");
    let finished: Vec<_> = recs.iter().filter(|r| r.phase == "finished").collect();
    assert_eq!(recs.len(), 2 * (marks.len() + 1), "{recs:?}");
    assert_eq!(finished.len(), marks.len() + 1);
    for r in finished {
        assert_eq!(
            (r.action.as_str(), r.outcome.as_str()),
            ("restore.pg", "ok")
        );
        assert_eq!(r.target, "main");
        assert!(r.details["backup"].is_string(), "{:?}", r.details);
    }
}

#[test]
fn exact_pitr_fs() {
    let dir = tempfile::tempdir().expect("tempdir");
    exact_pitr(&fs_repo(&dir));
}

#[test]
fn exact_pitr_garage() {
    exact_pitr(&common::garage_region_toml("garage"));
}

#[test]
fn restore_follows_timelines_after_promotion() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "200", "-n"]);
    let a = mark(&pg);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();

    // Disaster: restore the latest state and promote it; it keeps archiving
    // (timeline 2) into the same repository and becomes the new primary.
    let promoted = pg.target("promoted");
    let p2 = free_port();
    pg.track(promoted.clone());
    pg.dr(&[
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        promoted.to_str().expect("utf8"),
        "--start",
        "--port",
        &p2.to_string(),
    ]);
    assert_eq!(
        pg.sql_at(p2, "SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    let cfg2 = pg.config_for(&promoted, p2, "dr2.toml");
    pg.pgbench_at(p2, &["-t", "100", "-n"]);
    pg.dr_with(&cfg2, &["backup", "pg"]);
    pg.pgbench_at(p2, &["-t", "100", "-n"]);
    sleep(Duration::from_millis(600));
    let b_at = pg.sql_at(
        p2,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let b_balance = pg.sql_at(p2, "SELECT sum(abalance) FROM pgbench_accounts");
    let b_history = pg.sql_at(p2, "SELECT count(*) FROM pgbench_history");
    sleep(Duration::from_millis(600));
    pg.pgbench_at(p2, &["-t", "50", "-n"]);
    pg.archive_now_at(p2);

    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let mut tls: Vec<u64> = v["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .filter_map(|w| w["timeline"].as_u64())
        .collect();
    // The first backup reaches timeline 2 too, through the switch point.
    tls.dedup();
    assert_eq!(tls, vec![1, 2], "{v}");

    // A point on timeline 2, and a point on timeline 1 before the promotion.
    restore_and_check(&mut pg, &b_at, "tl2", &b_balance, &b_history);
    restore_and_check(&mut pg, &a.at, "tl1", &a.balance, &a.history);
}

fn expect_fail(pg: &TestPg, args: &[&str], needles: &[&str]) -> String {
    let o = pg.dr_raw(args);
    assert!(!o.status.success(), "dr {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    for n in needles {
        assert!(e.contains(n), "dr {args:?}: expected {n:?} in: {e}");
    }
    e
}

#[test]
fn restore_bad_inputs_are_clear_and_leave_nothing() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    let t = pg.target("bad");
    let ts = t.to_str().expect("utf8");

    expect_fail(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "2000-01-01T00:00:00Z",
            "--target",
            ts,
        ],
        &[
            "before the end of the oldest usable backup",
            "recoverable window is",
        ],
    );
    expect_fail(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "2100-01-01 00:00:00+00",
            "--target",
            ts,
        ],
        &["after the last archived WAL", "recoverable window is"],
    );
    expect_fail(
        &pg,
        &["restore", "pg", "--to", "yesterday", "--target", ts],
        &["is not a time", "RFC 3339"],
    );

    std::fs::create_dir_all(&t).expect("mkdir");
    std::fs::write(t.join("keep.txt"), "precious").expect("write");
    expect_fail(
        &pg,
        &["restore", "pg", "--to", "latest", "--target", ts],
        &["is not empty"],
    );
    assert_eq!(
        std::fs::read_to_string(t.join("keep.txt")).expect("kept"),
        "precious"
    );
    std::fs::remove_dir_all(&t).expect("rm");

    // Tampered data object: restore fails naming the object, and removes what it wrote.
    let data_dir = repo_dir.path().join("repo");
    let objs: Vec<std::path::PathBuf> = walk(&data_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/data/"))
        .collect();
    assert!(!objs.is_empty());
    let victim = &objs[0];
    let orig = std::fs::read(victim).expect("read");
    let mut bad = orig.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    std::fs::write(victim, &bad).expect("tamper");
    expect_fail(
        &pg,
        &["restore", "pg", "--to", "latest", "--target", ts],
        &["corrupt", "no region has a valid copy"],
    );
    assert!(
        std::fs::read_dir(&t)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true),
        "half-restored files left behind"
    );

    // Missing data object.
    std::fs::remove_file(victim).expect("rm");
    expect_fail(
        &pg,
        &["restore", "pg", "--to", "latest", "--target", ts],
        &["not found"],
    );
    std::fs::write(victim, &orig).expect("restore object");

    // Wrong identity: a config whose identity is not a recipient of the repository.
    let other_id = pg.dir.path().join("other-identity.txt");
    pg.dr(&["keygen", "--output", other_id.to_str().expect("utf8")]);
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let idline = text
        .lines()
        .find(|l| l.starts_with("identity_file"))
        .expect("identity line")
        .to_string();
    let cfg3 = pg.dir.path().join("dr-wrongkey.toml");
    std::fs::write(
        &cfg3,
        text.replace(
            &idline,
            &format!("identity_file = \"{}\"", other_id.display()),
        ),
    )
    .expect("write");
    common::pg::chown(&cfg3, &pg.user);
    let o = pg.dr_raw_with(&cfg3, &["restore", "pg", "--to", "latest", "--target", ts]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("none of the configured age identities can decrypt"),
        "{e}"
    );
}

#[test]
fn manifest_paths_cannot_escape_the_target() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    pg.dr(&["backup", "pg"]);
    pg.archive_now();
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let cfg = dr::validate::load(&pg.cfg).expect("cfg");
        let repo = dr::repo::Repository::open(&cfg).await.expect("open");
        let cat = dr::postgres::catalog::Catalog::load(&repo, "main")
            .await
            .expect("catalog");
        let mut m = cat.backups[0].clone();
        m.files[0].path = "../../escaped-by-manifest".into();
        // Newer than the real backup, so `--to latest` picks this one.
        m.start_time += chrono::Duration::milliseconds(1);
        m.stop_time += chrono::Duration::milliseconds(1);
        let id = dr::repo::layout::BackupId::new(chrono::Utc::now());
        m.id = id.to_string();
        let key = dr::repo::layout::ObjectKey::PgManifest {
            cluster: "main".into(),
            system_id: m.system_id,
            backup: id,
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&m).expect("json"));
        let n = body.len() as u64;
        repo.put_encoded(&key, dr::store::once(body), Some(n))
            .await
            .expect("put");
    });
    common::pg::chown(&repo_dir.path().join("repo"), &pg.user);
    let t = pg.target("escape/inner");
    expect_fail(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            t.to_str().expect("utf8"),
        ],
        &["escapes the target"],
    );
    assert!(!pg.dir.path().join("escaped-by-manifest").exists());
}

#[test]
fn block_incremental_backup_stores_little_and_restores_exactly() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    pg.pgbench(&["-i", "-s", "5", "-q"]);
    let o = pg.dr(&["--json", "backup", "pg"]);
    let first: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let full_stored = first["backup"]["stored_size"].as_u64().expect("stored");
    assert!(first["backup"]["incremental_of"].is_null());

    // Change 1% of the rows.
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid <= 5000");
    let o = pg.dr(&["--json", "backup", "pg"]);
    let second: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let incr_stored = second["backup"]["stored_size"].as_u64().expect("stored");
    assert_eq!(second["backup"]["incremental_of"], first["backup"]["id"]);
    eprintln!("full backup stored {full_stored} bytes, incremental {incr_stored} bytes");
    assert!(
        incr_stored * 10 < full_stored,
        "incremental stored {incr_stored} bytes, not < 10% of the full backup's {full_stored}"
    );

    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();
    restore_and_check(&mut pg, "latest", "incr", &balance, &history);

    // --full stores every block again and references no earlier backup.
    let o = pg.dr(&["--json", "backup", "pg", "--full"]);
    let third: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(third["backup"]["incremental_of"].is_null(), "{third}");
    assert_eq!(third["backup"]["reused_bytes"], 0, "{third}");
    let third_stored = third["backup"]["stored_size"].as_u64().expect("stored");
    assert!(
        third_stored * 10 > full_stored * 9,
        "--full stored {third_stored} bytes, the first full backup {full_stored}"
    );

    // full_every: incremental while the base is young, full once it is old.
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    std::fs::write(&pg.cfg, format!("{text}full_every = \"1h\"\n")).expect("cfg");
    let o = pg.dr(&["--json", "backup", "pg"]);
    let fourth: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(fourth["backup"]["incremental_of"], third["backup"]["id"]);
    std::fs::write(&pg.cfg, format!("{text}full_every = \"1s\"\n")).expect("cfg");
    sleep(Duration::from_secs(2));
    let o = pg.dr(&["--json", "backup", "pg"]);
    let fifth: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(fifth["backup"]["incremental_of"].is_null(), "{fifth}");
}

#[test]
fn wal_push_is_idempotent_and_refuses_different_content() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g");
    let seg = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.archive_now();

    // A directory laid out like PGDATA, as archive_command sees it.
    let fake = pg.dir.path().join("fake");
    std::fs::create_dir_all(fake.join("global")).expect("mkdir");
    std::fs::create_dir_all(fake.join("pg_wal")).expect("mkdir");
    std::fs::copy(
        pg.data.join("global/pg_control"),
        fake.join("global/pg_control"),
    )
    .expect("copy");
    common::pg::chown(&fake, &pg.user);
    let cfg = pg.cfg.to_str().expect("utf8").to_string();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        common::pg::run_as_in(&pg.user, &pg.dr, &all, &fake)
    };
    let dest = format!("pg_wal/{seg}");
    let o = run(&["wal-fetch", &seg, &dest]);
    assert!(
        o.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::metadata(fake.join(&dest)).expect("fetched").len(),
        16 << 20
    );

    let o = run(&["--json", "wal-push", &dest]);
    assert!(
        o.status.success(),
        "push again: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["wal_push"]["already_archived"], true);

    let mut bytes = std::fs::read(fake.join(&dest)).expect("read");
    bytes[1000] ^= 1;
    std::fs::write(fake.join(&dest), &bytes).expect("write");
    let o = run(&["wal-push", &dest]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("already archived with different content")
            && e.contains("refusing to overwrite"),
        "{e}"
    );

    // Past the end of the archive: exit 1, nothing on stderr (PostgreSQL asks routinely).
    let o = run(&[
        "wal-fetch",
        "0000000100000000000000FE",
        "pg_wal/RECOVERYXLOG",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!fake.join("pg_wal/RECOVERYXLOG").exists());

    let o = run(&["wal-push", "pg_wal/not-a-wal-file"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a WAL segment"));
}

#[test]
fn backup_reports_pages_with_bad_checksums() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    pg.sql(
        "CREATE TABLE victim AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 2000) g",
    );
    pg.sql("CHECKPOINT");
    let o = pg.dr(&["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["backup"]["checksums_verified"], true);
    assert_eq!(
        v["backup"]["checksum_failures"],
        serde_json::json!([]),
        "false positives: {v}"
    );

    // Flip a byte inside page 1 of the table's file, behind PostgreSQL's back.
    let rel = pg.sql("SELECT pg_relation_filepath('victim')");
    let path = pg.data.join(&rel);
    let mut bytes = std::fs::read(&path).expect("read relation");
    bytes[8192 + 4000] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write relation");
    let o = pg.dr(&["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v["backup"]["checksum_failures"],
        serde_json::json!([[rel, 1]]),
        "{v}"
    );
}

#[test]
fn delta_restore_rewrites_only_what_differs() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "100", "-n"]);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();

    let dir = pg.target("delta");
    let ds = dir.to_str().expect("utf8").to_string();
    pg.dr(&["restore", "pg", "--to", "latest", "--target", &ds]);
    // Damage the copy: a changed block, a deleted file, a stray file and dir.
    let rel = pg.sql("SELECT pg_relation_filepath('pgbench_accounts')");
    let f = dir.join(&rel);
    let mut bytes = std::fs::read(&f).expect("read");
    bytes[300_000] ^= 0x55;
    std::fs::write(&f, &bytes).expect("write");
    std::fs::remove_file(dir.join("base/1/PG_VERSION")).expect("rm");
    std::fs::write(dir.join("stray.txt"), "x").expect("stray");
    std::fs::create_dir_all(dir.join("base/stray_dir")).expect("stray dir");
    common::pg::chown(&dir, &pg.user);

    let o = pg.dr_raw(&["restore", "pg", "--to", "latest", "--target", &ds]);
    assert!(!o.status.success(), "a non-empty target needs --delta");
    let port = free_port();
    pg.track(dir.clone());
    let o = pg.dr(&[
        "--json",
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        &ds,
        "--delta",
        "--start",
        "--port",
        &port.to_string(),
        "--no-archive",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let written = v["restore"]["bytes"].as_u64().expect("bytes");
    let kept = v["restore"]["bytes_unchanged"].as_u64().expect("kept");
    assert!(
        written < kept / 10,
        "delta rewrote {written} bytes, kept {kept}"
    );
    assert!(
        v["restore"]["removed"].as_u64().expect("removed") >= 2,
        "{v}"
    );
    assert!(!dir.join("stray.txt").exists() && !dir.join("base/stray_dir").exists());
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        history
    );

    // A running server's directory is refused.
    let o = pg.dr_raw(&[
        "restore", "pg", "--to", "latest", "--target", &ds, "--delta",
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is running"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    pg.stop(&dir);
}

#[test]
fn backup_connects_over_verified_tls() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    let tls = pg.dir.path().join("tls");
    std::fs::create_dir_all(&tls).expect("mkdir");
    common::test_certificates(&tls);
    std::fs::copy(tls.join("server.crt"), pg.data.join("server.crt")).expect("cert");
    std::fs::copy(tls.join("server.key"), pg.data.join("server.key")).expect("key");
    std::fs::set_permissions(
        pg.data.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    common::pg::chown(&pg.data, &pg.user);
    common::pg::chown(&tls, &pg.user);
    // Plain-text TCP connections are refused from now on.
    let hba = std::fs::read_to_string(pg.data.join("pg_hba.conf")).expect("hba");
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        format!("hostnossl all all 127.0.0.1/32 reject\n{hba}"),
    )
    .expect("hba");
    pg.sql("ALTER SYSTEM SET ssl = on");
    pg.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));

    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let line = text
        .lines()
        .find(|l| l.starts_with("conninfo"))
        .expect("conninfo")
        .to_string();
    let with = |extra: &str, name: &str| {
        let p = pg.dir.path().join(name);
        std::fs::write(
            &p,
            text.replace(
                &line,
                &line.replace("dbname=postgres", &format!("dbname=postgres {extra}")),
            ),
        )
        .expect("write");
        common::pg::chown(&p, &pg.user);
        p
    };
    let ok = with(
        &format!(
            "sslmode=verify-full sslrootcert={}",
            tls.join("ca.crt").display()
        ),
        "tls.toml",
    );
    let o = pg.dr_with(&ok, &["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["backup"]["id"].is_string());

    let plain = with("sslmode=disable", "plain.toml");
    let o = pg.dr_raw_with(&plain, &["backup", "pg"]);
    assert!(
        !o.status.success(),
        "plain text must be rejected by the server"
    );

    let wrong = with(
        &format!(
            "sslmode=require sslrootcert={}",
            tls.join("other-ca.crt").display()
        ),
        "wrong.toml",
    );
    let o = pg.dr_raw_with(&wrong, &["backup", "pg"]);
    assert!(
        !o.status.success(),
        "a certificate from an unknown CA must be refused"
    );
    let e = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(e.contains("certificate") || e.contains("issuer"), "{e}");

    // Certificate authentication: the server now wants a client certificate
    // signed by the CA whose CN is the user (X.509 v3, as rustls requires).
    std::fs::write(tls.join("client.cnf"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for args in [
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-subj",
            "/CN=postgres",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.crt",
            "-days",
            "2",
            "-extfile",
            "client.cnf",
        ],
    ] {
        common::openssl(&tls, &args);
    }
    std::fs::set_permissions(
        tls.join("client.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    std::fs::copy(tls.join("ca.crt"), pg.data.join("root.crt")).expect("ca");
    common::pg::chown(&pg.data, &pg.user);
    common::pg::chown(&tls, &pg.user);
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        format!("hostssl all all 127.0.0.1/32 cert\nhostnossl all all 127.0.0.1/32 reject\n{hba}"),
    )
    .expect("hba");
    pg.sql("ALTER SYSTEM SET ssl_ca_file = 'root.crt'");
    pg.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    let o = pg.dr_raw_with(&ok, &["backup", "pg"]);
    assert!(
        !o.status.success(),
        "without a client certificate the server refuses"
    );
    let cert = with(
        &format!(
            "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            tls.join("ca.crt").display(),
            tls.join("client.crt").display(),
            tls.join("client.key").display()
        ),
        "cert.toml",
    );
    let o = pg.dr_with(&cert, &["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert!(v["backup"]["id"].is_string());
    std::fs::set_permissions(
        tls.join("client.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let o = pg.dr_raw_with(&cert, &["backup", "pg"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("chmod 600"), "{e}");
}

#[test]
fn tablespaces_restore_in_place_or_where_mapped_never_to_the_original() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    let ts = pg.dir.path().join("ts-fast");
    std::fs::create_dir_all(&ts).expect("mkdir");
    common::pg::chown(&ts, &pg.user);
    pg.sql(&format!(
        "CREATE TABLESPACE fast LOCATION '{}'",
        ts.display()
    ));
    pg.sql("CREATE TABLE t_fast (id int PRIMARY KEY, v text) TABLESPACE fast");
    pg.sql("INSERT INTO t_fast SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    pg.dr(&["backup", "pg"]);
    pg.sql("INSERT INTO t_fast SELECT g, 'after' FROM generate_series(20001, 25000) g");
    let sum = pg.sql("SELECT count(*) || ':' || sum(id) FROM t_fast");
    pg.archive_now();
    let oid = pg.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'fast'");
    let original: Vec<_> = walk(&ts);

    // Default: the tablespace comes back inside the target, linked from pg_tblspc.
    let r1 = pg.target("ts-in-place");
    pg.track(r1.clone());
    let port = free_port();
    pg.dr(&[
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        r1.to_str().expect("utf8"),
        "--start",
        "--port",
        &port.to_string(),
        "--no-archive",
    ]);
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) || ':' || sum(id) FROM t_fast"),
        sum
    );
    let link = r1.join("pg_tblspc").join(&oid);
    assert_eq!(
        std::fs::read_link(&link).expect("symlink"),
        r1.join("dr_tablespaces").join(&oid)
    );
    pg.stop(&r1);
    assert_eq!(
        walk(&ts),
        original,
        "the original tablespace location was touched"
    );

    // Mapped: linked to the given directory.
    let elsewhere = pg.dir.path().join("ts-restored");
    let r2 = pg.target("ts-mapped");
    pg.track(r2.clone());
    let port = free_port();
    pg.dr(&[
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        r2.to_str().expect("utf8"),
        "--tablespace-map",
        &format!("fast={}", elsewhere.display()),
        "--start",
        "--port",
        &port.to_string(),
        "--no-archive",
    ]);
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) || ':' || sum(id) FROM t_fast"),
        sum
    );
    let link = r2.join("pg_tblspc").join(&oid);
    assert_eq!(std::fs::read_link(&link).expect("symlink"), elsewhere);
    pg.stop(&r2);

    let r3 = pg.target("ts-bad");
    expect_fail(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            r3.to_str().expect("utf8"),
            "--tablespace-map",
            "slow=/tmp/x",
        ],
        &["has no tablespace \"slow\"", "fast (oid"],
    );
    expect_fail(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            r3.to_str().expect("utf8"),
            "--tablespace-map",
            "fast=relative/dir",
        ],
        &["must be absolute"],
    );
}

#[test]
fn backup_is_not_recorded_until_its_wal_is_archived() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    let text = std::fs::read_to_string(&pg.cfg).expect("read cfg");
    std::fs::write(&pg.cfg, format!("{text}stop_wal_timeout = \"2s\"\n")).expect("write cfg");
    pg.sql("ALTER SYSTEM SET archive_command = 'false'");
    pg.sql("SELECT pg_reload_conf()");

    let o = pg.dr_raw(&["backup", "pg"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a backup without its WAL succeeded");
    for needle in [
        "did not reach the repository within 2s",
        "stop_wal_timeout",
        "pg_stat_archiver",
        "was not recorded",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(v["backups"], serde_json::json!([]), "{v}");

    // Once archiving works again, the archiver catches up and a backup lands.
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    pg.dr(&["backup", "pg"]);
    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(v["backups"].as_array().map(|a| a.len()), Some(1), "{v}");
}

#[test]
fn check_reports_each_cluster_and_failing_archiving() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo_dir));
    pg.archive_now();
    let (ok, item) = pg.check_item(&pg.cfg, "postgres main");
    assert!(ok && item["status"] == "ok", "{item}");
    let (_, item) = pg.check_item(&pg.cfg, "wal archive main");
    assert_eq!(item["status"], "ok", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("last archived")),
        "{item}"
    );

    // Archiving breaks: check fails and says where to look.
    pg.sql("ALTER SYSTEM SET archive_command = 'false'");
    pg.sql("SELECT pg_reload_conf()");
    pg.sql("CREATE TABLE t AS SELECT 1 AS x");
    pg.sql("SELECT pg_switch_wal()");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pg.sql("SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "archiving never failed"
        );
        sleep(Duration::from_millis(100));
    }
    let (ok, item) = pg.check_item(&pg.cfg, "wal archive main");
    assert!(!ok && item["status"] == "fail", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("archiving is failing")),
        "{item}"
    );

    // A command that is not dr's is named, even when it succeeds.
    pg.sql("ALTER SYSTEM SET archive_command = 'true'");
    pg.sql("SELECT pg_reload_conf()");
    pg.archive_now();
    let (ok, item) = pg.check_item(&pg.cfg, "wal archive main");
    assert!(!ok, "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not run `dr wal-push %p`")),
        "{item}"
    );

    // Fixed: the archiver catches up and check passes again.
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    pg.archive_now();
    let (ok, item) = pg.check_item(&pg.cfg, "wal archive main");
    assert!(ok && item["status"] == "ok", "{item}");

    // A local-mode config whose data_dir is not the server's.
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let cfg = pg.dir.path().join("elsewhere.toml");
    let wrong = pg.dir.path().join("not-pgdata");
    std::fs::create_dir_all(&wrong).expect("mkdir");
    std::fs::write(
        &cfg,
        text.replace(
            &format!("data_dir = \"{}\"", pg.data.display()),
            &format!("data_dir = \"{}\"", wrong.display()),
        ),
    )
    .expect("write");
    common::pg::chown(&cfg, &pg.user);
    let (ok, item) = pg.check_item(&cfg, "postgres main");
    assert!(!ok && item["status"] == "fail", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("keeps its data in")),
        "{item}"
    );
}
