//! Kill-anywhere campaign, PostgreSQL commands (the rest is in
//! tests/kill_campaign_services.rs; the machinery in tests/common/chaos.rs): every command that writes to the repository (and
//! `restore`, the daemon mid-job and the S3 server mid-multipart-upload) is
//! killed with SIGKILL at a random instant, many times, against real servers
//! with a live workload. After every kill:
//!
//! - the repository is consistent: `dr verify --list` passes, so every
//!   listed backup has all its objects with the right sizes (a killed
//!   backup leaves at most an orphan, which is not listed);
//! - the next run of the same command succeeds;
//! - a restore to the last mark recorded before the kill is exact (every
//!   `DR_CHAOS_RESTORE_EVERY` kills, and at the end of each command's runs);
//! - `expire` (with a short `orphan_age`) removes whatever the kills left.
//!
//! The suite runs a few kills per command. `scripts/chaos.sh` runs the same
//! tests with `DR_CHAOS_KILLS` (kills per command), `DR_CHAOS_COMMANDS`
//! (which commands), `DR_CHAOS_RESTORE_EVERY` and `DR_CHAOS_JSON` (a file
//! that gets one JSON line of results per command). An inconsistent run is
//! recorded and the campaign goes on; the test fails at the end of the
//! command's runs, listing every failure.
//!
//! The delays come from one seed per command, printed at the start; set
//! `DR_KILL_SEED` to replay a run.

mod common;

use common::chaos::*;
use common::pg::{TestPg, mark};

/// Kills backups (`extra` = [] or ["--full"]): each run records a mark,
/// kills a backup under a pgbench workload, checks the repository, runs the
/// backup again and (now and then) restores to the mark.
fn backup_runs(c: &mut Campaign, pg: &mut TestPg, extra: &[&str], n: u32, label: &str) {
    let mut args = vec!["backup", "pg"];
    args.extend_from_slice(extra);
    let span = timed(pg, &args);
    eprintln!("{label}: an unkilled run takes {span:?}");
    for i in 0..n {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            let before = check_repo(pg, label);
            let m = mark(pg);
            let mut load = workload(pg, 150);
            let killed = kill_after(pg, &args, d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("{label} #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("{label} #{i} after kill at {d:?}");
            let after = check_repo(pg, &ctx);
            assert!(
                before.iter().all(|b| after.contains(b)),
                "{ctx}: a killed backup removed an earlier backup: {before:?} -> {after:?}"
            );
            assert!(
                after.len() <= before.len() + 1,
                "{ctx}: more than one new backup: {before:?} -> {after:?}"
            );
            r.consistent = true;
            pg.dr(&args);
            let again = check_repo(pg, &format!("{ctx}, after the next run"));
            assert_eq!(
                again.len(),
                after.len() + 1,
                "{ctx}: the next run added one backup"
            );
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(pg, &m, &format!("{label}-mark-{i}")));
            }
        });
    }
}

fn backup_campaign(command: &'static str, remote: bool, kills: u32) {
    let Some(mut c) = Campaign::new(command, kills) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(remote);
    let n = c.kills;
    if remote {
        backup_runs(&mut c, &mut pg, &[], n, command);
    } else {
        // Incremental and --full backups read and write differently: half
        // each, in turns of up to 10, so a time budget still covers both.
        let mut left = n;
        while left > 0 && !c.out_of_time() {
            let inc = left.div_ceil(2).min(10);
            backup_runs(&mut c, &mut pg, &[], inc, command);
            let full = (left - inc).min(10);
            backup_runs(&mut c, &mut pg, &["--full"], full, "backup pg --full");
            left -= inc + full;
        }
    }
    pg.pgbench(&["-n", "-t", "200"]);
    let m = mark(&pg);
    c.check("final restore to a mark", || {
        Some(restore_to_mark(&mut pg, &m, "final-mark"))
    });
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.check("consistent after expire", || {
        check_repo(&pg, "after expire");
        None
    });
    c.finish();
}

#[test]
fn kill_backup_pg_local() {
    backup_campaign("backup-pg", false, 4);
}

#[test]
fn kill_backup_pg_remote() {
    backup_campaign("backup-pg-remote", true, 2);
}

