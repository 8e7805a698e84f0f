//! The `dr` binary as a user runs it: keygen, repo init, check, selftest, and
//! the bad-input cases with the messages they must print.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{dr_bin, fs_region_toml, garage_region_toml};

struct Env {
    dir: tempfile::TempDir,
    recipient: String,
    identity: PathBuf,
}

fn dr(args: &[&str]) -> Output {
    Command::new(dr_bin())
        .args(args)
        .env_remove("DR_CONFIG")
        .env_remove("DR_IDENTITY_FILE")
        .output()
        .expect("run dr")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn setup() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = dir.path().join("identity.txt");
    let o = dr(&[
        "keygen",
        "--json",
        "--output",
        identity.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "keygen: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("keygen json");
    let recipient = v["recipient"].as_str().expect("recipient").to_string();
    assert!(recipient.starts_with("age1"));
    Env {
        dir,
        recipient,
        identity,
    }
}

impl Env {
    fn write_config(&self, regions: &str) -> PathBuf {
        let p = self.dir.path().join("dr.toml");
        let text = format!(
            "[repository]\nrecipients = [\"{}\"]\nidentity_file = \"{}\"\n\n{regions}",
            self.recipient,
            self.identity.display()
        );
        std::fs::write(&p, text).expect("write config");
        p
    }
    fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }
}

fn run_cfg(cfg: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--config", cfg.to_str().expect("utf8")];
    all.extend_from_slice(args);
    dr(&all)
}

#[test]
fn keygen_init_check_selftest_on_fs() {
    let env = setup();
    let mode = std::fs::metadata(&env.identity)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let cfg = env.write_config(&fs_region_toml("local", &env.repo()));

    let o = run_cfg(&cfg, &["check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check json");
    let checks = v["checks"].as_array().expect("checks");
    assert!(
        checks
            .iter()
            .any(|c| c["name"] == "repository in local" && c["status"] == "warn")
    );

    let o = run_cfg(&cfg, &["repo", "init", "--json"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("init json");
    assert_eq!(v["repository"]["initialized"][0], "local");
    assert!(env.repo().join("dr-repo.json").exists());

    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already initialized"), "{}", stderr(&o));

    let o = run_cfg(&cfg, &["check", "--json"]);
    assert!(o.status.success(), "check: {} {}", stdout(&o), stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check json");
    assert_eq!(v["ok"], true);
    for c in v["checks"].as_array().expect("checks") {
        assert_eq!(c["status"], "ok", "{c}");
    }

    let input = env.dir.path().join("input.bin");
    let data: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&input, &data).expect("write input");
    let o = run_cfg(
        &cfg,
        &[
            "repo",
            "selftest",
            "--json",
            "--file",
            input.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "selftest: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("selftest json");
    assert_eq!(v["selftest"]["plain_size"], 5_000_000);
    assert_eq!(v["selftest"]["regions"][0]["ok"], true);
    assert_eq!(
        v["selftest"]["plain_hash"],
        blake3::hash(&data).to_hex().to_string()
    );
    assert_eq!(v["selftest"]["cleaned_up"], true);
}

#[test]
fn init_and_check_on_garage() {
    let env = setup();
    let regions = fs_region_toml("local", &env.repo()) + "\n" + &garage_region_toml("garage");
    let cfg = env.write_config(&regions);
    let o = run_cfg(&cfg, &["repo", "init", "--json"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let o = run_cfg(&cfg, &["check", "--json"]);
    assert!(o.status.success(), "check: {} {}", stdout(&o), stderr(&o));
    let o = run_cfg(&cfg, &["repo", "selftest", "--size", "20000000"]);
    assert!(o.status.success(), "selftest: {}", stderr(&o));
    assert!(stdout(&o).contains("garage"), "{}", stdout(&o));
}

#[test]
fn unreachable_region_is_reported_by_check() {
    let env = setup();
    // A port nothing listens on: connection refused.
    let regions = fs_region_toml("local", &env.repo())
        + "\n[[region]]\nname = \"down\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\npath_style = true\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\n";
    let cfg = env.write_config(&regions);
    let o = run_cfg(&cfg, &["check", "--json"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let down = v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "region down")
        .expect("region down row");
    assert_eq!(down["status"], "fail");
    assert!(
        down["detail"]
            .as_str()
            .unwrap_or("")
            .contains("unreachable"),
        "{down}"
    );
}

fn config_error(env: &Env, text: &str) -> String {
    let p = env.dir.path().join("bad.toml");
    std::fs::write(&p, text).expect("write");
    let o = run_cfg(&p, &["check"]);
    assert!(!o.status.success(), "bad config accepted: {text}");
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "error must be one line: {e}");
    e
}

#[test]
fn bad_config_errors_name_file_line_and_fix() {
    let env = setup();
    let r = &env.recipient;
    let e = config_error(
        &env,
        &format!(
            "[repository]\nrecipients = [\"{r}\"]\ncompresion_level = 3\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n"
        ),
    );
    assert!(
        e.contains("bad.toml:3") && e.contains("compresion_level"),
        "{e}"
    );

    let e = config_error(
        &env,
        "[repository]\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n",
    );
    assert!(
        e.contains("no recipients") && e.contains("dr keygen"),
        "{e}"
    );

    let e = config_error(
        &env,
        &format!("[repository]\nrecipients = [\"{r}\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\n"),
    );
    assert!(
        e.contains("bad.toml:3") && e.contains("needs a path"),
        "{e}"
    );

    let e = config_error(
        &env,
        &format!(
            "[repository]\nrecipients = [\"{r}\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/y\"\n"
        ),
    );
    assert!(
        e.contains("bad.toml:8") && e.contains("duplicate region name"),
        "{e}"
    );

    // A too-open identity is not a config error (archiving must go on), but
    // `dr check` fails on it with the fix.
    std::fs::set_permissions(&env.identity, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let cfg = env.write_config(&fs_region_toml("local", &env.repo()));
    let o = run_cfg(&cfg, &["check"]);
    assert!(!o.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(
        all.contains(&format!("chmod 600 {}", env.identity.display())),
        "{all}"
    );

    let o = dr(&["--config", "/nonexistent/dr.toml", "check"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot read config"), "{}", stderr(&o));
}

#[test]
fn foreign_or_newer_repository_is_refused() {
    let env = setup();
    let cfg = env.write_config(&fs_region_toml("local", &env.repo()));
    std::fs::create_dir_all(env.repo()).expect("mkdir");
    std::fs::write(
        env.repo().join("dr-repo.json"),
        r#"{"format":"dr-repository","version":99,"id":"x","created":"2026-01-01T00:00:00Z","recipient_fingerprints":[]}"#,
    )
    .expect("write");
    let o = run_cfg(&cfg, &["repo", "selftest", "--size", "1000"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("format version 99") && stderr(&o).contains("upgrade dr"),
        "{}",
        stderr(&o)
    );

    std::fs::write(env.repo().join("dr-repo.json"), "[pgbackrest info]\n").expect("write");
    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not a dr repository descriptor"),
        "{}",
        stderr(&o)
    );
}

/// Kills `dr` with SIGKILL in the middle of writing a large object and checks
/// that no object becomes visible, then that the repository still works.
fn kill_mid_put(regions: String, list: impl Fn() -> Vec<String>) {
    let env = setup();
    let cfg = env.write_config(&regions);
    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let mut child = Command::new(dr_bin())
        .args([
            "--config",
            cfg.to_str().expect("utf8"),
            "repo",
            "selftest",
            "--size",
            "8000000000",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Let it stream for a while, then kill it hard.
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "selftest ended before the kill"
    );
    child.kill().expect("kill");
    child.wait().expect("reap");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        list().is_empty(),
        "objects visible after a crash: {:?}",
        list()
    );
    let o = run_cfg(&cfg, &["repo", "selftest", "--size", "1000000"]);
    assert!(o.status.success(), "selftest after crash: {}", stderr(&o));
}

#[test]
fn crash_mid_put_fs_leaves_no_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("repo");
    let root2 = root.clone();
    kill_mid_put(fs_region_toml("local", &root), move || {
        let sel = root2.join("selftest");
        match std::fs::read_dir(&sel) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    });
}

#[test]
fn crash_mid_put_s3_leaves_no_object() {
    let region = garage_region_toml("garage");
    let prefix = region
        .lines()
        .find_map(|l| l.strip_prefix("prefix = \""))
        .map(|p| p.trim_end_matches('"').to_string())
        .expect("prefix");
    kill_mid_put(region, move || {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        rt.block_on(async {
            let cfg = common::garage_region(&prefix);
            let store = dr::store::Store::S3(dr::store::S3Store::connect(&cfg).await.expect("s3"));
            store
                .list("selftest/")
                .await
                .expect("list")
                .into_iter()
                .map(|o| o.key)
                .collect()
        })
    });
}

#[test]
fn verify_levels_and_drill_names_are_checked_before_anything_runs() {
    let env = setup();
    let cfg = env.write_config(&fs_region_toml("local", &env.repo()));
    let o = run_cfg(&cfg, &["verify", "--to", "latest"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--restore"), "{}", stderr(&o));
    let o = run_cfg(&cfg, &["verify", "--list", "--restore"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let o = run_cfg(&cfg, &["verify", "--restore", "--region", "local"]);
    assert!(!o.status.success());
    let o = run_cfg(&cfg, &["verify", "--restore"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nothing to verify"), "{}", stderr(&o));
    let o = run_cfg(&cfg, &["drill", "nightly"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no [drill.nightly]"), "{}", stderr(&o));
}

/// Runs dr with stdout a pipe nobody reads any more, as `dr … | head` once
/// head has exited. The read end is closed before dr starts: closing it
/// after the spawn races with dr's first write on a loaded machine.
fn dr_into_closed_pipe(cfg: &Path, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(dr_bin())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("DR_CONFIG")
        .env_remove("DR_IDENTITY_FILE")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run dr")
}

#[test]
fn closed_stdout_ends_quietly_with_status_141() {
    let env = setup();
    let cfg = env.write_config(&format!(
        "{}\n[audit]\npath = \"{}\"\n",
        fs_region_toml("local", &env.repo()),
        env.dir.path().join("audit.jsonl").display()
    ));
    for args in [&["check", "--json"][..], &["check"], &["daemon", "--check"]] {
        let o = dr_into_closed_pipe(&cfg, args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(141), "{args:?}: {e}");
        assert!(
            !e.contains("panicked") && !e.contains("backtrace"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn usage_errors_under_json_are_json_with_status_2() {
    let o = dr(&["--json", "check", "--bogus"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("usage error as JSON");
    assert_eq!(v["ok"], false);
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("--bogus")),
        "{v}"
    );
    assert_eq!(v["usage"], "Usage: dr check [OPTIONS]", "{v}");
    // Without --json, clap's text only.
    let o = dr(&["check", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(o.stdout.is_empty() && stderr(&o).contains("--bogus"));
    // wal-fetch keeps its contract: anything but "not archived" is 200.
    let o = dr(&["--json", "wal-fetch"]);
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("usage error as JSON");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("<FILE>")),
        "{v}"
    );
    // Help is not an error.
    let o = dr(&["--json", "check", "--help"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn logs_are_not_coloured_off_a_terminal() {
    let env = setup();
    let url = common::require_env("DR_TEST_REDIS_URL", "Redis");
    let cfg = env.write_config(&format!(
        "{}\n[redis.cache]\nurl = \"{url}\"\n",
        fs_region_toml("local", &env.repo())
    ));
    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let o = run_cfg(&cfg, &["backup", "redis"]);
    let e = stderr(&o);
    assert!(o.status.success(), "backup: {e}");
    assert!(e.contains("INFO"), "the snapshot logs at info: {e}");
    assert!(!e.contains('\x1b'), "escape codes in a pipe: {e:?}");
}

#[test]
fn cron_errors_are_one_line_with_the_users_expression_and_the_true_bound() {
    let env = setup();
    let cfg = env.write_config(&format!(
        "{}\n[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n[redis.cache.schedule]\nsnapshot = \"0 24 * * *\"\n",
        fs_region_toml("local", &env.repo())
    ));
    let o = run_cfg(&cfg, &["daemon", "--check"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "one line: {e}");
    assert!(
        e.contains("\"0 24 * * *\"") && e.contains("hour 24 is out of range (0-23)"),
        "{e}"
    );
    assert!(
        !e.contains("0 0 24"),
        "the 6-field translation is not shown: {e}"
    );
    // 23 is a valid hour.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg)
            .expect("read")
            .replace("0 24", "0 23"),
    )
    .expect("write");
    let o = run_cfg(&cfg, &["daemon", "--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The checks of a `dr check --json` run, by name.
fn check_item(o: &Output, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check json");
    v["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no check {name:?}: {v:#}"))
}

#[test]
fn check_changes_nothing_and_checks_redis_sources() {
    let env = setup();
    let src = common::redis::TestRedis::start(&[
        "requirepass right-pw",
        "user nosync on >np ~* &* +@all -psync -sync",
    ]);
    let port = src.port;
    let audit = env.dir.path().join("log/audit.jsonl");
    let cfg = env.write_config(&format!(
        "{}\n[audit]\npath = \"{}\"\n\
         [redis.good]\nurl = \"redis://:right-pw@127.0.0.1:{port}\"\n\
         [redis.wrongpw]\nurl = \"redis://:wrong@127.0.0.1:{port}\"\n\
         [redis.noperm]\nurl = \"redis://nosync:np@127.0.0.1:{port}\"\n\
         [redis.notredis]\nurl = \"redis://{}\"\n",
        fs_region_toml("local", &env.repo()),
        audit.display(),
        common::require_env("DR_TEST_S3_ENDPOINT", "Garage").trim_start_matches("http://"),
    ));
    let o = run_cfg(&cfg, &["check", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!env.repo().exists(), "check created the repository");
    assert!(
        !audit.parent().expect("dir").exists(),
        "check created the audit log"
    );
    let region = check_item(&o, "region local");
    assert_eq!(region["status"], "ok", "{region}");
    assert!(
        region["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nothing written")),
        "{region}"
    );

    let good = check_item(&o, "redis good");
    assert_eq!(good["status"], "ok", "{good}");
    assert!(
        good["detail"]
            .as_str()
            .is_some_and(|d| d.contains("PSYNC allowed")),
        "{good}"
    );
    for (name, words) in [
        (
            "redis wrongpw",
            &["refused the credentials", "password"][..],
        ),
        ("redis noperm", &["psync", "ACL SETUSER"]),
        (
            "redis notredis",
            &["is it a Redis server", "not a Redis reply"],
        ),
    ] {
        let c = check_item(&o, name);
        assert_eq!(c["status"], "fail", "{c}");
        let d = c["detail"].as_str().unwrap_or_default().to_string();
        assert!(words.iter().any(|w| d.contains(w)), "{name}: {d}");
    }
}

#[test]
fn check_names_the_postgres_address_and_a_repository_the_archiving_user_cannot_write() {
    let env = setup();
    let os_user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    // A data directory owned by the user that would run archive_command, and
    // a repository only root may write.
    let data = env.dir.path().join("pgdata");
    std::fs::create_dir(&data).expect("mkdir");
    common::pg::chown(&data, &os_user);
    std::fs::create_dir(env.repo()).expect("mkdir");
    std::fs::set_permissions(env.repo(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg = env.write_config(&format!(
        "{}\n[postgres.main]\nconninfo = \"host=127.0.0.1 port=1 user=postgres dbname=postgres sslmode=disable\"\n\
         data_dir = \"{}\"\n",
        fs_region_toml("local", &env.repo()),
        data.display()
    ));
    let o = run_cfg(&cfg, &["check", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let pg = check_item(&o, "postgres main");
    let d = pg["detail"].as_str().unwrap_or_default();
    assert!(
        d.contains("at 127.0.0.1:1") && d.contains("is the server running"),
        "{d}"
    );
    assert_eq!(d.matches("error connecting to server").count(), 1, "{d}");
    let a = check_item(&o, "archiving main to local");
    assert_eq!(a["status"], "fail", "{a}");
    let d = a["detail"].as_str().unwrap_or_default();
    assert!(
        d.contains(&format!("not writable by {os_user}")) && d.contains("chown"),
        "{d}"
    );
    // Given to that user, it passes.
    common::pg::chown(&env.repo(), &os_user);
    let o = run_cfg(&cfg, &["check", "--json"]);
    assert_eq!(check_item(&o, "archiving main to local")["status"], "ok");
}

#[test]
fn list_pg_on_an_empty_repository_says_how_to_take_the_first_backup() {
    let env = setup();
    let cfg = env.write_config(&format!(
        "{}\n[postgres.main]\nconninfo = \"host=127.0.0.1 port=1 user=postgres\"\ndata_dir = \"/nonexistent\"\n",
        fs_region_toml("local", &env.repo())
    ));
    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    let o = run_cfg(&cfg, &["list", "pg"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("`dr backup pg main`"), "{}", stdout(&o));
}

#[test]
fn wrong_s3_credentials_are_named_with_the_http_status() {
    let env = setup();
    let garage = |var: &str| common::require_env(var, "Garage (S3)");
    // The right key id with a wrong secret: Garage answers HEAD with a bare 403.
    let regions = format!(
        "[[region]]\nname = \"garage\"\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nprefix = \"wrong-secret\"\ns3_region = \"{}\"\npath_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"not-the-secret\"\n",
        garage("DR_TEST_S3_ENDPOINT"),
        garage("DR_TEST_S3_BUCKET"),
        garage("DR_TEST_S3_REGION"),
        garage("DR_TEST_S3_ACCESS_KEY_ID"),
    );
    let cfg = env.write_config(&regions);
    let o = run_cfg(&cfg, &["repo", "init"]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("403") && e.contains("access key") && !e.contains("unknown: "),
        "{e}"
    );
}

#[test]
fn drill_dry_run_without_backups_is_refused_and_help_groups_global_options() {
    let env = setup();
    let repo = env.repo();
    let regions = fs_region_toml("local", &repo);
    let cfg = env.write_config(&format!(
        "{regions}\n[audit]\npath = \"{}\"\n[postgres.main]\nconninfo = \"host=127.0.0.1 port=9 user=postgres dbname=postgres\"\ndata_dir = \"{}\"\n[drill.nightly]\npostgres = [\"main\"]\nto = \"latest\"\nreport_dir = \"{}\"\n",
        env.dir.path().join("audit.jsonl").display(),
        env.dir.path().join("nodata").display(),
        env.dir.path().join("reports").display(),
    ));
    let o = run_cfg(&cfg, &["repo", "init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_cfg(&cfg, &["drill", "nightly", "--dry-run"]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        !o.status.success(),
        "a drill with nothing to restore must not pass: {text}"
    );
    assert!(
        text.contains("no restorable backup") && text.contains("refused"),
        "{text}"
    );

    let o = dr(&["backup", "pg", "--help"]);
    let help = stdout(&o);
    let global = help
        .find("Global options:")
        .unwrap_or_else(|| panic!("{help}"));
    assert!(
        help[global..].contains("--config") && !help[..global].contains("--config"),
        "{help}"
    );
}

#[test]
fn repo_init_owner_hands_directory_regions_to_the_archiving_user() {
    use std::os::unix::fs::MetadataExt;
    let env = setup();
    let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    let cfg = env.write_config(&fs_region_toml("local", &env.repo()));
    let o = run_cfg(&cfg, &["repo", "init", "--owner", &user]);
    assert!(o.status.success(), "{}", stderr(&o));
    let uid = Command::new("id").args(["-u", &user]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&uid.stdout)
        .trim()
        .parse()
        .expect("uid");
    for p in common::walk_files(&env.repo()) {
        assert_eq!(
            std::fs::metadata(&p).expect("meta").uid(),
            uid,
            "{}",
            p.display()
        );
    }
    assert_eq!(std::fs::metadata(env.repo()).expect("meta").uid(), uid);
}
