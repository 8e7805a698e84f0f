//! Kill-anywhere campaign, short version: `dr backup pg` (incremental and
//! `--full`), `wal-push`, `expire` and `restore pg` are each killed with
//! SIGKILL at a random instant, many times, against a real PostgreSQL and an
//! fs repository. After every kill the repository must stay consistent: every
//! listed backup is complete (`verify --list` passes), a killed `wal-push`
//! left nothing or the whole segment, and the next run of the same command
//! succeeds. At the end a restore of `latest` must be exact.
//!
//! The delays come from one seed, printed at the start; set `DR_KILL_SEED` to
//! replay a run.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::{TestPg, fs_repo, restore_started};

/// splitmix64: a tiny seeded generator, so a seed replays the same delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A delay in [2%, 80%] of `span`: late enough that dr has started,
    /// early enough that it has not finished.
    fn delay(&mut self, span: Duration) -> Duration {
        let permille = 20 + self.next() % 781;
        span * permille as u32 / 1000
    }
}

/// What happened to one killed run.
#[derive(Default)]
struct Tally {
    killed: u32,
    finished_first: u32,
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn dr_args<'a>(pg: &'a TestPg, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "-u",
        pg.user.as_str(),
        "--",
        pg.dr.to_str().expect("utf8"),
        "--config",
        pg.cfg.to_str().expect("utf8"),
    ];
    all.extend_from_slice(args);
    all
}

/// Runs dr and returns how long it took; panics on failure.
fn timed(pg: &TestPg, args: &[&str]) -> Duration {
    let t = Instant::now();
    pg.dr(args);
    t.elapsed()
}

/// Starts `dr args…` in a process group of its own and SIGKILLs the whole
/// group (runuser and dr) after `delay`; whether it was still running then.
fn kill_after(pg: &TestPg, args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new("runuser")
        .args(dr_args(pg, args))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn dr");
    std::thread::sleep(delay);
    let running = child.try_wait().expect("try_wait").is_none();
    if running {
        let st = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status()
            .expect("kill");
        assert!(st.success(), "kill of process group {} failed", child.id());
    }
    let _ = child.wait();
    running
}

