//! Backups that have not written their manifest yet, against a real
//! PostgreSQL: `dr expire` must leave a running backup's data alone, remove
//! real orphans once they are older than `orphan_age`, and a backup must not
//! record itself over data deleted behind its back.
//!
//! A backup is held at its last step deterministically: `archive_command`
//! parks segments in a directory (reporting success to PostgreSQL) while a
//! hold file exists, so the backup waits for its stop segment with all its
//! data written; pushing the parked files with `dr wal-push` releases it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{TestPg, chown, fs_repo, mark, restore_started};
use common::walk_files;

use common::json_of as json;

fn add_to_config(pg: &TestPg, text: &str) {
    let mut c = std::fs::read_to_string(&pg.cfg).expect("cfg");
    c.push_str(text);
    std::fs::write(&pg.cfg, c).expect("cfg");
}

/// Archiving that can park WAL instead of pushing it.
struct Hold {
    flag: PathBuf,
    parked: PathBuf,
}

impl Hold {
    fn install(pg: &TestPg) -> Hold {
        let flag = pg.dir.path().join("hold");
        let parked = pg.dir.path().join("parked");
        std::fs::create_dir_all(&parked).expect("mkdir");
        chown(&parked, &pg.user);
        let cmd = format!(
            "if [ -e {flag} ]; then cp %p {parked}/%f; else {dr} --config {cfg} wal-push %p; fi",
            flag = flag.display(),
            parked = parked.display(),
            dr = pg.dr.display(),
            cfg = pg.cfg.display(),
        );
        let conf = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read conf");
        text.push_str(&format!("\narchive_command = '{cmd}'\n"));
        std::fs::write(&conf, text).expect("write conf");
        assert_eq!(pg.sql("SELECT pg_reload_conf()"), "t");
        // The reload is asynchronous; wait until the server uses the new command.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pg.sql("SHOW archive_command").starts_with("if [") {
            assert!(
                Instant::now() < deadline,
                "archive_command was not reloaded"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Hold { flag, parked }
    }

    fn set(&self, on: bool) {
        if on {
            std::fs::write(&self.flag, b"").expect("hold");
        } else {
            std::fs::remove_file(&self.flag).expect("unhold");
        }
    }

    /// Waits until a backup history file is parked: the backup that ended
    /// backup mode has written all its data and now waits for its stop
    /// segment, which is parked too.
    fn wait_for_waiting_backup(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if walk_files(&self.parked)
                .iter()
                .any(|p| p.to_string_lossy().ends_with(".backup"))
            {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the backup ended ({status}) before it was held");
            }
            assert!(
                Instant::now() < deadline,
                "no backup reached its stop segment"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pushes the parked files, oldest first, releasing waiting backups.
    fn release(&self, pg: &TestPg) {
        let mut files = walk_files(&self.parked);
        files.sort();
        for f in files {
            pg.dr(&["wal-push", f.to_str().expect("utf8")]);
            std::fs::remove_file(&f).expect("rm parked");
        }
    }
}

/// Starts `dr backup pg` (plus `extra`) as the OS user without waiting.
fn spawn_backup(pg: &TestPg, extra: &[&str]) -> Child {
    Command::new("runuser")
        .args(["-u", &pg.user, "--"])
        .arg(&pg.dr)
        .args(["--config", pg.cfg.to_str().expect("utf8"), "--json"])
        .args(["backup", "pg"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dr backup")
}

/// The backup directories of the repository, by id, with their files.
fn backup_dirs(repo: &Path) -> Vec<(String, Vec<PathBuf>)> {
    let mut out = Vec::new();
    for f in walk_files(&repo.join("pg/main")) {
        let parts: Vec<String> = f
            .strip_prefix(repo)
            .expect("under repo")
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if parts.get(3).map(String::as_str) == Some("backups") {
            let id = parts[4].clone();
            match out
                .iter_mut()
                .find(|(i, _): &&mut (String, Vec<PathBuf>)| *i == id)
            {
                Some((_, v)) => v.push(f),
                None => out.push((id, vec![f])),
            }
        }
    }
    out.sort();
    for (_, v) in &mut out {
        v.sort();
    }
    out
}

fn has_manifest(files: &[PathBuf]) -> bool {
    files.iter().any(|f| f.ends_with("manifest"))
}

/// The one backup directory without a manifest.
fn unfinished(repo: &Path) -> (String, Vec<PathBuf>) {
    let open: Vec<_> = backup_dirs(repo)
        .into_iter()
        .filter(|(_, f)| !has_manifest(f))
        .collect();
    assert_eq!(open.len(), 1, "{open:?}");
    open.into_iter().next().expect("one")
}

fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().expect("wait for dr backup")
}

#[test]
fn a_running_backup_survives_expire_and_restores_exactly() {
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let mut pg = TestPg::new(&fs_repo(&fs));
    add_to_config(
        &pg,
        "stop_wal_timeout = \"10m\"\n\n[postgres.main.retention]\nkeep_full = 1\n",
    );
    let hold = Hold::install(&pg);
    pg.pgbench(&["-i", "-s", "2", "-q"]);

    // The slow full backup: all its data written, waiting for its stop segment.
    hold.set(true);
    let mut slow = spawn_backup(&pg, &["--full"]);
    hold.wait_for_waiting_backup(&mut slow);
    hold.set(false);
    let (slow_id, slow_files) = unfinished(&repo);
    assert!(
        slow_files.iter().any(|f| f.ends_with("started")),
        "the running marker is written first: {slow_files:?}"
    );
    assert!(slow_files.len() > 1, "{slow_files:?}");

    pg.pgbench(&["-t", "300", "-n"]);
    let m = mark(&pg);
    pg.pgbench(&["-t", "300", "-n"]);
    pg.archive_now();
    // The fast backup starts after the slow one and finishes first.
    pg.dr(&["backup", "pg"]);

    let v = json(&pg.dr(&["--json", "expire"]));
    assert_eq!(v["ok"], true, "{v}");
    let plan = &v["expire"][0]["plan"];
    assert_eq!(plan["running"], serde_json::json!([slow_id]), "{v}");
    assert!(plan["deferred"].as_u64().expect("deferred") > 0, "{v}");
    assert_eq!(
        unfinished(&repo),
        (slow_id.clone(), slow_files),
        "expire touched the running backup"
    );

    // The slow backup gets its stop segment, checks its objects and records itself.
    hold.release(&pg);
    let o = finish(slow);
    assert!(
        o.status.success(),
        "slow backup: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(json(&o)["backup"]["id"], slow_id.as_str(), "{}", json(&o));

    // A point between the two backups restores from the slow one, exactly.
    let (port, dir, report) = restore_started(&mut pg, &m.at, "slow");
    assert_eq!(report["restore"]["backup"], slow_id.as_str(), "{report}");
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        m.balance
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        m.history
    );
    pg.stop(&dir);
}

#[test]
fn orphans_older_than_orphan_age_are_removed_and_reported() {
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let pg = TestPg::new(&fs_repo(&fs));
    add_to_config(
        &pg,
        "stop_wal_timeout = \"10m\"\n\n[retention]\norphan_age = \"5s\"\n",
    );
    let hold = Hold::install(&pg);
    pg.pgbench(&["-i", "-s", "1", "-q"]);

    // A backup killed while waiting for its stop segment leaves an orphan.
    hold.set(true);
    let mut killed = spawn_backup(&pg, &[]);
    hold.wait_for_waiting_backup(&mut killed);
    let pid = killed.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for p in children
        .split_whitespace()
        .chain([pid.to_string().as_str()])
    {
        let _ = Command::new("kill").args(["-9", p]).status();
    }
    let _ = killed.wait();
    hold.set(false);
    hold.release(&pg);
    let (orphan_id, orphan_files) = unfinished(&repo);
    pg.dr(&["backup", "pg"]);
    // Verification passes and names the orphan as one.
    let v = json(&pg.dr(&["--json", "verify", "--list"]));
    assert_eq!(v["ok"], true, "{v}");
    let orphans = v["verify"]["orphans"].as_array().expect("orphans");
    assert_eq!(orphans.len(), 1, "{v}");
    assert!(
        orphans[0].as_str().is_some_and(|o| o.contains(&orphan_id)
            && o.contains(&format!("{} object(s) and no manifest", orphan_files.len()))),
        "{v}"
    );
    // A writer killed mid-put leaves its temp file; one being written is young.
    let tmp = repo.join(".tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let (stale, young) = (tmp.join("00000000deadbeef"), tmp.join("00000000cafef00d"));
    std::fs::write(&stale, b"partial object").expect("write");
    std::fs::write(&young, b"partial object").expect("write");
    let touched = Command::new("touch")
        .args(["-d", "1 hour ago"])
        .arg(&stale)
        .status()
        .expect("touch");
    assert!(touched.success());
    std::thread::sleep(Duration::from_secs(6));
    std::fs::write(&young, b"partial object, still growing").expect("write");

    // The dry run names them and changes nothing. (WAL from before the only
    // backup goes as well: that is retention, not orphan removal.)
    let orphan_keys: Vec<String> = orphan_files
        .iter()
        .map(|f| {
            let k = f.strip_prefix(&repo).expect("under repo");
            k.to_string_lossy().into_owned()
        })
        .collect();
    let orphans_in = |deletions: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = deletions
            .as_array()
            .expect("deletions")
            .iter()
            .filter(|d| d["orphan"] == true)
            .map(|d| d["key"].as_str().expect("key").to_string())
            .collect();
        v.sort();
        v
    };
    let v = json(&pg.dr(&["--json", "expire", "--dry-run"]));
    assert_eq!(orphans_in(&v["plans"][0]["deletions"]), orphan_keys, "{v}");
    assert!(
        orphan_keys.iter().any(|k| k.ends_with("/started")),
        "{orphan_keys:?}"
    );
    assert_eq!(v["temp_files"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["temp_files"][0]["name"], "00000000deadbeef", "{v}");
    let text = String::from_utf8_lossy(&pg.dr(&["expire", "--dry-run"]).stdout).into_owned();
    assert!(
        text.contains(&format!("orphan: {orphan_id} has no manifest")),
        "{text}"
    );
    assert!(
        text.contains("would remove temp file [local] .tmp/00000000deadbeef"),
        "{text}"
    );
    assert!(stale.exists() && unfinished(&repo).1 == orphan_files);

    let v = json(&pg.dr(&["--json", "expire"]));
    assert_eq!(v["ok"], true, "{v}");
    let done = &v["expire"][0];
    let mut deleted: Vec<String> = done["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .filter_map(|k| k.as_str())
        .filter(|k| k.contains("/backups/"))
        .map(str::to_string)
        .collect();
    deleted.sort();
    assert_eq!(deleted, orphan_keys, "{v}");
    assert_eq!(orphans_in(&done["plan"]["deletions"]), orphan_keys, "{v}");
    assert_eq!(v["temp_files"]["removed"][0]["name"], "00000000deadbeef");
    assert!(orphan_files.iter().all(|f| !f.exists()), "{orphan_files:?}");
    assert!(!stale.exists() && young.exists());
    // The complete backup is untouched.
    let dirs = backup_dirs(&repo);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(has_manifest(&dirs[0].1));
    let text = String::from_utf8_lossy(&pg.dr(&["expire"]).stdout).into_owned();
    assert!(text.contains(", 0 of them orphans"), "{text}");
    let v = json(&pg.dr(&["--json", "verify", "--list"]));
    assert_eq!(v["verify"]["orphans"], serde_json::json!([]), "{v}");
}

#[test]
fn a_backup_whose_referenced_blocks_vanished_writes_no_manifest() {
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let pg = TestPg::new(&fs_repo(&fs));
    add_to_config(&pg, "stop_wal_timeout = \"10m\"\n");
    let hold = Hold::install(&pg);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    let (base_id, base_files) = backup_dirs(&repo).into_iter().next().expect("base");
    pg.pgbench(&["-t", "50", "-n"]);

    // A block-incremental backup, waiting for its stop segment, while the
    // blocks it references are deleted behind its back.
    hold.set(true);
    let mut inc = spawn_backup(&pg, &[]);
    hold.wait_for_waiting_backup(&mut inc);
    hold.set(false);
    let (inc_id, _) = unfinished(&repo);
    let data: Vec<&PathBuf> = base_files
        .iter()
        .filter(|f| f.parent().is_some_and(|p| p.ends_with("data")))
        .collect();
    assert!(!data.is_empty());
    for f in &data {
        std::fs::remove_file(f).expect("rm");
    }
    hold.release(&pg);
    let o = finish(inc);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the backup recorded itself: {err}");
    assert!(
        err.contains("gone from the repository")
            && err.contains(&format!("backups/{base_id}/data/")),
        "{err}"
    );
    let dirs = backup_dirs(&repo);
    let (_, inc_files) = dirs.iter().find(|(i, _)| *i == inc_id).expect("inc dir");
    assert!(!has_manifest(inc_files), "{inc_files:?}");
    let listed = json(&pg.dr(&["--json", "list", "pg"]));
    let ids: Vec<&str> = listed["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .filter_map(|b| b["id"].as_str())
        .collect();
    assert!(!ids.contains(&inc_id.as_str()), "{listed}");
}
