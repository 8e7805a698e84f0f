//! Daemons sharing one config divide its scheduled jobs through etcd (`[ha]`
//! fleet), against real servers: the etcd of `scripts/testenv.sh`, PostgreSQL
//! 15, Redis and real `dr daemon` processes. Who ran what, and when, is read
//! from the audit log's `fleet.job` records.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::pg::{TestPg, free_port, fs_repo};
use common::redis::TestRedis;
use common::{Gate, endpoint_port, require_env, unique};
use dr::ha::fleet::{Claim, Fleet};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const BACKUP: &str = "postgres.main.backup";
const SNAPSHOT: &str = "redis.cache.snapshot";

/// A `dr daemon` run as the PostgreSQL OS user; SIGKILLed on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    /// `dr --config cfg daemon args…`.
    fn start(pg: &TestPg, cfg: &Path, log: &Path, args: &[&str]) -> Daemon {
        let err = std::fs::File::create(log).expect("log file");
        common::pg::chown(log, &pg.user);
        let id = |flag: &str| common::pg::os_id(&pg.user, flag);
        let child = Command::new(&pg.dr)
            .arg("--config")
            .arg(cfg)
            .arg("daemon")
            .args(args)
            .env("DR_LOG", "info")
            .uid(id("-u"))
            .gid(id("-g"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("start dr daemon");
        Daemon { child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `fleet.job` run as the audit log tells it.
#[derive(Debug, Clone)]
struct Run {
    id: String,
    job: String,
    node: String,
    scheduled: String,
    start: DateTime<Utc>,
    end: Option<DateTime<Utc>>,
    outcome: String,
    /// The backup or snapshot written.
    written: String,
}

fn runs(audit: &Path) -> Vec<Run> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let mut out: Vec<Run> = Vec::new();
    for line in text.lines() {
        let r: Value = serde_json::from_str(line).expect("audit line is JSON");
        if r["action"] != "fleet.job" {
            continue;
        }
        let id = r["id"].as_str().expect("id").to_string();
        let time = |k: &str| {
            r[k].as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .expect("time")
        };
        match r["phase"].as_str() {
            Some("started") => out.push(Run {
                id,
                job: r["target"].as_str().expect("target").into(),
                node: r["details"]["node"].as_str().expect("node").into(),
                scheduled: r["details"]["scheduled"]
                    .as_str()
                    .expect("scheduled")
                    .into(),
                start: time("started"),
                end: None,
                outcome: "running".into(),
                written: String::new(),
            }),
            Some("finished") => {
                let run = out.iter_mut().find(|x| x.id == id).expect("started first");
                run.end = Some(time("time"));
                run.outcome = r["outcome"].as_str().unwrap_or_default().into();
                run.written = r["details"]["id"].as_str().unwrap_or_default().into();
            }
            _ => {}
        }
    }
    out
}

fn wait_until(what: &str, timeout: Duration, logs: &[&Path], mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        if t.elapsed() > timeout {
            let logs: String = logs
                .iter()
                .map(|l| {
                    format!(
                        "--- {}\n{}",
                        l.display(),
                        std::fs::read_to_string(l).unwrap_or_default()
                    )
                })
                .collect();
            panic!("timed out after {timeout:?} waiting for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok_runs(runs: &[Run], job: &str, node: &str) -> usize {
    runs.iter()
        .filter(|r| r.job == job && r.node == node && r.outcome == "ok")
        .count()
}

/// `pg`'s config with `extra`, its own `[daemon]` and `[ha]` as fleet
/// member `node` (the etcd of `scripts/testenv.sh`, keys under `prefix`).
fn fleet_config(pg: &TestPg, node: &str, prefix: &str, extra: &str) -> (PathBuf, u16) {
    let etcd = require_env("DR_TEST_ETCD_ENDPOINTS", "etcd");
    let base = std::fs::read_to_string(&pg.cfg).expect("config");
    let state = pg.dir.path().join(format!("state-{node}"));
    let port = free_port();
    let text = format!(
        "{base}\n{extra}\n[daemon]\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\nretries = 0\n\n\
         [ha]\nendpoints = [\"{etcd}\"]\nprefix = \"{prefix}\"\nttl = \"3s\"\nloop_wait = \"1s\"\nmember = \"{node}\"\n",
        port,
        state.display()
    );
    let p = pg.dir.path().join(format!("{node}.toml"));
    std::fs::write(&p, text).expect("write config");
    common::pg::chown(&p, &pg.user);
    (p, port)
}

/// The value of `name{…label…}` on the daemon listening on `port`.
fn metric(port: u16, name: &str, label: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn two_daemons_split_the_jobs_one_killed_mid_backup_is_taken_over_and_no_run_overlaps() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    // Big enough that a backup takes a while to kill it in the middle.
    pg.pgbench(&["-i", "-s", "10"]);
    let redis = TestRedis::start(&[]);
    redis.populate(2_000);
    let prefix = format!("/t{}", unique("fleet"));
    let jobs = format!(
        "[postgres.main.schedule]\nbackup = \"*/3 * * * * *\"\n\n\
         [redis.cache]\nurl = \"{}\"\n[redis.cache.schedule]\nsnapshot = \"*/3 * * * * *\"\n",
        redis.url()
    );
    let cfg_of = |node: &str| fleet_config(&pg, node, &prefix, &jobs);
    let ((cfg1, _), (cfg2, port2)) = (cfg_of("n1"), cfg_of("n2"));
    let audit = pg.dir.path().join("audit.jsonl");
    let (log1, log2) = (pg.dir.path().join("n1.log"), pg.dir.path().join("n2.log"));
    let logs = [log1.as_path(), log2.as_path()];
    let mut d1 = Daemon::start(&pg, &cfg1, &log1, &[]);
    let mut d2 = Daemon::start(&pg, &cfg2, &log2, &[]);

    // Jobs in name order dealt round the nodes: the backup to n1, the
    // snapshot to n2.
    wait_until(
        "two runs of each job",
        Duration::from_secs(90),
        &logs,
        || {
            let r = runs(&audit);
            ok_runs(&r, BACKUP, "n1") >= 2 && ok_runs(&r, SNAPSHOT, "n2") >= 2
        },
    );
    let before = runs(&audit);
    assert_eq!(ok_runs(&before, BACKUP, "n2"), 0, "{before:#?}");
    assert_eq!(ok_runs(&before, SNAPSHOT, "n1"), 0, "{before:#?}");
    let elsewhere = metric(port2, "dr_job_runs_elsewhere_total", BACKUP);
    assert!(elsewhere.is_some_and(|n| n >= 1.0), "{elsewhere:?}");
    // `dr ha fleet` shows both daemons and who claimed what.
    let v = common::json_of(&pg.dr_with(&cfg1, &["--json", "ha", "fleet"]));
    let nodes: Vec<&str> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert_eq!(nodes, ["n1", "n2"], "{v}");
    let claims = |job: &str| {
        v["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .find(|j| j["job"] == job)
            .map(|j| j["last"][0].clone())
    };
    assert_eq!(claims(BACKUP), Some(Value::from("n1")), "{v}");
    assert_eq!(claims(SNAPSHOT), Some(Value::from("n2")), "{v}");
    let text = String::from_utf8_lossy(&pg.dr_with(&cfg2, &["ha", "status"]).stdout).into_owned();
    assert!(
        text.contains("DAEMON") && text.contains("n2") && text.contains(SNAPSHOT),
        "{text}"
    );

    // SIGKILL n1 in the middle of a backup.
    let mut killed = None;
    wait_until(
        "a backup on n1 to kill mid-run",
        Duration::from_secs(90),
        &logs,
        || {
            let Some(open) = runs(&audit)
                .into_iter()
                .find(|r| r.job == BACKUP && r.node == "n1" && r.end.is_none())
            else {
                return false;
            };
            std::thread::sleep(Duration::from_millis(200));
            if runs(&audit)
                .iter()
                .any(|r| r.id == open.id && r.end.is_some())
            {
                return false;
            }
            d1.kill();
            killed = Some((open, Utc::now()));
            true
        },
    );
    let (victim, kill_time) = killed.expect("killed");
    let kill_clock = Instant::now();

    // n2 takes the backup over and keeps its own snapshots going.
    wait_until("two backups on n2", Duration::from_secs(60), &logs, || {
        ok_runs(&runs(&audit), BACKUP, "n2") >= 2
    });
    let took = kill_clock.elapsed();
    eprintln!(
        "first two backups on n2 done {:.1}s after the kill",
        took.as_secs_f64()
    );
    let after = runs(&audit);
    let v = after.iter().find(|r| r.id == victim.id).expect("victim");
    assert!(
        v.end.is_none(),
        "the killed run must have had no end: {v:?}"
    );
    let first_n2 = after
        .iter()
        .filter(|r| r.job == BACKUP && r.node == "n2")
        .map(|r| r.start)
        .min()
        .expect("n2 backup");
    assert!(
        first_n2 > kill_time,
        "n2 backed up at {first_n2} before n1 was killed at {kill_time}"
    );
    let before_snaps = ok_runs(&after, SNAPSHOT, "n2");
    wait_until(
        "n2's snapshots go on",
        Duration::from_secs(30),
        &logs,
        || ok_runs(&runs(&audit), SNAPSHOT, "n2") > before_snaps,
    );

    // n1 comes back and gets its share again.
    let d1_back = ok_runs(&runs(&audit), BACKUP, "n1");
    let _d1 = Daemon::start(&pg, &cfg1, &log1, &[]);
    wait_until("n1 backs up again", Duration::from_secs(60), &logs, || {
        ok_runs(&runs(&audit), BACKUP, "n1") > d1_back
    });
    d2.kill();

    // No run of a job overlaps another, and each scheduled time ran once.
    let all = runs(&audit);
    for job in [BACKUP, SNAPSHOT] {
        let mut mine: Vec<&Run> = all.iter().filter(|r| r.job == job).collect();
        mine.sort_by_key(|r| r.start);
        let mut times: Vec<&str> = mine.iter().map(|r| r.scheduled.as_str()).collect();
        times.sort_unstable();
        let n = times.len();
        times.dedup();
        assert_eq!(
            times.len(),
            n,
            "{job}: a scheduled time ran twice: {mine:#?}"
        );
        for w in mine.windows(2) {
            let end = match &w[0].end {
                Some(e) => *e,
                None if w[0].id == victim.id => kill_time,
                None => panic!("{job}: run {:?} never ended", w[0]),
            };
            assert!(
                w[1].start >= end,
                "{job}: {:?} started before {:?} ended",
                w[1],
                w[0]
            );
        }
    }
    // Every backup either daemon reported is in the repository.
    let list = common::json_of(&pg.dr(&["--json", "list", "pg"]));
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    for r in all.iter().filter(|r| r.job == BACKUP && r.outcome == "ok") {
        assert!(ids.contains(&r.written.as_str()), "{r:?} not in {ids:?}");
    }
}

#[test]
fn wal_is_streamed_by_one_daemon_of_the_fleet_and_another_takes_over_when_it_dies() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::streaming(&fs_repo(&repo), "stream_flush_interval = \"200ms\"\n");
    let prefix = format!("/t{}", unique("fleetwal"));
    // One config file for both: each daemon names itself, its address and
    // its state directory on its command line.
    let etcd = require_env("DR_TEST_ETCD_ENDPOINTS", "etcd");
    let cfg = pg.dir.path().join("shared.toml");
    let text = std::fs::read_to_string(&pg.cfg).expect("config")
        + &format!(
            "\n[ha]\nendpoints = [\"{etcd}\"]\nprefix = \"{prefix}\"\nttl = \"3s\"\nloop_wait = \"1s\"\n"
        );
    std::fs::write(&cfg, text).expect("write config");
    common::pg::chown(&cfg, &pg.user);
    let logs = ["n1", "n2"].map(|n| pg.dir.path().join(format!("{n}.log")));
    let log_refs = [logs[0].as_path(), logs[1].as_path()];
    let mut daemons: Vec<Daemon> = ["n1", "n2"]
        .iter()
        .zip(&logs)
        .map(|(n, log)| {
            let listen = format!("127.0.0.1:{}", free_port());
            let state = pg.dir.path().join(format!("state-{n}"));
            let state = state.to_str().expect("utf-8 path");
            let args = ["--member", n, "--listen", &listen, "--state-dir", state];
            Daemon::start(&pg, &cfg, log, &args)
        })
        .collect();
    let streamers =
        || pg.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'dr_main'");
    let owner = || {
        (0..2).find(|&i| {
            std::fs::read_to_string(&logs[i])
                .unwrap_or_default()
                .contains("this daemon of the fleet runs it now")
        })
    };
    wait_until(
        "one daemon streams",
        Duration::from_secs(60),
        &log_refs,
        || streamers() == "1" && owner().is_some(),
    );
    // The other one waits instead of fighting for the slot.
    std::thread::sleep(Duration::from_secs(3));
    let first = owner().expect("owner");
    let other = 1 - first;
    let other_log = std::fs::read_to_string(&logs[other]).unwrap_or_default();
    assert!(
        !other_log.contains("this daemon of the fleet runs it now")
            && !other_log.contains("WAL streaming failed"),
        "{other_log}"
    );
    assert_eq!(streamers(), "1");

    daemons[first].kill();
    pg.sql("CREATE TABLE t AS SELECT i FROM generate_series(1, 50000) i");
    let lsn = pg.sql("SELECT pg_current_wal_lsn()");
    wait_until(
        "the other daemon streams what was written after the kill",
        Duration::from_secs(60),
        &log_refs,
        || {
            pg.sql(&format!(
                "SELECT coalesce(bool_or(flush_lsn >= '{lsn}'), false) FROM pg_stat_replication \
                 WHERE application_name = 'dr_main'"
            )) == "t"
        },
    );
    assert!(
        std::fs::read_to_string(&logs[other])
            .unwrap_or_default()
            .contains("this daemon of the fleet runs it now")
    );
}

/// A fleet member of `[ha]` at `endpoint`, ready to claim.
async fn member(endpoint: &str, prefix: &str, node: &str, stop: &CancellationToken) -> Fleet {
    let ha: dr::config::HaConfig = toml::from_str(&format!(
        "endpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\nttl = \"3s\"\nloop_wait = \"1s\"\n"
    ))
    .expect("ha config");
    let f = Fleet::join(&ha, node.into(), stop.clone());
    let t = Instant::now();
    while !f.is_ready() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{node} got no fleet lease from etcd at {endpoint}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_daemons_run_each_time_once_and_one_cut_off_stops_its_run_before_its_key_expires() {
    let etcd = require_env("DR_TEST_ETCD_ENDPOINTS", "etcd");
    let gate = Gate::start(endpoint_port(&etcd));
    let prefix = format!("/t{}", unique("fleetrace"));
    let stop = CancellationToken::new();
    let mut fleet = Vec::new();
    for i in 0..4 {
        fleet.push(member(&etcd, &prefix, &format!("n{i}"), &stop).await);
    }
    let jobs = vec!["job".to_string()];
    let at = Utc::now();
    let mut tasks = tokio::task::JoinSet::new();
    for f in &fleet {
        let (f, jobs) = (f.clone(), jobs.clone());
        tasks.spawn(async move { f.claim("job", &jobs, at).await.expect("claim") });
    }
    let mut mine = Vec::new();
    while let Some(c) = tasks.join_next().await {
        match c.expect("task") {
            Claim::Mine(g) => mine.push(g),
            Claim::Taken { node } | Claim::Busy { node } => assert!(node.starts_with('n')),
        }
    }
    assert_eq!(mine.len(), 1, "each scheduled time runs once");
    // While that run goes on, the next time cannot start anywhere else.
    let later = at + chrono::Duration::seconds(1);
    for f in &fleet {
        match f.claim("job", &jobs, later).await.expect("claim") {
            Claim::Busy { .. } => {}
            Claim::Mine(_) => panic!("{} started a run while another was going", f.node()),
            Claim::Taken { node } => panic!("time taken by {node} while busy"),
        }
    }
    mine.pop().expect("guard").release().await;
    let Claim::Mine(g) = fleet[0].claim("job", &jobs, later).await.expect("claim") else {
        panic!("the job is free again after its run ended");
    };
    g.release().await;

    // A member cut off from etcd is told to stop its run before its lease
    // (and so the run key) can expire, and no one else claims meanwhile.
    let cut_endpoint = format!("http://127.0.0.1:{}", gate.port);
    let cut = member(&cut_endpoint, &prefix, "cut", &stop).await;
    let third = later + chrono::Duration::seconds(1);
    let Claim::Mine(g) = cut.claim("solo", &[], third).await.expect("claim") else {
        panic!("nobody else runs job solo");
    };
    let lost = g.lost();
    let t = Instant::now();
    gate.set_open(false);
    tokio::time::timeout(Duration::from_secs(3), lost.cancelled())
        .await
        .expect("the run is told to stop within the lease");
    let stopped_after = t.elapsed();
    match fleet[1]
        .claim("solo", &[], third + chrono::Duration::seconds(1))
        .await
        .expect("claim")
    {
        Claim::Busy { node } => assert_eq!(node, "cut"),
        other => panic!("the cut-off member's run key must still hold: {other:?}"),
    }
    eprintln!(
        "cut-off member stopped its run {:.2}s after losing etcd",
        stopped_after.as_secs_f64()
    );
    // Once its lease expires, another member takes the job.
    let t = Instant::now();
    loop {
        match fleet[1]
            .claim("solo", &[], Utc::now())
            .await
            .expect("claim")
        {
            Claim::Mine(g) => {
                g.release().await;
                break;
            }
            _ => {
                assert!(t.elapsed() < Duration::from_secs(10), "never taken over");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    stop.cancel();
}
