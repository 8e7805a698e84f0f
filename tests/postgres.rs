//! PostgreSQL backup, WAL archiving and point-in-time restore against a real
//! PostgreSQL 15, with an fs repository and with a Garage S3 repository.

mod common;

use std::thread::sleep;
use std::time::Duration;

use common::pg::{TestPg, free_port};

struct Mark {
    at: String,
    balance: String,
    history: String,
}

fn mark(pg: &TestPg) -> Mark {
    // Quiet gaps around the mark so the target falls between commits.
    sleep(Duration::from_millis(600));
    let at = pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    sleep(Duration::from_millis(600));
    Mark {
        at,
        balance,
        history,
    }
}

fn restore_and_check(pg: &mut TestPg, to: &str, name: &str, balance: &str, history: &str) {
    let dir = pg.target(name);
    let port = free_port();
    pg.track(dir.clone());
    let o = pg.dr(&[
        "--json",
        "restore",
        "pg",
        "--to",
        to,
        "--target",
        dir.to_str().expect("utf8"),
        "--start",
        "--port",
        &port.to_string(),
        "--no-archive",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("restore json");
    assert_eq!(v["restore"]["started"], true);
    eprintln!(
        "restored {to}: expect balance {balance} history {history}; report {}",
        v["restore"]
    );
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance,
        "balance at {to}"
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        history,
        "history at {to}"
    );
    assert_eq!(pg.sql_at(port, "SELECT pg_is_in_recovery()"), "f");
    pg.sql_at(port, "CREATE EXTENSION IF NOT EXISTS amcheck");
    let bad = pg.sql_at(
        port,
        "SELECT count(*) FROM (SELECT bt_index_check(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence <> 't') x",
    );
    assert!(!bad.is_empty());
    pg.stop(&dir);
}

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
}

#[test]
fn exact_pitr_fs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    common::pg::chown(&repo, &common::require_env("DR_TEST_OS_USER", "PostgreSQL"));
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    exact_pitr(&common::fs_region_toml("local", &repo));
}

#[test]
fn exact_pitr_garage() {
    exact_pitr(&common::garage_region_toml("garage"));
}
