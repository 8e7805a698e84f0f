//! The monitoring kit against real tools: the alert rules through promtool
//! (syntax and unit tests), then a real Prometheus scraping real `dr daemon`s
//! (PostgreSQL with backups, archived WAL, scheduled verification, Redis
//! snapshots, a region, a streamed cluster, a failover in the audit log):
//! every metric, label and label value the rules and the Grafana dashboard
//! use is exported, the rules load, and every dashboard query returns data.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http_get;
use common::pg::{TestPg, chown, free_port, fs_repo};
use common::redis::TestRedis;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rules_file() -> PathBuf {
    root().join("config/prometheus/dr-alerts.yml")
}

/// The path of `tool`, or a failure that says how to install it.
fn require_tool(tool: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin"])
    {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{tool} is not installed: run scripts/setup.sh (or apt-get install {package}); \
         the monitoring tests need the real tool and are not skipped"
    );
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_firing_and_silent() {
    let promtool = require_tool("promtool", "prometheus");
    let o = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(rules_file())
        .output()
        .expect("promtool");
    assert!(
        o.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new(&promtool)
        .args(["test", "rules", "dr-alerts.test.yml"])
        .current_dir(root().join("config/prometheus"))
        .output()
        .expect("promtool");
    assert!(
        o.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    // Every alert has a test where it fires and one where it stays silent.
    let rules = std::fs::read_to_string(rules_file()).expect("rules");
    let tests = std::fs::read_to_string(root().join("config/prometheus/dr-alerts.test.yml"))
        .expect("rule tests");
    let lines: Vec<&str> = tests.lines().collect();
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for (i, l) in lines.iter().enumerate() {
        let Some((_, rest)) = l.split_once("alertname: ") else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let here_and_next = format!("{l}\n{}", lines.get(i + 1).unwrap_or(&""));
        if here_and_next.contains("exp_alerts: []") {
            silent.insert(name);
        } else if lines.get(i + 1).is_some_and(|n| n.trim() == "exp_alerts:") {
            fires.insert(name);
        }
    }
    let alerts: Vec<String> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect();
    assert!(alerts.len() >= 20, "{alerts:?}");
    for a in &alerts {
        assert!(fires.contains(a), "no test where {a} fires");
        assert!(silent.contains(a), "no test where {a} stays silent");
    }
    // Each alert has a severity, a summary and a runbook line.
    for block in rules.split("- alert: ").skip(1) {
        let name = block.lines().next().unwrap_or("");
        for key in ["severity: ", "summary: ", "runbook: \"README.md#alerts"] {
            assert!(block.contains(key), "alert {name} has no {key}");
        }
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    assert!(
        readme.contains("\n### Alerts\n"),
        "README has no Alerts section"
    );
    for a in &alerts {
        assert!(
            readme.contains(&format!("`{a}`")),
            "README's Alerts section does not explain {a}"
        );
    }
}

/// A `dr daemon`, killed (by pid) when dropped.
struct Daemon {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Daemon {
    fn start(pg: &TestPg, port: u16, log: &str) -> Daemon {
        use std::os::unix::process::CommandExt;
        let log = pg.dir.path().join(log);
        let err = std::fs::File::create(&log).expect("log");
        let id = |flag: &str| common::pg::os_id(&pg.user, flag);
        let child = Command::new(&pg.dr)
            .arg("--config")
            .arg(&pg.cfg)
            .arg("daemon")
            .env("DR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .uid(id("-u"))
            .gid(id("-g"))
            .spawn()
            .expect("dr daemon");
        let d = Daemon { child, port, log };
        wait_for("the daemon's /metrics", Duration::from_secs(30), || {
            http_get(d.port, "/metrics").is_some()
        });
        d
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus server on a free loopback port with its own config and
/// TSDB, stopped (by pid) when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Prometheus {
        let bin = require_tool("prometheus", "prometheus");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: dr\n    static_configs:\n      - targets: [{}]\n",
                rules_file().display(),
                targets.join(", ")
            ),
        )
        .expect("prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
            log,
        };
        wait_for("Prometheus to be ready", Duration::from_secs(60), || {
            http_get(p.port, "/-/ready").is_some_and(|(s, _)| s == 200)
        });
        p
    }

    /// GET an API path; the JSON `data`, or the error Prometheus gave.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<serde_json::Value, String> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect();
        let url = if query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let (status, body) = http_get(self.port, &url).ok_or("no answer")?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(v["data"].clone())
    }

    /// The instant result of `expr` (an error for a bad query).
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let d = self.api("/api/v1/query", &[("query", expr)])?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// The `expr`s of the rules file (block scalars after `expr: |`).
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = rules.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim() == "expr: |" {
            let indent = l.len() - l.trim_start().len();
            let mut e = String::new();
            i += 1;
            while i < lines.len() {
                let n = lines[i];
                if !n.trim().is_empty() && n.len() - n.trim_start().len() <= indent {
                    break;
                }
                e.push_str(n.trim());
                e.push(' ');
                i += 1;
            }
            out.push(e.trim().to_string());
        } else {
            i += 1;
        }
    }
    out
}

/// Dashboard queries with Grafana's variables replaced as Grafana would
/// (all daemons selected).
fn dashboard_targets(dash: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                substitute(expr),
                t["legendFormat"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
}

/// Selectors (`name` or `name{…}`) of dr metrics and `up` in `expr`.
fn selectors(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let name = &expr[start..i];
            if name.starts_with("dr_") || name == "up" {
                let mut sel = name.to_string();
                if b.get(i) == Some(&b'{') {
                    let end = expr[i..].find('}').map(|e| i + e + 1).unwrap_or(b.len());
                    sel.push_str(&expr[i..end]);
                    i = end;
                }
                out.push(sel);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Label names an expression or legend relies on: matchers, `on`/`by`/
/// `group_left` lists and `{{x}}`.
fn label_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sel in selectors(text) {
        if let Some((_, m)) = sel.split_once('{') {
            for part in m.trim_end_matches('}').split(',') {
                let k: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !k.is_empty() {
                    out.insert(k);
                }
            }
        }
    }
    for kw in ["on (", "by (", "group_left (", "on(", "by(", "group_left("] {
        for piece in text.split(kw).skip(1) {
            for l in piece.split(')').next().unwrap_or("").split(',') {
                let l = l.trim();
                if !l.is_empty() {
                    out.insert(l.to_string());
                }
            }
        }
    }
    for piece in text.split("{{").skip(1) {
        let l = piece.split("}}").next().unwrap_or("").trim();
        if !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(l.to_string());
        }
    }
    out
}

fn append(cfg: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(cfg)
        .expect("open config");
    f.write_all(text.as_bytes()).expect("append");
}

#[test]
fn a_real_prometheus_finds_every_metric_of_the_rules_and_data_for_every_dashboard_panel() {
    require_tool("prometheus", "prometheus");

    // Daemon 1: PostgreSQL archiving into a region, backups, scheduled
    // verification, Redis snapshots, and a failover in its audit log.
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.archive_now();
    let redis = TestRedis::start(&[]);
    redis.populate(2_000);
    let scratch = pg.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    chown(&scratch, &pg.user);
    let playbook = pg.dir.path().join("noop.toml");
    std::fs::write(
        &playbook,
        "name = \"noop\"\n\n[[step]]\nname = \"wait\"\naction = { type = \"sleep\", duration = \"1ms\" }\n",
    )
    .expect("playbook");
    chown(&playbook, &pg.user);
    let port1 = free_port();
    append(
        &pg.cfg,
        &format!(
            "[postgres.main.schedule]\nbackup = \"*/20 * * * * *\"\nverify = \"*/5 * * * * *\"\n\
             [postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 3600\n\n\
             [redis.cache]\nurl = \"{}\"\n[redis.cache.schedule]\nsnapshot = \"*/3 * * * * *\"\n\n\
             [env.test]\nstate_dir = \"{}\"\n[env.test.redis.cache]\nurl = \"{}\"\n\n\
             [daemon]\nlisten = \"127.0.0.1:{port1}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\nmax_concurrent_jobs = 2\n",
            scratch.display(),
            redis.url(),
            pg.dir.path().join("failover-state").display(),
            redis.url(),
            pg.dir.path().join("daemon-state").display()
        ),
    );
    // The same server leads an [ha] cluster through the real etcd, so the
    // failover metrics are scraped too. Its standby p2 is a host that is
    // down (nothing listens on its port): p1 leads alone.
    append(
        &pg.cfg,
        &format!(
            "\n[ha]\nendpoints = [\"{}\"]\nprefix = \"/t{}\"\nmember = \"p1\"\n\n\
             [ha.postgres.main.member.p1]\nconninfo = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\n\
             data_dir = \"{}\"\nbin_dir = \"{}\"\nos_user = \"{}\"\n\n\
             [ha.postgres.main.member.p2]\nconninfo = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\n\
             data_dir = \"{}\"\n",
            common::require_env("DR_TEST_ETCD_ENDPOINTS", "etcd"),
            common::unique("mon"),
            pg.port,
            pg.data.display(),
            pg.bin.display(),
            pg.user,
            free_port(),
            pg.dir.path().join("p2").display(),
        ),
    );
    let o = pg.dr_raw(&[
        "failover",
        playbook.to_str().expect("utf8"),
        "--env",
        "test",
        "--yes",
    ]);
    assert!(
        o.status.success(),
        "failover: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let d1 = Daemon::start(&pg, port1, "daemon.log");

    // Daemon 2: a cluster whose WAL is streamed.
    let repo2 = tempfile::tempdir().expect("tempdir");
    let spg = TestPg::streaming(&fs_repo(&repo2), "stream_flush_interval = \"200ms\"\n");
    let port2 = free_port();
    append(
        &spg.cfg,
        &format!(
            "\n[daemon]\nlisten = \"127.0.0.1:{port2}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\n",
            spg.dir.path().join("daemon-state").display()
        ),
    );
    let d2 = Daemon::start(&spg, port2, "daemon.log");

    let prom = Prometheus::start(&[port1, port2]);

    // What the rules and the dashboard rely on.
    let rules = std::fs::read_to_string(rules_file()).expect("rules");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("config/grafana/dr.json")).expect("dashboard"),
    )
    .expect("dashboard is JSON");
    let exprs = rule_exprs(&rules);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let targets = dashboard_targets(&dash);
    assert!(targets.len() >= 20, "{targets:?}");
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for e in exprs.iter().chain(targets.iter().map(|t| &t.1)) {
        needed.extend(selectors(e));
    }

    // Wait until every selector has data: the verification, the streamer
    // and the catalog probes take a few seconds to show up.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut missing: Vec<String>;
    loop {
        missing = needed
            .iter()
            .filter(|s| {
                prom.query(&format!("count({s})"))
                    .map(|r| r.is_empty())
                    .unwrap_or(true)
            })
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        missing.is_empty(),
        "Prometheus has no series for {missing:?} (a rule or panel uses a name or label value the daemon does not export)\n\
         daemon 1 log tail:\n{}\ndaemon 2 log tail:\n{}",
        tail(&d1.logs()),
        tail(&d2.logs())
    );

    // Every label name used is on the scraped series.
    let labels = prom
        .api("/api/v1/labels", &[("match[]", "{job=\"dr\"}")])
        .expect("labels");
    let have: BTreeSet<String> = labels
        .as_array()
        .expect("labels array")
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let mut used = BTreeSet::new();
    for e in &exprs {
        used.extend(label_names(e));
    }
    for piece in rules.split("$labels.").skip(1) {
        used.insert(
            piece
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect(),
        );
    }
    for (_, e, legend) in &targets {
        used.extend(label_names(e));
        used.extend(label_names(legend));
    }
    let absent: Vec<&String> = used.iter().filter(|l| !have.contains(*l)).collect();
    assert!(
        absent.is_empty(),
        "labels used but never exported: {absent:?} (exported: {have:?})"
    );

    // Every metric name the rules use is on a scraped series (by name, so a
    // renamed metric fails here even where a selector has no matcher).
    let names = prom
        .api("/api/v1/label/__name__/values", &[])
        .expect("names");
    let names: BTreeSet<String> = names
        .as_array()
        .expect("names")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    for s in &needed {
        let n = s.split('{').next().unwrap_or(s);
        assert!(names.contains(n), "{n} is not exported");
    }

    // The rules loaded and evaluate without error.
    let groups = prom.api("/api/v1/rules", &[]).expect("rules");
    let mut loaded = 0;
    for g in groups["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            loaded += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} failed: {}",
                r["name"], r["lastError"]
            );
        }
    }
    assert_eq!(loaded, exprs.len(), "{groups:#}");

    // Every dashboard query returns data.
    let mut empty = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        empty.clear();
        for (title, e, _) in &targets {
            match prom.query(e) {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => {
                    empty.insert(e.clone(), format!("{title}: no data"));
                }
                Err(err) => {
                    empty.insert(e.clone(), format!("{title}: {err}"));
                }
            }
        }
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}\nPrometheus log:\n{}",
        tail(&prom.logs())
    );

    // The healthy setup fires none of the alerts about backups, WAL,
    // regions or verification (the failover alert does fire: one ran).
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").expect("alerts");
    let names: Vec<String> = firing
        .iter()
        .filter_map(|a| a["metric"]["alertname"].as_str().map(str::to_string))
        .collect();
    for a in &names {
        assert!(
            ["DrFailoverHappened", "DrWalStreamerNotSynchronous"].contains(&a.as_str()),
            "{a} fires on a healthy setup: {firing:#?}"
        );
    }
    let fo = prom
        .query("dr_failovers_total{env=\"test\",outcome=\"ok\"}")
        .expect("failovers");
    assert_eq!(fo.len(), 1, "{fo:#?}");
    drop(prom);
    drop(d2);
    drop(d1);
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn the_dashboard_is_importable_with_its_data_source_as_a_variable() {
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("config/grafana/dr.json")).expect("dashboard"),
    )
    .expect("dashboard is JSON");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    // Import asks for nothing: no __inputs, the data source is a variable.
    assert!(dash.get("__inputs").is_none());
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("name"));
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_ref.as_str(), "{}", p["title"]);
        }
    }
}
