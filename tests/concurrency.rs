//! Commands that run at the same time on one repository, against a real
//! PostgreSQL: two backups, a backup and `expire`, `repo sync` and
//! `expire`, two `wal-push` of one segment, and two daemons with different
//! state directories. Nothing may be lost: afterwards `verify --list`
//! passes and a restore of `latest` is exact. Where something must not run
//! twice, the second run is refused with a message saying so.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::chaos::os_ids;
use common::json_of as json;
use common::pg::{TestPg, chown, free_port, fs_repo, restore_started};

/// dr as the OS user, started directly (a signal reaches dr itself), in a
/// process group of its own.
fn spawn(pg: &TestPg, cfg: &Path, args: &[&str]) -> Child {
    let (uid, gid) = os_ids(&pg.user);
    Command::new(&pg.dr)
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn dr")
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `verify --list` passes; the listed backup ids.
fn consistent(pg: &TestPg, ctx: &str) -> Vec<String> {
    ok(
        &pg.dr_raw(&["--json", "verify", "--list"]),
        &format!("{ctx}: verify --list"),
    );
    json(&pg.dr(&["--json", "list", "pg"]))["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

/// A restore of `latest` holds the primary's data once it is archived.
fn latest_is_exact(pg: &mut TestPg, name: &str) {
    pg.archive_now();
    let want = (
        pg.sql("SELECT sum(abalance) FROM pgbench_accounts"),
        pg.sql("SELECT count(*) FROM pgbench_history"),
    );
    let (port, dir, _) = restore_started(pg, "latest", name);
    let got = (
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
    );
    pg.stop(&dir);
    assert_eq!(got, want, "{name}: restore of latest");
}

fn setup() -> (tempfile::TempDir, TestPg) {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    (fs, pg)
}

fn add_to_config(cfg: &Path, text: &str) {
    let mut c = std::fs::read_to_string(cfg).expect("cfg");
    c.push_str(text);
    std::fs::write(cfg, c).expect("cfg");
}

#[test]
fn two_backups_at_once_both_succeed_or_one_is_refused_and_nothing_is_lost() {
    let (_fs, mut pg) = setup();
    for round in 0..2 {
        let before = consistent(&pg, "before");
        let extra: &[&str] = if round == 1 { &["--full"] } else { &[] };
        let mut args = vec!["backup", "pg"];
        args.extend_from_slice(extra);
        let a = spawn(&pg, &pg.cfg, &args);
        let b = spawn(&pg, &pg.cfg, &["backup", "pg"]);
        pg.pgbench(&["-n", "-t", "100"]);
        let (a, b) = (
            a.wait_with_output().expect("a"),
            b.wait_with_output().expect("b"),
        );
        let succeeded = [&a, &b].iter().filter(|o| o.status.success()).count();
        for o in [&a, &b] {
            if !o.status.success() {
                let e = String::from_utf8_lossy(&o.stderr);
                assert!(
                    e.contains("already running") || e.contains("another backup"),
                    "round {round}: a concurrent backup failed without saying why: {e}"
                );
            }
        }
        assert!(succeeded >= 1, "round {round}: neither backup succeeded");
        let after = consistent(&pg, &format!("round {round}"));
        assert_eq!(
            after.len(),
            before.len() + succeeded,
            "round {round}: every backup that said so is listed: {before:?} -> {after:?}"
        );
    }
    latest_is_exact(&mut pg, "two-backups");
}

#[test]
fn backup_and_expire_at_once_lose_nothing() {
    let (_fs, mut pg) = setup();
    add_to_config(&pg.cfg, "\n[postgres.main.retention]\nkeep_full = 1\n");
    for round in 0..2 {
        pg.pgbench(&["-n", "-t", "100"]);
        pg.dr(&["backup", "pg", "--full"]);
        pg.dr(&["backup", "pg"]);
        let backup = spawn(&pg, &pg.cfg, &["backup", "pg"]);
        // expire starts while the backup reads the cluster.
        std::thread::sleep(Duration::from_millis(300 * round));
        let expire = spawn(&pg, &pg.cfg, &["expire"]);
        let (b, e) = (
            backup.wait_with_output().expect("backup"),
            expire.wait_with_output().expect("expire"),
        );
        ok(&b, &format!("round {round}: backup"));
        ok(&e, &format!("round {round}: expire"));
        consistent(&pg, &format!("round {round}"));
        latest_is_exact(&mut pg, &format!("backup-expire-{round}"));
    }
}

#[test]
fn sync_and_expire_at_once_lose_nothing() {
    let fs = tempfile::tempdir().expect("tempdir");
    let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    let (a, b) = (fs.path().join("a"), fs.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).expect("mkdir");
        chown(d, &user);
    }
    std::fs::set_permissions(
        fs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut pg = TestPg::new(&format!(
        "{}{}",
        common::fs_region_toml("a", &a),
        common::fs_region_toml("b", &b)
    ));
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    add_to_config(&pg.cfg, "\n[postgres.main.retention]\nkeep_full = 1\n");
    for round in 0..2 {
        for _ in 0..2 {
            pg.pgbench(&["-n", "-t", "100"]);
            pg.dr(&["backup", "pg", "--full"]);
        }
        pg.archive_now();
        // b lost everything but its descriptor: sync has it all to copy,
        // while expire deletes the older backups.
        for e in std::fs::read_dir(&b).expect("b").flatten() {
            if e.file_name() != "dr-repo.json" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let sync = spawn(&pg, &pg.cfg, &["repo", "sync"]);
        std::thread::sleep(Duration::from_millis(150 * round));
        let expire = spawn(&pg, &pg.cfg, &["expire"]);
        let (s, e) = (
            sync.wait_with_output().expect("sync"),
            expire.wait_with_output().expect("expire"),
        );
        ok(&e, &format!("round {round}: expire"));
        // An object expire deleted under the sync is counted as vanished,
        // not as a failure; the next sync completes the region.
        ok(&s, &format!("round {round}: sync during expire"));
        ok(
            &pg.dr_raw(&["repo", "sync"]),
            &format!("round {round}: the next sync"),
        );
        for region in ["a", "b"] {
            ok(
                &pg.dr_raw(&["--json", "verify", "--list", "--region", region]),
                &format!("round {round}: verify --list --region {region}"),
            );
        }
        // What the race left behind (segments sync copied back after expire
        // listed a region) is gone after the next expire.
        ok(
            &pg.dr_raw(&["expire"]),
            &format!("round {round}: expire again"),
        );
        let v = json(&pg.dr_raw(&["--json", "verify", "--list"]));
        assert_eq!(v["verify"]["unneeded_wal"], serde_json::json!([]), "{v}");
    }
    latest_is_exact(&mut pg, "sync-expire");
}

#[test]
fn two_wal_push_of_one_segment_at_once_both_succeed_with_one_exact_copy() {
    let (_fs, pg) = setup();
    pg.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    pg.sql("SELECT pg_reload_conf()");
    for round in 0..3 {
        pg.pgbench(&["-n", "-t", "100"]);
        let seg = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
        let path = pg.data.join("pg_wal").join(&seg);
        let p = path.to_str().expect("utf8");
        let a = spawn(&pg, &pg.cfg, &["wal-push", p]);
        let b = spawn(&pg, &pg.cfg, &["wal-push", p]);
        let (a, b) = (
            a.wait_with_output().expect("a"),
            b.wait_with_output().expect("b"),
        );
        ok(&a, &format!("round {round}: first wal-push"));
        ok(&b, &format!("round {round}: second wal-push"));
        let dest = pg.dir.path().join("fetched");
        let _ = std::fs::remove_file(&dest);
        pg.dr(&["wal-fetch", &seg, dest.to_str().expect("utf8")]);
        assert!(
            std::fs::read(&dest).expect("fetched") == std::fs::read(&path).expect("segment"),
            "round {round}: the archived {seg} differs from pg_wal"
        );
    }
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    pg.archive_now();
    consistent(&pg, "end");
}

#[test]
fn two_daemons_with_different_state_dirs_share_a_repository_without_loss() {
    let (_fs, mut pg) = setup();
    let mut cfgs = Vec::new();
    for n in 0..2 {
        let state = pg.dir.path().join(format!("state-{n}"));
        std::fs::create_dir_all(&state).expect("state");
        chown(&state, &pg.user);
        let text = std::fs::read_to_string(&pg.cfg).expect("cfg")
            + &format!(
                "\n[postgres.main.schedule]\nbackup = \"*/4 * * * * *\"\n\n[postgres.main.retention]\nkeep_full = 2\n\n\
                 [retention]\nschedule = \"*/5 * * * * *\"\n\n[daemon]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\n",
                free_port(),
                state.display()
            );
        let cfg = pg.dir.path().join(format!("daemon-{n}.toml"));
        std::fs::write(&cfg, text).expect("cfg");
        chown(&cfg, &pg.user);
        cfgs.push(cfg);
    }
    let daemons: Vec<Child> = cfgs.iter().map(|c| spawn(&pg, c, &["daemon"])).collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(14) {
        pg.pgbench(&["-n", "-t", "50"]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut logs = Vec::new();
    for d in daemons {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", d.id())])
            .status();
        let o = d.wait_with_output().expect("daemon");
        logs.push(String::from_utf8_lossy(&o.stderr).to_string());
        ok(&o, "a daemon");
    }
    for (n, log) in logs.iter().enumerate() {
        assert!(
            log.lines()
                .any(|l| l.contains("job succeeded") && l.contains("postgres.main.backup")),
            "daemon {n} took no backup: {log}"
        );
    }
    let ids = consistent(&pg, "two daemons");
    assert!(!ids.is_empty(), "no backups kept: {logs:?}");
    latest_is_exact(&mut pg, "two-daemons");
}

/// A second daemon on the same state directory is refused, saying which
/// daemon holds it (the refusal where something must not run twice).
#[test]
fn a_second_daemon_on_one_state_dir_is_refused() {
    let (_fs, pg) = setup();
    let state = pg.dir.path().join("state-one");
    std::fs::create_dir_all(&state).expect("state");
    chown(&state, &pg.user);
    add_to_config(
        &pg.cfg,
        &format!(
            "\n[postgres.main.schedule]\nbackup = \"0 0 1 1 *\"\n\n[daemon]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n",
            free_port(),
            state.display()
        ),
    );
    let first = spawn(&pg, &pg.cfg, &["daemon"]);
    std::thread::sleep(Duration::from_secs(2));
    let o = pg.dr_raw(&["daemon"]);
    assert!(!o.status.success(), "a second daemon on one state_dir ran");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("state_dir") || e.contains("daemon.lock") || e.contains("already"),
        "the refusal says why: {e}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{}", first.id())])
        .status();
    let _ = first.wait_with_output();
}