/// `dr wal-fetch seg` compared with the segment in pg_wal: Some(true) for
/// the exact bytes, None for "not archived"; anything else fails.
fn fetched(pg: &TestPg, seg: &str, orig: &[u8], ctx: &str) -> Option<bool> {
    let dest = pg.dir.path().join("fetched");
    let _ = std::fs::remove_file(&dest);
    let o = pg.dr_raw(&["wal-fetch", seg, dest.to_str().expect("utf8")]);
    match o.status.code() {
        Some(0) => {
            let got = std::fs::read(&dest).expect("fetched segment");
            assert!(
                got == orig,
                "{ctx}: wal-fetch of {seg} returned other bytes than pushed"
            );
            Some(true)
        }
        Some(1) => None,
        c => panic!(
            "{ctx}: wal-fetch {seg} exited {c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// Kills `wal-push` of completed segments the archiver holds back; the
/// segment is then either absent or exact, the next push succeeds and the
/// archived copy is exact.
#[test]
fn kill_wal_push() {
    let Some(mut c) = Campaign::new("wal-push", 4) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    // The archiver fails until the end of the runs, so the segments stay
    // in pg_wal for our own wal-push runs.
    pg.sql("ALTER SYSTEM SET archive_command = '/bin/false'");
    pg.sql("SELECT pg_reload_conf()");
    let segment = |pg: &TestPg| {
        pg.pgbench(&["-n", "-t", "100"]);
        let seg = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
        let path = pg.data.join("pg_wal").join(&seg);
        (seg, path)
    };
    let (seg, path) = segment(&pg);
    let span = timed(&pg, &["wal-push", path.to_str().expect("utf8")]);
    eprintln!("wal-push: an unkilled run of {seg} takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        c.run(i, |r| {
            let (seg, path) = segment(&pg);
            let orig = std::fs::read(&path).expect("segment in pg_wal");
            let killed = kill_after(&pg, &["wal-push", path.to_str().expect("utf8")], d);
            r.killed = Some(killed);
            let ctx = format!("wal-push #{i} of {seg} killed at {d:?}");
            let state = fetched(&pg, &seg, &orig, &ctx);
            eprintln!(
                "wal-push #{i}: delay {d:?}, killed {killed}, left {}",
                if state.is_some() {
                    "the whole segment"
                } else {
                    "nothing"
                }
            );
            check_repo(&pg, &ctx);
            r.consistent = true;
            let o = pg.dr_raw(&["wal-push", path.to_str().expect("utf8")]);
            assert!(
                o.status.success(),
                "{ctx}: the next wal-push failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            r.next_ok = true;
            r.restore = Some(fetched(&pg, &seg, &orig, &ctx) == Some(true));
            assert_eq!(r.restore, Some(true), "{ctx}: archived after the next run");
        });
    }
    pg.sql("ALTER SYSTEM RESET archive_command");
    pg.sql("SELECT pg_reload_conf()");
    // The archiver now pushes the same segments again: identical copies
    // must be accepted, or archiving would be stuck.
    c.check("archiver catches up over the pushed segments", || {
        pg.archive_now();
        None
    });
    c.check("final restore of latest", || {
        pg.dr(&["backup", "pg"]);
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills `expire` with something to delete each time; the next run
/// finishes the job and every kept backup stays complete.
#[test]
fn kill_expire() {
    let Some(mut c) = Campaign::new("expire", 3) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    let mut text = std::fs::read_to_string(&pg.cfg).expect("cfg");
    text.push_str("\n[postgres.main.retention]\nkeep_full = 1\n");
    std::fs::write(&pg.cfg, text).expect("cfg");
    pg.pgbench(&["-n", "-t", "100"]);
    pg.dr(&["backup", "pg", "--full"]);
    let span = timed(&pg, &["expire"]);
    eprintln!("expire: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        let d = c.delay(span);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            pg.pgbench(&["-n", "-t", "100"]);
            pg.archive_now();
            pg.dr(&["backup", "pg", "--full"]);
            pg.dr(&["backup", "pg"]);
            let m = mark(&pg);
            let before = check_repo(&pg, "expire");
            let mut load = workload(&pg, 100);
            let killed = kill_after(&pg, &["expire"], d);
            let _ = load.wait();
            r.killed = Some(killed);
            eprintln!("expire #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("expire #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            pg.dr(&["expire"]);
            let after = check_repo(&pg, &format!("{ctx}, after the next run"));
            assert!(
                after.len() < before.len() && after.iter().all(|b| before.contains(b)),
                "{ctx}: the next run expired: {before:?} -> {after:?}"
            );
            r.next_ok = true;
            if restore {
                r.restore = Some(restore_to_mark(&mut pg, &m, &format!("expire-mark-{i}")));
            }
        });
    }
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    let cfg = pg.cfg.clone();
    expire_removes_orphans(&mut c, |a| pg.dr_raw(a), &cfg);
    c.finish();
}

/// Kills restores into fresh directories; the next run into another fresh
/// directory succeeds, and the killed one's directory is refused or
/// reusable, never mistaken for a finished restore.
#[test]
fn kill_restore_pg() {
    let Some(mut c) = Campaign::new("restore-pg", 3) else {
        return;
    };
    let (_fs, mut pg) = pg_setup(false);
    pg.pgbench(&["-n", "-t", "200"]);
    pg.archive_now();
    let first = pg.target("rk-measure");
    let span = timed(
        &pg,
        &[
            "restore",
            "pg",
            "--to",
            "latest",
            "--target",
            first.to_str().expect("utf8"),
        ],
    );
    remove(&first);
    eprintln!("restore: an unkilled run takes {span:?}");
    for i in 0..c.kills {
        // Later restores read a warm cache and have finished in under half
        // the measured run: kills land in its first half.
        let d = c.delay(span / 2);
        let restore = c.restore_now(i);
        c.run(i, |r| {
            let dir = pg.target(&format!("rk-{i}"));
            let killed = kill_after(
                &pg,
                &[
                    "restore",
                    "pg",
                    "--to",
                    "latest",
                    "--target",
                    dir.to_str().expect("utf8"),
                ],
                d,
            );
            r.killed = Some(killed);
            eprintln!("restore #{i}: delay {d:?}, killed {killed}");
            let ctx = format!("restore #{i} killed at {d:?}");
            check_repo(&pg, &ctx);
            r.consistent = true;
            let again = pg.target(&format!("rk-{i}-again"));
            let o = pg.restore_raw("latest", &again, &[]);
            assert!(
                o.status.success(),
                "{ctx}: the next restore failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            r.next_ok = true;
            remove(&dir);
            remove(&again);
            if restore {
                r.restore = Some(check_latest_restores(&mut pg, &format!("rk-check-{i}")));
            }
        });
    }
    c.check("final restore of latest", || {
        Some(check_latest_restores(&mut pg, "final-latest"))
    });
    c.finish();
}
