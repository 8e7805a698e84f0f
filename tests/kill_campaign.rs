//! Kill-anywhere campaign: every command that writes to the repository (and
//! `restore`, the daemon mid-job and the S3 server mid-multipart-upload) is
//! killed with SIGKILL at a random instant, many times, against real servers
//! with a live workload. After every kill:
//!
//! - the repository is consistent: `dr verify --list` passes, so every
//!   listed backup has all its objects with the right sizes (a killed
//!   backup leaves at most an orphan, which is not listed);
//! - the next run of the same command succeeds;
//! - a restore to the last mark recorded before the kill is exact (every
//!   `DR_CHAOS_RESTORE_EVERY` kills, and at the end of each command's runs);
//! - `expire` (with a short `orphan_age`) removes whatever the kills left.
//!
//! The suite runs a few kills per command. `scripts/chaos.sh` runs the same
//! tests with `DR_CHAOS_KILLS` (kills per command), `DR_CHAOS_COMMANDS`
//! (which commands), `DR_CHAOS_RESTORE_EVERY` and `DR_CHAOS_JSON` (a file
//! that gets one JSON line of results per command). An inconsistent run is
//! recorded and the campaign goes on; the test fails at the end of the
//! command's runs, listing every failure.
//!
//! The delays come from one seed per command, printed at the start; set
//! `DR_KILL_SEED` to replay a run.

mod common;

use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::garage::OwnGarage;
use common::pg::{Mark, TestPg, chown, free_port, fs_repo, mark, restore_started};
use common::redis::{DrSetup, TestRedis};

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

/// The campaign's settings for one command, from the environment.
struct Campaign {
    command: &'static str,
    seed: u64,
    rng: Rng,
    kills: u32,
    restore_every: u32,
    started: Instant,
    t: Tally,
}

/// What happened to the runs of one command.
#[derive(Default, Debug)]
struct Tally {
    runs: u32,
    killed: u32,
    finished_first: u32,
    consistent: u32,
    inconsistent: u32,
    next_run_ok: u32,
    restores_checked: u32,
    restores_exact: u32,
    orphans_left: u32,
    orphans_after_expire: u32,
    faults: u32,
    failures: Vec<String>,
}

/// How far one run got; filled in by the run as it passes each check.
#[derive(Default)]
struct Run {
    killed: Option<bool>,
    consistent: bool,
    next_ok: bool,
    restore: Option<bool>,
}

