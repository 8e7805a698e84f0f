//! Store faults in one of two regions during real `dr backup pg` runs:
//! failing, slow and stalled requests and short writes (injected with
//! `DR_FAULTS`, see `store/faults.rs`), and a full filesystem (a small
//! tmpfs). With `min_regions` met by the healthy region the backup
//! succeeds and names the faulty region as degraded; with `min_regions`
//! not met it fails, saying why, and no backup is listed. Either way the
//! repository verifies and `dr repo sync` repairs the faulty region.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::json_of as json;
use common::pg::{TestPg, chown, restore_started};

/// Two fs regions, `a` and `b`, under one temp dir the OS user can reach.
struct TwoRegions {
    dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl TwoRegions {
    fn new() -> TwoRegions {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).expect("mkdir");
            chown(d, &user);
        }
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        TwoRegions { dir, a, b }
    }

    fn toml(&self, min_regions: usize) -> String {
        // TestPg writes [repository] first; min_regions and stall_timeout
        // go into it through the config text below.
        let _ = min_regions;
        format!(
            "{}{}",
            common::fs_region_toml("a", &self.a),
            common::fs_region_toml("b", &self.b)
        )
    }
}

/// Sets `[repository]` keys in the config.
fn repository_keys(pg: &TestPg, keys: &str) {
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let text = text.replacen("[repository]\n", &format!("[repository]\n{keys}\n"), 1);
    std::fs::write(&pg.cfg, text).expect("cfg");
}

/// dr as the OS user with `DR_FAULTS` set for this run only.
fn dr_faulty(pg: &TestPg, faults: &str, args: &[&str]) -> Output {
    Command::new("runuser")
        .args(["-u", &pg.user, "--"])
        .arg(&pg.dr)
        .arg("--config")
        .arg(&pg.cfg)
        .args(args)
        .env("DR_FAULTS", faults)
        .current_dir("/")
        .output()
        .expect("run dr")
}

fn backups(pg: &TestPg) -> usize {
    json(&pg.dr(&["--json", "list", "pg"]))["backups"]
        .as_array()
        .expect("backups")
        .len()
}

fn verify_region(pg: &TestPg, region: &str) -> serde_json::Value {
    json(&pg.dr_raw(&["--json", "verify", "--list", "--region", region]))
}

fn clean(v: &serde_json::Value) -> bool {
    v["ok"] == true
        && v["verify"]["problems"]
            .as_array()
            .is_some_and(|p| p.is_empty())
        && v["verify"]["wal_gaps"]
            .as_array()
            .is_none_or(|g| g.is_empty())
}

fn setup(min_regions: usize, extra_repo_keys: &str) -> (TwoRegions, TestPg) {
    let r = TwoRegions::new();
    let pg = TestPg::new(&r.toml(min_regions));
    repository_keys(
        &pg,
        &format!("min_regions = {min_regions}\n{extra_repo_keys}"),
    );
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    (r, pg)
}

/// The backup succeeded with region b degraded; region a verifies; after
/// `dr repo sync` both regions verify and `latest` restores exactly.
fn degraded_then_repaired(pg: &mut TestPg, o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: the backup failed although region a makes min_regions: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v = json(o);
    let degraded = v["degraded"].as_array().cloned().unwrap_or_default();
    assert!(
        degraded.iter().any(|d| d["region"] == "b"),
        "{what}: region b is not reported degraded: {v}"
    );
    assert!(clean(&verify_region(pg, "a")), "{what}: region a");
    let o = pg.dr_raw(&["repo", "sync"]);
    assert!(
        o.status.success(),
        "{what}: sync: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let vb = verify_region(pg, "b");
    assert!(clean(&vb), "{what}: region b after sync: {vb}");
    latest_exact(pg, what);
}

fn latest_exact(pg: &mut TestPg, name: &str) {
    pg.archive_now();
    let want = (
        pg.sql("SELECT sum(abalance) FROM pgbench_accounts"),
        pg.sql("SELECT count(*) FROM pgbench_history"),
    );
    let (port, dir, _) = restore_started(pg, "latest", &format!("r-{name}"));
    let got = (
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
    );
    pg.stop(&dir);
    assert_eq!(got, want, "{name}: restore of latest");
}

/// The backup failed, saying min_regions was not met, and listed nothing.
fn failed_clearly(pg: &TestPg, o: &Output, before: usize, what: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what}: the backup claimed success");
    assert!(
        e.contains("min_regions"),
        "{what}: the failure does not say min_regions was not met: {e}"
    );
    assert_eq!(backups(pg), before, "{what}: a failed backup is listed");
    let v = json(&pg.dr_raw(&["--json", "verify", "--list"]));
    assert!(
        v["verify"]["problems"].as_array().is_some_and(|p| p
            .iter()
            .all(|p| p["region"] == "b" && p["kind"] == "missing")),
        "{what}: damage beyond copies b missed: {v}"
    );
}

#[test]
fn failing_requests_in_one_region() {
    let (_r, mut pg) = setup(1, "");
    pg.pgbench(&["-n", "-t", "100"]);
    let o = dr_faulty(&pg, "b:error_rate=0.5,seed=7", &["--json", "backup", "pg"]);
    degraded_then_repaired(&mut pg, &o, "error_rate=0.5");

    let (_r, pg) = setup(2, "");
    let before = backups(&pg);
    let o = dr_faulty(&pg, "b:error_rate=1", &["--json", "backup", "pg"]);
    failed_clearly(&pg, &o, before, "error_rate=1, min_regions=2");
}

