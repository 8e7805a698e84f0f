//! `dr daemon` against real PostgreSQL and Redis servers: scheduled runs seen
//! through /metrics, failing and overlapping jobs, shutdown during an upload,
//! the single-instance lock and config reloads.

mod common;

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::pg::{TestPg, free_port, fs_repo, os_id as id};
use common::redis::{AfterBudget, DrSetup, Proxy, TestRedis};
use common::{dr_bin, fs_region_toml, require_env};

/// A running `dr daemon`, killed (by pid) on drop if a test failed before
/// stopping it.
struct Daemon {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Daemon {
    /// Starts `dr --config cfg daemon` with stderr in `log`; as `user` if given.
    fn start(dr: &Path, cfg: &Path, port: u16, log: PathBuf, user: Option<&str>) -> Daemon {
        let err = std::fs::File::create(&log).expect("log file");
        let mut c = Command::new(dr);
        c.arg("--config")
            .arg(cfg)
            .arg("daemon")
            .env("DR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err));
        if let Some(u) = user {
            c.uid(id(u, "-u")).gid(id(u, "-g"));
        }
        let child = c.spawn().expect("start dr daemon");
        let d = Daemon { child, log, port };
        d.wait_for("the metrics endpoint", Duration::from_secs(30), |d| {
            d.try_get("/healthz").is_some()
        });
        d
    }

    /// Starts a daemon as the PostgreSQL OS user on a [`TestPg`]'s config.
    fn of_pg(pg: &TestPg, port: u16, log: &str) -> Daemon {
        Daemon::start(
            &pg.dr,
            &pg.cfg,
            port,
            pg.dir.path().join(log),
            Some(&pg.user),
        )
    }

    /// Starts a daemon as the current user on a [`DrSetup`]'s config.
    fn of(setup: &DrSetup, port: u16, log: &str) -> Daemon {
        Daemon::start(Path::new(dr_bin()), &setup.cfg, port, setup.path(log), None)
    }

    /// Waits until `job` has succeeded `n` times in all.
    fn wait_successes(&self, job: &str, n: f64) {
        self.wait_for(
            &format!("{n} successful runs of {job}"),
            Duration::from_secs(60),
            |d| successes(&d.metrics(), job) >= n,
        );
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -s {sig}");
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// (status, headers, body) of a GET, or None while nothing listens.
    fn try_get(&self, path: &str) -> Option<(u16, String, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, head.to_string(), body.to_string()))
    }

    fn get(&self, path: &str) -> (u16, String, String) {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed; daemon log:\n{}", self.logs()))
    }

    fn metrics(&self) -> String {
        let (status, head, body) = self.get("/metrics");
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        body
    }

    fn wait_for(&self, what: &str, timeout: Duration, ok: impl Fn(&Daemon) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}; daemon log:\n{}",
            self.logs()
        );
    }

    /// Waits for the process to exit; None if it is still running.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(mut self) -> String {
        self.signal("TERM");
        let st = self.wait_exit(Duration::from_secs(60));
        assert!(
            st.is_some_and(|s| s.success()),
            "daemon did not stop cleanly ({st:?}); log:\n{}",
            self.logs()
        );
        self.logs()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of `name` in the sample whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn job(name: &str) -> String {
    format!("name=\"{name}\"")
}

/// Successful runs of a job: finished runs minus failures.
fn successes(text: &str, name: &str) -> f64 {
    let l = job(name);
    metric(text, "dr_job_runs_total", &l).unwrap_or(0.0)
        - metric(text, "dr_job_failures_total", &l).unwrap_or(0.0)
}

fn append(cfg: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cfg)
        .expect("open config");
    f.write_all(text.as_bytes()).expect("append config");
}

fn daemon_section(port: u16, state: &Path, extra: &str) -> String {
    format!(
        "\n[daemon]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\n{extra}\n",
        state.display()
    )
}