impl Campaign {
    /// None when `DR_CHAOS_COMMANDS` names other commands.
    fn new(command: &'static str, default_kills: u32) -> Option<Campaign> {
        if let Ok(only) = std::env::var("DR_CHAOS_COMMANDS")
            && !only.trim().is_empty()
            && !only.split([',', ' ']).any(|c| c.trim() == command)
        {
            eprintln!("{command}: not in DR_CHAOS_COMMANDS={only}; skipped");
            return None;
        }
        let env_u32 = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<u32>().ok());
        let seed = std::env::var("DR_KILL_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_nanos() as u64
            });
        eprintln!("{command}: kill campaign seed {seed} (replay with DR_KILL_SEED={seed})");
        Some(Campaign {
            command,
            seed,
            rng: Rng(seed),
            kills: env_u32("DR_CHAOS_KILLS").unwrap_or(default_kills),
            restore_every: env_u32("DR_CHAOS_RESTORE_EVERY").unwrap_or(0),
            started: Instant::now(),
            t: Tally::default(),
        })
    }

    fn delay(&mut self, span: Duration) -> Duration {
        self.rng.delay(span)
    }

    /// Whether run `i` ends with a restore check.
    fn restore_now(&self, i: u32) -> bool {
        self.restore_every > 0 && (i + 1) % self.restore_every == 0
    }

    /// Runs one kill cycle; a panic in it is an inconsistent run, recorded
    /// with its message, and the campaign goes on.
    fn run(&mut self, i: u32, f: impl FnOnce(&mut Run)) {
        let mut r = Run::default();
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut r)));
        self.t.runs += 1;
        match r.killed {
            Some(true) => self.t.killed += 1,
            Some(false) => self.t.finished_first += 1,
            None => {}
        }
        if r.consistent {
            self.t.consistent += 1;
        } else {
            self.t.inconsistent += 1;
        }
        if r.next_ok {
            self.t.next_run_ok += 1;
        }
        if let Some(exact) = r.restore {
            self.t.restores_checked += 1;
            if exact {
                self.t.restores_exact += 1;
            }
        }
        if let Err(p) = res {
            let msg = panic_message(&p);
            eprintln!("{} #{i}: FAILED: {msg}", self.command);
            if r.consistent && !r.next_ok {
                self.t.failures.push(format!("#{i} next run: {msg}"));
            } else {
                self.t.failures.push(format!("#{i}: {msg}"));
            }
        }
    }

    /// A check outside the kill cycles (final restore, orphans); a panic is
    /// recorded as a failure.
    fn check(&mut self, what: &str, f: impl FnOnce() -> Option<bool>) {
        match std::panic::catch_unwind(AssertUnwindSafe(f)) {
            Ok(Some(exact)) => {
                self.t.restores_checked += 1;
                if exact {
                    self.t.restores_exact += 1;
                }
            }
            Ok(None) => {}
            Err(p) => {
                let msg = panic_message(&p);
                eprintln!("{}: {what} FAILED: {msg}", self.command);
                self.t.failures.push(format!("{what}: {msg}"));
            }
        }
    }

    /// Prints the summary, appends it to `DR_CHAOS_JSON`, and fails the
    /// test when any run was inconsistent or any check failed.
    fn finish(self) {
        let t = &self.t;
        let v = serde_json::json!({
            "command": self.command,
            "seed": self.seed.to_string(),
            "runs": t.runs,
            "kills": t.killed,
            "finished_before_kill": t.finished_first,
            "consistent": t.consistent,
            "inconsistent": t.inconsistent,
            "next_run_ok": t.next_run_ok,
            "restores_checked": t.restores_checked,
            "restores_exact": t.restores_exact,
            "orphans_left_by_kills": t.orphans_left,
            "orphans_after_expire": t.orphans_after_expire,
            "faults": t.faults,
            "failures": t.failures,
            "seconds": self.started.elapsed().as_secs(),
        });
        eprintln!("kill campaign result: {v}");
        if let Ok(path) = std::env::var("DR_CHAOS_JSON") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("DR_CHAOS_JSON");
            writeln!(f, "{v}").expect("write DR_CHAOS_JSON");
        }
        assert!(
            t.failures.is_empty() && t.inconsistent == 0,
            "{}: {} of {} runs inconsistent, failures:\n{}\n(replay with DR_KILL_SEED={})",
            self.command,
            t.inconsistent,
            t.runs,
            t.failures.join("\n"),
            self.seed
        );
        assert!(
            t.killed * 2 >= t.runs,
            "{}: only {} of {} runs were killed mid-way; the delays no longer cover the command",
            self.command,
            t.killed,
            t.runs
        );
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let s = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    // Long outputs (whole stderr dumps) would drown the table.
    s.chars().take(1500).collect()
}

fn json(o: &Output) -> serde_json::Value {
    common::json_of(o)
}

fn dr_args<'a>(user: &'a str, dr: &'a Path, cfg: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "-u",
        user,
        "--",
        dr.to_str().expect("utf8"),
        "--config",
        cfg.to_str().expect("utf8"),
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

fn os_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let o = Command::new("id").args([flag, user]).output().expect("id");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// `dr args…` as the OS user (started directly, so a signal reaches dr
/// itself), in a process group of its own.
fn spawn_dr(pg: &TestPg, args: &[&str]) -> Child {
    let (uid, gid) = os_ids(&pg.user);
    Command::new(&pg.dr)
        .arg("--config")
        .arg(&pg.cfg)
        .args(args)
        .uid(uid)
        .gid(gid)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn dr")
}

