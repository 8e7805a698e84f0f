//! `dr restore pg` refuses bad input before writing anything, never deletes
//! what is not its cluster's data, quotes what it hands to PostgreSQL, and
//! reaches a started server whatever its password rules — against a real
//! PostgreSQL 15.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::pg::{TestPg, chown, free_port, fs_repo, initdb, run_as_in};

/// A cluster with one backup and archived WAL after it.
fn backed_up(repo_dir: &tempfile::TempDir) -> TestPg {
    let pg = TestPg::new(&fs_repo(repo_dir));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    pg
}

/// Runs dr, expects failure, checks the error holds every needle.
fn expect_fail(o: Output, args: &[&str], needles: &[&str]) -> String {
    assert!(!o.status.success(), "dr {args:?} should fail");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    for n in needles {
        assert!(e.contains(n), "dr {args:?}: expected {n:?} in: {e}");
    }
    e
}

fn refused(pg: &TestPg, args: &[&str], needles: &[&str]) -> String {
    expect_fail(pg.dr_raw(args), args, needles)
}

/// `restore pg --to latest --target DIR` plus `extra`.
fn latest<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["restore", "pg", "--to", "latest", "--target", dir];
    v.extend_from_slice(extra);
    v
}

/// Names of the entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn delta_into_a_directory_that_is_not_a_data_directory_keeps_its_files() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = backed_up(&repo_dir);
    let junk = pg.target("junk");
    std::fs::create_dir_all(junk.join("sub")).expect("mkdir");
    std::fs::write(junk.join("keepme.txt"), "precious").expect("write");
    std::fs::write(junk.join("sub/also.txt"), "x").expect("write");
    chown(&junk, &pg.user);
    let js = junk.to_str().expect("utf8");
    refused(
        &pg,
        &latest(js, &["--delta"]),
        &[
            js,
            "not a PostgreSQL data directory",
            "keepme.txt",
            "empty or new directory",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(junk.join("keepme.txt")).expect("kept"),
        "precious"
    );
    assert_eq!(entries(&junk), ["keepme.txt", "sub"]);
    assert!(junk.join("sub/also.txt").exists());
}

#[test]
fn delta_into_another_clusters_data_directory_is_refused() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = backed_up(&repo_dir);
    let other = pg.target("other");
    initdb(&pg.user, &pg.bin, &other, &[]);
    let before = common::walk_files(&other).len();
    let os = other.to_str().expect("utf8");
    refused(
        &pg,
        &latest(os, &["--delta"]),
        &[
            os,
            "another cluster",
            "system identifier",
            "nothing was changed",
        ],
    );
    // Without --delta: the same refusal, and no suggestion to use --delta.
    let e = refused(
        &pg,
        &latest(os, &[]),
        &[os, "is not empty", "another cluster"],
    );
    assert!(!e.contains("--delta"), "{e}");
    assert!(other.join("PG_VERSION").exists());
    assert_eq!(common::walk_files(&other).len(), before);
}

#[test]
fn non_empty_target_of_the_same_cluster_suggests_delta() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = backed_up(&repo_dir);
    let dir = pg.target("same");
    let ds = dir.to_str().expect("utf8");
    pg.dr(&latest(ds, &[]));
    refused(
        &pg,
        &latest(ds, &[]),
        &[
            ds,
            "is not empty",
            "of this cluster",
            "add --delta",
            "rm -rf",
        ],
    );
    // The suggestion works.
    pg.dr(&latest(ds, &["--delta"]));
}

#[test]
fn bad_recovery_targets_are_refused_before_anything_is_written() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let pg = backed_up(&repo_dir);
    let absent = pg.target("absent");
    let a = absent.to_str().expect("utf8");
    let empty = pg.target("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let e = empty.to_str().expect("utf8");
    for (target, extra, needles) in [
        (
            a,
            ["--lsn", "zz"],
            &["--lsn \"zz\" is not an LSN", "0/16B3748"][..],
        ),
        (a, ["--lsn", "0/1/2"], &["is not an LSN"][..]),
        (
            e,
            ["--xid", "abc"],
            &["--xid \"abc\" is not a transaction id"][..],
        ),
        (e, ["--xid", "12x"], &["is not a transaction id"][..]),
        (a, ["--name", "two\nlines"], &["--name", "line break"][..]),
    ] {
        let args = latest(target, &extra);
        refused(&pg, &args, needles);
        assert!(!absent.exists(), "{args:?} created the target");
        assert!(entries(&empty).is_empty(), "{args:?} wrote into the target");
    }
}

#[test]
fn restore_point_name_with_a_quote_and_backslash_is_reached() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = backed_up(&repo_dir);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let name = r"a'b\c";
    pg.sql(r"SELECT pg_create_restore_point('a''b\c')");
    pg.pgbench(&["-t", "50", "-n"]);
    assert_ne!(
        pg.sql("SELECT sum(abalance) FROM pgbench_accounts"),
        balance
    );
    pg.archive_now();
    let dir = pg.target("named");
    let port = free_port();
    pg.track(dir.clone());
    let port_s = port.to_string();
    pg.dr(&start_args(
        &dir,
        &port_s,
        &["--no-archive", "--name", name],
    ));
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance
    );
    pg.stop(&dir);
}

