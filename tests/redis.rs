//! Redis snapshots and restores against real redis-server processes.

mod common;

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::redis::{AfterBudget, DrSetup, Proxy, TestRedis, value_of};

fn fs_region(s: &tempfile::TempDir) -> String {
    common::fs_region_toml("local", &s.path().join("repo"))
}

fn redis_section(url: &str, extra: &str) -> String {
    let os_user = common::require_env("DR_TEST_OS_USER", "Redis");
    let bin = common::require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    format!(
        "[redis.cache]\nurl = \"{url}\"\nserver_bin = \"{bin}\"\nos_user = \"{os_user}\"\ntimeout_seconds = 30\n{extra}\n"
    )
}

/// Restores the latest snapshot with --start and checks it against `src`:
/// redis-check-rdb accepts the file, DBSIZE per database matches, and sampled
/// keys have the same values.
fn restore_and_compare(
    dr: &DrSetup,
    src: &TestRedis,
    name: &str,
    samples: u64,
    total: u64,
    instance: &str,
) {
    let target = dr.path(name);
    let port = common::pg::free_port();
    let v = dr.dr_json(&[
        "restore",
        "redis",
        instance,
        "--to",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
        "--start",
        "--port",
        &port.to_string(),
    ]);
    let r = &v["restore"];
    // Take charge of the server first, so a failed assertion cannot leak it.
    let pid = r["pid"].as_u64().or_else(|| {
        std::fs::read_to_string(target.join("redis.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
    });
    let restored = pid.map(|pid| Restored { pid });
    assert!(restored.is_some(), "no pid for the restored server: {v}");
    assert_eq!(r["keys_match"], true, "{v}");

    let dump = target.join("dump.rdb");
    // Decrypted data is private whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    for (p, want) in [(&dump, 0o600), (&target, 0o700)] {
        let mode = std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode, want, "{}", p.display());
    }
    let check = std::process::Command::new("redis-check-rdb")
        .arg(&dump)
        .output()
        .expect("redis-check-rdb (from the redis-tools package)");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("RDB looks OK"),
        "redis-check-rdb: {text}"
    );

    let copy = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("client")
        .get_connection()
        .expect("connect to restored server");
    let mut copy = copy;
    let mut orig = src.conn();
    for db in [0u32, 1] {
        let _: () = redis::cmd("SELECT")
            .arg(db)
            .query(&mut copy)
            .expect("select");
        let n: u64 = redis::cmd("DBSIZE").query(&mut copy).expect("dbsize");
        assert_eq!(n, src.dbsize(db), "DBSIZE of db{db}");
    }
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query(&mut copy)
        .expect("select");
    let step = (total / samples).max(1);
    let mut compared = 0;
    for i in (0..total).step_by(step as usize) {
        let k = format!("k:{i}");
        assert_eq!(value_of(&mut copy, &k), value_of(&mut orig, &k), "key {k}");
        compared += 1;
    }
    assert!(compared >= samples.min(total));
    drop(restored);
}