/// SIGKILLs the process group of `child` if it still runs; whether it did.
fn kill_group(child: &mut Child) -> bool {
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

/// Starts `dr args…` and SIGKILLs it (runuser and dr) after `delay`;
/// whether it was still running then.
fn kill_after(pg: &TestPg, args: &[&str], delay: Duration) -> bool {
    let mut child = spawn_dr(pg, args);
    std::thread::sleep(delay);
    kill_group(&mut child)
}

/// `dr verify --list` of `scope` (`pg`, `redis`) passes; the report.
fn verify_list(o: Output, ctx: &str) -> serde_json::Value {
    assert!(
        o.status.success(),
        "{ctx}: verify --list failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    json(&o)
}

/// The repository is consistent: `verify --list` passes, so every listed
/// backup has all its objects with the right sizes; returns the listed ids.
fn check_repo(pg: &TestPg, ctx: &str) -> Vec<String> {
    verify_list(pg.dr_raw(&["--json", "verify", "--list", "pg"]), ctx);
    backup_ids(pg, ctx)
}

fn backup_ids(pg: &TestPg, ctx: &str) -> Vec<String> {
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

/// What `dr expire --dry-run` would still remove as left over by killed
/// runs: orphan objects of backups that never wrote a manifest, and temp
/// files of killed writers.
fn leftovers(dr: &impl Fn(&[&str]) -> Output) -> u32 {
    let o = dr(&["--json", "expire", "--dry-run"]);
    assert!(
        o.status.success(),
        "expire --dry-run: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v = json(&o);
    let orphans: usize = v["plans"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .flat_map(|p| p["deletions"].as_array().cloned().unwrap_or_default())
                .filter(|d| d["orphan"] == true)
                .count()
        })
        .unwrap_or(0);
    let temp = v["temp_files"].as_array().map_or(0, |t| t.len());
    (orphans + temp) as u32
}

/// With `orphan_age = "1s"`, `dr expire` removes every orphan object and
/// temp file the kills left: a dry run afterwards finds none.
fn expire_removes_orphans(c: &mut Campaign, dr: impl Fn(&[&str]) -> Output, cfg: &Path) {
    let mut text = std::fs::read_to_string(cfg).expect("cfg");
    if !text.contains("\n[retention]\n") {
        text.push_str("\n[retention]\norphan_age = \"1s\"\n");
        std::fs::write(cfg, text).expect("cfg");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let mut left = 0;
    let mut after = 0;
    c.check("expire removes the orphans", || {
        left = leftovers(&dr);
        let o = dr(&["--json", "expire"]);
        assert!(
            o.status.success(),
            "expire: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        after = leftovers(&dr);
        assert_eq!(after, 0, "expire left {after} orphan objects or temp files (of {left})");
        None
    });
    c.t.orphans_left = left;
    c.t.orphans_after_expire = after;
}

/// A restore to `m` started on a scratch port holds exactly the data of
/// the mark.
fn restore_to_mark(pg: &mut TestPg, m: &Mark, name: &str) -> bool {
    // Commits after the mark put it inside the recoverable window (which
    // ends at the last archived commit).
    pg.pgbench(&["-n", "-t", "5"]);
    pg.archive_now();
    let (port, dir, _) = restore_started(pg, &m.at, name);
    let balance = pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql_at(port, "SELECT count(*) FROM pgbench_history");
    pg.stop(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        (&balance, &history),
        (&m.balance, &m.history),
        "{name}: restore to {} is not the data of the mark",
        m.at
    );
    true
}

/// A restore of `latest` started on a scratch port holds exactly the data
/// of the primary once everything is archived.
fn check_latest_restores(pg: &mut TestPg, name: &str) -> bool {
    pg.archive_now();
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    let (port, dir, _) = restore_started(pg, "latest", name);
    let got = (
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
    );
    pg.stop(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(got, (balance, history), "{name}: restore of latest");
    true
}

/// A short pgbench run in the background, as a live workload during a kill.
fn workload(pg: &TestPg, transactions: u32) -> Child {
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
            &transactions.to_string(),
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench")
}

/// A PostgreSQL cluster with pgbench data and a first full backup.
fn pg_setup(remote: bool) -> (tempfile::TempDir, TestPg) {
    let fs = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&fs);
    let pg = if remote {
        TestPg::remote(&regions)
    } else {
        TestPg::new(&regions)
    };
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    (fs, pg)
}

/// Kills backups (`extra` = [] or ["--full"]): each run records a mark,
/// kills a backup under a pgbench workload, checks the repository, runs the
/// backup again and (now and then) restores to the mark.
fn backup_runs(c: &mut Campaign, pg: &mut TestPg, extra: &[&str], n: u32, label: &str) {
    let mut args = vec!["backup", "pg"];
    args.extend_from_slice(extra);
    let span = timed(pg, &args);
    eprintln!("{label}: an unkilled run takes {span:?}");
    for i in 0..n {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            let before = check_repo(pg, label);
            let m = mark(pg);
            let mut load = workload(pg, 150);
            let killed = kill_after(pg, &args, d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("{label} #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("{label} #{i} after kill at {d:?}");
            let after = check_repo(pg, &ctx);
            assert!(
                before.iter().all(|b| after.contains(b)),
                "{ctx}: a killed backup removed an earlier backup: {before:?} -> {after:?}"
            );
            assert!(
                after.len() <= before.len() + 1,
                "{ctx}: more than one new backup: {before:?} -> {after:?}"
            );
            r.consistent = true;
            pg.dr(&args);
            let again = check_repo(pg, &format!("{ctx}, after the next run"));
            assert_eq!(
                again.len(),
                after.len() + 1,
                "{ctx}: the next run added one backup"
            );
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(pg, &m, &format!("{label}-mark-{i}")));
            }
        });
    }
}

fn backup_campaign(command: &'static str, remote: bool, kills: u32) {
    let Some(mut c) = Campaign::new(command, kills) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(remote);
    let n = c.kills;
    if remote {
        backup_runs(&mut c, &mut pg, &[], n, command);
    } else {
        // Incremental and --full backups read and write differently: half each.
        backup_runs(&mut c, &mut pg, &[], n.div_ceil(2), command);
        backup_runs(&mut c, &mut pg, &["--full"], n / 2, "backup pg --full");
    }
    pg.pgbench(&["-n", "-t", "200"]);
    let m = mark(&pg);
    c.check("final restore to a mark", || {
        Some(restore_to_mark(&mut pg, &m, "final-mark"))
    });
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.check("consistent after expire", || {
        check_repo(&pg, "after expire");
        None
    });
    c.finish();
}

#[test]
fn kill_backup_pg_local() {
    backup_campaign("backup-pg", false, 6);
}

#[test]
fn kill_backup_pg_remote() {
    backup_campaign("backup-pg-remote", true, 3);
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

/// Kills `wal-push` of completed segments the archiver holds back; the
/// segment is then either absent or exact, the next push succeeds and the
/// archived copy is exact.
#[test]
fn kill_wal_push() {
    let Some(mut c) = Campaign::new("wal-push", 6) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    // The archiver fails until the end of the runs, so the segments stay
    // in pg_wal for our own wal-push runs.
    pg.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    pg.sql("SELECT pg_reload_conf()");
    let segment = |pg: &TestPg| {
        pg.pgbench(&["-n", "-t", "100"]);
        let seg = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
        let path = pg.data.join("pg_wal").join(&seg);
        (seg, path)
    };
    let (seg, path) = segment(&pg);
    let span = timed(&pg, &["wal-push", path.to_str().expect("utf8")]);
    eprintln!("wal-push: an unkilled run of {seg} takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        c.run(i, |r| {
            let (seg, path) = segment(&pg);
            let orig = std::fs::read(&path).expect("segment in pg_wal");
            let killed = kill_after(&pg, &["wal-push", path.to_str().expect("utf8")], d);
            r.killed = Some(killed);
            let ctx = format!("wal-push #{i} of {seg} killed at {d:?}");
            let state = fetched(&pg, &seg, &orig, &ctx);
            eprintln!(
                "wal-push #{i}: delay {d:?}, killed {killed}, left {}",
                if state.is_some() {
                    "the whole segment"
                } else {
                    "nothing"
                }
            );
            check_repo(&pg, &ctx);
            r.consistent = true;
            let o = pg.dr_raw(&["wal-push", path.to_str().expect("utf8")]);
            assert!(
                o.status.success(),
                "{ctx}: the next wal-push failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            r.next_ok = true;
            r.restore = Some(fetched(&pg, &seg, &orig, &ctx) == Some(true));
            assert_eq!(r.restore, Some(true), "{ctx}: archived after the next run");
        });
    }
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    // The archiver now pushes the same segments again: identical copies
    // must be accepted, or archiving would be stuck.
    c.check("archiver catches up over the pushed segments", || {
        pg.archive_now();
        None
    });
    c.check("final restore of latest", || {
        pg.dr(&["backup", "pg"]);
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills `expire` with something to delete each time; the next run
/// finishes the job and every kept backup stays complete.
#[test]
fn kill_expire() {
    let Some(mut c) = Campaign::new("expire", 4) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    let mut text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    text.push_str("\n[postgres.main.retention]\nkeep_full = 1\n");
    std::fs::write(&pg.cfg, text).expect("cfg");
    pg.pgbench(&["-n", "-t", "100"]);
    pg.dr(&["backup", "pg", "--full"]);
    let span = timed(&pg, &["expire"]);
    eprintln!("expire: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            pg.pgbench(&["-n", "-t", "100"]);
            pg.archive_now();
            pg.dr(&["backup", "pg", "--full"]);
            pg.dr(&["backup", "pg"]);
            let m = mark(&pg);
            let before = check_repo(&pg, "expire");
            let mut load = workload(&pg, 100);
            let killed = kill_after(&pg, &["expire"], d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("expire #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("expire #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            pg.dr(&["expire"]);
            let after = check_repo(&pg, &format!("{ctx}, after the next run"));
            assert!(
                after.len() < before.len() && after.iter().all(|b| before.contains(b)),
                "{ctx}: the next run expired: {before:?} -> {after:?}"
            );
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("expire-mark-{i}")));
            }
        });
    }
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills restores into fresh directories; the next run into another fresh
/// directory succeeds, and the killed one's directory is refused or
/// reusable, never mistaken for a finished restore.
#[test]
fn kill_restore_pg() {
    let Some(mut c) = Campaign::new("restore-pg", 4) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    pg.pgbench(&["-n", "-t", "200"]);
    pg.archive_now();
    let first = pg.target("rk-measure");
    let span = timed(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            first.to_str().expect("utf8"),
        ],
    );
    remove(&first);
    eprintln!("restore: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            let dir = pg.target(&format!("rk-{i}"));
            let killed = kill_after(
                &pg,
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
            r.killed = Some(killed);
            eprintln!("restore #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("restore #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            let again = pg.target(&format!("rk-{i}-again"));
            let o = pg.restore_raw("latest", &again, &[]);
            assert!(
                o.status.success(),
                "{ctx}: the next restore failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            r.next_ok = true;
            remove(&dir);
            remove(&again);
            if restore {
                r.restore = Some(check_latest_restores(&mut pg, &format!("rk-check-{i}")));
            }
        });
    }
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    c.finish();
}

fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

/// `dr wal-stream` as the OS user in a process group of its own, logging
/// to `stream.log`.
fn spawn_streamer(pg: &TestPg) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pg.dir.path().join("stream.log"))
        .expect("log");
    Command::new("runuser")
        .args(dr_args(&pg.user, &pg.dr, &pg.cfg, &["wal-stream"]))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn dr wal-stream")
}

/// Waits until the server sees the streamer as a synchronous standby.
fn wait_sync_streaming(pg: &TestPg) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pg.sql(
            "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication WHERE application_name = 'dr_main'",
        );
        if s == "sync" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dr_main is not streaming synchronously ({s:?}); log:\n{}",
            std::fs::read_to_string(pg.dir.path().join("stream.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills `dr wal-stream` (synchronous, so every acknowledged commit is in
/// the repository) under a pgbench workload. After each kill the
/// repository is consistent, the next streamer resumes from its slot, and
/// a restore of `latest` holds every mark committed before the kill.
#[test]
fn kill_wal_stream() {
    let Some(mut c) = Campaign::new("wal-stream", 4) else {
        return;
    };
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::streaming(
        &fs_repo(&fs),
        "synchronous = true\nstream_flush_interval = \"1s\"\n",
    );
    pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'dr_main'");
    pg.sql("SELECT pg_reload_conf()");
    let mut streamer = spawn_streamer(&pg);
    wait_sync_streaming(&pg);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.sql("CREATE TABLE chaos_marks (i int primary key, at timestamptz default now())");
    pg.dr(&["backup", "pg", "--full"]);
    let span = Duration::from_secs(4);
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let mut load = workload(&pg, 400);
            std::thread::sleep(d);
            // Synchronous: once this returns, the mark is in the repository.
            pg.sql(&format!("INSERT INTO chaos_marks (i) VALUES ({i})"));
            let killed = kill_group(&mut streamer);
            r.killed = Some(killed);
            eprintln!("wal-stream #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("wal-stream #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            streamer = spawn_streamer(&pg);
            wait_sync_streaming(&pg);
            let _ = load.wait();
            r.next_ok = true;
            if restore {
                let (port, dir, _) = restore_started(&mut pg, "latest", &format!("ws-{i}"));
                let got = pg.sql_at(port, "SELECT coalesce(max(i), -1) FROM chaos_marks");
                pg.stop(&dir);
                remove(&dir);
                r.restore = Some(got.parse::<i64>().unwrap_or(-1) >= i64::from(i));
                assert_eq!(
                    r.restore,
                    Some(true),
                    "{ctx}: restore of latest holds marks up to {got}, but mark {i} was acknowledged before the kill"
                );
            }
        });
    }
    kill_group(&mut streamer);
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills `dr backup redis` under a write load. A restore of the next
/// snapshot holds the mark written before the kill.
#[test]
fn kill_backup_redis() {
    let Some(mut c) = Campaign::new("backup-redis", 5) else {
        return;
    };
    let redis = TestRedis::start(&[]);
    redis.populate(150_000);
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let setup = DrSetup::new(
        &common::fs_region_toml("local", &repo),
        &format!("[redis.cache]\nurl = \"{}\"\n", redis.url()),
    );
    let t = Instant::now();
    setup.dr(&["backup", "redis"]);
    let span = t.elapsed();
    eprintln!("backup redis: an unkilled run takes {span:?}");
    let snapshots = |ctx: &str| -> usize {
        let o = setup.dr_raw(&["--json", "verify", "--list", "redis"]);
        verify_list(o, ctx);
        let v = setup.dr_json(&["list", "redis"]);
        v["snapshots"].as_array().map_or(0, |a| a.len())
    };
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = snapshots("before");
            let _: () = redis.cmd(&["SET", "chaos:mark", &i.to_string()]);
            // A live write load on other keys during the kill.
            let url = redis.url();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            let writer = std::thread::spawn(move || {
                let mut conn = redis::Client::open(url).expect("url").get_connection().expect("conn");
                let mut n = 0u64;
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: redis::RedisResult<()> =
                        redis::cmd("SET").arg(format!("w:{}", n % 5000)).arg(n).query(&mut conn);
                    n += 1;
                }
            });
            let mut child = setup
                .command(&["backup", "redis"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn");
            std::thread::sleep(d);
            let killed = kill_group(&mut child);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = writer.join();
            r.killed = Some(killed);
            eprintln!("backup redis #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("backup redis #{i} killed at {d:?}");
            let after = snapshots(&ctx);
            assert!(after >= before && after <= before + 1, "{ctx}: {before} -> {after} snapshots");
            r.consistent = true;
            setup.dr(&["backup", "redis"]);
            assert_eq!(snapshots(&ctx), after + 1, "{ctx}: the next run added a snapshot");
            r.next_ok = true;
            if restore {
                let target = setup.path(&format!("rr-{i}"));
                let port = free_port();
                let v = setup.dr_json(&[
                    "restore",
                    "redis",
                    "--to",
                    "latest",
                    "--target",
                    target.to_str().expect("utf8"),
                    "--start",
                    "--port",
                    &port.to_string(),
                ]);
                let pid = v["restore"]["pid"].as_u64();
                let got: redis::RedisResult<String> = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("GET").arg("chaos:mark").query(&mut c));
                if let Some(pid) = pid {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                }
                remove(&target);
                assert_eq!(v["restore"]["keys_match"], true, "{ctx}: {v}");
                r.restore = Some(got.as_deref().ok() == Some(i.to_string().as_str()));
                assert_eq!(r.restore, Some(true), "{ctx}: chaos:mark in the restore: {got:?}");
            }
        });
    }
    expire_removes_orphans(&mut c, |a| setup.dr_raw(a), &setup.cfg.clone());
    c.finish();
}

/// Kills `dr repo sync` while it copies a region that lost everything:
/// the copies it made are whole (verify finds only missing objects, never
/// corrupt ones), a backup whose manifest reached the region has all its
/// data there, and the next sync completes the region.
#[test]
fn kill_repo_sync() {
    let Some(mut c) = Campaign::new("repo-sync", 5) else {
        return;
    };
    let fs = tempfile::tempdir().expect("tempdir");
    let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    let (a, b) = (fs.path().join("a"), fs.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).expect("mkdir");
        chown(d, &user);
    }
    std::fs::set_permissions(fs.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let regions = format!(
        "{}{}",
        common::fs_region_toml("a", &a),
        common::fs_region_toml("b", &b)
    );
    let mut pg = TestPg::new(&regions);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    pg.pgbench(&["-n", "-t", "200"]);
    pg.dr(&["backup", "pg"]);
    pg.archive_now();
    // Region b loses everything but its descriptor.
    let wipe = |b: &Path| {
        for e in std::fs::read_dir(b).expect("read b").flatten() {
            if e.file_name() != "dr-repo.json" {
                let p = e.path();
                if p.is_dir() {
                    remove(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    };
    wipe(&b);
    let span = timed(&pg, &["repo", "sync"]);
    eprintln!("repo sync: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            wipe(&b);
            let mut load = workload(&pg, 100);
            let killed = kill_after(&pg, &["repo", "sync"], d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("repo sync #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("repo sync #{i} killed at {d:?}");
            verify_list(pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "a"]), &ctx);
            let v = json(&pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "b"]));
            let problems = v["problems"].as_array().cloned().unwrap_or_default();
            let bad: Vec<_> = problems.iter().filter(|p| p["kind"] != "missing").collect();
            assert!(bad.is_empty(), "{ctx}: region b holds bad copies: {bad:?}");
            // A manifest in b means its backup directory is whole in b.
            for f in common::walk_files(&b) {
                if f.file_name().is_some_and(|n| n == "manifest") && f.to_string_lossy().contains("/backups/") {
                    let dir_b = f.parent().expect("dir");
                    let dir_a = a.join(dir_b.strip_prefix(&b).expect("under b"));
                    for fa in common::walk_files(&dir_a) {
                        let fb = b.join(fa.strip_prefix(&a).expect("under a"));
                        let (la, lb) = (
                            std::fs::metadata(&fa).map(|m| m.len()).ok(),
                            std::fs::metadata(&fb).map(|m| m.len()).ok(),
                        );
                        assert_eq!(la, lb, "{ctx}: {} has its manifest in b but {} is not whole there", dir_b.display(), fb.display());
                    }
                }
            }
            r.consistent = true;
            pg.dr(&["repo", "sync"]);
            verify_list(pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "b"]), &format!("{ctx}, after the next sync"));
            r.next_ok = true;
            if restore {
                r.restore = Some(check_latest_restores(&mut pg, &format!("sync-{i}")));
            }
        });
    }
    c.check("final restore of latest from region b alone", || {
        let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
        // Make b the preferred region for reads: restore reads from b.
        let only_b = text.replace(&common::fs_region_toml("a", &a), "");
        let cfg_b = pg.dir.path().join("only-b.toml");
        std::fs::write(&cfg_b, only_b).expect("cfg");
        chown(&cfg_b, &user);
        pg.archive_now();
        pg.dr(&["repo", "sync"]);
        let dir = pg.target("sync-final");
        pg.dr_with(&cfg_b, &["restore", "pg", "--to", "latest", "--target", dir.to_str().expect("utf8")]);
        remove(&dir);
        Some(true)
    });
    c.finish();
}

