//! WAL streaming (`dr wal-stream`) against a real PostgreSQL 15: zero loss
//! as a synchronous standby, bounded loss asynchronously, no gap across a
//! killed streamer, and timeline switches.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pg::{TestPg, fs_repo, mark, restore_and_check, restore_started};

/// `dr wal-stream` running as the OS user, started directly (not through
/// runuser) so the test can signal the dr process itself.
struct Streamer {
    child: Child,
}

fn os_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let o = Command::new("id").args([flag, user]).output().expect("id");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

impl Streamer {
    fn start(pg: &TestPg, cfg: &Path) -> Streamer {
        let (uid, gid) = os_ids(&pg.user);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pg.dir.path().join("stream.log"))
            .expect("log");
        let child = Command::new(&pg.dr)
            .args(["--config", cfg.to_str().expect("utf8"), "wal-stream"])
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn dr wal-stream");
        Streamer { child }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    /// SIGTERM and wait: the streamer drains what it queued and exits 0.
    fn stop(mut self) {
        self.signal("-TERM");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "dr wal-stream exited with {status}");
    }

    fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn stream_log(pg: &TestPg) -> String {
    std::fs::read_to_string(pg.dir.path().join("stream.log")).unwrap_or_default()
}

/// Waits until the server sees the streamer, in `state` ('async'/'sync').
fn wait_replication(pg: &TestPg, sync_state: &str) {
    wait_replication_at(pg, pg.port, sync_state)
}

/// [`wait_replication`] on the server at `port`.
fn wait_replication_at(pg: &TestPg, port: u16, sync_state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pg.sql_at(
            port,
            "SELECT coalesce(string_agg(sync_state, ','), '') FROM pg_stat_replication WHERE application_name = 'dr_main'",
        );
        if s == sync_state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dr_main is not streaming as {sync_state} (pg_stat_replication: {s:?}); log:\n{}",
            stream_log(pg)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGKILLs the postmaster and every process it started, then deletes PGDATA.
/// Returns when the first SIGKILL was sent.
fn destroy_primary(pg: &TestPg) -> Instant {
    let pid_file = std::fs::read_to_string(pg.data.join("postmaster.pid")).expect("postmaster.pid");
    let pm: u32 = pid_file
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid");
    let mut pids = vec![pm];
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        let ppid: Option<u32> = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pm)
            && let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>()
        {
            pids.push(pid);
        }
    }
    let killed = Instant::now();
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(|p| p.to_string()))
        .status();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::remove_dir_all(&pg.data).expect("delete PGDATA");
    killed
}

/// Commits single-row transactions from `clients` connections until the
/// server dies, recording each acknowledged id with the time of its ack.
/// Kills the primary once `n` are acknowledged; returns the acks and the
/// moment of the kill.
async fn commit_until_killed(
    pg: &TestPg,
    clients: usize,
    n: usize,
) -> (Vec<(i64, Instant)>, Instant) {
    let acked: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let port = pg.port;
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
            let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            let mut i = c as i64;
            loop {
                match client
                    .execute("INSERT INTO acked (id) VALUES ($1)", &[&i])
                    .await
                {
                    Ok(_) => acked.lock().expect("lock").push((i, Instant::now())),
                    Err(_) => return,
                }
                i += clients as i64;
            }
        }));
    }
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acked.lock().expect("lock").len() >= n {
            break;
        }
    }
    let killed = destroy_primary(pg);
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().expect("lock").clone();
    (acked, killed)
}

/// Streamed pieces of segments that are also stored whole (the streamer
/// deletes those once the segment is stored).
fn superseded_pieces(repo: &Path) -> Vec<String> {
    let names: Vec<String> = common::walk_files(repo)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/wal/"))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    let whole: std::collections::HashSet<&str> = names
        .iter()
        .filter(|n| n.len() == 24 + 1 + 64)
        .map(|n| &n[..24])
        .collect();
    names
        .iter()
        .filter(|n| streamed(n) && whole.contains(&n[..24]))
        .cloned()
        .collect()
}

/// Whether a WAL object name is a streamed piece or a segment journal.
fn streamed(name: &str) -> bool {
    name.contains(".stream.") || name.contains(".journal.")
}

/// Streamed WAL object names under `repo`: (pieces, journals).
fn streamed_objects(repo: &Path) -> (usize, usize) {
    let names: Vec<String> = common::walk_files(repo)
        .into_iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    (
        names.iter().filter(|n| n.contains(".stream.")).count(),
        names.iter().filter(|n| n.contains(".journal.")).count(),
    )
}

/// Where the kill-the-primary workload streams to.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Target {
    /// One filesystem region: synchronous flushes go to segment journals.
    Fs,
    /// A filesystem and a Garage region, `min_regions = 2`: pieces.
    FsAndS3,
}