/// The repository is consistent: `verify --list` passes, so every listed
/// backup has all its objects with the right sizes; returns the listed ids.
fn check_repo(pg: &TestPg, ctx: &str) -> Vec<String> {
    let o = pg.dr_raw(&["--json", "verify", "--list", "pg"]);
    assert!(
        o.status.success(),
        "{ctx}: verify --list failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = pg.dr_raw(&["--json", "list", "pg"]);
    assert!(
        o.status.success(),
        "{ctx}: list failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    json(&o)["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("{ctx}: no backups array"))
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

/// A restore of `latest` started on a scratch port holds exactly the data
/// of the primary once everything is archived.
fn check_latest_restores(pg: &mut TestPg, name: &str) {
    pg.archive_now();
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    let (port, dir, _) = restore_started(pg, "latest", name);
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance,
        "{name}: balance of the restore of latest"
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        history,
        "{name}: history of the restore of latest"
    );
    pg.stop(&dir);
}

/// A short pgbench run in the background, as a live workload during a kill.
fn workload(pg: &TestPg) -> std::process::Child {
    let port = pg.port.to_string();
    Command::new(pg.bin.join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-n",
            "-t",
            "150",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench")
}

/// Kills backups (`extra` = [] or ["--full"]) `n` times.
fn backup_phase(pg: &mut TestPg, rng: &mut Rng, extra: &[&str], n: u32, label: &str) -> Tally {
    let mut args = vec!["backup", "pg"];
    args.extend_from_slice(extra);
    let span = timed(pg, &args);
    eprintln!("{label}: an unkilled run takes {span:?}");
    let mut t = Tally::default();
    for i in 0..n {
        let before = check_repo(pg, label);
        let mut load = workload(pg);
        let d = rng.delay(span);
        let killed = kill_after(pg, &args, d);
        let _ = load.wait();
        eprintln!("{label} #{i}: delay {d:?}, killed {killed}");
        if killed {
            t.killed += 1;
        } else {
            t.finished_first += 1;
        }
        let ctx = format!("{label} #{i} after kill at {d:?}");
        let after = check_repo(pg, &ctx);
        assert!(
            before.iter().all(|b| after.contains(b)),
            "{ctx}: a killed backup removed an earlier backup: {before:?} -> {after:?}"
        );
        pg.dr(&args);
        let again = check_repo(pg, &format!("{ctx}, after the next run"));
        assert_eq!(
            again.len(),
            after.len() + 1,
            "{ctx}: the next run added one backup"
        );
        if i % 3 == 2 {
            check_latest_restores(pg, &format!("{label}-restore-{i}"));
        }
    }
    t
}

/// `dr wal-fetch seg` compared with the segment in pg_wal: Some(true) for
/// the exact bytes, None for "not archived"; anything else fails.
fn fetched(pg: &TestPg, seg: &str, orig: &[u8], ctx: &str) -> Option<bool> {
    let dest = pg.dir.path().join("fetched");
    let _ = std::fs::remove_file(&dest);
    let o = pg.dr_raw(&["wal-fetch", seg, dest.to_str().expect("utf8")]);
    match o.status.code() {
        Some(0) => {
            let got = std::fs::read(&dest).expect("fetched segment");
            assert!(
                got == orig,
                "{ctx}: wal-fetch of {seg} returned other bytes than pushed"
            );
            Some(true)
        }
        Some(1) => None,
        c => panic!(
            "{ctx}: wal-fetch {seg} exited {c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// Kills `wal-push` of completed segments the archiver holds back.
fn wal_push_phase(pg: &TestPg, rng: &mut Rng, n: u32) -> Tally {
    // The archiver fails until the end of the phase, so the segments stay
    // in pg_wal for our own wal-push runs.
    pg.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    pg.sql("SELECT pg_reload_conf()");
    let segment = |pg: &TestPg| {
        pg.pgbench(&["-n", "-t", "100"]);
        let seg = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
        let path = pg.data.join("pg_wal").join(&seg);
        (seg, path)
    };
    let (seg, path) = segment(pg);
    let span = timed(pg, &["wal-push", path.to_str().expect("utf8")]);
    eprintln!("wal-push: an unkilled run of {seg} takes {span:?}");
    let mut t = Tally::default();
    for i in 0..n {
        let (seg, path) = segment(pg);
        let orig = std::fs::read(&path).expect("segment in pg_wal");
        let d = rng.delay(span);
        let killed = kill_after(pg, &["wal-push", path.to_str().expect("utf8")], d);
        let ctx = format!("wal-push #{i} of {seg} killed at {d:?}");
        let state = fetched(pg, &seg, &orig, &ctx);
        eprintln!(
            "wal-push #{i}: delay {d:?}, killed {killed}, left {}",
            if state.is_some() {
                "the whole segment"
            } else {
                "nothing"
            }
        );
        if killed {
            t.killed += 1;
        } else {
            t.finished_first += 1;
        }
        let o = pg.dr_raw(&["wal-push", path.to_str().expect("utf8")]);
        assert!(
            o.status.success(),
            "{ctx}: the next wal-push failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            fetched(pg, &seg, &orig, &ctx),
            Some(true),
            "{ctx}: archived after the next run"
        );
        check_repo(pg, &ctx);
    }
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    // The archiver now pushes the same segments again: identical copies
    // must be accepted, or archiving would be stuck.
    pg.archive_now();
    t
}

/// Kills `expire` with something to delete each time.
fn expire_phase(pg: &TestPg, rng: &mut Rng, n: u32) -> Tally {
    let mut c = std::fs::read_to_string(&pg.cfg).expect("cfg");
    c.push_str("\n[postgres.main.retention]\nkeep_full = 1\n");
    std::fs::write(&pg.cfg, c).expect("cfg");
    pg.pgbench(&["-n", "-t", "100"]);
    pg.dr(&["backup", "pg", "--full"]);
    let span = timed(pg, &["expire"]);
    eprintln!("expire: an unkilled run takes {span:?}");
    let mut t = Tally::default();
    for i in 0..n {
        pg.pgbench(&["-n", "-t", "100"]);
        pg.archive_now();
        pg.dr(&["backup", "pg", "--full"]);
        pg.dr(&["backup", "pg"]);
        let before = check_repo(pg, "expire");
        let d = rng.delay(span);
        let killed = kill_after(pg, &["expire"], d);
        eprintln!("expire #{i}: delay {d:?}, killed {killed}");
        if killed {
            t.killed += 1;
        } else {
            t.finished_first += 1;
        }
        let ctx = format!("expire #{i} killed at {d:?}");
        check_repo(pg, &ctx);
        pg.dr(&["expire"]);
        let after = check_repo(pg, &format!("{ctx}, after the next run"));
        assert!(
            after.len() < before.len() && after.iter().all(|b| before.contains(b)),
            "{ctx}: the next run expired: {before:?} -> {after:?}"
        );
    }
    t
}

/// Kills restores into fresh directories; the next run into another fresh
/// directory must succeed.
fn restore_phase(pg: &TestPg, rng: &mut Rng, n: u32) -> Tally {
    let first = pg.target("rk-measure");
    let span = timed(
        pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            first.to_str().expect("utf8"),
        ],
    );
    eprintln!("restore: an unkilled run takes {span:?}");
    let mut t = Tally::default();
    for i in 0..n {
        let dir = pg.target(&format!("rk-{i}"));
        let d = rng.delay(span);
        let killed = kill_after(
            pg,
            &[
                "restore",
                "pg",
                "--to",
                "latest",
                "--target",
                dir.to_str().expect("utf8"),
            ],
            d,
        );
        eprintln!("restore #{i}: delay {d:?}, killed {killed}");
        if killed {
            t.killed += 1;
        } else {
            t.finished_first += 1;
        }
        let ctx = format!("restore #{i} killed at {d:?}");
        check_repo(pg, &ctx);
        let again = pg.target(&format!("rk-{i}-again"));
        let o = pg.restore_raw("latest", &again, &[]);
        assert!(
            o.status.success(),
            "{ctx}: the next restore failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        remove(&dir);
        remove(&again);
    }
    t
}

fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

#[test]
fn every_command_killed_anywhere_leaves_a_consistent_repository() {
    let seed = std::env::var("DR_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        });
    eprintln!("kill campaign seed {seed} (replay with DR_KILL_SEED={seed})");
    let mut rng = Rng(seed);
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);

    let phases = [
        (
            "backup pg",
            backup_phase(&mut pg, &mut rng, &[], 6, "backup"),
        ),
        (
            "backup pg --full",
            backup_phase(&mut pg, &mut rng, &["--full"], 5, "backup --full"),
        ),
        ("wal-push", wal_push_phase(&pg, &mut rng, 6)),
        ("expire", expire_phase(&pg, &mut rng, 4)),
        ("restore pg", restore_phase(&pg, &mut rng, 5)),
    ];

    pg.pgbench(&["-n", "-t", "200"]);
    check_repo(&pg, "final");
    check_latest_restores(&mut pg, "final-restore");

    eprintln!("kill campaign summary (seed {seed}):");
    let mut total = 0;
    for (name, t) in &phases {
        eprintln!(
            "  {name:<18} killed {:>2}, finished before the kill {:>2}, consistent after every one",
            t.killed, t.finished_first
        );
        total += t.killed;
    }
    assert!(
        total >= 20,
        "only {total} runs were killed mid-way; the delays no longer cover the commands"
    );
}
