//! Kill-anywhere campaign, continued: `dr wal-stream`, `dr backup redis`,
//! `dr repo sync`, the daemon mid-job and the S3 server mid-multipart-upload
//! (a Garage of the test's own; the shared one is never killed). What is
//! checked after each kill, and the environment variables that scale it,
//! are described in tests/kill_campaign.rs.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::chaos::*;
use common::garage::OwnGarage;
use common::pg::{TestPg, chown, free_port, fs_repo, mark, restore_started, stable_port};
use common::redis::{DrSetup, TestRedis};

/// `dr wal-stream` as the OS user in a process group of its own, logging
/// to `stream.log`.
fn spawn_streamer(pg: &TestPg) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pg.dir.path().join("stream.log"))
        .expect("log");
    Command::new("runuser")
        .args(dr_args(&pg.user, &pg.dr, &pg.cfg, &["wal-stream"]))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("spawn dr wal-stream")
}

/// Waits until the server sees the streamer as a synchronous standby.
fn wait_sync_streaming(pg: &TestPg) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pg.sql(
            "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication WHERE application_name = 'dr_main'",
        );
        if s == "sync" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dr_main is not streaming synchronously ({s:?}); log:\n{}",
            std::fs::read_to_string(pg.dir.path().join("stream.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills `dr wal-stream` (synchronous, so every acknowledged commit is in
/// the repository) under a pgbench workload. After each kill the
/// repository is consistent, the next streamer resumes from its slot, and
/// a restore of `latest` holds every mark committed before the kill.
#[test]
fn kill_wal_stream() {
    let Some(mut c) = Campaign::new("wal-stream", 3) else {
        return;
    };
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::streaming(
        &fs_repo(&fs),
        "synchronous = true\nstream_flush_interval = \"1s\"\n",
    );
    pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'dr_main'");
    pg.sql("SELECT pg_reload_conf()");
    let mut streamer = spawn_streamer(&pg);
    wait_sync_streaming(&pg);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.sql("CREATE TABLE chaos_marks (i int primary key, at timestamptz default now())");
    pg.dr(&["backup", "pg", "--full"]);
    let span = Duration::from_secs(4);
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let mut load = workload(&pg, 400);
            std::thread::sleep(d);
            // Synchronous: once this returns, the mark is in the repository.
            pg.sql(&format!("INSERT INTO chaos_marks (i) VALUES ({i})"));
            let killed = kill_group(&mut streamer);
            r.killed = Some(killed);
            eprintln!("wal-stream #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("wal-stream #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            streamer = spawn_streamer(&pg);
            wait_sync_streaming(&pg);
            let _ = load.wait();
            r.next_ok = true;
            if restore {
                let (port, dir, _) = restore_started(&mut pg, "latest", &format!("ws-{i}"));
                let got = pg.sql_at(port, "SELECT coalesce(max(i), -1) FROM chaos_marks");
                pg.stop(&dir);
                remove(&dir);
                r.restore = Some(got.parse::<i64>().unwrap_or(-1) >= i64::from(i));
                assert_eq!(
                    r.restore,
                    Some(true),
                    "{ctx}: restore of latest holds marks up to {got}, but mark {i} was acknowledged before the kill"
                );
            }
        });
    }
    kill_group(&mut streamer);
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills `dr backup redis` under a write load. A restore of the next
/// snapshot holds the mark written before the kill.
#[test]
fn kill_backup_redis() {
    let Some(mut c) = Campaign::new("backup-redis", 3) else {
        return;
    };
    let redis = TestRedis::start(&[]);
    redis.populate(100_000);
    let fs = tempfile::tempdir().expect("tempdir");
    let repo = fs.path().join("repo");
    let setup = DrSetup::new(
        &common::fs_region_toml("local", &repo),
        &format!("[redis.cache]\nurl = \"{}\"\n", redis.url()),
    );
    let t = Instant::now();
    setup.dr(&["backup", "redis"]);
    let span = t.elapsed();
    eprintln!("backup redis: an unkilled run takes {span:?}");
    let snapshots = |ctx: &str| -> usize {
        let o = setup.dr_raw(&["--json", "verify", "--list", "redis"]);
        verify_list(o, ctx);
        let v = setup.dr_json(&["list", "redis"]);
        v["snapshots"].as_array().map_or(0, |a| a.len())
    };
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = snapshots("before");
            let _: () = redis.cmd(&["SET", "chaos:mark", &i.to_string()]);
            // A live write load on other keys during the kill.
            let url = redis.url();
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            let writer = std::thread::spawn(move || {
                let mut conn = redis::Client::open(url)
                    .expect("url")
                    .get_connection()
                    .expect("conn");
                let mut n = 0u64;
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(format!("w:{}", n % 5000))
                        .arg(n)
                        .query(&mut conn);
                    n += 1;
                }
            });
            let mut child = setup
                .command(&["backup", "redis"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn");
            std::thread::sleep(d);
            let killed = kill_group(&mut child);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = writer.join();
            r.killed = Some(killed);
            eprintln!("backup redis #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("backup redis #{i} killed at {d:?}");
            let after = snapshots(&ctx);
            assert!(
                after >= before && after <= before + 1,
                "{ctx}: {before} -> {after} snapshots"
            );
            r.consistent = true;
            setup.dr(&["backup", "redis"]);
            assert_eq!(
                snapshots(&ctx),
                after + 1,
                "{ctx}: the next run added a snapshot"
            );
            r.next_ok = true;
            if restore {
                let target = setup.path(&format!("rr-{i}"));
                let port = free_port();
                let v = setup.dr_json(&[
                    "restore",
                    "redis",
                    "--to",
                    "latest",
                    "--target",
                    target.to_str().expect("utf8"),
                    "--start",
                    "--port",
                    &port.to_string(),
                ]);
                let pid = v["restore"]["pid"].as_u64();
                let got: redis::RedisResult<String> =
                    redis::Client::open(format!("redis://127.0.0.1:{port}"))
                        .and_then(|c| c.get_connection())
                        .and_then(|mut c| redis::cmd("GET").arg("chaos:mark").query(&mut c));
                if let Some(pid) = pid {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                remove(&target);
                assert_eq!(v["restore"]["keys_match"], true, "{ctx}: {v}");
                r.restore = Some(got.as_deref().ok() == Some(i.to_string().as_str()));
                assert_eq!(
                    r.restore,
                    Some(true),
                    "{ctx}: chaos:mark in the restore: {got:?}"
                );
            }
        });
    }
    expire_removes_orphans(&mut c, |a| setup.dr_raw(a), &setup.cfg.clone());
    c.finish();
}

/// Kills `dr repo sync` while it copies a region that lost everything:
/// the copies it made are whole (verify finds only missing objects, never
/// corrupt ones), a backup whose manifest reached the region has all its
/// data there, and the next sync completes the region.
#[test]
fn kill_repo_sync() {
    let Some(mut c) = Campaign::new("repo-sync", 3) else {
        return;
    };
    let fs = tempfile::tempdir().expect("tempdir");
    let user = common::require_env("DR_TEST_OS_USER", "PostgreSQL");
    let (a, b) = (fs.path().join("a"), fs.path().join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).expect("mkdir");
        chown(d, &user);
    }
    std::fs::set_permissions(
        fs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let regions = format!(
        "{}{}",
        common::fs_region_toml("a", &a),
        common::fs_region_toml("b", &b)
    );
    let mut pg = TestPg::new(&regions);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    pg.pgbench(&["-n", "-t", "200"]);
    pg.dr(&["backup", "pg"]);
    pg.archive_now();
    // Region b loses everything but its descriptor.
    let wipe = |b: &Path| {
        for e in std::fs::read_dir(b).expect("read b").flatten() {
            if e.file_name() != "dr-repo.json" {
                let p = e.path();
                if p.is_dir() {
                    remove(&p);
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    };
    wipe(&b);
    let span = timed(&pg, &["repo", "sync"]);
    eprintln!("repo sync: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            wipe(&b);
            let mut load = workload(&pg, 100);
            let killed = kill_after(&pg, &["repo", "sync"], d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("repo sync #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("repo sync #{i} killed at {d:?}");
            verify_list(
                pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "a"]),
                &ctx,
            );
            let v = json(&pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "b"]));
            let problems = v["verify"]["problems"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| panic!("{ctx}: no verify report: {v}"));
            let bad: Vec<_> = problems.iter().filter(|p| p["kind"] != "missing").collect();
            assert!(bad.is_empty(), "{ctx}: region b holds bad copies: {bad:?}");
            // A manifest in b means its backup directory is whole in b.
            for f in common::walk_files(&b) {
                if f.file_name().is_some_and(|n| n == "manifest")
                    && f.to_string_lossy().contains("/backups/")
                {
                    let dir_b = f.parent().expect("dir");
                    let dir_a = a.join(dir_b.strip_prefix(&b).expect("under b"));
                    for fa in common::walk_files(&dir_a) {
                        let fb = b.join(fa.strip_prefix(&a).expect("under a"));
                        let (la, lb) = (
                            std::fs::metadata(&fa).map(|m| m.len()).ok(),
                            std::fs::metadata(&fb).map(|m| m.len()).ok(),
                        );
                        assert_eq!(
                            la,
                            lb,
                            "{ctx}: {} has its manifest in b but {} is not whole there",
                            dir_b.display(),
                            fb.display()
                        );
                    }
                }
            }
            r.consistent = true;
            pg.dr(&["repo", "sync"]);
            verify_list(
                pg.dr_raw(&["--json", "verify", "--list", "pg", "--region", "b"]),
                &format!("{ctx}, after the next sync"),
            );
            r.next_ok = true;
            if restore {
                r.restore = Some(check_latest_restores(&mut pg, &format!("sync-{i}")));
            }
        });
    }
    c.check("final restore of latest from region b alone", || {
        let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
        // Make b the preferred region for reads: restore reads from b.
        let only_b = text.replace(&common::fs_region_toml("a", &a), "");
        let cfg_b = pg.dir.path().join("only-b.toml");
        std::fs::write(&cfg_b, only_b).expect("cfg");
        chown(&cfg_b, &user);
        pg.archive_now();
        pg.dr(&["repo", "sync"]);
        let dir = pg.target("sync-final");
        pg.dr_with(
            &cfg_b,
            &[
                "restore",
                "pg",
                "--to",
                "latest",
                "--target",
                dir.to_str().expect("utf8"),
            ],
        );
        remove(&dir);
        Some(true)
    });
    c.finish();
}

