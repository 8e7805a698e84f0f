//! `dr failover` against real servers: a PostgreSQL 15 primary with two
//! streaming standbys, a Redis master with a replica, and a small HTTP server
//! standing in for the application, all on loopback.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dr_bin;
use common::topology::{PgTopology, RedisPair};

/// A valid age recipient: failovers need no repository, but dr.toml does.
const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// A dr.toml with environment `test` made of `servers` (TOML sections).
struct Setup {
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

impl Setup {
    fn new(servers: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("dr.toml");
        let text = format!(
            "[repository]\nrecipients = [\"{RECIPIENT}\"]\n\n[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"{}\"\n\n[audit]\npath = \"{}\"\n\n[env.test]\nstate_dir = \"{}\"\n\n{servers}",
            dir.path().join("repo").display(),
            dir.path().join("audit.jsonl").display(),
            dir.path().join("state").display(),
        );
        std::fs::write(&cfg, text).expect("write config");
        Setup { dir, cfg }
    }

    /// Runs `dr --config … failover <args>` with stdin closed (no TTY).
    fn failover(&self, args: &[&str]) -> Output {
        Command::new(dr_bin())
            .arg("--config")
            .arg(&self.cfg)
            .arg("failover")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dr")
    }

    /// Runs with `--env test --yes --json` and returns (output, report).
    fn run_json(&self, playbook: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
        let mut args = vec![
            playbook.to_str().expect("utf8"),
            "--env",
            "test",
            "--yes",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = self.failover(&args);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}): stdout {} stderr {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o, v)
    }

    /// The audit records (started + finished lines).
    fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).expect("audit log");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Writes a playbook into the setup's directory.
    fn playbook(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write playbook");
        p
    }
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("playbooks/{name}.toml"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn step_statuses(report: &serde_json::Value) -> Vec<String> {
    report["failover"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["status"].as_str().expect("status").to_string())
        .collect()
}

/// Asserts the last two audit lines are this run's started/finished pair
/// with `outcome`, and returns the finished one.
fn last_audit_run(setup: &Setup, action: &str, outcome: &str) -> serde_json::Value {
    let records = setup.audit();
    let n = records.len();
    assert!(n >= 2, "audit log has {n} lines");
    let (started, finished) = (&records[n - 2], &records[n - 1]);
    assert_eq!(started["phase"], "started");
    assert_eq!(finished["phase"], "finished");
    assert_eq!(started["id"], finished["id"]);
    assert_eq!(finished["action"], action);
    assert_eq!(finished["target"], "test");
    assert_eq!(finished["outcome"], outcome, "{finished:#}");
    finished.clone()
}

#[test]
fn pg_playbook_promotes_standby_fences_primary_and_repoints_the_other() {
    let topo = PgTopology::new(2);
    let (p, s1, s2) = topo.ports();
    topo.sql(
        p,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)",
    );
    let setup = Setup::new(&topo.env_toml("test"));

    let (o, report) = setup.run_json(&sample("pg-promote-standby"), &[]);
    assert!(o.status.success(), "failover failed: {}", stderr(&o));
    let r = &report["failover"];
    assert_eq!(r["outcome"], "ok");
    assert_eq!(step_statuses(&report), ["ok", "ok", "ok", "ok"]);
    let rto = r["rto_seconds"].as_f64().expect("RTO measured");
    assert!(rto > 0.0 && rto < r["total_seconds"].as_f64().expect("total"));
    assert!(
        r["rto_basis"]
            .as_str()
            .expect("basis")
            .contains("pg.writable standby1"),
        "{r:#}"
    );
    // Progress went to stderr, step by step, with timings.
    let err = stderr(&o);
    assert!(err.contains("[3/4] promote standby1"), "{err}");
    assert!(err.contains("pg.promote standby1"), "{err}");

    // The new primary accepts writes.
    assert!(!topo.in_recovery(s1));
    topo.sql(s1, "INSERT INTO t VALUES (2)");
    // The old primary is fenced: a write to it fails.
    let fenced = topo.try_sql(p, "INSERT INTO t VALUES (3)");
    assert!(fenced.is_err(), "write to the old primary succeeded");
    // The other standby follows the new primary and replays the new write.
    assert!(topo.in_recovery(s2));
    topo.wait_streaming(s2, s1);
    topo.wait_for(
        s2,
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM t",
        "1,2",
        Duration::from_secs(30),
    );

    let rec = last_audit_run(&setup, "failover", "ok");
    let steps = rec["details"]["steps"].as_array().expect("steps in audit");
    assert_eq!(steps.len(), 4);
    assert!(steps.iter().all(|s| s["status"] == "ok"), "{rec:#}");
    assert_eq!(steps[1]["attempts"][0]["action"]["ok"], true);
    assert!(rec["details"]["rto_seconds"].as_f64().is_some());
}