/// Runs the kill-the-primary workload and returns (acked, lost ids with their
/// age at the kill).
async fn loss_after_primary_loss(synchronous: bool, target: Target) -> (usize, Vec<Duration>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut regions = fs_repo(&tmp);
    if target == Target::FsAndS3 {
        regions.push_str(&common::s3_region_toml(
            "garage",
            &common::require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)"),
            &common::require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
            &common::unique("stream"),
            &common::require_env("DR_TEST_S3_REGION", "Garage (S3)"),
            "DR_TEST_S3_ACCESS_KEY_ID",
            "DR_TEST_S3_SECRET_ACCESS_KEY",
            "",
        ));
    }
    let extra = format!("synchronous = {synchronous}\nstream_flush_interval = \"1s\"\n");
    let mut pg = TestPg::streaming(&regions, &extra);
    if target == Target::FsAndS3 {
        let text = std::fs::read_to_string(&pg.cfg).expect("cfg");
        let text = text.replacen("[repository]\n", "[repository]\nmin_regions = 2\n", 1);
        assert!(
            text.contains("min_regions = 2"),
            "no [repository] in {text}"
        );
        std::fs::write(&pg.cfg, text).expect("write cfg");
    }
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    if synchronous {
        pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'dr_main'");
        pg.sql("SELECT pg_reload_conf()");
        wait_replication(&pg, "sync");
    }
    pg.sql("CREATE TABLE acked (id bigint PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())");
    pg.dr(&["backup", "pg"]);
    let (acked, killed) = commit_until_killed(&pg, 8, 10_000).await;
    streamer.stop();
    let left = superseded_pieces(&tmp.path().join("repo"));
    assert!(
        left.is_empty(),
        "pieces of stored segments remain: {left:?}"
    );
    // The unfinished last segment is in a journal exactly when every
    // region can append and the stream is synchronous; pieces otherwise.
    let (pieces, journals) = streamed_objects(&tmp.path().join("repo"));
    if synchronous && target == Target::Fs {
        assert!(
            journals > 0 && pieces == 0,
            "{pieces} pieces, {journals} journals"
        );
    } else {
        assert!(
            pieces > 0 && journals == 0,
            "{pieces} pieces, {journals} journals"
        );
    }
    let (port, _, report) = restore_started(&mut pg, "latest", "restored");
    eprintln!("restore: {report}");
    let ids = pg.sql_at(port, "SELECT string_agg(id::text, ',') FROM acked");
    let restored: std::collections::HashSet<i64> =
        ids.split(',').filter_map(|s| s.parse().ok()).collect();
    let lost: Vec<Duration> = acked
        .iter()
        .filter(|(id, _)| !restored.contains(id))
        .map(|(_, at)| killed.saturating_duration_since(*at))
        .collect();
    eprintln!(
        "synchronous={synchronous}: {} commits acknowledged, {} restored, {} acknowledged commits lost{}",
        acked.len(),
        restored.len(),
        lost.len(),
        lost.iter()
            .max()
            .map(|d| format!(
                " (the oldest acknowledged {:.3} s before the kill)",
                d.as_secs_f64()
            ))
            .unwrap_or_default()
    );
    (acked.len(), lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_streaming_loses_no_acknowledged_commit() {
    synchronous_loses_nothing(Target::Fs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_streaming_to_two_regions_loses_no_acknowledged_commit() {
    synchronous_loses_nothing(Target::FsAndS3).await;
}

async fn synchronous_loses_nothing(target: Target) {
    let (acked, lost) = loss_after_primary_loss(true, target).await;
    assert!(acked >= 10_000);
    assert!(
        lost.is_empty(),
        "{} acknowledged commits are missing after restore",
        lost.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_streaming_loses_at_most_the_flush_interval() {
    let (acked, lost) = loss_after_primary_loss(false, Target::Fs).await;
    assert!(acked >= 10_000);
    // stream_flush_interval = 1 s, plus the time one upload takes.
    if let Some(oldest) = lost.iter().max() {
        assert!(
            *oldest < Duration::from_millis(2500),
            "a commit acknowledged {oldest:?} before the primary died was lost"
        );
    }
}

/// Waits until the streamer reports as flushed everything written so far.
fn wait_durable(pg: &TestPg) {
    wait_durable_at(pg, pg.port)
}

/// [`wait_durable`] on the server at `port` (a primary or a standby).
fn wait_durable_at(pg: &TestPg, port: u16) {
    let lsn = pg.sql_at(
        port,
        "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = pg.sql_at(port, &format!(
            "SELECT coalesce(bool_or(flush_lsn >= '{lsn}'), false) FROM pg_stat_replication WHERE application_name = 'dr_main'"
        ));
        if ok == "t" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "streamer did not reach {lsn}; log:\n{}",
            stream_log(pg)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `wal stream main` entry of `dr check --json`.
fn stream_check(pg: &TestPg) -> serde_json::Value {
    pg.check_item(&pg.cfg, "wal stream main").1
}

#[test]
fn killed_streamer_resumes_from_its_slot_without_a_gap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let mut pg = TestPg::streaming(&regions, "stream_flush_interval = \"200ms\"\n");
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    pg.dr(&["backup", "pg"]);
    pg.sql("CREATE TABLE g (id bigint, pad text)");
    let write = |rows: u32| {
        pg.sql(&format!(
            "INSERT INTO g SELECT i, repeat('x', 100) FROM generate_series(1, {rows}) i"
        ));
    };
    // About 40 MB of WAL per round: several segments each.
    write(200_000);
    streamer.kill();
    // dr check names the missing streamer (WAL piles up on the server).
    let check = stream_check(&pg);
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .is_some_and(|d| d.contains("no streamer is connected to slot dr_main")),
        "{check}"
    );
    // Written while nothing streams: the slot must keep it.
    write(200_000);
    pg.sql("CHECKPOINT");
    write(200_000);
    let streamer = Streamer::start(&pg, &pg.cfg);
    write(200_000);
    pg.sql("SELECT pg_switch_wal()");
    wait_durable(&pg);
    let rows = pg.sql("SELECT count(*) FROM g");
    let check = stream_check(&pg);
    assert_eq!(check["status"], "ok", "{check}");
    // dr list shows the durable position and the lag behind the server.
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("list json");
    let s = &v["stream"]["status"];
    assert!(s["durable_lsn"].is_string(), "{v}");
    assert!(s["lag_bytes"].as_u64().is_some(), "{v}");
    streamer.stop();

    let o = pg.dr_raw(&["--json", "verify", "pg", "--list"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "verify json ({e}): {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    assert!(o.status.success(), "verify --list: {v}");
    assert_eq!(v["verify"]["wal_gaps"], serde_json::json!([]), "{v}");
    // And the archive replays to the end.
    let (port, _, _) = restore_started(&mut pg, "latest", "after-kill");
    assert_eq!(pg.sql_at(port, "SELECT count(*) FROM g"), rows);
}

/// Remote mode with streamed WAL (archive_mode off): the backup waits for
/// its stop segment from the streamer, and restores exactly.
#[test]
fn remote_backup_with_streamed_wal_restores_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let mut pg = TestPg::streaming(
        &regions,
        "mode = \"remote\"\nstream_flush_interval = \"200ms\"\n",
    );
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let o = pg.dr(&["--json", "backup", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("backup json");
    assert_eq!(v["backup"]["mode"], "remote", "{v}");
    pg.pgbench(&["-t", "200", "-n"]);
    let m = mark(&pg);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.sql("SELECT pg_switch_wal()");
    wait_durable(&pg);
    streamer.stop();
    restore_and_check(&mut pg, &m.at, "streamed", &m.balance, &m.history);
}

#[test]
fn verify_list_names_a_hole_in_the_archive() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let pg = TestPg::streaming(&regions, "");
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    for _ in 0..3 {
        pg.sql("CREATE TABLE IF NOT EXISTS h (id int); INSERT INTO h VALUES (1)");
        pg.sql("SELECT pg_switch_wal()");
    }
    wait_durable(&pg);
    streamer.stop();
    // Delete one complete segment (and any pieces of it) in the only region.
    let wal: Vec<_> = common::walk_files(&tmp.path().join("repo"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("/wal/00000001/"))
        .collect();
    let mut names: Vec<String> = wal
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.get(..24).map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 3, "segments: {names:?}");
    let victim = names[1].clone();
    for p in wal.iter().filter(|p| p.to_string_lossy().contains(&victim)) {
        std::fs::remove_file(p).expect("rm");
    }
    let o = pg.dr_raw(&["verify", "pg", "--list"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        !o.status.success(),
        "a hole ({victim} of {wal:?}) must fail verify: {text}"
    );
    assert!(
        text.contains("WAL GAP") && text.contains(&victim),
        "names the hole {victim}: {text}"
    );
}

#[test]
fn a_promoted_standby_is_followed_onto_its_new_timeline() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let mut pg = TestPg::streaming(&regions, "stream_flush_interval = \"200ms\"\n");
    let (standby, sport) = pg.start_standby("standby");
    // dr streams from the standby (a cascading walsender there).
    let scfg = pg.config_for(&standby, sport, "standby.toml");
    let streamer = Streamer::start(&pg, &scfg);
    wait_replication_at(&pg, sport, "async");
    // Backed up on the primary; its stop segment reaches the repository
    // through the standby.
    pg.dr(&["backup", "pg"]);
    pg.sql("CREATE TABLE tl (id int, tli int)");
    pg.sql("INSERT INTO tl SELECT i, 1 FROM generate_series(1, 1000) i");
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::pg::psql(&pg.bin, sport, "SELECT count(*) FROM tl").as_deref() != Ok("1000") {
        assert!(Instant::now() < deadline, "the standby did not replay");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_durable_at(&pg, sport);

    // Failover: the primary goes away and the standby is promoted while
    // dr streams from it.
    pg.stop(&pg.data);
    pg.pg_ctl(&standby, &["-w", "promote"]);
    assert_eq!(pg.sql_at(sport, "SELECT pg_is_in_recovery()"), "f");
    pg.sql_at(
        sport,
        "INSERT INTO tl SELECT i, 2 FROM generate_series(1001, 1500) i",
    );
    wait_replication_at(&pg, sport, "async");
    wait_durable_at(&pg, sport);
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("list json");
    assert_eq!(
        v["stream"]["status"]["timeline"],
        2,
        "{v}\n{}",
        stream_log(&pg)
    );
    streamer.stop();

    // The archive holds the new timeline's history and WAL, without a hole.
    let history: Vec<_> = common::walk_files(&tmp.path().join("repo"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("00000002.history"))
        .collect();
    assert_eq!(history.len(), 1, "no 00000002.history stored");
    let o = pg.dr_raw(&["--json", "verify", "pg", "--list"]);
    assert!(
        o.status.success(),
        "verify --list: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // A restore to the latest point follows the switch to timeline 2.
    let (port, _, report) = restore_started(&mut pg, "latest", "restored");
    assert_eq!(
        pg.sql_at(port, "SELECT count(*), sum(tli) FROM tl"),
        "1500|2000",
        "{report}"
    );
}

#[test]
fn the_window_end_in_streamed_pieces_restores_exactly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let mut pg = TestPg::streaming(&regions, "stream_flush_interval = \"200ms\"\n");
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    // Writes that stay in the unfinished segment: only pieces hold them.
    pg.pgbench(&["-t", "200", "-n"]);
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    wait_durable(&pg);
    std::thread::sleep(Duration::from_secs(1));
    streamer.stop();
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("list json");
    let w = v["windows"]
        .as_array()
        .and_then(|w| w.last())
        .cloned()
        .unwrap_or_else(|| panic!("no window: {v}"));
    assert_eq!(w["streamed_tail"], true, "{w}");
    assert_eq!(w["end_basis"], "last commit in the archived WAL", "{w}");
    let end = w["to"].as_str().expect("to").to_string();
    restore_and_check(&mut pg, &end, "tail-end", &balance, &history);
}

/// A journal damaged before its last record is never read shorter: the
/// restore to the latest point fails and names it.
#[test]
fn a_damaged_journal_fails_the_restore_instead_of_shortening_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let regions = fs_repo(&tmp);
    let mut pg = TestPg::streaming(&regions, "synchronous = true\n");
    let streamer = Streamer::start(&pg, &pg.cfg);
    wait_replication(&pg, "async");
    pg.sql("ALTER SYSTEM SET synchronous_standby_names = 'dr_main'");
    pg.sql("SELECT pg_reload_conf()");
    wait_replication(&pg, "sync");
    pg.sql("CREATE TABLE t (id int)");
    pg.dr(&["backup", "pg"]);
    // One commit, one journal record each.
    for i in 0..20 {
        pg.sql(&format!("INSERT INTO t VALUES ({i})"));
    }
    let after = pg.sql(
        "SELECT to_char((clock_timestamp() + interval '1 second') AT TIME ZONE 'utc', \
         'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
    );
    streamer.stop();
    let journal = common::walk_files(&tmp.path().join("repo"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".journal."))
        .max_by_key(|p| p.to_string_lossy().to_string())
        .expect("no journal stored");
    let mut bytes = std::fs::read(&journal).expect("read journal");
    let header = u32::from_le_bytes(bytes[11..15].try_into().expect("4 bytes")) as usize;
    // The first record's first sealed byte.
    let at = 15 + header + 8;
    bytes[at] ^= 0x40;
    std::fs::write(&journal, &bytes).expect("write journal");

    let target = pg.target("restored");
    pg.track(target.clone());
    let o = pg.restore_raw("latest", &target, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "restore succeeded on a damaged journal: {err}"
    );
    let name = journal.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        err.contains("would stop short") && err.contains(name) && err.contains("corrupt"),
        "{err}"
    );
    // A time past the readable WAL is refused for the same reason.
    let o = pg.restore_raw(&after, &target, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "restore to {after} succeeded: {err}");
    assert!(
        err.contains("cannot be read") && err.contains(name),
        "{err}"
    );
    // The listing says so too.
    let v: serde_json::Value =
        serde_json::from_slice(&pg.dr(&["--json", "list", "pg"]).stdout).expect("list json");
    let damaged = v["damaged_tails"].to_string();
    assert!(damaged.contains(name), "{v}");
}