/// A restored redis-server, stopped on drop.
struct Restored {
    pid: u64,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.pid.to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn million_keys_disk_based_with_requirepass() {
    let src = TestRedis::start(&["requirepass s3cret-pw", "repl-diskless-sync no"]);
    let total = 1_000_000;
    src.populate(total);
    let repo = tempfile::tempdir().expect("tempdir");
    let dr = DrSetup::new(&fs_region(&repo), &redis_section(&src.url(), ""));

    let v = dr.dr_json(&["backup", "redis"]);
    let s = &v["snapshot"];
    eprintln!("snapshot: {s}");
    assert_eq!(s["diskless"], false);
    assert_eq!(s["sync"], "psync");
    assert_eq!(s["keys"].as_u64(), Some(total + 10));
    assert_eq!(s["keyspace"]["0"]["keys"].as_u64(), Some(total));
    assert!(s["keyspace"]["0"]["expires"].as_u64().unwrap_or(0) > 0);

    let l = dr.dr_json(&["list", "redis"]);
    let snaps = l["snapshots"].as_array().expect("snapshots");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["id"], s["id"]);
    assert!(
        snaps[0]["server_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty())
    );

    restore_and_compare(&dr, &src, "restored", 2000, total, "cache");

    // The restore is in the audit log, and its record is in the repository.
    let log = dr::audit::AuditLog::at(dr.path("audit.jsonl"));
    let recs = log.read_all().expect("audit log");
    let done: Vec<_> = recs.iter().filter(|r| r.phase == "finished").collect();
    assert_eq!(done.len(), 1, "{recs:?}");
    assert_eq!(
        (done[0].action.as_str(), done[0].outcome.as_str()),
        ("restore.redis", "ok")
    );
    assert_eq!(done[0].details["snapshot"], s["id"]);
    let audit_dir = repo.path().join("repo/audit");
    assert!(
        common::walk_files(&audit_dir).len() == 1,
        "one audit object in {}",
        audit_dir.display()
    );
}

#[test]
fn diskless_sync_with_an_acl_user_into_s3() {
    let src = TestRedis::start(&[
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
        "user backup on >bk-pass ~* &* -@all +psync +sync +replconf +ping +info",
    ]);
    let total = 60_000;
    src.populate(total);
    let url = format!("redis://backup@127.0.0.1:{}", src.port);
    let dr = DrSetup::new(
        &common::garage_region_toml("garage"),
        &redis_section(&url, "password_env = \"DR_TEST_REDIS_BACKUP_PW\""),
    );
    let o = dr
        .command(&["--json", "backup", "redis"])
        .env("DR_TEST_REDIS_BACKUP_PW", "bk-pass")
        .output()
        .expect("dr");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["snapshot"]["diskless"], true, "{v}");
    assert_eq!(v["snapshot"]["keys"].as_u64(), Some(total + 10));
    // Restoring needs no access to the server: the password is not required.
    restore_and_compare(&dr, &src, "restored", 500, total, "cache");
}

/// `sync = "auto"` avoids the server's diskless delay by asking for a
/// disk-based sync; `disk` and `diskless` force the choice. Every mode
/// restores the same data.
#[test]
fn sync_mode_chooses_disk_or_diskless() {
    // The server's defaults: diskless, waiting 5 s for more replicas.
    let delayed = TestRedis::start(&["repl-diskless-sync yes", "repl-diskless-sync-delay 5"]);
    let total = 5_000;
    delayed.populate(total);
    let snap = |extra: &str| {
        let repo = tempfile::tempdir().expect("tempdir");
        let dr = DrSetup::new(&fs_region(&repo), &redis_section(&delayed.url(), extra));
        let v = dr.dr_json(&["backup", "redis"]);
        assert_eq!(v["snapshot"]["keys"].as_u64(), Some(total + 10), "{v}");
        (repo, dr, v["snapshot"]["diskless"].clone())
    };
    let (_, _, auto) = snap("");
    assert_eq!(auto, false, "auto must not wait for the diskless delay");
    let (_, _, forced) = snap("sync = \"diskless\"");
    assert_eq!(forced, true, "sync = \"diskless\" must stream diskless");
    let (_repo, dr, disk) = snap("sync = \"disk\"");
    assert_eq!(disk, false);
    restore_and_compare(&dr, &delayed, "restored", 500, total, "cache");

    // Without a delay, auto lets the server stream diskless.
    let prompt = TestRedis::start(&["repl-diskless-sync yes", "repl-diskless-sync-delay 0"]);
    prompt.populate(100);
    let repo = tempfile::tempdir().expect("tempdir");
    let dr = DrSetup::new(&fs_region(&repo), &redis_section(&prompt.url(), ""));
    let v = dr.dr_json(&["backup", "redis"]);
    assert_eq!(v["snapshot"]["diskless"], true, "{v}");
}

fn expect_fail(dr: &DrSetup, args: &[&str], needles: &[&str]) {
    let o = dr.dr_raw(args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "dr {args:?} should fail");
    for n in needles {
        assert!(e.contains(n), "dr {args:?}: expected {n:?} in: {e}");
    }
}