#[test]
fn scheduled_jobs_run_and_show_in_metrics_and_a_failing_job_does_not_stop_them() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "2"]);
    let redis = TestRedis::start(&[]);
    redis.populate(5_000);
    let port = free_port();
    let closed = free_port();
    append(
        &pg.cfg,
        &format!(
            "[postgres.main.schedule]\nbackup = \"*/2 * * * * *\"\n\n\
             [redis.cache]\nurl = \"{}\"\n[redis.cache.schedule]\nsnapshot = \"* * * * * *\"\n\n\
             [redis.bad]\nurl = \"redis://127.0.0.1:{closed}\"\ntimeout_seconds = 1\n\
             [redis.bad.schedule]\nsnapshot = \"* * * * * *\"\n{}",
            redis.url(),
            daemon_section(
                port,
                &pg.dir.path().join("daemon-state"),
                "max_concurrent_jobs = 3\nretries = 1\nretry_initial_seconds = 1\nretry_max_seconds = 1\nunhealthy_after_failures = 2\ngrace_seconds = 30"
            )
        ),
    );
    let started = chrono::Utc::now().timestamp() as f64;
    let d = Daemon::of_pg(&pg, port, "daemon.log");
    d.wait_for(
        "2 backups, 3 snapshots, 2 failures",
        Duration::from_secs(180),
        |d| {
            let m = d.metrics();
            successes(&m, "postgres.main.backup") >= 2.0
                && successes(&m, "redis.cache.snapshot") >= 3.0
                && metric(&m, "dr_job_failures_total", &job("redis.bad.snapshot")).unwrap_or(0.0)
                    >= 2.0
        },
    );
    // WAL probes run every second; give one a moment after the last backup.
    std::thread::sleep(Duration::from_secs(2));
    let m = d.metrics();
    let now = chrono::Utc::now().timestamp() as f64 + 1.0;
    for name in ["postgres.main.backup", "redis.cache.snapshot"] {
        let l = job(name);
        let t = metric(&m, "dr_job_last_success_timestamp_seconds", &l).expect(name);
        assert!(t >= started && t <= now, "{name}: last success {t}\n{m}");
        assert!(metric(&m, "dr_job_last_duration_seconds", &l).expect(name) > 0.0);
        assert_eq!(metric(&m, "dr_job_failures_total", &l), Some(0.0), "{m}");
        assert!(metric(&m, "dr_job_running", &l).is_some(), "{m}");
        assert!(metric(&m, "dr_job_next_run_timestamp_seconds", &l).expect(name) >= now - 2.0);
    }
    let pg_bytes = metric(&m, "dr_job_last_bytes", &job("postgres.main.backup")).expect("bytes");
    assert!(
        pg_bytes > 20e6,
        "a pgbench -s 2 cluster is larger: {pg_bytes}"
    );
    assert!(metric(&m, "dr_job_last_bytes", &job("redis.cache.snapshot")).expect("bytes") > 1e4);
    let bad = job("redis.bad.snapshot");
    assert!(metric(&m, "dr_job_failures_total", &bad).expect("failures") >= 2.0);
    assert!(
        metric(&m, "dr_job_retries_total", &bad).expect("retries") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "dr_job_last_success_timestamp_seconds", &bad),
        None
    );
    let cluster = "cluster=\"main\"";
    assert_eq!(metric(&m, "dr_postgres_up", cluster), Some(1.0), "{m}");
    let lag = metric(&m, "dr_wal_archive_lag_segments", cluster).expect("lag");
    assert!(lag < 3.0, "archiving keeps up in this test: {lag}\n{m}");
    assert!(
        metric(&m, "dr_wal_archive_lag_seconds", cluster).is_some(),
        "{m}"
    );
    assert!(metric(&m, "dr_wal_last_archived_timestamp_seconds", cluster).is_some());
    assert_eq!(
        metric(&m, "dr_region_up", "region=\"local\""),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "dr_region_write_degraded", "region=\"local\""),
        Some(0.0)
    );
    // No verify job exists, so no verification gauges pretend one ran.
    assert!(!m.contains("dr_verified_restore_rto_seconds"), "{m}");
    assert!(
        !m.contains("dr_last_verified_restore_timestamp_seconds"),
        "{m}"
    );

    let (status, _, body) = d.get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("job redis.bad.snapshot failed") && body.contains("in a row"),
        "{body}"
    );
    assert!(!body.contains("redis.cache"), "{body}");
    assert_eq!(d.get("/nope").0, 404);

    let logs = d.stop();
    // stderr is a file, not a terminal: every line is JSON.
    for line in logs.lines().take(20) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(logs.contains("schedules are in UTC"), "{logs}");

    let list: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("json");
    let backups = list["backups"].as_array().expect("backups").len();
    assert!(backups >= 2, "{list}");
    let list: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "redis", "cache"]).stdout).expect("json");
    assert!(list["snapshots"].as_array().expect("snapshots").len() >= 3);
}