/// `--json restore pg --to latest --target DIR --start --port PORT`.
/// plus `extra`.
fn start_args<'a>(dir: &'a Path, port: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--json"];
    v.extend(latest(
        dir.to_str().expect("utf8"),
        &["--start", "--port", port],
    ));
    v.extend_from_slice(extra);
    v
}

/// One /bin/sh word.
fn sh(s: &Path) -> String {
    format!("'{}'", s.display().to_string().replace('\'', "'\\''"))
}

#[test]
fn config_and_binary_paths_with_a_space_and_quote_work_end_to_end() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    let odd = pg.dir.path().join("my dr's conf");
    std::fs::create_dir_all(&odd).expect("mkdir");
    let dr = odd.join("dr");
    let cfg = odd.join("dr.toml");
    std::fs::copy(&pg.dr, &dr).expect("copy dr");
    std::fs::copy(&pg.cfg, &cfg).expect("copy cfg");
    chown(&odd, &pg.user);
    // ALTER SYSTEM quotes the value for postgresql.auto.conf itself.
    pg.sql(&format!(
        "ALTER SYSTEM SET archive_command = $q${} --config {} wal-push %p$q$",
        sh(&dr),
        sh(&cfg)
    ));
    pg.sql("SELECT pg_reload_conf()");
    let user = pg.user.clone();
    let run = |args: &[&str]| {
        let mut all = vec!["--config", cfg.to_str().expect("utf8")];
        all.extend_from_slice(args);
        let o = run_as_in(&user, &dr, &all, Path::new("/"));
        assert!(
            o.status.success(),
            "dr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    };
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    run(&["backup", "pg"]);
    pg.pgbench(&["-t", "50", "-n"]);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    pg.archive_now();
    let failed = pg.sql("SELECT failed_count FROM pg_stat_archiver");
    assert_eq!(failed, "0", "archive_command with odd paths failed");

    let dir = pg.target("odd restore");
    let port = free_port();
    pg.track(dir.clone());
    let o = run(&start_args(&dir, &port.to_string(), &[]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["restore"]["started"], true, "{v}");
    // Promotion picks timeline 2; the copy archives it (archiving is on).
    assert_eq!(v["restore"]["timeline"], 2, "{v}");
    assert_eq!(v["restore"]["archive_mode"], "on", "{v}");
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance
    );
    pg.stop(&dir);
}

const PASSWORD: &str = "s3cret pw";

/// psql on 127.0.0.1:`port` with the password.
fn psql_pw(bin: &Path, port: u16, sql: &str) -> String {
    common::pg::psql_as(bin, port, sql, Some(PASSWORD))
        .unwrap_or_else(|e| panic!("psql {sql}: {e}"))
}

#[test]
fn restore_start_works_when_tcp_needs_a_password() {
    let repo_dir = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&repo_dir));
    pg.sql(&format!(
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{PASSWORD}'"
    ));
    pg.sql("ALTER SYSTEM SET password_encryption = 'scram-sha-256'");
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("hba");
    pg.sql("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        common::pg::psql(&pg.bin, pg.port, "SELECT 1").is_err(),
        "TCP without a password must be refused"
    );
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let text = text.replace(
        "dbname=postgres\"",
        &format!("dbname=postgres password='{PASSWORD}'\""),
    );
    std::fs::write(&pg.cfg, text).expect("cfg");
    psql_pw(&pg.bin, pg.port, "CREATE TABLE t AS SELECT 42 AS x");
    pg.dr(&["backup", "pg"]);
    psql_pw(&pg.bin, pg.port, "INSERT INTO t VALUES (43)");
    let seg = psql_pw(&pg.bin, pg.port, "SELECT pg_walfile_name(pg_switch_wal())");
    let archived = (0..300).any(|_| {
        let last = psql_pw(
            &pg.bin,
            pg.port,
            "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        last >= seg
    });
    assert!(archived, "segment {seg} was not archived within 30s");

    let dir: PathBuf = pg.target("pw");
    let port = free_port();
    pg.track(dir.clone());
    let t0 = std::time::Instant::now();
    let o = pg.dr(&start_args(&dir, &port.to_string(), &["--no-archive"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["restore"]["started"], true, "{v}");
    assert!(v["restore"]["socket_dir"].is_string(), "{v}");
    assert_eq!(v["restore"]["archive_mode"], "off", "{v}");
    assert!(
        t0.elapsed().as_secs() < 50,
        "the restore waited for a timeout"
    );
    // The cluster's own rules still hold for TCP.
    assert!(common::pg::psql(&pg.bin, port, "SELECT 1").is_err());
    assert_eq!(
        psql_pw(
            &pg.bin,
            port,
            "SELECT string_agg(x::text, ',' ORDER BY x) FROM t"
        ),
        "42,43"
    );
    pg.stop(&dir);
}
