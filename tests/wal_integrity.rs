//! A restore reaches the point asked for or fails loudly: damaged WAL stops
//! recovery instead of ending it, `latest` never stops short of archived WAL
//! in silence, and what is archived under a segment name is that segment.
//! Real PostgreSQL 15 and `dr` processes, fs repository.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::pg::{TestPg, chown, free_port, fs_repo, mark, restore_and_check, run_as_in};
use common::{segment_of, wal_objects, walk_files};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// A scratch parent for `verify --restore`, and the config section using it.
fn enable_verify(pg: &TestPg) -> PathBuf {
    let scratch = pg.dir.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir scratch");
    chown(&scratch, &pg.user);
    let mut text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    text.push_str(&format!(
        "\n[postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 120\n",
        scratch.display()
    ));
    std::fs::write(&pg.cfg, text).expect("write cfg");
    scratch
}

/// A backup followed by three archived segments with writes in each.
fn backup_then_segments(pg: &TestPg) {
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    for _ in 0..3 {
        pg.pgbench(&["-t", "200", "-n"]);
        pg.archive_now();
    }
}

fn verify_source(o: &Output) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify json ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    });
    v["verify_restore"]["sources"][0].clone()
}

fn check<'a>(src: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    src["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name}: {src:#}"))
}

