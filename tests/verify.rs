//! Scratch-restore verification (`dr verify --restore`) and drills
//! (`dr drill`) against real PostgreSQL 15 and redis-server processes. Every
//! test asserts that no scratch server or directory is left behind.

mod common;

use common::walk_files as walk;
use common::{segment_of, wal_objects};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::pg::{TestPg, chown, fs_repo, mark};
use common::redis::{DrSetup, TestRedis};
use serde_json::Value;

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// Processes whose command line mentions `dir` or that work inside it.
fn processes_in(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd_inside = std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c.starts_with(dir));
        if cmd.contains(&needle) || cwd_inside {
            out.push((pid, cmd));
        }
    }
    out
}

/// Nothing runs in the scratch parent and it holds no directory.
fn assert_clean(scratch: &Path) {
    let procs = processes_in(scratch);
    assert!(procs.is_empty(), "scratch processes left: {procs:?}");
    let left: Vec<PathBuf> = std::fs::read_dir(scratch)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "scratch directories left: {left:?}");
}

/// The named check of a source report.
fn check<'a>(src: &'a Value, name: &str) -> &'a Value {
    src["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name:?} in {src}"))
}

fn failed(src: &Value) -> Vec<String> {
    src["checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["ok"] != true)
                .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A scratch parent the OS user can write.
fn scratch_dir(pg: &TestPg) -> PathBuf {
    let d = pg.dir.path().join("scratch");
    std::fs::create_dir_all(&d).expect("mkdir scratch");
    chown(&d, &pg.user);
    d
}

/// Rewrites the config: the base text plus `extra` TOML.
fn set_config(pg: &TestPg, base: &str, extra: &str) {
    std::fs::write(&pg.cfg, format!("{base}\n{extra}\n")).expect("write config");
}

fn verify_section(scratch: &Path, checks: &[(&str, &str)]) -> String {
    let mut s = format!(
        "[postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 120\n",
        scratch.display()
    );
    for (name, sql) in checks {
        s.push_str(&format!(
            "[[postgres.main.verify.check]]\nname = \"{name}\"\ndatabase = \"postgres\"\nsql = \"{sql}\"\n"
        ));
    }
    s
}

#[test]
fn pg_restore_verification_passes_and_fails_clearly() {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    let base = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let scratch = scratch_dir(&pg);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "200", "-n"]);
    let m1 = mark(&pg);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.archive_now();

    // Passes: the data is exactly as at the mark, and a user check says so.
    let balance_sql = format!(
        "SELECT sum(abalance) = {} AND (SELECT count(*) FROM pgbench_history) = {} FROM pgbench_accounts",
        m1.balance, m1.history
    );
    set_config(
        &pg,
        &base,
        &verify_section(&scratch, &[("data as at the mark", &balance_sql)]),
    );
    let o = pg.dr_raw(&[
        "--json",
        "verify",
        "pg",
        "main",
        "--restore",
        "--to",
        &m1.at,
    ]);
    let v = json(&o);
    assert!(o.status.success(), "verify failed: {v:#}");
    let src = &v["verify_restore"]["sources"][0];
    for name in [
        "restore",
        "promoted",
        "target reached",
        "recovered point",
        "amcheck postgres",
        "data as at the mark",
        "cleanup",
    ] {
        assert_eq!(check(src, name)["ok"], true, "{name}: {src:#}");
    }
    assert!(
        check(src, "amcheck postgres")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("btree indexes checked")),
        "{src:#}"
    );
    let rpo = src["rpo_seconds"].as_f64().expect("rpo");
    let rto = src["rto_seconds"].as_f64().expect("rto");
    assert!((0.0..30.0).contains(&rpo), "rpo {rpo}");
    assert!(rto > 0.0, "rto {rto}");
    eprintln!("MEASURED pg verify --to mark: RTO {rto:.2}s RPO {rpo:.3}s");
    assert_clean(&scratch);

    // Latest, with the human table.
    set_config(
        &pg,
        &base,
        &verify_section(
            &scratch,
            &[(
                "accounts exist",
                "SELECT count(*) = 100000 FROM pgbench_accounts",
            )],
        ),
    );
    let o = pg.dr_raw(&["verify", "pg", "--restore"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("CHECK") && text.contains("RPO") && text.contains("every restore passed"),
        "{text}"
    );
    eprintln!("{text}");
    assert_clean(&scratch);

    // The audit log and the repository hold the reports.
    let audit = std::fs::read_to_string(pg.dir.path().join("audit.jsonl")).expect("audit");
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"verify.pg\"") && l.contains("\"finished\""))
            .count()
            >= 2,
        "{audit}"
    );
    let reports = walk(&fs.path().join("repo/reports/verify"));
    assert!(reports.len() >= 2, "{reports:?}");

    // A failing user check fails the run, names the check and still cleans up.
    set_config(
        &pg,
        &base,
        &verify_section(
            &scratch,
            &[("no accounts", "SELECT count(*) = 0 FROM pgbench_accounts")],
        ),
    );
    let o = pg.dr_raw(&["--json", "verify", "pg", "--restore", "--to", &m1.at]);
    assert!(!o.status.success());
    let v = json(&o);
    let src = &v["verify_restore"]["sources"][0];
    assert_eq!(v["ok"], false);
    assert_eq!(failed(src), vec!["no accounts"], "{src:#}");
    assert!(
        check(src, "no accounts")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("is false")),
        "{src:#}"
    );
    assert_clean(&scratch);

    // A WAL segment the target needs, gone from every region.
    let before: Vec<PathBuf> = wal_objects(&fs.path().join("repo"));
    pg.pgbench(&["-t", "100", "-n"]);
    let m2 = mark(&pg);
    pg.pgbench(&["-t", "50", "-n"]);
    pg.archive_now();
    let victim = before.last().expect("WAL archived").clone();
    std::fs::remove_file(&victim).expect("delete segment");
    let segment = segment_of(&victim);
    set_config(&pg, &base, &verify_section(&scratch, &[]));
    let o = pg.dr_raw(&["--json", "verify", "pg", "--restore", "--to", &m2.at]);
    assert!(!o.status.success());
    let src = &json(&o)["verify_restore"]["sources"][0];
    let detail = check(src, "restore")["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("gap") && detail.contains(&segment),
        "missing WAL must be named: {src:#}"
    );
    assert_clean(&scratch);
    // With `latest`, replay stops at the gap: the server starts, the target
    // check fails and the server is still removed.
    let o = pg.dr_raw(&["--json", "verify", "pg", "--restore"]);
    assert!(!o.status.success());
    let src = &json(&o)["verify_restore"]["sources"][0];
    assert_eq!(check(src, "promoted")["ok"], true, "{src:#}");
    assert_eq!(check(src, "target reached")["ok"], false, "{src:#}");
    assert!(
        check(src, "target reached")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("missing in every region")),
        "{src:#}"
    );
    assert_eq!(check(src, "cleanup")["ok"], true, "{src:#}");
    assert_clean(&scratch);

    // A corrupt data object (the only region holds the only copy).
    let object = walk(&fs.path().join("repo/pg"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/data/"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a data object");
    let mut bytes = std::fs::read(&object).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&object, &bytes).expect("write");
    let o = pg.dr_raw(&["--json", "verify", "pg", "--restore"]);
    assert!(!o.status.success());
    let src = &json(&o)["verify_restore"]["sources"][0];
    let detail = check(src, "restore")["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("corrupt"), "{src:#}");
    assert_eq!(check(src, "cleanup")["ok"], true, "{src:#}");
    assert_clean(&scratch);
}

/// Children of `pid` (from /proc/*/stat).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[test]
fn sigterm_during_verify_leaves_nothing_behind() {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    let base = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let scratch = scratch_dir(&pg);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.archive_now();
    // A check that holds the scratch server up long enough to be interrupted.
    set_config(
        &pg,
        &base,
        &verify_section(&scratch, &[("slow", "SELECT true FROM pg_sleep(120)")]),
    );
    let child = Command::new("runuser")
        .args(["-u", &pg.user, "--"])
        .arg(&pg.dr)
        .args(["--config", pg.cfg.to_str().expect("utf8")])
        .args(["--json", "verify", "pg", "--restore"])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dr");
    // Wait until the scratch server runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = walk(&scratch)
            .iter()
            .any(|p| p.ends_with("data/postmaster.pid"));
        if running && !processes_in(&scratch).is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "scratch server never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let dr_pid = *children(child.id()).first().expect("dr under runuser");
    let st = Command::new("kill")
        .args(["-TERM", &dr_pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let t = Instant::now();
    let o = child.wait_with_output().expect("wait dr");
    eprintln!(
        "dr exited {:?} {:.1}s after SIGTERM",
        o.status,
        t.elapsed().as_secs_f64()
    );
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("interrupted"), "{stderr}");
    let v = json(&o);
    let src = &v["verify_restore"]["sources"][0];
    assert_eq!(check(src, "interrupted")["ok"], false, "{src:#}");
    assert_eq!(check(src, "cleanup")["ok"], true, "{src:#}");
    assert_clean(&scratch);
}

fn redis_section(url: &str, scratch: &Path, checks: &str) -> String {
    let os_user = common::require_env("DR_TEST_OS_USER", "Redis");
    let bin = common::require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    format!(
        "[redis.cache]\nurl = \"{url}\"\nserver_bin = \"{bin}\"\nos_user = \"{os_user}\"\ntimeout_seconds = 30\n[redis.cache.verify]\nscratch_dir = \"{}\"\n{checks}\n",
        scratch.display()
    )
}

/// A scratch parent any user can traverse (redis-server runs as the OS user).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    d
}

#[test]
fn redis_restore_verification_checks_keys_and_user_checks() {
    let src = TestRedis::start(&[]);
    src.populate(5000);
    let scratch = open_tempdir();
    let repo = tempfile::tempdir().expect("tempdir");
    let checks = format!(
        "[[redis.cache.verify.check]]\nname = \"db0 size\"\ncommand = [\"DBSIZE\"]\nexpect = \"{}\"\n[[redis.cache.verify.check]]\nname = \"db1 key\"\ndb = 1\ncommand = [\"GET\", \"db1:3\"]\nexpect = \"3\"\n",
        src.dbsize(0)
    );
    let dr = DrSetup::new(
        &common::fs_region_toml("local", &repo.path().join("repo")),
        &redis_section(&src.url(), scratch.path(), &checks),
    );
    dr.dr(&["backup", "redis"]);
    let o = dr.dr_raw(&["--json", "verify", "redis", "--restore"]);
    let v = json(&o);
    assert!(o.status.success(), "{v:#}");
    let s = &v["verify_restore"]["sources"][0];
    for name in ["restore", "key counts", "db0 size", "db1 key", "cleanup"] {
        assert_eq!(check(s, name)["ok"], true, "{name}: {s:#}");
    }
    eprintln!(
        "MEASURED redis verify: RTO {:.3}s RPO {:.3}s",
        s["rto_seconds"].as_f64().unwrap_or(-1.0),
        s["rpo_seconds"].as_f64().unwrap_or(-1.0)
    );
    assert_clean(scratch.path());

    // A manifest whose key counts disagree with the RDB: a newer snapshot
    // with the same RDB and a manifest claiming 1000 more keys in db0.
    tamper_newest_snapshot(&dr, &repo.path().join("repo"));
    let o = dr.dr_raw(&["--json", "verify", "redis", "--restore"]);
    assert!(!o.status.success());
    let s = &json(&o)["verify_restore"]["sources"][0];
    assert_eq!(failed(s), vec!["key counts"], "{s:#}");
    assert!(
        check(s, "key counts")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("disagrees with the manifest")),
        "{s:#}"
    );
    let o = dr.dr_raw(&["verify", "redis", "--restore"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("key counts") && text.contains("FAIL"),
        "{text}"
    );
    assert_clean(scratch.path());
}

/// Writes a snapshot newer than the newest one: the same RDB object, and a
/// manifest whose db0 key count is 1000 higher (more than the keys with a
/// TTL, which the comparison allows to have expired).
fn tamper_newest_snapshot(dr: &DrSetup, repo_dir: &Path) {
    use dr::repo::layout::{BackupId, ObjectKey};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = dr::validate::load(&dr.cfg).expect("config");
    let repo = rt
        .block_on(dr::repo::Repository::open(&cfg))
        .expect("open repo");
    let cat = rt
        .block_on(dr::redis::restore::RedisCatalog::load(&repo, "cache"))
        .expect("catalog");
    let newest = cat.snapshots.last().expect("a snapshot").clone();
    let old_id: BackupId = newest.id.parse().expect("id");
    let new_id = BackupId::new(newest.time + chrono::Duration::seconds(2));
    let mut m = serde_json::to_value(&newest).expect("manifest json");
    m["id"] = Value::String(new_id.to_string());
    m["time"] = serde_json::to_value(newest.time + chrono::Duration::seconds(2)).expect("time");
    for field in ["keyspace", "keyspace_after"] {
        if let Some(k) = m[field]["0"]["keys"].as_u64() {
            m[field]["0"]["keys"] = Value::from(k + 1000);
        }
    }
    let rdb = |id: &BackupId| {
        repo_dir.join(
            ObjectKey::RedisRdb {
                instance: "cache".into(),
                snapshot: id.clone(),
            }
            .to_string(),
        )
    };
    let to = rdb(&new_id);
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(rdb(&old_id), &to).expect("copy rdb");
    let key = ObjectKey::RedisManifest {
        instance: "cache".into(),
        snapshot: new_id,
    };
    let body = serde_json::to_vec(&m).expect("encode");
    rt.block_on(repo.put_buffer(&key, bytes::Bytes::from(body), None))
        .expect("put manifest");
}

/// Production for a drill: a cluster with pgbench data, a base backup and
/// archived WAL after it, and a Redis with 2000 keys; with the repository
/// directory, the config text, the scratch parent and the report directory.
fn drill_production() -> (
    tempfile::TempDir,
    TestPg,
    String,
    PathBuf,
    PathBuf,
    TestRedis,
) {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    let base = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let scratch = scratch_dir(&pg);
    let reports = pg.dir.path().join("drills");
    let redis = TestRedis::start(&[]);
    redis.populate(2000);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.archive_now();
    (fs, pg, base, scratch, reports, redis)
}

/// The drill's report files: the JSON (parsed) and the Markdown; the HTML
/// beside them is checked in a browser by tests/report.rs.
fn report_files(d: &Value) -> (Value, String) {
    let files: Vec<&str> = d["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert_eq!(files.len(), 3, "{d:#}");
    assert!(files[2].ends_with(".html"), "{files:?}");
    let html = std::fs::read_to_string(files[2]).expect("html report");
    assert!(html.contains(d["drill"].as_str().expect("drill")), "{html}");
    let json =
        serde_json::from_slice(&std::fs::read(files[0]).expect("json report")).expect("json");
    let md = std::fs::read_to_string(files[1]).expect("markdown report");
    (json, md)
}

/// The drill-level checks are the playbook and both objectives.
fn assert_drill_checks(d: &Value) {
    let names: Vec<&str> = d["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["playbook", "RTO objective", "RPO objective"],
        "{d:#}"
    );
}

/// A playbook that passes when the restored `main` is a primary holding
/// pgbench's accounts and the restored `cache` is a master.
fn drill_playbook(pg: &TestPg) -> PathBuf {
    let playbook = pg.dir.path().join("drill-check.toml");
    std::fs::write(
        &playbook,
        "name = \"drill-check\"\ndescription = \"restored servers serve\"\n\n[[step]]\nname = \"restored servers answer\"\npre = [\n  { type = \"pg.role\", target = \"main\", role = \"primary\" },\n  { type = \"sql\", target = \"main\", query = \"SELECT count(*) = 100000 FROM pgbench_accounts\" },\n  { type = \"redis.role\", target = \"cache\", role = \"master\" },\n]\n",
    )
    .expect("playbook");
    chown(&playbook, &pg.user);
    playbook
}

#[test]
fn drill_over_postgres_and_redis_reports_and_enforces_objectives() {
    let (fs, pg, base, scratch, reports, redis) = drill_production();

    // A playbook run against the restored scratch servers.
    let playbook = drill_playbook(&pg);
    let bin = common::require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let sections = |rto: &str| {
        format!(
            "{}\n[redis.cache]\nurl = \"{}\"\nserver_bin = \"{bin}\"\n[redis.cache.verify]\nscratch_dir = \"{}\"\n\n[drill.nightly]\npostgres = [\"main\"]\nredis = [\"cache\"]\nto = \"latest\"\nplaybook = \"{}\"\n{rto}\nrpo_seconds = 600\nreport_dir = \"{}\"\n",
            verify_section(
                &scratch,
                &[("accounts", "SELECT count(*) = 100000 FROM pgbench_accounts")]
            ),
            redis.url(),
            scratch.display(),
            playbook.display(),
            reports.display()
        )
    };
    set_config(&pg, &base, &sections("rto_seconds = 600"));
    pg.dr(&["backup", "redis"]);
    let o = pg.dr_raw(&["--json", "drill", "nightly"]);
    let v = json(&o);
    assert!(o.status.success(), "{v:#}");
    let d = &v["drill"];
    assert_eq!(d["ok"], true);
    let rto = d["achieved"]["rto_seconds"].as_f64().expect("rto");
    let rpo = d["achieved"]["rpo_seconds"].as_f64().expect("rpo");
    for s in d["sources"].as_array().expect("sources") {
        eprintln!(
            "MEASURED drill {} {}: RTO {:.2}s RPO {:.3}s",
            s["kind"],
            s["name"],
            s["rto_seconds"].as_f64().unwrap_or(-1.0),
            s["rpo_seconds"].as_f64().unwrap_or(-1.0)
        );
        assert_eq!(check(s, "cleanup")["ok"], true, "{s:#}");
    }
    eprintln!("MEASURED drill overall: RTO {rto:.2}s RPO {rpo:.3}s");
    assert_eq!(d["sources"].as_array().map(Vec::len), Some(2));
    assert_drill_checks(d);
    let (json_file, md) = report_files(d);
    assert_eq!(json_file["achieved"]["rto_seconds"].as_f64(), Some(rto));
    assert!(
        md.contains("PASSED") && md.contains("| achieved |") && md.contains("## redis `cache`"),
        "{md}"
    );
    assert_clean(&scratch);
    assert!(!walk(&fs.path().join("repo/reports/drill")).is_empty());

    // An objective below what was achieved fails the drill.
    set_config(&pg, &base, &sections("rto_seconds = 0.001"));
    let o = pg.dr_raw(&["--json", "drill", "nightly"]);
    assert!(!o.status.success());
    let d = &json(&o)["drill"];
    assert_eq!(d["ok"], false);
    let objective = d["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "RTO objective"))
        .expect("RTO objective check");
    assert_eq!(objective["ok"], false, "{d:#}");
    assert!(
        objective["detail"]
            .as_str()
            .is_some_and(|s| s.contains("exceeds the objective of 0.001s")),
        "{d:#}"
    );
    let md = std::fs::read_to_string(d["files"][1].as_str().expect("md")).expect("md");
    assert!(md.contains("FAILED") && md.contains("**FAIL**"), "{md}");
    assert_clean(&scratch);
}

/// A second cluster standing in for a staging server: initdb'd and
/// configured as its own (port, `cluster_name = 'staging'`, no archiving),
/// running, with a table production does not have. Stopped when `pg` drops.
fn staging_cluster(pg: &mut TestPg) -> (PathBuf, u16) {
    let data = pg.dir.path().join("staging-data");
    common::pg::initdb(&pg.user, &pg.bin, &data, &[]);
    let port = common::pg::free_port();
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
    conf.push_str(&format!(
        "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\narchive_mode = off\ncluster_name = 'staging'\n"
    ));
    std::fs::write(data.join("postgresql.conf"), conf).expect("conf");
    let log = pg.dir.path().join("staging.log");
    common::pg::pg_ctl_start(&pg.user, &pg.bin, &data, &log);
    pg.track(data.clone());
    pg.sql_at(port, "CREATE TABLE staging_only (x int)");
    (data, port)
}

fn postmaster_pid(data: &Path) -> String {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn redis_pid(r: &TestRedis) -> String {
    std::fs::read_to_string(r.dir.path().join("redis.pid"))
        .expect("redis.pid")
        .trim()
        .to_string()
}

#[test]
fn drill_into_staging_servers_restores_production_data_and_refuses_production() {
    let (_fs, mut pg, base, scratch, reports, redis) = drill_production();
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");

    // Staging servers of their own: a cluster and an AOF-persisted Redis.
    let (staging_data, staging_port) = staging_cluster(&mut pg);
    let staging_redis = TestRedis::start(&["appendonly yes"]);
    let _: () = staging_redis.cmd(&["SET", "staging:only", "1"]);
    let state = pg.dir.path().join("state-staging");
    std::fs::create_dir_all(&state).expect("mkdir");
    chown(&state, &pg.user);

    // The same playbook, against [env.staging] this time.
    let playbook = drill_playbook(&pg);
    let bin = common::require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let sections = |staging_pg: &str| {
        format!(
            "{}\n[redis.cache]\nurl = \"{}\"\nserver_bin = \"{bin}\"\n\n\
             [env.staging]\nallow_overwrite = true\nstate_dir = \"{}\"\n\
             [env.staging.postgres.main]\n{staging_pg}\nbin_dir = \"{}\"\nos_user = \"{}\"\n\
             [env.staging.redis.cache]\nurl = \"{}\"\nconfig_file = \"{}\"\ndir = \"{}\"\nserver_bin = \"{bin}\"\n\n\
             [drill.staging]\npostgres = [\"main\"]\nredis = [\"cache\"]\nenvironment = \"staging\"\n\
             playbook = \"{}\"\nrto_seconds = 600\nrpo_seconds = 600\nreport_dir = \"{}\"\n",
            verify_section(
                &scratch,
                &[("accounts", "SELECT count(*) = 100000 FROM pgbench_accounts")]
            ),
            redis.url(),
            state.display(),
            pg.bin.display(),
            pg.user,
            staging_redis.url(),
            staging_redis.dir.path().join("redis.conf").display(),
            staging_redis.dir.path().display(),
            playbook.display(),
            reports.display()
        )
    };
    let staging_pg = |port: u16, data: &Path| {
        format!(
            "conninfo = \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\ndata_dir = \"{}\"",
            data.display()
        )
    };
    let good = sections(&staging_pg(staging_port, &staging_data));
    set_config(&pg, &base, &good);
    pg.dr(&["backup", "redis"]);
    let prod_pid = postmaster_pid(&pg.data);
    let prod_redis_pid = redis_pid(&redis);
    let staging_pid = postmaster_pid(&staging_data);
    let untouched = |what: &str| {
        assert_eq!(
            postmaster_pid(&pg.data),
            prod_pid,
            "{what}: production PostgreSQL restarted"
        );
        assert_eq!(
            redis_pid(&redis),
            prod_redis_pid,
            "{what}: production Redis restarted"
        );
        assert_eq!(
            pg.sql("SELECT count(*) FROM pgbench_history"),
            history,
            "{what}"
        );
        assert_eq!(pg.sql("SHOW cluster_name"), "", "{what}");
        assert_eq!(
            postmaster_pid(&staging_data),
            staging_pid,
            "{what}: staging restarted"
        );
        assert_eq!(
            pg.sql_at(
                staging_port,
                "SELECT to_regclass('staging_only') IS NOT NULL"
            ),
            "t"
        );
    };

    // A staging definition on production's data directory: refused when the
    // config is read, before anything runs.
    set_config(&pg, &base, &sections(&staging_pg(staging_port, &pg.data)));
    let o = pg.dr_raw(&["drill", "staging"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "[env.staging.postgres.main] data_dir {} is (or overlaps)",
            pg.data.display()
        )) && err.contains("the production cluster [postgres.main]"),
        "{err}"
    );
    // On production's port: refused too.
    set_config(&pg, &base, &sections(&staging_pg(pg.port, &staging_data)));
    let o = pg.dr_raw(&["drill", "staging"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success());
    assert!(
        err.contains(&format!(
            "reaches local:{}, the address of the production cluster [postgres.main]",
            pg.port
        )),
        "{err}"
    );
    untouched("refused by the config");

    // Production behind another address (a proxy): only the running server
    // can tell, by its identity; refused before anything is touched, and
    // the refusal is audited.
    let gate = common::Gate::start(pg.port);
    let redis_gate = common::Gate::start(redis.port);
    let proxied = sections(&staging_pg(gate.port, &staging_data)).replace(
        &format!("url = \"{}\"", staging_redis.url()),
        &format!("url = \"redis://127.0.0.1:{}\"", redis_gate.port),
    );
    set_config(&pg, &base, &proxied);
    let o = pg.dr_raw(&["drill", "staging"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{err}");
    for why in [
        "refusing to drill into environment staging, nothing was touched",
        "[env.staging.postgres.main]: the server at its conninfo is the running production cluster [postgres.main]",
        &format!("runs on {}, not on data_dir", pg.data.display()),
        "[env.staging.redis.cache]: the server at its url is the running production instance [redis.cache]",
        "not config_file",
    ] {
        assert!(err.contains(why), "{why:?} missing from: {err}");
    }
    // A dry run sees the same and touches nothing either.
    let o = pg.dr_raw(&["drill", "staging", "--dry-run"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("refused: [env.staging.postgres.main]: the server at its conninfo is the running production cluster")
            && text.contains("would be refused; nothing was touched"),
        "{text}"
    );
    drop((gate, redis_gate));
    untouched("refused at run time");
    let audit = std::fs::read_to_string(pg.dir.path().join("audit.jsonl")).expect("audit");
    let refused: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["action"] == "drill" && r["phase"] == "finished")
        .collect();
    assert!(
        refused.last().is_some_and(|r| r["outcome"] == "failed"
            && r["error"].as_str().is_some_and(|e| e.contains("refusing"))),
        "{refused:?}"
    );

    // The real staging servers: a dry run says what would happen, then the
    // drill restores, checks, runs the playbook and leaves them running.
    set_config(&pg, &base, &good);
    let o = pg.dr_raw(&["--json", "drill", "staging", "--dry-run"]);
    let plan = json(&o);
    assert!(o.status.success(), "{plan:#}");
    let steps = plan["plan"]["steps"].to_string();
    assert!(
        steps.contains("[env.staging.postgres.main]")
            && steps.contains("--delta")
            && steps.contains("SHUTDOWN NOSAVE")
            && steps.contains("CONFIG SET appendonly yes")
            && steps.contains("then playbook"),
        "{plan:#}"
    );
    untouched("dry run");
    let o = pg.dr_raw(&["--json", "drill", "staging"]);
    let v = json(&o);
    assert!(
        o.status.success(),
        "{v:#}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let d = &v["drill"];
    assert_eq!(d["ok"], true, "{d:#}");
    assert_eq!(d["environment"], "staging");
    for s in d["sources"].as_array().expect("sources") {
        eprintln!(
            "MEASURED staging drill {} {}: RTO {:.2}s RPO {:.3}s",
            s["kind"],
            s["name"],
            s["rto_seconds"].as_f64().unwrap_or(-1.0),
            s["rpo_seconds"].as_f64().unwrap_or(-1.0)
        );
        assert!(
            s["staging"]
                .as_str()
                .is_some_and(|x| x.contains("[env.staging.")),
            "{s:#}"
        );
        assert!(s["rto_seconds"].as_f64().is_some() && s["rpo_seconds"].as_f64().is_some());
        assert_eq!(check(s, "staging stopped")["ok"], true, "{s:#}");
    }
    assert_drill_checks(d);
    assert!(d["playbook"]["env"] == "staging", "{d:#}");
    let (report, md) = report_files(d);
    assert!(report["achieved"]["rto_seconds"].as_f64().is_some());
    assert!(report["achieved"]["rpo_seconds"].as_f64().is_some());
    assert!(
        md.contains("PASSED")
            && md.contains("environment: staging")
            && md.contains("(left running)")
            && md.contains("| achieved |"),
        "{md}"
    );

    // Staging holds production's data as of the target, under its own config.
    let sp = staging_port;
    assert_eq!(
        pg.sql_at(sp, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
    assert_eq!(
        pg.sql_at(sp, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance
    );
    assert_eq!(
        pg.sql_at(sp, "SELECT count(*) FROM pgbench_history"),
        history
    );
    assert_eq!(
        pg.sql_at(sp, "SELECT to_regclass('staging_only') IS NULL"),
        "t"
    );
    assert_eq!(pg.sql_at(sp, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(pg.sql_at(sp, "SHOW cluster_name"), "staging");
    assert_eq!(pg.sql_at(sp, "SHOW archive_mode"), "off");
    let exists: i64 = staging_redis.cmd(&["EXISTS", "staging:only"]);
    assert_eq!(exists, 0, "staging's own key survived the drill");
    let mut prod = redis.conn();
    let mut stag = staging_redis.conn();
    for k in ["k:0", "k:1", "k:6", "k:1998"] {
        assert_eq!(
            common::redis::value_of(&mut stag, k),
            common::redis::value_of(&mut prod, k),
            "{k}"
        );
    }
    assert_eq!(staging_redis.dbsize(0), redis.dbsize(0));
    assert_eq!(staging_redis.dbsize(1), redis.dbsize(1));
    let persistence: String = staging_redis.cmd(&["INFO", "persistence"]);
    assert!(persistence.contains("aof_enabled:1"), "{persistence}");
    // Production was never touched.
    assert_eq!(postmaster_pid(&pg.data), prod_pid);
    assert_eq!(redis_pid(&redis), prod_redis_pid);
    assert_eq!(pg.sql("SELECT count(*) FROM pgbench_history"), history);
    assert_clean(&scratch);

    // A target no backup covers fails the drill before staging is stopped.
    let (pg_pid, cache_pid) = (postmaster_pid(&staging_data), redis_pid(&staging_redis));
    let early = good.replace(
        "environment = \"staging\"",
        "environment = \"staging\"\nto = \"2020-01-01T00:00:00Z\"",
    );
    set_config(&pg, &base, &early);
    let o = pg.dr_raw(&["--json", "drill", "staging"]);
    let d = &json(&o)["drill"];
    assert!(!o.status.success(), "{d:#}");
    for s in d["sources"].as_array().expect("sources") {
        assert_eq!(check(s, "restore")["ok"], false, "{s:#}");
    }
    assert_eq!(
        postmaster_pid(&staging_data),
        pg_pid,
        "staging PostgreSQL was stopped"
    );
    assert_eq!(
        redis_pid(&staging_redis),
        cache_pid,
        "staging Redis was stopped"
    );
    assert_eq!(
        pg.sql_at(sp, "SELECT count(*) FROM pgbench_accounts"),
        "100000"
    );
}

/// Creates a vhost with a quorum queue and a binding on the test broker;
/// returns (management URL, admin user, vhost).
fn rabbitmq_vhost() -> (String, String, String) {
    let url = common::require_env("DR_TEST_RABBITMQ_URL", "RabbitMQ");
    let user = common::require_env("DR_TEST_RABBITMQ_USER", "RabbitMQ");
    let password = common::require_env("DR_TEST_RABBITMQ_PASSWORD", "RabbitMQ");
    let vhost = common::unique("drill");
    let defs = serde_json::json!({
        "vhosts": [{"name": vhost}],
        "queues": [{"name": "jobs", "vhost": vhost, "durable": true, "auto_delete": false,
                    "arguments": {"x-queue-type": "quorum"}}],
        "exchanges": [{"name": "in", "vhost": vhost, "type": "direct", "durable": true,
                       "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "in", "vhost": vhost, "destination": "jobs",
                      "destination_type": "queue", "routing_key": "job", "arguments": {}}]
    });
    let o = Command::new("curl")
        .args(["-sS", "-f", "-u", &format!("{user}:{password}")])
        .args(["-H", "content-type: application/json", "-X", "POST"])
        .args(["--data-binary", &defs.to_string()])
        .arg(format!("{url}/api/definitions"))
        .output()
        .expect("curl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (url, user, vhost)
}

fn delete_rabbitmq_vhost(url: &str, user: &str, vhost: &str) {
    let password = common::require_env("DR_TEST_RABBITMQ_PASSWORD", "RabbitMQ");
    let _ = Command::new("curl")
        .args(["-sS", "-u", &format!("{user}:{password}"), "-X", "DELETE"])
        .arg(format!("{url}/api/vhosts/{vhost}"))
        .output();
}

#[test]
fn drill_over_postgres_redis_and_rabbitmq_reports_one_rto_and_rpo() {
    let (_fs, pg, base, scratch, reports, redis) = drill_production();
    let (url, user, vhost) = rabbitmq_vhost();
    let bin = common::require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let sections = format!(
        "{}\n[redis.cache]\nurl = \"{}\"\nserver_bin = \"{bin}\"\n[redis.cache.verify]\nscratch_dir = \"{}\"\n\n\
         [rabbitmq.mq]\nurl = \"{url}\"\nuser = \"{user}\"\npassword_env = \"DR_TEST_RABBITMQ_PASSWORD\"\nvhosts = [\"{vhost}\"]\n\
         server_bin = \"{}\"\nos_user = \"{}\"\n[rabbitmq.mq.verify]\nscratch_dir = \"{}\"\n\
         [[rabbitmq.mq.verify.check]]\nname = \"jobs is quorum\"\nkind = \"queue\"\nvhost = \"{vhost}\"\nitem = \"jobs\"\narguments = {{ \"x-queue-type\" = \"quorum\" }}\n\n\
         [drill.all]\npostgres = [\"main\"]\nredis = [\"cache\"]\nrabbitmq = [\"mq\"]\nto = \"latest\"\nrto_seconds = 900\nrpo_seconds = 900\nreport_dir = \"{}\"\n",
        verify_section(&scratch, &[]),
        redis.url(),
        scratch.display(),
        common::require_env("DR_TEST_RABBITMQ_SERVER_BIN", "RabbitMQ"),
        pg.user,
        scratch.display(),
        reports.display()
    );
    set_config(&pg, &base, &sections);
    pg.dr(&["backup", "redis"]);
    pg.dr(&["backup", "rabbitmq"]);
    let o = pg.dr_raw(&["--json", "drill", "all"]);
    delete_rabbitmq_vhost(&url, &user, &vhost);
    let v = json(&o);
    assert!(o.status.success(), "{v:#}");
    let d = &v["drill"];
    assert_eq!(d["ok"], true, "{d:#}");
    let sources = d["sources"].as_array().expect("sources");
    let kinds: Vec<&str> = sources.iter().filter_map(|s| s["kind"].as_str()).collect();
    assert_eq!(kinds, ["pg", "redis", "rabbitmq"], "{d:#}");
    let rto = d["achieved"]["rto_seconds"].as_f64().expect("one RTO");
    let rpo = d["achieved"]["rpo_seconds"].as_f64().expect("one RPO");
    for s in sources {
        let (r, p) = (
            s["rto_seconds"].as_f64().expect("source RTO"),
            s["rpo_seconds"].as_f64().expect("source RPO"),
        );
        assert!(r <= rto && p <= rpo, "{s:#}");
        assert_eq!(check(s, "cleanup")["ok"], true, "{s:#}");
        eprintln!(
            "MEASURED drill {} {}: RTO {r:.2}s RPO {p:.3}s",
            s["kind"], s["name"]
        );
    }
    let mq = &sources[2];
    assert_eq!(check(mq, "definitions")["ok"], true, "{mq:#}");
    assert_eq!(check(mq, "jobs is quorum")["ok"], true, "{mq:#}");
    eprintln!("MEASURED drill overall: RTO {rto:.2}s RPO {rpo:.3}s");
    let (_, md) = report_files(d);
    assert!(md.contains("## rabbitmq `mq`"), "{md}");
    assert_clean(&scratch);
}

/// A data object rewritten with valid encryption but other content (what a
/// bug, or anyone holding a recipient's public key, could produce) passes
/// age's authentication; the block hashes the manifest records must catch
/// it, on `verify --read-data` and on restore.
#[test]
fn a_re_encrypted_data_object_with_other_content_is_refused() {
    use std::io::{Read, Write};
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    let object = walk(&fs.path().join("repo/pg"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/data/"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a data object");
    let key_text = std::fs::read_to_string(pg.dir.path().join("identity.txt")).expect("identity");
    let id: age::x25519::Identity = key_text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .expect("secret key line")
        .parse()
        .expect("identity");
    let stored = std::fs::read(&object).expect("read object");
    let mut compressed = Vec::new();
    age::Decryptor::new(&stored[..])
        .expect("age header")
        .decrypt(std::iter::once(&id as &dyn age::Identity))
        .expect("decrypt")
        .read_to_end(&mut compressed)
        .expect("read plaintext");
    let mut plain = zstd::decode_all(&compressed[..]).expect("zstd");
    // A changed byte whose object keeps its stored size, so no size check
    // can catch it before the content checks do.
    let third = plain.len() / 3;
    let same_size = (0..2000)
        .map(|i| third + i * 97)
        .find_map(|at| {
            plain[at] ^= 0x01;
            let z = zstd::bulk::compress(&plain, 3).expect("zstd");
            if z.len() == compressed.len() {
                return Some(z);
            }
            plain[at] ^= 0x01;
            None
        })
        .expect("a byte whose change keeps the compressed size");
    let recipient = id.to_public();
    // age's header carries a random-length grease stanza: encrypt until the
    // object is as long as the original.
    let forged = (0..5000)
        .find_map(|_| {
            let mut out = Vec::new();
            let mut w =
                age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                    .expect("encryptor")
                    .wrap_output(&mut out)
                    .expect("wrap");
            w.write_all(&same_size).expect("encrypt");
            w.finish().expect("finish");
            (out.len() == stored.len()).then_some(out)
        })
        .expect("an encryption as long as the original");
    std::fs::write(&object, &forged).expect("write forged object");

    let o = pg.dr_raw(&["--json", "verify", "--read-data"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "verify passed a forged object: {out}");
    assert!(
        out.contains("corrupt") && out.contains("the manifest records"),
        "{out}"
    );

    let target = pg.dir.path().join("restored");
    let o = pg.dr_raw(&[
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "restore used a forged object: {err}");
    assert!(err.contains("corrupt"), "{err}");
}