/// A Redis server behind a proxy that stalls after `budget` bytes: a
/// snapshot of it hangs mid-transfer.
fn stalled_redis(keys: u64, budget: u64) -> (TestRedis, Proxy) {
    let redis = TestRedis::start(&[]);
    redis.populate(keys);
    let proxy = Proxy::start(redis.port, budget, AfterBudget::Stall);
    (redis, proxy)
}

fn redis_job(name: &str, url: &str, schedule: &str, extra: &str) -> String {
    format!(
        "[redis.{name}]\nurl = \"{url}\"\n{extra}\n[redis.{name}.schedule]\nsnapshot = \"{schedule}\"\n"
    )
}

#[test]
fn a_run_slower_than_its_schedule_is_skipped_not_doubled() {
    require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let (_redis, proxy) = stalled_redis(20_000, 4096);
    let repo = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let setup = DrSetup::new(
        &fs_region_toml("local", &repo.path().join("repo")),
        &(redis_job(
            "slow",
            &format!("redis://127.0.0.1:{}", proxy.port),
            "* * * * * *",
            "timeout_seconds = 3",
        ) + &daemon_section(port, &repo.path().join("state"), "retries = 0")),
    );
    let d = Daemon::of(&setup, port, "daemon.log");
    let name = job("redis.slow.snapshot");
    d.wait_for("two failed runs", Duration::from_secs(60), |d| {
        metric(&d.metrics(), "dr_job_failures_total", &name).unwrap_or(0.0) >= 2.0
    });
    let m = d.metrics();
    let runs = metric(&m, "dr_job_runs_total", &name).expect("runs");
    let skipped = metric(&m, "dr_job_skipped_total", &name).expect("skipped");
    assert!(
        skipped >= 2.0 * runs,
        "each 3 s run skips about 2 ticks: {m}"
    );
    let logs = d.stop();
    // Start and end events of the job alternate: never two runs at once.
    let mut inside = false;
    let mut starts = 0;
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json log");
        let msg = v["fields"]["message"].as_str().unwrap_or("");
        if msg == "job started" {
            assert!(!inside, "a second run started while one was going:\n{logs}");
            inside = true;
            starts += 1;
        } else if msg.starts_with("job failed")
            || msg.starts_with("job succeeded")
            || msg.starts_with("job aborted")
        {
            assert!(inside, "{logs}");
            inside = false;
        }
    }
    assert!(starts >= 2, "{logs}");
    assert!(
        logs.contains("skipped: the previous run is still going"),
        "{logs}"
    );
}

fn files_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    common::walk_files(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == name))
        .collect()
}