#[test]
fn slow_requests_in_one_region_only_slow_the_backup() {
    let (_r, mut pg) = setup(2, "");
    pg.pgbench(&["-n", "-t", "100"]);
    let before = backups(&pg);
    let o = dr_faulty(&pg, "b:slow_ms=30", &["--json", "backup", "pg"]);
    assert!(
        o.status.success(),
        "slow region: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(backups(&pg), before + 1);
    for region in ["a", "b"] {
        assert!(clean(&verify_region(&pg, region)), "region {region}");
    }
    latest_exact(&mut pg, "slow");
}

#[test]
fn a_stalled_region_is_abandoned_after_stall_timeout() {
    // min_regions met by a: the backup finishes soon after the stall
    // timeout instead of hanging on b.
    let (_r, mut pg) = setup(1, "stall_timeout = \"3s\"");
    pg.pgbench(&["-n", "-t", "100"]);
    let t = Instant::now();
    let o = dr_faulty(
        &pg,
        "b:stall_put_after=65536",
        &["--json", "backup", "pg", "--full"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "the backup hung on a stalled region for {:?}",
        t.elapsed()
    );
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    degraded_then_repaired(&mut pg, &o, "stalled region");
    let v = json(&o);
    assert!(
        v["degraded"].to_string().contains("stalled") || e.contains("stalled"),
        "the report says the region stalled: {v} {e}"
    );

    // min_regions not met: it fails, in bounded time, saying why.
    let (_r, pg) = setup(2, "stall_timeout = \"3s\"");
    let before = backups(&pg);
    let t = Instant::now();
    let o = dr_faulty(
        &pg,
        "b:stall_put_after=65536",
        &["--json", "backup", "pg", "--full"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(120),
        "hung {:?}",
        t.elapsed()
    );
    failed_clearly(&pg, &o, before, "stalled, min_regions=2");
}

#[test]
fn short_writes_in_one_region_are_found_by_verify_and_repaired_by_sync() {
    let (_r, mut pg) = setup(1, "");
    pg.pgbench(&["-n", "-t", "100"]);
    // b silently keeps only the first 1000 bytes of every object.
    let o = dr_faulty(&pg, "b:short_write_after=1000", &["--json", "backup", "pg"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(clean(&verify_region(&pg, "a")), "region a");
    let vb = verify_region(&pg, "b");
    let corrupt = vb["verify"]["problems"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["kind"] == "corrupt").count())
        .unwrap_or(0);
    assert!(
        corrupt > 0,
        "verify --list finds the short copies in b: {vb}"
    );
    // Reads fall back to a: the restore is exact despite b's bad copies.
    latest_exact(&mut pg, "short-before-sync");
    let o = pg.dr_raw(&["repo", "sync"]);
    assert!(
        o.status.success(),
        "sync: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let vb = verify_region(&pg, "b");
    assert!(clean(&vb), "region b after sync: {vb}");
    let o = pg.dr_raw(&["--json", "verify", "--read-data", "--region", "b"]);
    assert!(
        o.status.success(),
        "read-data of b after sync: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// A small tmpfs mounted at `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str, user: &str) -> Tmpfs {
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mount tmpfs at {} (the tests run as root)",
            at.display()
        );
        chown(at, user);
        Tmpfs(at.to_path_buf())
    }

    /// Fills the filesystem but for about `leave` bytes.
    fn fill(&self, leave: u64) {
        let st = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .expect("df");
        let avail: u64 = String::from_utf8_lossy(&st.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df avail");
        let n = avail.saturating_sub(leave);
        std::fs::write(self.0.join("filler"), vec![0u8; n as usize]).expect("filler");
    }

    fn empty(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_filesystem_in_one_region() {
    let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    for min_regions in [1, 2] {
        let r = TwoRegions::new();
        let full = Tmpfs::mount(&r.b, "64m", &user);
        let mut pg = TestPg::new(&r.toml(min_regions));
        repository_keys(&pg, &format!("min_regions = {min_regions}"));
        pg.pgbench(&["-i", "-s", "2", "-q"]);
        pg.dr(&["backup", "pg", "--full"]);
        pg.pgbench(&["-n", "-t", "200"]);
        pg.archive_now();
        let before = backups(&pg);
        full.fill(256 << 10);
        let o = pg.dr_raw(&["--json", "backup", "pg", "--full"]);
        let what = format!("full filesystem in b, min_regions = {min_regions}");
        if min_regions == 1 {
            let e = String::from_utf8_lossy(&o.stderr).to_string();
            let v = json(&o);
            assert!(
                v["degraded"].to_string().contains("full")
                    || e.contains("full")
                    || e.contains("No space"),
                "{what}: the report says the filesystem is full: {v} {e}"
            );
            full.empty();
            degraded_then_repaired(&mut pg, &o, &what);
        } else {
            failed_clearly(&pg, &o, before, &what);
            full.empty();
            let o = pg.dr_raw(&["backup", "pg"]);
            assert!(
                o.status.success(),
                "{what}: the next backup once there is room: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let o = pg.dr_raw(&["repo", "sync"]);
            assert!(
                o.status.success(),
                "{what}: sync: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(clean(&verify_region(&pg, "b")), "{what}: b after sync");
            latest_exact(&mut pg, "full-2");
        }
        drop(pg);
        drop(full);
        drop(r.dir);
    }
}

#[test]
fn dr_faults_naming_an_unknown_region_is_refused() {
    let (_r, pg) = setup(1, "");
    let o = dr_faulty(&pg, "nope:error_rate=1", &["backup", "pg"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("DR_FAULTS"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
