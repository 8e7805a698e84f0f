//! The kill-anywhere campaign's machinery (tests/kill_campaign*.rs): a
//! seeded delay generator, one tally per command, runs whose panics are
//! recorded rather than fatal, and the checks every kill is followed by.

use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::pg::{Mark, TestPg, fs_repo, restore_started};

/// splitmix64: a tiny seeded generator, so a seed replays the same delays.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A delay in [2%, 80%] of `span`: late enough that dr has started,
    /// early enough that it has not finished.
    pub fn delay(&mut self, span: Duration) -> Duration {
        let permille = 20 + self.next() % 781;
        span * permille as u32 / 1000
    }
}

/// The campaign's settings for one command, from the environment.
pub struct Campaign {
    pub command: &'static str,
    pub seed: u64,
    pub rng: Rng,
    pub kills: u32,
    pub restore_every: u32,
    /// No new run starts after this time (`DR_CHAOS_UNTIL`, Unix seconds),
    /// so a long campaign fits a time budget.
    pub until: Option<u64>,
    pub started: Instant,
    pub t: Tally,
}

/// What happened to the runs of one command.
#[derive(Default, Debug)]
pub struct Tally {
    pub runs: u32,
    pub killed: u32,
    pub finished_first: u32,
    pub consistent: u32,
    pub inconsistent: u32,
    pub next_run_ok: u32,
    pub restores_checked: u32,
    pub restores_exact: u32,
    pub orphans_left: u32,
    pub orphans_after_expire: u32,
    pub faults: u32,
    pub failures: Vec<String>,
}

/// How far one run got; filled in by the run as it passes each check.
#[derive(Default)]
pub struct Run {
    pub killed: Option<bool>,
    pub consistent: bool,
    pub next_ok: bool,
    pub restore: Option<bool>,
}

impl Campaign {
    /// None when `DR_CHAOS_COMMANDS` names other commands.
    pub fn new(command: &'static str, default_kills: u32) -> Option<Campaign> {
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
            until: std::env::var("DR_CHAOS_UNTIL")
                .ok()
                .and_then(|s| s.parse().ok()),
            started: Instant::now(),
            t: Tally::default(),
        })
    }

    pub fn delay(&mut self, span: Duration) -> Duration {
        self.rng.delay(span)
    }

    /// Whether the time budget is spent: later runs are skipped, and the
    /// summary says how many ran.
    pub fn out_of_time(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.until.is_some_and(|u| now >= u)
    }

    /// Whether run `i` ends with a restore check.
    pub fn restore_now(&self, i: u32) -> bool {
        self.restore_every > 0 && (i + 1).is_multiple_of(self.restore_every)
    }

    /// Runs one kill cycle; a panic in it is an inconsistent run, recorded
    /// with its message, and the campaign goes on.
    pub fn run(&mut self, i: u32, f: impl FnOnce(&mut Run)) {
        if self.out_of_time() {
            return;
        }
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
    pub fn check(&mut self, what: &str, f: impl FnOnce() -> Option<bool>) {
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
    pub fn finish(self) {
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

pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let s = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    // Long outputs (whole stderr dumps) would drown the table.
    s.chars().take(1500).collect()
}

pub fn json(o: &Output) -> serde_json::Value {
    super::json_of(o)
}

pub fn dr_args<'a>(user: &'a str, dr: &'a Path, cfg: &'a Path, args: &[&'a str]) -> Vec<&'a str> {
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
pub fn timed(pg: &TestPg, args: &[&str]) -> Duration {
    let t = Instant::now();
    pg.dr(args);
    t.elapsed()
}

pub fn os_ids(user: &str) -> (u32, u32) {
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
pub fn spawn_dr(pg: &TestPg, args: &[&str]) -> Child {
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
pub fn kill_group(child: &mut Child) -> bool {
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
pub fn kill_after(pg: &TestPg, args: &[&str], delay: Duration) -> bool {
    let mut child = spawn_dr(pg, args);
    std::thread::sleep(delay);
    kill_group(&mut child)
}

/// `dr verify --list` of `scope` (`pg`, `redis`) passes; the report.
pub fn verify_list(o: Output, ctx: &str) -> serde_json::Value {
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
pub fn check_repo(pg: &TestPg, ctx: &str) -> Vec<String> {
    verify_list(pg.dr_raw(&["--json", "verify", "--list", "pg"]), ctx);
    backup_ids(pg, ctx)
}

pub fn backup_ids(pg: &TestPg, ctx: &str) -> Vec<String> {
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
pub fn leftovers(dr: &impl Fn(&[&str]) -> Output) -> u32 {
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
pub fn expire_removes_orphans(c: &mut Campaign, dr: impl Fn(&[&str]) -> Output, cfg: &Path) {
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
        assert_eq!(
            after, 0,
            "expire left {after} orphan objects or temp files (of {left})"
        );
        None
    });
    c.t.orphans_left = left;
    c.t.orphans_after_expire = after;
}

/// A restore to `m` started on a scratch port holds exactly the data of
/// the mark.
pub fn restore_to_mark(pg: &mut TestPg, m: &Mark, name: &str) -> bool {
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
pub fn check_latest_restores(pg: &mut TestPg, name: &str) -> bool {
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
pub fn workload(pg: &TestPg, transactions: u32) -> Child {
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
pub fn pg_setup(remote: bool) -> (tempfile::TempDir, TestPg) {
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

/// Removes a directory tree, if there.
pub fn remove(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}