#[test]
fn sigterm_during_an_upload_stops_within_the_grace_period_and_leaves_no_backup() {
    require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let budget = 1 << 20;
    let (redis, proxy) = stalled_redis(100_000, budget);
    let repo = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let daemon = daemon_section(port, &repo.path().join("state"), "grace_seconds = 2");
    let setup = DrSetup::new(
        &fs_region_toml("local", &repo.path().join("repo")),
        &(redis_job(
            "cache",
            &format!("redis://127.0.0.1:{}", proxy.port),
            "* * * * * *",
            "timeout_seconds = 120",
        ) + &daemon),
    );
    let mut d = Daemon::of(&setup, port, "daemon.log");
    let name = job("redis.cache.snapshot");
    d.wait_for(
        "a snapshot stalled mid-upload",
        Duration::from_secs(60),
        |d| {
            proxy.forwarded.load(std::sync::atomic::Ordering::Relaxed) >= budget
                && metric(&d.metrics(), "dr_job_running", &name) == Some(1.0)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    d.signal("TERM");
    let st = d.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(
        st.is_some_and(|s| s.success()),
        "exit {st:?}; log:\n{}",
        d.logs()
    );
    assert!(took < Duration::from_secs(5), "grace is 2 s, took {took:?}");
    let logs = d.logs();
    assert!(logs.contains("job aborted"), "{logs}");
    drop(d);

    let snaps = setup.dr_json(&["list", "redis", "cache"]);
    assert_eq!(
        snaps["snapshots"].as_array().map(|a| a.len()),
        Some(0),
        "{snaps}"
    );
    assert!(
        files_named(&repo.path().join("repo"), "manifest").is_empty(),
        "no manifest may exist after an aborted run"
    );

    // The next run, against the server directly, succeeds.
    let text = std::fs::read_to_string(&setup.cfg).expect("cfg");
    std::fs::write(
        &setup.cfg,
        text.replace(
            &format!("127.0.0.1:{}", proxy.port),
            &format!("127.0.0.1:{}", redis.port),
        ),
    )
    .expect("cfg");
    let d = Daemon::of(&setup, port, "daemon2.log");
    d.wait_successes("redis.cache.snapshot", 1.0);
    d.stop();
    let snaps = setup.dr_json(&["list", "redis", "cache"]);
    let n = snaps["snapshots"].as_array().map(|a| a.len()).unwrap_or(0);
    assert!(n >= 1, "{snaps}");
    let target = setup.path("restored");
    setup.dr(&[
        "restore",
        "redis",
        "cache",
        "--to",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
    ]);
    assert!(target.join("dump.rdb").is_file());
}

#[test]
fn a_second_daemon_refuses_and_a_broken_reload_keeps_the_old_schedules() {
    require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let redis = TestRedis::start(&[]);
    redis.populate(1_000);
    let repo = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let good = redis_job("cache", &redis.url(), "* * * * * *", "")
        + &daemon_section(port, &repo.path().join("state"), "");
    let setup = DrSetup::new(&fs_region_toml("local", &repo.path().join("repo")), &good);
    let original = std::fs::read_to_string(&setup.cfg).expect("cfg");
    let d = Daemon::of(&setup, port, "daemon.log");
    d.wait_successes("redis.cache.snapshot", 1.0);

    // A second daemon on the same config exits at once, naming the first.
    let mut second = setup
        .command(&["daemon"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("second daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = second.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = second.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.is_some_and(|s| !s.success()),
        "second daemon must refuse: {status:?} {err}"
    );
    assert!(
        err.contains("another dr daemon is already running")
            && err.contains(&format!("pid {}", d.pid())),
        "{err}"
    );

    // A broken config is rejected at SIGHUP; the old schedule keeps running.
    std::fs::write(
        &setup.cfg,
        original.replace("snapshot = \"* * * * * *\"", "snapshot = \"every second\""),
    )
    .expect("write");
    d.signal("HUP");
    d.wait_for("the reload to be rejected", Duration::from_secs(20), |d| {
        metric(
            &d.metrics(),
            "dr_daemon_config_reloads_total",
            "outcome=\"rejected\"",
        ) == Some(1.0)
    });
    assert!(d.logs().contains("config reload rejected"), "{}", d.logs());
    let before = successes(&d.metrics(), "redis.cache.snapshot");
    d.wait_for(
        "more snapshots on the old schedule",
        Duration::from_secs(60),
        |d| successes(&d.metrics(), "redis.cache.snapshot") >= before + 2.0,
    );
    let (status, _, body) = d.get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("rejected at reload"), "{body}");

    // A valid config adding a job is applied.
    std::fs::write(
        &setup.cfg,
        original.clone() + &redis_job("second", &redis.url(), "*/2 * * * * *", ""),
    )
    .expect("write");
    d.signal("HUP");
    d.wait_successes("redis.second.snapshot", 1.0);
    let (status, _, body) = d.get("/healthz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok\n");
    d.stop();
}

#[test]
fn daemon_check_prints_utc_schedules_including_retention() {
    let repo = tempfile::tempdir().expect("tempdir");
    let sections = redis_job("cache", "redis://127.0.0.1:6379", "0 2 * * 1-5", "")
        + &daemon_section(free_port(), &repo.path().join("state"), "");
    let setup = DrSetup::new(
        &fs_region_toml("local", &repo.path().join("repo")),
        &sections,
    );
    let o = setup.dr(&["daemon", "--check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("redis.cache.snapshot") && out.contains("0 2 * * 1-5"),
        "{out}"
    );
    assert!(out.contains("schedules are in UTC"), "{out}");
    assert!(out.contains("T02:00:00Z"), "{out}");

    append(&setup.cfg, "\n[retention]\nschedule = \"0 4 * * *\"\n");
    let o = setup.dr(&["daemon", "--check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("retention.expire") && out.contains("T04:00:00Z"),
        "{out}"
    );
}

#[test]
fn an_aborted_postgres_backup_is_invisible_and_the_next_one_succeeds() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "30"]);
    let port = free_port();
    append(
        &pg.cfg,
        &format!(
            "[postgres.main.schedule]\nbackup = \"* * * * * *\"\n{}",
            daemon_section(
                port,
                &pg.dir.path().join("daemon-state"),
                "grace_seconds = 0\nretries = 0"
            )
        ),
    );
    let start = |log: &str| Daemon::of_pg(&pg, port, log);
    let mut d = start("daemon.log");
    let name = job("postgres.main.backup");
    d.wait_for("a backup in progress", Duration::from_secs(60), |d| {
        metric(&d.metrics(), "dr_job_running", &name) == Some(1.0)
    });
    std::thread::sleep(Duration::from_millis(800));
    d.signal("TERM");
    let st = d.wait_exit(Duration::from_secs(10));
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{}", d.logs());
    let logs = d.logs();
    drop(d);
    if logs.contains("job aborted") {
        let list: serde_json::Value =
            serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("json");
        assert_eq!(
            list["backups"].as_array().map(|a| a.len()),
            Some(0),
            "{list}"
        );
        assert!(files_named(&repo.path().join("repo"), "manifest").is_empty());
    } else {
        panic!("the backup finished before SIGTERM; make the cluster larger:\n{logs}");
    }
    let d = start("daemon2.log");
    d.wait_for("a successful backup", Duration::from_secs(120), |d| {
        successes(&d.metrics(), "postgres.main.backup") >= 1.0
    });
    d.stop();
    let list: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("json");
    assert!(
        !list["backups"].as_array().expect("backups").is_empty(),
        "{list}"
    );
}

#[test]
fn scheduled_verification_and_retention_run_and_show_in_metrics() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "1"]);
    for _ in 0..3 {
        pg.dr(&["backup", "pg"]);
        pg.pgbench(&["-t", "50", "-n"]);
    }
    pg.archive_now();
    let scratch = pg.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    common::pg::chown(&scratch, &pg.user);
    let port = free_port();
    append(
        &pg.cfg,
        &format!(
            "[postgres.main.retention]\nkeep_full = 1\n\
             [postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 3600\n\
             [postgres.main.schedule]\nverify = \"*/2 * * * * *\"\n\
             [retention]\nschedule = \"* * * * * *\"\n{}",
            scratch.display(),
            daemon_section(
                port,
                &pg.dir.path().join("daemon-state"),
                "max_concurrent_jobs = 1\ngrace_seconds = 60"
            )
        ),
    );
    let d = Daemon::of_pg(&pg, port, "daemon.log");
    d.wait_for(
        "a verification and an expiry",
        Duration::from_secs(180),
        |d| {
            let m = d.metrics();
            successes(&m, "postgres.main.verify") >= 1.0 && successes(&m, "retention.expire") >= 1.0
        },
    );
    let m = d.metrics();
    let rto = metric(&m, "dr_verified_restore_rto_seconds", "source=\"main\"").expect("rto gauge");
    assert!(rto > 0.0, "{m}");
    assert!(
        metric(
            &m,
            "dr_last_verified_restore_timestamp_seconds",
            "source=\"main\""
        )
        .is_some()
    );
    assert_eq!(
        metric(&m, "dr_job_failures_total", &job("postgres.main.verify")),
        Some(0.0),
        "{m}"
    );
    d.stop();
    // Retention kept only the newest backup, and no scratch copy is left.
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("json");
    assert_eq!(v["backups"].as_array().map(|a| a.len()), Some(1), "{v}");
    let left: Vec<_> = std::fs::read_dir(&scratch)
        .expect("scratch")
        .flatten()
        .collect();
    assert!(left.is_empty(), "scratch copies left behind: {left:?}");
    let audit = dr::audit::AuditLog::at(pg.dir.path().join("audit.jsonl"))
        .read_all()
        .expect("audit");
    assert!(
        audit
            .iter()
            .any(|r| r.action == "expire" && r.outcome == "ok")
    );
    assert!(
        audit
            .iter()
            .any(|r| r.action == "verify.pg" && r.outcome == "ok")
    );
}