fn snapshot_count(dr: &DrSetup, name: &str) -> usize {
    dr.dr_json(&["list", "redis", name])["snapshots"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(usize::MAX)
}

#[test]
fn bad_credentials_permissions_and_targets_are_clear() {
    let src = TestRedis::start(&[
        "requirepass right-pw",
        "user nosync on >np ~* &* +@all -psync -sync",
    ]);
    src.populate(1000);
    let repo = tempfile::tempdir().expect("tempdir");
    let port = src.port;
    let sections = format!(
        "{}\n{}\n{}\n{}",
        redis_section(&format!("redis://:wrong-pw@127.0.0.1:{port}"), "")
            .replace("[redis.cache]", "[redis.wrongpw]"),
        redis_section(&format!("redis://nosync:np@127.0.0.1:{port}"), "")
            .replace("[redis.cache]", "[redis.noperm]"),
        redis_section(&format!("redis://127.0.0.1:{port}"), "")
            .replace("[redis.cache]", "[redis.nopw]"),
        redis_section(&src.url(), ""),
    );
    let dr = DrSetup::new(&fs_region(&repo), &sections);
    expect_fail(
        &dr,
        &["backup", "redis", "wrongpw"],
        &["refused the credentials", "password"],
    );
    expect_fail(
        &dr,
        &["backup", "redis", "noperm"],
        &["refused replication", "NOPERM", "ACL SETUSER"],
    );
    expect_fail(&dr, &["backup", "redis", "nopw"], &["requires a password"]);
    let closed = common::pg::free_port();
    let repo2 = tempfile::tempdir().expect("tempdir");
    let dr2 = DrSetup::new(
        &fs_region(&repo2),
        &redis_section(&format!("redis://127.0.0.1:{closed}"), ""),
    );
    expect_fail(&dr2, &["backup", "redis"], &["cannot connect to Redis"]);
    expect_fail(
        &dr,
        &["list", "redis"],
        &["several Redis instances", "name one"],
    );
    for name in ["wrongpw", "noperm", "nopw"] {
        let v = dr.dr_json(&["list", "redis", name]);
        assert_eq!(v["snapshots"].as_array().map(|a| a.len()), Some(0));
    }

    // A target before the first snapshot names the available range.
    dr.dr(&["backup", "redis", "cache"]);
    let t = dr.path("early");
    expect_fail(
        &dr,
        &[
            "restore",
            "redis",
            "cache",
            "--to",
            "2001-01-01T00:00:00Z",
            "--target",
            t.to_str().expect("utf8"),
        ],
        &["before the first snapshot", "snapshots cover"],
    );
    assert!(!t.exists(), "a failed restore leaves no directory");
    expect_fail(
        &dr,
        &[
            "restore",
            "redis",
            "cache",
            "--to",
            "yesterday-ish",
            "--target",
            "/tmp/x",
        ],
        &["is not a time", "RFC 3339"],
    );
    // An existing dump is never overwritten.
    let t2 = dr.path("occupied");
    std::fs::create_dir_all(&t2).expect("mkdir");
    std::fs::write(t2.join("dump.rdb"), b"precious").expect("write");
    expect_fail(
        &dr,
        &[
            "restore",
            "redis",
            "cache",
            "--to",
            "latest",
            "--target",
            t2.to_str().expect("utf8"),
        ],
        &["already exists"],
    );
    assert_eq!(
        std::fs::read(t2.join("dump.rdb")).expect("read"),
        b"precious"
    );
}

#[test]
fn broken_corrupt_or_killed_transfers_leave_no_snapshot() {
    let src = TestRedis::start(&["repl-diskless-sync no", "rdbcompression no"]);
    let total = 300_000;
    src.populate(total);
    let repo = tempfile::tempdir().expect("tempdir");
    let cut = Proxy::start(src.port, 1 << 20, AfterBudget::Cut);
    let flip = Proxy::start(src.port, 3 << 20, AfterBudget::Flip);
    let stall = Proxy::start(src.port, 2 << 20, AfterBudget::Stall);
    let via = |name: &str, p: &Proxy| {
        redis_section(&format!("redis://127.0.0.1:{}", p.port), "")
            .replace("[redis.cache]", &format!("[redis.{name}]"))
    };
    let sections = format!(
        "{}\n{}\n{}\n{}",
        via("cut", &cut),
        via("flip", &flip),
        via("stall", &stall),
        redis_section(&src.url(), "")
    );
    let dr = DrSetup::new(&fs_region(&repo), &sections);

    // The connection drops 1 MiB into the payload.
    expect_fail(
        &dr,
        &["backup", "redis", "cut"],
        &[
            "failed after",
            "connection closed",
            "no snapshot was recorded",
        ],
    );
    assert_eq!(snapshot_count(&dr, "cut"), 0);

    // One byte flipped in transit: the CRC-64 trailer catches it.
    expect_fail(
        &dr,
        &["backup", "redis", "flip"],
        &["RDB checksum mismatch", "no snapshot was recorded"],
    );
    assert_eq!(snapshot_count(&dr, "flip"), 0);

    // dr is killed while the transfer stalls half-way.
    let mut child = dr
        .command(&["backup", "redis", "stall"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dr");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stall.forwarded.load(Ordering::Relaxed) < 2 << 20 {
        assert!(Instant::now() < deadline, "transfer never reached 2 MiB");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().expect("kill dr");
    let _ = child.wait();
    assert_eq!(snapshot_count(&dr, "stall"), 0);

    // The next run, in the same repository, succeeds and restores.
    dr.dr(&["backup", "redis", "cache"]);
    assert_eq!(snapshot_count(&dr, "cache"), 1);
    restore_and_compare(&dr, &src, "after-kill", 300, total, "cache");
}

#[test]
fn snapshot_over_verified_tls() {
    let tls = tempfile::tempdir().expect("tempdir");
    common::test_certificates(tls.path());
    let user = common::require_env("DR_TEST_OS_USER", "Redis");
    common::pg::chown(tls.path(), &user);
    let tls_port = common::pg::free_port();
    let t = |f: &str| tls.path().join(f).display().to_string();
    let src = TestRedis::start(&[
        &format!("tls-port {tls_port}"),
        &format!("tls-cert-file {}", t("server.crt")),
        &format!("tls-key-file {}", t("server.key")),
        &format!("tls-ca-cert-file {}", t("ca.crt")),
        "tls-auth-clients no",
        "repl-diskless-sync-delay 0",
    ]);
    src.populate(20_000);
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let repo = tempfile::tempdir().expect("tempdir");
    let sections = format!(
        "{}\n{}\n{}",
        redis_section(&url, &format!("ca_file = \"{}\"", t("ca.crt"))),
        redis_section(&url, &format!("ca_file = \"{}\"", t("other-ca.crt")))
            .replace("[redis.cache]", "[redis.wrongca]"),
        redis_section(&url, "").replace("[redis.cache]", "[redis.systemroots]"),
    );
    let dr = DrSetup::new(&fs_region(&repo), &sections);
    let v = dr.dr_json(&["backup", "redis", "cache"]);
    assert_eq!(v["snapshot"]["keys"].as_u64(), Some(20_010), "{v}");
    for name in ["wrongca", "systemroots"] {
        expect_fail(
            &dr,
            &["backup", "redis", name],
            &["cannot connect to Redis", "TLS handshake"],
        );
    }
    restore_and_compare(&dr, &src, "restored", 200, 20_000, "cache");
}

#[test]
fn falls_back_to_sync_when_psync_is_unavailable() {
    // Servers older than 2.8 know only SYNC; renaming PSYNC away makes a
    // current server answer the same way ("unknown command").
    let src = TestRedis::start(&["rename-command PSYNC \"\"", "repl-diskless-sync no"]);
    src.populate(20_000);
    let repo = tempfile::tempdir().expect("tempdir");
    let dr = DrSetup::new(&fs_region(&repo), &redis_section(&src.url(), ""));
    let v = dr.dr_json(&["backup", "redis"]);
    assert_eq!(v["snapshot"]["sync"], "sync", "{v}");
    restore_and_compare(&dr, &src, "restored", 200, 20_000, "cache");
}