#[test]
fn corrupt_wal_object_stops_recovery_and_fails_verification() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    enable_verify(&pg);
    backup_then_segments(&pg);
    let repo = fs.path().join("repo");
    let objects = wal_objects(&repo);
    assert!(objects.len() >= 4, "{objects:?}");

    // A good segment is fetched 0600 into a 0700 spool whatever the umask.
    let out = pg.dir.path().join("fetched");
    std::fs::create_dir_all(&out).expect("mkdir");
    chown(&out, &pg.user);
    let good = segment_of(&objects[objects.len() - 1]);
    let dest = out.join(&good);
    let o = pg.dr_raw(&["wal-fetch", &good, dest.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&dest), 0o600);

    // Not in the archive: exit 1, the end of the archive for PostgreSQL.
    let o = pg.dr_raw(&["wal-fetch", "0000000100000000000000FE", "/nonexistent/x"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // --json prints a document and keeps the statuses.
    let o = pg.dr_raw(&[
        "wal-fetch",
        "--json",
        "0000000100000000000000FE",
        "/nonexistent/x",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("wal-fetch json");
    assert_eq!(
        (v["ok"].clone(), v["archived"].clone()),
        (false.into(), false.into())
    );
    let o = pg.dr_raw(&[
        "wal-fetch",
        "--json",
        &good,
        dest.with_extension("j").to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("wal-fetch json");
    assert_eq!(v["ok"], true, "{v}");
    // Bad arguments must not read as "end of archive" either.
    let o = pg.dr_raw(&["wal-fetch", "000000010000000000000003"]);
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));

    // One flipped byte in a segment after the backup.
    let victim = objects[objects.len() - 2].clone();
    let segment = segment_of(&victim);
    let mut bytes = std::fs::read(&victim).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&victim, &bytes).expect("write");

    let o = pg.dr_raw(&["wal-fetch", &segment, out.join("x").to_str().expect("utf8")]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(200), "{e}");
    let o = pg.dr_raw(&[
        "wal-fetch",
        "--json",
        &segment,
        out.join("y").to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(200), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("wal-fetch error json");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        e.contains(&segment) && e.contains("[local]") && e.contains("corrupt"),
        "the error names the object, the region and the damage: {e}"
    );

    // The restore fails instead of promoting a server that lacks the rest.
    let dir = pg.target("restored");
    pg.track(dir.clone());
    let port = free_port().to_string();
    let o = pg.restore_raw(
        "latest",
        &dir,
        &["--start", "--port", &port, "--no-archive"],
    );
    let e = stderr(&o);
    assert!(!o.status.success(), "restore must fail: {e}");
    assert!(e.contains(&segment), "the failure names the segment: {e}");
    pg.stop(&dir);

    let o = pg.dr_raw(&["--json", "verify", "pg", "--restore"]);
    assert!(!o.status.success(), "verification must fail");
    let src = verify_source(&o);
    let detail = check(&src, "restore")["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(detail.contains(&segment), "{src:#}");
}

#[test]
fn latest_refuses_to_stop_short_of_archived_wal() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    backup_then_segments(&pg);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let objects = wal_objects(&fs.path().join("repo"));
    let victim = objects[objects.len() - 2].clone();
    let segment = segment_of(&victim);
    std::fs::remove_file(&victim).expect("delete segment");

    let dir = pg.target("short");
    let o = pg.restore_raw("latest", &dir, &[]);
    let e = stderr(&o);
    assert!(!o.status.success(), "must refuse: {e}");
    assert!(
        e.contains(&segment) && e.contains("missing in every region") && e.contains("--accept-gap"),
        "{e}"
    );
    assert!(
        !dir.exists() || std::fs::read_dir(&dir).expect("dir").next().is_none(),
        "nothing written"
    );

    // Accepted explicitly: restores up to the gap and says what was given up.
    let port = free_port();
    pg.track(dir.clone());
    let p = port.to_string();
    let o = pg.restore_raw(
        "latest",
        &dir,
        &[
            "--json",
            "--accept-gap",
            "--start",
            "--port",
            &p,
            "--no-archive",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let gave_up = v["restore"]["gave_up"].as_str().unwrap_or_default();
    assert!(gave_up.contains(&segment), "{v:#}");
    let short = pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts");
    assert_ne!(short, balance, "the restore stopped at the gap");
    pg.stop(&dir);
}

#[test]
fn wal_push_refuses_non_wal_and_repairs_an_invalid_archived_copy() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);

    // Eight bytes under a segment name are not archived. (Writes first: right
    // after the backup's switch, the position names the archived segment.)
    pg.pgbench(&["-t", "10", "-n"]);
    let current = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let junk_dir = pg.dir.path().join("junk");
    std::fs::create_dir_all(&junk_dir).expect("mkdir");
    let junk = junk_dir.join(&current);
    std::fs::write(&junk, b"notwal!\n").expect("write");
    chown(&junk_dir, &pg.user);
    chown(&junk, &pg.user);
    let o = pg.dr_raw(&["wal-push", junk.to_str().expect("utf8")]);
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("refusing to archive") && e.contains("bytes"),
        "{e}"
    );
    let repo = fs.path().join("repo");
    assert!(
        !wal_objects(&repo).iter().any(|p| segment_of(p) == current),
        "nothing archived under {current}"
    );

    // An invalid copy that reached the repository some other way (an older
    // dr, a manual upload) blocks the real segment...
    let cfg = dr::validate::load(&pg.cfg).expect("config");
    let sysid = dr::postgres::system_id(&pg.data).expect("system id");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let repo = dr::repo::Repository::open(&cfg).await.expect("repo");
        let file = dr::postgres::wal::WalFile::parse(&current).expect("name");
        dr::postgres::wal::push_bytes(&repo, "main", sysid, file, &current, vec![7u8; 8])
            .await
            .expect("plant");
    });
    pg.pgbench(&["-t", "200", "-n"]);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    pg.sql("SELECT pg_switch_wal()");
    let mut failed = String::new();
    for _ in 0..100 {
        failed = pg.sql("SELECT coalesce(last_failed_wal, '') FROM pg_stat_archiver");
        if failed == current {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(failed, current, "the archiver must be refused");

    // ...until --replace-invalid proves it invalid and replaces it.
    let o = run_as_in(
        &pg.user,
        &pg.dr,
        &[
            "--config",
            pg.cfg.to_str().expect("utf8"),
            "wal-push",
            "--replace-invalid",
            &format!("pg_wal/{current}"),
        ],
        &pg.data,
    );
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{text}{}", stderr(&o));
    assert!(text.contains("deleted invalid"), "{text}");
    pg.archive_now();
    let log = dr::audit::AuditLog::at(pg.dir.path().join("audit.jsonl"));
    assert_eq!(mode(log.path()), 0o600, "audit log is private");
    let recs = log.read_all().expect("audit");
    assert!(
        recs.iter().any(|r| r.action == "wal-push.replace-invalid"
            && r.phase == "finished"
            && r.outcome == "ok"),
        "{recs:?}"
    );
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    restore_and_check(&mut pg, "latest", "repaired", &balance, &history);
}

#[test]
fn a_too_open_identity_stops_only_what_decrypts() {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    let identity = pg.dir.path().join("identity.txt");
    std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    // Archiving and backups encrypt to public keys: they keep running.
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.archive_now();
    let failed = pg.sql("SELECT failed_count FROM pg_stat_archiver");
    assert_eq!(failed, "0", "archiving must not stop");
    // What decrypts refuses, with the fix.
    let o = pg.restore_raw("latest", &pg.target("r"), &[]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("chmod 600"), "{e}");
    let (ok, item) = pg.check_item(&pg.cfg, "identity");
    assert!(!ok, "{item}");
    assert_eq!(item["status"], "fail", "{item}");
}

#[test]
fn verification_of_latest_passes_on_a_busy_cluster() {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    enable_verify(&pg);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.sql("ALTER SYSTEM SET archive_timeout = '1s'");
    pg.sql("SELECT pg_reload_conf()");
    pg.dr(&["backup", "pg"]);
    let m = mark(&pg);
    assert!(!m.at.is_empty());
    // Steady writes, and a segment archived every second while verifying.
    let port = pg.port.to_string();
    let mut load = std::process::Command::new(pg.bin.join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-n",
            "-c",
            "2",
            "-T",
            "90",
            "-R",
            "100",
            "postgres",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(std::time::Duration::from_secs(5));
    let mut failures = Vec::new();
    for _ in 0..2 {
        let o = pg.dr_raw(&["--json", "verify", "pg", "--restore"]);
        if !o.status.success() {
            failures.push(verify_source(&o));
        }
    }
    let _ = load.kill();
    let _ = load.wait();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The windows `dr list pg --json` prints.
fn windows(pg: &TestPg) -> Vec<serde_json::Value> {
    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    v["windows"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_printed_window_end_restores_exactly() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    // No autovacuum or analyze commits behind the test's back.
    pg.sql("ALTER SYSTEM SET autovacuum = off");
    pg.sql("SELECT pg_reload_conf()");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);

    // Nothing committed since the backup: its end is the one restorable time.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    pg.archive_now();
    let w = windows(&pg);
    assert_eq!(w[0]["from"], w[0]["to"], "{w:?}");
    let at_end = w[0]["to"].as_str().expect("to").to_string();
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    restore_and_check(&mut pg, &at_end, "at-backup-end", &balance, &history);

    // Writes, then a quiet stretch before the segment is archived: the window
    // ends at the last commit, not when the segment was archived.
    pg.pgbench(&["-t", "200", "-n"]);
    let after_writes = pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    std::thread::sleep(std::time::Duration::from_secs(2));
    pg.archive_now();
    let w = windows(&pg);
    let end = w.last().expect("window")["to"]
        .as_str()
        .expect("to")
        .to_string();
    let end_t = chrono::DateTime::parse_from_rfc3339(&end).expect("rfc3339");
    let after_t = chrono::DateTime::parse_from_rfc3339(&after_writes).expect("rfc3339");
    let before = (after_t - end_t).num_milliseconds();
    assert!(
        (0..1500).contains(&before),
        "window end {end} must be the last commit (just before {after_writes}), not the \
         archive time 2 s later"
    );
    restore_and_check(&mut pg, &end, "at-window-end", &balance, &history);
    // A second later is outside the window: refused before anything is written.
    let later = (end_t + chrono::Duration::seconds(1)).to_rfc3339();
    let dir = pg.target("after-end");
    let o = pg.restore_raw(&later, &dir, &[]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("recoverable window"),
        "{e}"
    );
}

#[test]
fn without_an_audit_path_the_first_restore_as_postgres_is_audited_not_refused() {
    let fs = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.archive_now();
    // No [audit] path: /var/log/dr is not the postgres user's to write.
    let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    let audit_line = format!(
        "path = \"{}\"\n",
        pg.dir.path().join("audit.jsonl").display()
    );
    std::fs::write(&pg.cfg, text.replace(&audit_line, "")).expect("write cfg");
    let state = pg.dir.path().join("xdg-state");
    std::fs::create_dir_all(&state).expect("mkdir");
    chown(&state, &pg.user);
    let as_postgres = |args: &[&str]| {
        let mut all = vec![
            format!("XDG_STATE_HOME={}", state.display()),
            pg.dr.display().to_string(),
            "--config".into(),
            pg.cfg.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run_as_in(&pg.user, Path::new("/usr/bin/env"), &refs, Path::new("/"))
    };
    let log = state.join("dr/audit.jsonl");
    let o = as_postgres(&["--json", "check"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check json");
    let item = v["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "audit log"))
        .cloned()
        .unwrap_or_else(|| panic!("no audit log check: {v}"));
    assert_eq!(item["status"], "ok", "{item}");
    assert!(
        item["detail"]
            .as_str()
            .is_some_and(|d| d.contains(log.to_str().expect("utf8"))),
        "{item}"
    );
    let dir = pg.target("first");
    let o = as_postgres(&[
        "restore",
        "pg",
        "--to",
        "latest",
        "--target",
        dir.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&log), 0o600);
    let recs = dr::audit::AuditLog::at(log).read_all().expect("audit");
    assert!(
        recs.iter()
            .any(|r| r.action == "restore.pg" && r.outcome == "ok" && r.actor.user == pg.user),
        "{recs:?}"
    );
}

/// `verify --list` judges the WAL archive by what the backups need: a hole
/// below every backup's start (an expired segment that a sync running beside
/// `expire` copied back) is a note, not a failure, and `expire` clears it; a
/// hole after the oldest backup's start, or in a backup's own segments,
/// fails and names the region.
#[test]
fn verify_judges_the_wal_archive_by_what_backups_need() {
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let pg = TestPg::new(&format!(
        "{}\n[postgres.main.retention]\nkeep_full = 1\n",
        fs_repo(&fs)
    ));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    for _ in 0..3 {
        pg.pgbench(&["-n", "-t", "50"]);
        pg.archive_now();
    }
    let before = wal_objects(&repo);
    assert!(before.len() >= 3, "{before:?}");
    pg.dr(&["backup", "pg"]);
    for _ in 0..3 {
        pg.pgbench(&["-n", "-t", "50"]);
        pg.archive_now();
    }
    let list = |extra: &[&str]| {
        let mut args = vec!["--json", "verify", "--list"];
        args.extend_from_slice(extra);
        let o = pg.dr_raw(&args);
        (o.status.success(), common::json_of(&o))
    };

    // A hole below the backup.
    std::fs::remove_file(&before[1]).expect("rm");
    let (ok, v) = list(&[]);
    assert!(ok, "{v}");
    assert_eq!(v["verify"]["wal_gaps"], serde_json::json!([]), "{v}");
    let unneeded = v["verify"]["unneeded_wal"][0].as_str().unwrap_or_default();
    assert!(
        unneeded.contains("precede the start of every backup")
            && unneeded.contains(&segment_of(&before[0])),
        "{v}"
    );
    let text = String::from_utf8_lossy(&pg.dr(&["verify", "--list"]).stdout).into_owned();
    assert!(
        text.contains("note: main (system ") && text.contains("clean"),
        "{text}"
    );
    pg.dr(&["expire"]);
    let (ok, v) = list(&[]);
    assert!(ok, "{v}");
    assert_eq!(v["verify"]["unneeded_wal"], serde_json::json!([]), "{v}");

    // A hole the backup's window needs.
    let after = wal_objects(&repo);
    let start = walk_files(&repo)
        .into_iter()
        .find(|p| p.to_string_lossy().contains(".backup"))
        .map(|p| segment_of(&p))
        .expect("backup history file");
    let later: Vec<&PathBuf> = after.iter().filter(|p| segment_of(p) > start).collect();
    assert!(later.len() >= 3, "{after:?}");
    let hole = later[1].clone();
    let kept = fs.path().join("kept-segment");
    std::fs::copy(&hole, &kept).expect("keep");
    std::fs::remove_file(&hole).expect("rm");
    let (ok, v) = list(&["--region", "local"]);
    assert!(!ok, "{v}");
    let gap = v["verify"]["wal_gaps"][0].as_str().unwrap_or_default();
    assert!(
        gap.contains(&format!(
            "WAL {} .. {} missing",
            segment_of(&hole),
            segment_of(&hole)
        )),
        "{v}"
    );
    let o = pg.dr_raw(&["verify", "--list", "--region", "local"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("in region local: replay stops before it"),
        "{text}"
    );
    std::fs::copy(&kept, &hole).expect("put back");
    chown(&hole, &pg.user);

    // The backup's own first segment.
    let own = after
        .iter()
        .find(|p| segment_of(p) == start)
        .expect("start segment archived");
    std::fs::remove_file(own).expect("rm");
    let (ok, v) = list(&[]);
    assert!(!ok, "{v}");
    let gap = v["verify"]["wal_gaps"][0].as_str().unwrap_or_default();
    assert!(
        gap.contains("needs WAL") && gap.contains(&format!("{start} is missing")),
        "{v}"
    );
}
