//! Remote-mode base backups (`BASE_BACKUP` over the replication protocol)
//! against a real PostgreSQL 15: the same exactness as local mode, block-
//! incremental second backups, tablespaces, and clear errors.

mod common;

use common::pg::{TestPg, fs_repo, mark, restore_and_check};

fn backup_json(pg: &TestPg) -> serde_json::Value {
    let o = pg.dr(&["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("backup json");
    assert_eq!(v["backup"]["mode"], "remote", "{v}");
    v["backup"].clone()
}

/// Marks before and after a second, block-incremental backup; every mark and
/// the latest state restore exactly.
fn exact_pitr_remote(regions: &str) {
    let mut pg = TestPg::remote(regions);
    let cfg = std::fs::read_to_string(&pg.cfg).expect("cfg");
    assert!(!cfg.contains("data_dir"), "{cfg}");
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let first = backup_json(&pg);
    assert!(first["incremental_of"].is_null(), "{first}");
    let mut marks = Vec::new();
    for _ in 0..2 {
        pg.pgbench(&["-t", "300", "-c", "2", "-n"]);
        marks.push(mark(&pg));
    }
    let second = backup_json(&pg);
    assert_eq!(second["incremental_of"], first["id"], "{second}");
    let (full, incr) = (
        first["stored_size"].as_u64().expect("stored"),
        second["stored_size"].as_u64().expect("stored"),
    );
    eprintln!("remote full backup stored {full} bytes, incremental {incr} bytes");
    assert!(second["reused_bytes"].as_u64() > Some(0), "{second}");
    assert!(incr < full, "incremental stored {incr} bytes, full {full}");
    pg.pgbench(&["-t", "300", "-c", "2", "-n"]);
    marks.push(mark(&pg));
    pg.pgbench(&["-t", "300", "-n"]);
    let final_balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let final_history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();

    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(v["backups"].as_array().map(|a| a.len()), Some(2), "{v}");

    for (i, m) in marks.iter().enumerate() {
        restore_and_check(&mut pg, &m.at, &format!("r{i}"), &m.balance, &m.history);
    }
    restore_and_check(&mut pg, "latest", "rlatest", &final_balance, &final_history);
    pg.dr(&["verify", "pg", "--read-data"]);
}

#[test]
fn remote_exact_pitr_fs() {
    let dir = tempfile::tempdir().expect("tempdir");
    exact_pitr_remote(&fs_repo(&dir));
}

#[test]
fn remote_exact_pitr_garage() {
    exact_pitr_remote(&common::garage_region_toml("garage"));
}

#[test]
fn remote_backup_keeps_tablespaces() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::remote(&fs_repo(&repo_dir));
    let ts = pg.dir.path().join("ts-fast");
    std::fs::create_dir_all(&ts).expect("mkdir");
    common::pg::chown(&ts, &pg.user);
    pg.sql(&format!(
        "CREATE TABLESPACE fast LOCATION '{}'",
        ts.display()
    ));
    pg.sql("CREATE TABLE t_fast (id int PRIMARY KEY, v text) TABLESPACE fast");
    pg.sql("INSERT INTO t_fast SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    backup_json(&pg);
    pg.sql("INSERT INTO t_fast SELECT g, 'after' FROM generate_series(20001, 25000) g");
    let sum = pg.sql("SELECT count(*) || ':' || sum(id) FROM t_fast");
    let classes = pg.sql("SELECT count(*) FROM pg_class");
    pg.archive_now();
    let oid = pg.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'fast'");

    let (port, dir, _) = common::pg::restore_started(&mut pg, "latest", "ts");
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) || ':' || sum(id) FROM t_fast"),
        sum
    );
    assert_eq!(pg.sql_at(port, "SELECT count(*) FROM pg_class"), classes);
    assert_eq!(
        std::fs::read_link(dir.join("pg_tblspc").join(&oid)).expect("symlink"),
        dir.join("dr_tablespaces").join(&oid)
    );
    pg.stop(&dir);
}

#[test]
fn remote_backup_without_replication_rights_says_how_to_grant_them() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::remote(&fs_repo(&repo_dir));
    pg.sql("CREATE ROLE plain LOGIN");
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let cfg = pg.dir.path().join("plain.toml");
    std::fs::write(&cfg, text.replace("user=postgres", "user=plain")).expect("write");
    common::pg::chown(&cfg, &pg.user);
    // dr check tries the replication connection before any backup does.
    let (ok, item) = pg.check_item(&pg.cfg, "replication main");
    assert!(ok && item["status"] == "ok", "{item}");
    let (ok, item) = pg.check_item(&cfg, "replication main");
    assert!(!ok && item["status"] == "fail", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains("ALTER ROLE plain REPLICATION")),
        "{item}"
    );
    let o = pg.dr_raw_with(&cfg, &["backup", "pg"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    eprintln!("without replication rights: {e}");
    assert!(e.contains("ALTER ROLE plain REPLICATION"), "{e}");

    // Local mode without data_dir names both ways out.
    std::fs::write(&cfg, text.replace("mode = \"remote\"", "")).expect("write");
    let o = pg.dr_raw_with(&cfg, &["backup", "pg"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("data_dir is missing") && e.contains("remote"),
        "{e}"
    );
}

#[test]
fn a_connection_cut_during_a_remote_backup_is_a_transient_error() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::remote(&fs_repo(&repo_dir));
    pg.pgbench(&["-i", "-s", "10", "-q"]);
    // The backup reaches the server only through a gate that can be closed.
    let gate = common::Gate::start(pg.port);
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let cfg_path = pg.dir.path().join("gated.toml");
    let from = format!("port={} ", pg.port);
    assert!(text.contains(&from), "{text}");
    std::fs::write(
        &cfg_path,
        text.replace(&from, &format!("port={} ", gate.port)),
    )
    .expect("write");
    let cfg = dr::validate::load(&cfg_path).expect("config");
    let main = cfg.postgres.get("main").expect("[postgres.main]").get_ref();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let err = rt.block_on(async {
        let repo = dr::repo::Repository::open(&cfg).await.expect("open");
        let progress = dr::progress::Progress::new();
        let backup = dr::postgres::backup::backup(&repo, "main", main, true, progress.clone());
        let cut = async {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while progress.get().0 == 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the backup sent no data within 60s"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            gate.set_open(false);
        };
        let (res, ()) = tokio::join!(backup, cut);
        match res {
            Ok(r) => panic!("the backup finished before the connection was cut: {r:?}"),
            Err(e) => e,
        }
    });
    eprintln!("cut mid-backup: {err}");
    assert!(
        matches!(err, dr::postgres::PgError::Connection { .. }),
        "{err:?}"
    );
    assert!(err.is_transient(), "{err}");
    // Nothing was recorded: the list shows no backup.
    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(v["backups"].as_array().map(|a| a.len()), Some(0), "{v}");
}