#[test]
fn lag_gate_aborts_before_changing_anything_and_says_why() {
    let topo = PgTopology::new(2);
    let (p, s1, s2) = topo.ports();
    topo.sql(s1, "SELECT pg_wal_replay_pause()");
    // About 5 MiB of WAL that standby1 receives but does not replay.
    topo.sql(
        p,
        "CREATE TABLE big AS SELECT repeat('x', 1000) AS v FROM generate_series(1, 5000)",
    );
    let setup = Setup::new(&topo.env_toml("test"));

    let (o, report) = setup.run_json(&sample("pg-promote-standby"), &[]);
    assert!(!o.status.success(), "the failover should have aborted");
    let err = stderr(&o);
    assert!(err.contains("replay lag"), "{err}");
    assert!(err.contains("> limit 1.0 MiB on standby1"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let r = &report["failover"];
    assert_eq!(r["outcome"], "aborted");
    assert_eq!(
        step_statuses(&report),
        ["failed", "not_run", "not_run", "not_run"]
    );
    assert!(r["rto_seconds"].is_null());

    // Nothing was fenced or promoted.
    assert!(!topo.in_recovery(p));
    topo.sql(p, "CREATE TABLE after_abort (id int)");
    assert!(topo.in_recovery(s1));
    assert!(topo.in_recovery(s2));
    topo.sql(s1, "SELECT pg_wal_replay_resume()");
    topo.wait_for(
        s2,
        "SELECT count(*) FROM pg_class WHERE relname = 'after_abort'",
        "1",
        Duration::from_secs(30),
    );

    let rec = last_audit_run(&setup, "failover", "failed");
    assert!(
        rec["error"].as_str().expect("error").contains("replay lag"),
        "{rec:#}"
    );
    assert_eq!(rec["details"]["steps"][0]["status"], "failed");
}

#[test]
fn failing_post_gate_rolls_back_in_reverse_and_keeps_the_old_topology() {
    let topo = PgTopology::new(2);
    let (p, s1, s2) = topo.ports();
    topo.sql(p, "CREATE TABLE t (id int)");
    let setup = Setup::new(&topo.env_toml("test"));
    let log = setup.dir.path().join("order.log");
    let echo = |word: &str| {
        format!(
            "{{ type = \"exec\", argv = [\"/bin/sh\", \"-c\", \"echo {word} >> {}\"] }}",
            log.display()
        )
    };
    let pb = setup.playbook(
        "rollback.toml",
        &format!(
            r#"name = "rollback-test"

[[step]]
name = "fence primary"
action = {{ type = "pg.fence", target = "primary", mode = "read_only" }}
post = [{{ type = "pg.writable", target = "primary", negate = true, timeout = "5s" }}]
rollback = [{{ type = "pg.unfence", target = "primary", mode = "read_only" }}, {echo_fence}]

[[step]]
name = "notify"
action = {action_notify}
rollback = [{echo_notify}]

[[step]]
name = "expect standby1 to be primary"
action = {{ type = "sql", target = "standby1", statement = "SELECT 1" }}
post = [{{ type = "pg.role", target = "standby1", role = "primary", timeout = "500ms" }}]
retries = 1
retry_delay = "100ms"
on_failure = "rollback"
rollback = [{echo_third}]

[[step]]
name = "never reached"
action = {{ type = "sleep", duration = "1ms" }}
"#,
            echo_fence = echo("fence"),
            action_notify = echo("notify-action"),
            echo_notify = echo("notify"),
            echo_third = echo("third"),
        ),
    );

    let (o, report) = setup.run_json(&pb, &[]);
    assert!(!o.status.success(), "the run should fail");
    let r = &report["failover"];
    assert_eq!(r["outcome"], "rolled_back", "{r:#}");
    assert_eq!(
        step_statuses(&report),
        ["ok", "ok", "failed", "not_run"],
        "{r:#}"
    );
    // The fence held while it was up (its negated write gate passed) …
    assert_eq!(r["steps"][0]["attempts"][0]["post"][0]["ok"], true);
    // … the failing step was retried once …
    assert_eq!(r["steps"][2]["attempts"].as_array().expect("a").len(), 2);
    assert!(
        r["steps"][2]["error"]
            .as_str()
            .expect("error")
            .contains("standby1 is a standby, expected primary"),
        "{r:#}"
    );
    // … and the rollback ran newest step first.
    assert_eq!(
        std::fs::read_to_string(&log).expect("order log"),
        "notify-action\nthird\nnotify\nfence\n"
    );
    let undone: Vec<&str> = r["rollback"]
        .as_array()
        .expect("rollback")
        .iter()
        .map(|x| x["step"].as_str().expect("step"))
        .collect();
    assert_eq!(
        undone,
        [
            "expect standby1 to be primary",
            "notify",
            "fence primary",
            "fence primary"
        ]
    );

    // The old topology works: the primary takes writes, the standbys replay them.
    topo.sql(p, "INSERT INTO t VALUES (42)");
    assert!(topo.in_recovery(s1) && topo.in_recovery(s2));
    for s in [s1, s2] {
        topo.wait_for(s, "SELECT count(*) FROM t", "1", Duration::from_secs(30));
    }
    let rec = last_audit_run(&setup, "failover", "failed");
    assert_eq!(rec["details"]["outcome"], "rolled_back");
    assert_eq!(rec["details"]["rollback"].as_array().expect("r").len(), 4);
}

#[test]
fn dry_run_changes_nothing_and_unconfirmed_or_locked_runs_refuse() {
    let topo = PgTopology::new(2);
    let redis = RedisPair::new();
    let setup = Setup::new(&(topo.env_toml("test") + &redis.env_toml("test")));
    let roles = || {
        (
            topo.in_recovery(topo.primary.port),
            topo.in_recovery(topo.standbys[0].port),
            topo.in_recovery(topo.standbys[1].port),
            redis.master.info("role"),
            redis.replica.info("role"),
        )
    };
    let before = roles();
    assert_eq!(before, (false, true, true, "master".into(), "slave".into()));

    let pg = sample("pg-promote-standby");
    let o = setup.failover(&[pg.to_str().expect("utf8"), "--env", "test", "--dry-run"]);
    assert!(o.status.success(), "dry run: {}", stderr(&o));
    let plan = String::from_utf8_lossy(&o.stdout);
    for line in [
        "2. fence old primary",
        "do    pg.fence primary (stop)",
        "do    pg.promote standby1",
        "post  pg.writable standby1",
        "undo  pg.unfence primary (stop)",
        "do    pg.repoint standby2 → standby1",
        "passes now",
        "every pre gate passes now",
    ] {
        assert!(plan.contains(line), "plan lacks {line:?}:\n{plan}");
    }
    let (o, report) = setup.run_json(&sample("redis-promote-replica"), &["--dry-run"]);
    assert!(o.status.success(), "redis dry run: {}", stderr(&o));
    assert_eq!(report["failover"]["outcome"], "ready");
    assert_eq!(roles(), before);
    last_audit_run(&setup, "failover.dry-run", "ok");

    // Without a terminal and without --yes: refused.
    let o = setup.failover(&[pg.to_str().expect("utf8"), "--env", "test"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("stdin is not a terminal") && stderr(&o).contains("--yes"),
        "{}",
        stderr(&o)
    );
    // While another process holds the environment's lock: refused.
    let state = setup.dir.path().join("state");
    std::fs::create_dir_all(&state).expect("mkdir");
    let lock = std::fs::File::create(state.join("failover-test.lock")).expect("lock file");
    lock.lock().expect("lock");
    let o = setup.failover(&[pg.to_str().expect("utf8"), "--env", "test", "--yes"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another failover of environment test is running"),
        "{}",
        stderr(&o)
    );
    drop(lock);
    assert_eq!(roles(), before);
}

#[test]
fn redis_playbook_promotes_replica_and_repoints_old_master() {
    let redis = RedisPair::new();
    let setup = Setup::new(&redis.env_toml("test"));
    let _: () = redis::cmd("SET")
        .arg("before")
        .arg("1")
        .query(&mut redis.master.conn())
        .expect("SET");
    // The sample's lag gate allows a little lag; this test is about the
    // promotion, so let the write reach the replica first.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v: Option<String> = redis::cmd("GET")
            .arg("before")
            .query(&mut redis.replica.conn())
            .expect("GET on the replica");
        if v.is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never got the write"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let (o, report) = setup.run_json(&sample("redis-promote-replica"), &[]);
    assert!(o.status.success(), "failover failed: {}", stderr(&o));
    assert_eq!(report["failover"]["outcome"], "ok");
    assert_eq!(step_statuses(&report), ["ok", "ok", "ok"]);
    assert!(report["failover"]["rto_seconds"].as_f64().is_some());

    assert_eq!(redis.replica.info("role"), "master");
    assert_eq!(redis.master.info("role"), "slave");
    redis.wait_link(&redis.master, redis.replica.port);
    // Data written before survives; a write on the new master reaches the old one.
    let v: Option<String> = redis::cmd("GET")
        .arg("before")
        .query(&mut redis.replica.conn())
        .expect("GET");
    assert_eq!(v.as_deref(), Some("1"));
    let _: () = redis::cmd("SET")
        .arg("after")
        .arg("2")
        .query(&mut redis.replica.conn())
        .expect("SET on the new master");
    let mut seen = None;
    for _ in 0..200 {
        seen = redis::cmd("GET")
            .arg("after")
            .query::<Option<String>>(&mut redis.master.conn())
            .expect("GET");
        if seen.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(seen.as_deref(), Some("2"));
    let rec = last_audit_run(&setup, "failover", "ok");
    assert_eq!(rec["details"]["steps"].as_array().expect("s").len(), 3);
}

/// A tiny application: `/healthz` answers 503 until `ready` exists, then 200
/// "ok"; every other request is recorded and answered 200.
fn app_server(ready: PathBuf) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (status, text) = if request_line.starts_with("GET /healthz") {
                if ready.exists() {
                    ("200 OK", "ok")
                } else {
                    ("503 Service Unavailable", "starting")
                }
            } else {
                log.lock().expect("lock").push(format!(
                    "{} {}",
                    request_line.trim(),
                    String::from_utf8_lossy(&body)
                ));
                ("200 OK", "noted")
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (port, seen)
}

#[test]
fn region_failover_moves_postgres_and_redis_and_runs_hooks() {
    let topo = PgTopology::new(2);
    let redis = RedisPair::new();
    let setup = Setup::new(&(topo.env_toml("test") + &redis.env_toml("test")));
    let ready = setup.dir.path().join("discovery-updated");
    let (app_port, requests) = app_server(ready.clone());
    // The service-discovery hook: records what it was told and marks the app ready.
    let hook = setup.dir.path().join("update-discovery");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$DR_FAILOVER_ENV $DR_FAILOVER_STEP $*\" > {}\n",
            ready.display()
        ),
    )
    .expect("hook");
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let text = std::fs::read_to_string(sample("region-failover"))
        .expect("sample")
        .replace(
            "/etc/dr/hooks/update-discovery",
            hook.to_str().expect("utf8"),
        )
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{app_port}"));
    let pb = setup.playbook("region.toml", &text);
    // standby2 does not follow timeline switches: pg.repoint must set
    // recovery_target_timeline = latest and restart it.
    let (p, s1, s2) = topo.ports();
    topo.sql(s2, "ALTER SYSTEM SET recovery_target_timeline = 'current'");
    topo.restart(&topo.standbys[1]);
    topo.wait_streaming(s2, p);
    assert_eq!(topo.sql(s2, "SHOW recovery_target_timeline"), "current");

    let (o, report) = setup.run_json(&pb, &[]);
    assert!(o.status.success(), "failover failed: {}", stderr(&o));
    let r = &report["failover"];
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert!(step_statuses(&report).iter().all(|s| s == "ok"), "{r:#}");
    assert!(r["rto_seconds"].as_f64().is_some());

    // PostgreSQL: new primary writable, old one read-only, standby2 follows.
    assert!(
        r["steps"][5]["attempts"][0]["action"]["detail"]
            .as_str()
            .expect("detail")
            .contains("restarted (recovery_target_timeline = latest)"),
        "{r:#}"
    );
    assert_eq!(topo.sql(s2, "SHOW recovery_target_timeline"), "latest");
    topo.sql(
        s1,
        "CREATE TABLE moved (id int); INSERT INTO moved VALUES (1)",
    );
    let err = topo
        .try_sql(p, "CREATE TABLE on_old (id int)")
        .expect_err("the old primary must be read-only");
    assert!(err.contains("read-only transaction"), "{err}");
    topo.wait_streaming(s2, s1);
    topo.wait_for(
        s2,
        "SELECT count(*) FROM moved",
        "1",
        Duration::from_secs(30),
    );
    // Redis moved too.
    assert_eq!(redis.replica.info("role"), "master");
    redis.wait_link(&redis.master, redis.replica.port);
    // The hook ran with the run's names; the announcement reached the app.
    let hook_saw = std::fs::read_to_string(&ready).expect("hook ran");
    assert_eq!(
        hook_saw.trim(),
        "test update service discovery --postgres standby1 --redis replica"
    );
    let reqs = requests.lock().expect("lock").clone();
    assert_eq!(
        reqs,
        ["POST /failover-done HTTP/1.1 {\"region\": \"standby\"}"]
    );
    // The health gate (503 until the hook runs) passed after the hook.
    let health = &r["steps"][4]["attempts"][0]["post"][0];
    assert_eq!(health["ok"], true, "{r:#}");
    last_audit_run(&setup, "failover", "ok");
}