/// Kills `dr daemon` while it runs a scheduled backup (every 2 s); the
/// next daemon starts (the lock of the killed one does not hold it back)
/// and takes backups again.
#[test]
fn kill_daemon_mid_job() {
    let Some(mut c) = Campaign::new("daemon", 2) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    let state = pg.dir.path().join("daemon-state");
    std::fs::create_dir_all(&state).expect("state");
    chown(&state, &pg.user);
    let port = stable_port();
    let mut text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    text.push_str(&format!(
        "\n[postgres.main.schedule]\nbackup = \"*/2 * * * * *\"\n\n[daemon]\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{}\"\nprobe_seconds = 1\nretry_initial_seconds = 1\n",
        state.display()
    ));
    std::fs::write(&pg.cfg, text).expect("cfg");
    let span = Duration::from_secs(8);
    for i in 0..c.kills {
        let d = Duration::from_secs(1) + c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = backup_ids(&pg, "before");
            let m = mark(&pg);
            let mut load = workload(&pg, 300);
            let mut daemon = spawn_dr(&pg, &["daemon"]);
            std::thread::sleep(d);
            let killed = kill_group(&mut daemon);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("daemon #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("daemon #{i} killed at {d:?}");
            let after = check_repo(&pg, &ctx);
            assert!(
                before.iter().all(|b| after.contains(b)),
                "{ctx}: {before:?} -> {after:?}"
            );
            r.consistent = true;
            // The next daemon starts and takes a backup.
            let mut next = spawn_dr(&pg, &["daemon"]);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if backup_ids(&pg, &ctx).len() > after.len() {
                    break;
                }
                if let Some(st) = next.try_wait().expect("try_wait") {
                    panic!("{ctx}: the next daemon exited with {st}");
                }
                assert!(
                    Instant::now() < deadline,
                    "{ctx}: the next daemon took no backup within 60 s"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            // SIGTERM: the running job may finish, then it exits.
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", next.id())])
                .status();
            let st = next.wait().expect("wait");
            assert!(
                st.success(),
                "{ctx}: the next daemon exited with {st} on SIGTERM"
            );
            check_repo(&pg, &format!("{ctx}, after the next daemon"));
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("daemon-mark-{i}")));
            }
        });
    }
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills the S3 server (a Garage of the test's own) while `dr backup pg`
/// uploads in 5 MiB parts to it: the backup fails (or finished first) and
/// nothing claims success that is not there; once the server is back, the
/// repository verifies, the next backup succeeds and restores exactly.
#[test]
fn kill_s3_server_mid_multipart_upload() {
    let Some(mut c) = Campaign::new("s3-server", 2) else {
        return;
    };
    let mut garage = OwnGarage::start();
    let region = garage.region_toml("s3", "part_size_mib = 5\n");
    let mut pg = TestPg::new(&region);
    pg.pgbench(&["-i", "-s", "8", "-q"]);
    pg.dr(&["backup", "pg", "--full"]);
    let span = timed(&pg, &["backup", "pg", "--full"]);
    eprintln!("s3-server: an unkilled --full backup takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i) || i + 1 == c.kills;
        c.run(i, |r| {
            let before = check_repo(&pg, "before");
            let m = mark(&pg);
            let mut load = workload(&pg, 200);
            let mut child = Command::new("runuser")
                .args(dr_args(
                    &pg.user,
                    &pg.dr,
                    &pg.cfg,
                    &["backup", "pg", "--full"],
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .process_group(0)
                .spawn()
                .expect("spawn");
            std::thread::sleep(d);
            let running = child.try_wait().expect("try_wait").is_none();
            garage.kill();
            r.killed = Some(running);
            let out = child.wait_with_output().expect("wait");
            let _ = load.wait();
            eprintln!(
                "s3-server #{i}: delay {d:?}, killed mid-backup {running}, dr exit {}",
                out.status
            );
            std::thread::sleep(Duration::from_millis(500));
            garage.run();
            garage.wait_s3();
            let ctx = format!("s3-server #{i} killed at {d:?}");
            let after = check_repo(&pg, &ctx);
            if out.status.success() {
                assert_eq!(after.len(), before.len() + 1, "{ctx}: dr said success");
            } else {
                assert_eq!(
                    after,
                    before,
                    "{ctx}: dr failed ({}) but a backup appeared",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            r.consistent = true;
            pg.dr(&["backup", "pg"]);
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("s3-mark-{i}")));
            }
        });
    }
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}