#[test]
fn scheduled_sync_catches_up_a_region_that_missed_writes() {
    let redis = TestRedis::start(&[]);
    redis.populate(2_000);
    let repo = tempfile::tempdir().expect("tempdir");
    let regions = format!(
        "{}\n{}",
        fs_region_toml("local", &repo.path().join("a")),
        fs_region_toml("second", &repo.path().join("b"))
    );
    let port = free_port();
    let setup = DrSetup::new(
        &regions,
        &(redis_job("cache", &redis.url(), "0 0 1 1 *", "")
            + "\n[sync]\nschedule = \"* * * * * *\"\n"
            + &daemon_section(port, &repo.path().join("state"), "")),
    );
    setup.dr(&["backup", "redis"]);
    // The second region loses the snapshot (as if it had been down).
    let lost = files_named(&repo.path().join("b"), "rdb");
    assert_eq!(lost.len(), 1);
    std::fs::remove_file(&lost[0]).expect("remove");
    let o = setup.dr_raw(&["verify", "--list"]);
    assert!(!o.status.success(), "verify must see the missing copy");

    let d = Daemon::of(&setup, port, "daemon.log");
    d.wait_for("a sync run", Duration::from_secs(60), |d| {
        successes(&d.metrics(), "sync.sync") >= 1.0
    });
    d.stop();
    let v = setup.dr_json(&["verify", "--list"]);
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn the_daemon_streams_wal_and_reports_the_lag_in_metrics() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::streaming(&fs_repo(&repo), "stream_flush_interval = \"200ms\"\n");
    let port = free_port();
    append(
        &pg.cfg,
        &daemon_section(port, &pg.dir.path().join("daemon-state"), ""),
    );
    let o = pg.dr(&["daemon", "--check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("WAL of [postgres.main] is streamed continuously") && !out.contains("no job"),
        "{out}"
    );
    let d = Daemon::of_pg(&pg, port, "daemon.log");
    d.wait_for("the streamer to connect", Duration::from_secs(30), |_| {
        pg.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'dr_main'") == "1"
    });
    pg.sql("CREATE TABLE t AS SELECT i, repeat('x', 100) AS pad FROM generate_series(1, 100000) i");
    pg.sql("SELECT pg_switch_wal()");
    let lsn = pg.sql("SELECT pg_current_wal_lsn()");
    d.wait_for("the streamed WAL to be durable", Duration::from_secs(60), |_| {
        pg.sql(&format!(
            "SELECT coalesce(bool_or(flush_lsn >= '{lsn}'), false) FROM pg_stat_replication WHERE application_name = 'dr_main'"
        )) == "t"
    });
    d.wait_for("a small lag in the metrics", Duration::from_secs(30), |d| {
        metric(&d.metrics(), "dr_wal_stream_lag_bytes", "cluster=\"main\"")
            .is_some_and(|v| v < 1_048_576.0)
    });
    let m = d.metrics();
    assert_eq!(
        metric(&m, "dr_wal_stream_failures_total", "cluster=\"main\""),
        Some(0.0),
        "{m}"
    );
    assert!(
        metric(&m, "dr_wal_stream_status_age_seconds", "cluster=\"main\"")
            .is_some_and(|v| v < 10.0),
        "{m}"
    );
    // A reload that changes the cluster's settings restarts its streamer.
    let text = std::fs::read_to_string(&pg.cfg).expect("read config");
    std::fs::write(
        &pg.cfg,
        text.replace(
            "wal = \"stream\"\n",
            "wal = \"stream\"\napplication_name = \"dr_renamed\"\n",
        ),
    )
    .expect("write config");
    d.signal("HUP");
    d.wait_for(
        "the streamer to reconnect under its new name",
        Duration::from_secs(30),
        |_| {
            pg.sql("SELECT string_agg(application_name, ',') FROM pg_stat_replication")
                == "dr_renamed"
        },
    );
    // A reload that moves the region restarts the streamer too: WAL streamed
    // afterwards lands in the new path only.
    let old_repo = repo.path().join("repo");
    let new_repo = repo.path().join("moved");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&old_repo)
        .arg(&new_repo)
        .status()
        .expect("cp");
    assert!(st.success(), "copy the repository");
    let text = std::fs::read_to_string(&pg.cfg).expect("read config");
    let old_path = format!("path = \"{}\"", old_repo.display());
    assert!(text.contains(&old_path), "{text}");
    std::fs::write(
        &pg.cfg,
        text.replace(&old_path, &format!("path = \"{}\"", new_repo.display())),
    )
    .expect("write config");
    d.signal("HUP");
    d.wait_for(
        "the streamer to restart on the moved region",
        Duration::from_secs(30),
        |d| d.logs().matches("WAL streamer started").count() >= 3,
    );
    pg.sql("INSERT INTO t SELECT i, 'y' FROM generate_series(1, 1000) i");
    let segment = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.sql("SELECT pg_switch_wal()");
    let has = |root: &Path| {
        common::wal_objects(root)
            .iter()
            .any(|o| common::segment_of(o) == segment)
    };
    d.wait_for(
        "the new segment in the moved region",
        Duration::from_secs(60),
        |_| has(&new_repo),
    );
    assert!(
        !has(&old_repo),
        "segment {segment} was streamed to the old region path after the reload"
    );
    let logs = d.stop();
    assert!(logs.contains("WAL streamer stopped"), "{logs}");
    // The slot outlives the daemon, so WAL written meanwhile is kept.
    assert_eq!(
        pg.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'dr_main'"),
        "f"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("list json");
    assert!(v["wal_segments"].as_u64().is_some_and(|n| n >= 1), "{v}");
}

#[test]
fn scheduled_verification_of_a_busy_cluster_stays_green() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    // A segment archived every second while writes go on: what verification
    // of `latest` replays keeps growing under it.
    pg.sql_at(pg.port, "ALTER SYSTEM SET archive_timeout = '1s'");
    pg.sql_at(pg.port, "SELECT pg_reload_conf()");
    pg.dr(&["backup", "pg"]);
    let scratch = pg.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    common::pg::chown(&scratch, &pg.user);
    let port = free_port();
    append(
        &pg.cfg,
        &format!(
            "[postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 60\n\
             [postgres.main.schedule]\nverify = \"*/10 * * * * *\"\n{}",
            scratch.display(),
            daemon_section(port, &pg.dir.path().join("daemon-state"), "")
        ),
    );
    let db_port = pg.port.to_string();
    let mut load = Command::new(pg.bin.join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &db_port,
            "-U",
            "postgres",
            "-n",
            "-c",
            "2",
            "-T",
            "300",
            "-R",
            "100",
            "postgres",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench");
    let d = Daemon::of_pg(&pg, port, "daemon.log");
    d.wait_for("two verifications", Duration::from_secs(240), |d| {
        let m = d.metrics();
        successes(&m, "postgres.main.verify") >= 2.0
            || metric(&m, "dr_job_failures_total", &job("postgres.main.verify")).unwrap_or(0.0)
                > 0.0
    });
    let m = d.metrics();
    let health = d.try_get("/healthz");
    let _ = load.kill();
    let _ = load.wait();
    d.stop();
    assert_eq!(
        metric(&m, "dr_job_failures_total", &job("postgres.main.verify")),
        Some(0.0),
        "a healthy busy cluster must verify green: {m}"
    );
    assert_eq!(health.map(|(status, _, _)| status), Some(200), "/healthz");
}