/// Kills `dr daemon` while it runs a scheduled backup (every 2 s); the
/// next daemon starts (the lock of the killed one does not hold it back)
/// and takes backups again.
#[test]
fn kill_daemon_mid_job() {
    let Some(mut c) = Campaign::new("daemon", 3) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    let state = pg.dir.path().join("daemon-state");
    std::fs::create_dir_all(&state).expect("state");
    chown(&state, &pg.user);
    let port = free_port();
    let mut text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    text.push_str(&format!(
        "\n[postgres.main.schedule]\nbackup = \"*/2 * * * * *\"\n\n[daemon]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\nretry_initial_seconds = 1\n",
        state.display()
    ));
    std::fs::write(&pg.cfg, text).expect("cfg");
    let span = Duration::from_secs(8);
    for i in 0..c.kills {
        let d = Duration::from_secs(1) + c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = backup_ids(&pg, "before");
            let m = mark(&pg);
            let mut load = workload(&pg, 300);
            let mut daemon = spawn_dr(&pg, &["daemon"]);
            std::thread::sleep(d);
            let killed = kill_group(&mut daemon);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("daemon #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("daemon #{i} killed at {d:?}");
            let after = check_repo(&pg, &ctx);
            assert!(before.iter().all(|b| after.contains(b)), "{ctx}: {before:?} -> {after:?}");
            r.consistent = true;
            // The next daemon starts and takes a backup.
            let mut next = spawn_dr(&pg, &["daemon"]);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if backup_ids(&pg, &ctx).len() > after.len() {
                    break;
                }
                if let Some(st) = next.try_wait().expect("try_wait") {
                    panic!("{ctx}: the next daemon exited with {st}");
                }
                assert!(Instant::now() < deadline, "{ctx}: the next daemon took no backup within 60 s");
                std::thread::sleep(Duration::from_millis(300));
            }
            // SIGTERM: the running job may finish, then it exits.
            let _ = Command::new("kill").args(["-TERM", "--", &format!("-{}", next.id())]).status();
            let st = next.wait().expect("wait");
            assert!(st.success(), "{ctx}: the next daemon exited with {st} on SIGTERM");
            check_repo(&pg, &format!("{ctx}, after the next daemon"));
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("daemon-mark-{i}")));
            }
        });
    }
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills the S3 server (a Garage of the test's own) while `dr backup pg`
/// uploads in 5 MiB parts to it: the backup fails (or finished first) and
/// nothing claims success that is not there; once the server is back, the
/// repository verifies, the next backup succeeds and restores exactly.
#[test]
fn kill_s3_server_mid_multipart_upload() {
    let Some(mut c) = Campaign::new("s3-server", 3) else {
        return;
    };
    let mut garage = OwnGarage::start();
    let region = garage.region_toml("s3", "part_size_mib = 5\n");
    let mut pg = TestPg::new(&region);
    pg.pgbench(&["-i", "-s", "8", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    let span = timed(&pg, &["backup", "pg", "--full"]);
    eprintln!("s3-server: an unkilled --full backup takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = check_repo(&pg, "before");
            let m = mark(&pg);
            let mut load = workload(&pg, 200);
            let mut child = Command::new("runuser")
                .args(dr_args(&pg.user, &pg.dr, &pg.cfg, &["backup", "pg", "--full"]))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .expect("spawn");
            std::thread::sleep(d);
            let running = child.try_wait().expect("try_wait").is_none();
            garage.kill();
            r.killed = Some(running);
            let out = child.wait_with_output().expect("wait");
            let _ = load.wait();
            eprintln!("s3-server #{i}: delay {d:?}, killed mid-backup {running}, dr exit {}", out.status);
            std::thread::sleep(Duration::from_millis(500));
            garage.run();
            garage.wait_s3();
            let ctx = format!("s3-server #{i} killed at {d:?}");
            let after = check_repo(&pg, &ctx);
            if out.status.success() {
                assert_eq!(after.len(), before.len() + 1, "{ctx}: dr said success");
            } else {
                assert_eq!(after, before, "{ctx}: dr failed ({}) but a backup appeared", String::from_utf8_lossy(&out.stderr));
            }
            r.consistent = true;
            pg.dr(&["backup", "pg"]);
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("s3-mark-{i}")));
            }
        });
    }
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}
