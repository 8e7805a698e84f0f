//! Restore planning on S3 costs the same few requests however long the WAL
//! and backup history, and plans exactly what the whole catalog would.
//! Against the Garage test server, with histories written by
//! `common::catalog_fixture`; every count is read from the S3 client.

mod common;

use chrono::{DateTime, Utc};
use common::catalog_fixture::{History, write};
use dr::postgres::catalog::{Catalog, Listed};
use dr::postgres::timeline::TimelineChoice;
use dr::repo::Repository;

/// The bound the design sets for planning a restore, whatever the history.
const MAX_PLAN_REQUESTS: u64 = 10;

struct Setup {
    _dir: tempfile::TempDir,
    repo: Repository,
    cfg: dr::config::Config,
}

async fn setup() -> Setup {
    setup_with("").await
}

/// A repository on Garage; `extra` is appended to its config.
async fn setup_with(extra: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = dir.path().join("identity.txt");
    let o = std::process::Command::new(common::dr_bin())
        .args(["keygen", "--json", "--output", id.to_str().expect("utf8")])
        .output()
        .expect("run dr keygen");
    assert!(
        o.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("keygen JSON");
    let rcpt = v["recipient"].as_str().expect("recipient");
    let path = dir.path().join("dr.toml");
    let text = format!(
        "[repository]\nrecipients = [\"{rcpt}\"]\nidentity_file = \"{}\"\n\n{}\n{extra}",
        id.display(),
        common::garage_region_toml("garage")
    );
    std::fs::write(&path, &text).expect("config");
    let cfg = dr::config::Config::parse(&text, &path).expect("config parses");
    Repository::init(&cfg).await.expect("repo init on Garage");
    let repo = Repository::open(&cfg).await.expect("repo open");
    Setup {
        _dir: dir,
        repo,
        cfg,
    }
}

/// Requests `f` sent to S3.
async fn counted<T>(f: impl std::future::Future<Output = T>) -> (u64, T) {
    let before = dr::store::s3_requests();
    let out = f.await;
    (dr::store::s3_requests() - before, out)
}

/// Plans `target` both ways and checks they agree; returns the requests
/// the scoped plan cost and its backup id.
async fn plan_both(repo: &Repository, target: Option<DateTime<Utc>>) -> (u64, String) {
    let (n, id, _) = plan_both_on(repo, target).await;
    (n, id)
}

/// As [`plan_both`], with the timeline followed.
async fn plan_both_on(repo: &Repository, target: Option<DateTime<Utc>>) -> (u64, String, u32) {
    let (n, scoped) = counted(Catalog::plan_restore(
        repo,
        "main",
        target,
        false,
        TimelineChoice::Auto,
    ))
    .await;
    let scoped = scoped.expect("scoped plan");
    let (whole_cost, whole) = counted(Catalog::load(repo, "main")).await;
    let whole = whole.expect("whole catalog");
    let p = whole
        .plan(target, false, TimelineChoice::Auto)
        .expect("whole-catalog plan");
    assert_eq!(scoped.backup.id, p.backup.id, "same backup for {target:?}");
    assert_eq!(scoped.timeline, p.timeline);
    assert_eq!(scoped.stop_after_lsn, p.stop_after_lsn, "{target:?}");
    assert_eq!(scoped.stop_at_backup_end, p.stop_at_backup_end);
    assert!(scoped.scoped, "planned from part of the history");
    assert!(
        scoped.backup.backup_label.starts_with("START WAL"),
        "the plan carries the backup's own manifest, not its summary"
    );
    // The bound means something: the whole catalog costs more.
    assert!(
        whole_cost > MAX_PLAN_REQUESTS,
        "the whole catalog cost only {whole_cost} requests: the history is too short to test the bound"
    );
    (n, scoped.backup.id, scoped.timeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_planning_requests_do_not_grow_with_history() {
    let mut costs = Vec::new();
    for (segments, backups) in [(1_200, 12), (12_000, 120)] {
        let s = setup().await;
        let h = History::new("main", segments, backups);
        write(&s.repo, &h, 64).await;
        let (latest, id) = plan_both(&s.repo, None).await;
        assert_eq!(id, common::catalog_fixture::manifest(&h, backups - 1).id);
        // A time in the middle of the history, between two backups.
        let k = backups / 2;
        let t = h.time_of(h.backup_start(k) + 7);
        let (past, id) = plan_both(&s.repo, Some(t)).await;
        assert_eq!(id, common::catalog_fixture::manifest(&h, k).id);
        costs.push((segments, latest, past));
    }
    eprintln!("S3 requests to plan (segments, latest, past time): {costs:?}");
    for (segments, latest, past) in &costs {
        assert!(
            *latest <= MAX_PLAN_REQUESTS && *past <= MAX_PLAN_REQUESTS,
            "{segments} segments: planning `latest` cost {latest} requests, a past time {past} \
             (bound {MAX_PLAN_REQUESTS}); all: {costs:?}"
        );
    }
    assert!(
        costs[1].1 <= costs[0].1 + 1 && costs[1].2 <= costs[0].2 + 1,
        "ten times the history cost more requests to plan: {costs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_without_a_summary_are_planned_from_their_manifests() {
    let s = setup().await;
    let mut h = History::new("main", 1_200, 12);
    // The newest as if cut short between manifest and summary; two as if
    // taken before summaries existed.
    h.without_summary = vec![0, 5, 11];
    write(&s.repo, &h, 64).await;
    let (_, id) = plan_both(&s.repo, None).await;
    assert_eq!(id, common::catalog_fixture::manifest(&h, 11).id);
    let t = h.time_of(h.backup_start(5) + 3);
    let (_, id) = plan_both(&s.repo, Some(t)).await;
    assert_eq!(id, common::catalog_fixture::manifest(&h, 5).id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_still_blocks_the_restores_that_cross_it() {
    let s = setup().await;
    let h = History::new("main", 1_200, 12);
    write(&s.repo, &h, 64).await;
    // Take out a segment after the newest backup, and one inside an old,
    // complete prefix after backup 3.
    let (_, objects) = s.repo.regions.list("pg/main/").await.expect("list");
    let gone = |n: u64| {
        let name = format!("{:08X}{:08X}{:08X}", 1, n / 256, n % 256);
        objects
            .iter()
            .find(|o| o.key.contains(&format!("/{name}-")))
            .map(|o| o.key.clone())
            .expect("segment listed")
    };
    let newest = h.backup_start(11);
    let old = h.backup_start(3) + 40;
    for n in [newest + 30, old] {
        s.repo
            .regions
            .iter()
            .next()
            .expect("region")
            .store
            .delete(&gone(n))
            .await
            .expect("delete");
    }
    let err = Catalog::plan_restore(&s.repo, "main", None, false, TimelineChoice::Auto)
        .await
        .expect_err("latest across a gap is refused");
    assert!(err.to_string().contains("would stop short"), "{err}");
    // A time after the old gap, before backup 4 ended: unreachable.
    let t = h.time_of(old + 5);
    let err = Catalog::plan_restore(&s.repo, "main", Some(t), false, TimelineChoice::Auto)
        .await
        .expect_err("a target beyond the old gap is refused");
    assert!(err.to_string().contains("recoverable window"), "{err}");
    // Before the old gap: reachable from backup 3.
    let t = h.time_of(old - 25);
    let (_, id) = plan_both(&s.repo, Some(t)).await;
    assert_eq!(id, common::catalog_fixture::manifest(&h, 3).id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_follow_a_timeline_branch_from_part_of_the_history() {
    let s = setup().await;
    let mut h = History::new("main", 1_200, 12);
    // Timeline 2 branches in segment 900: backup 9 (segments 898-899) is
    // on timeline 1 before the branch, backups 10 and 11 on timeline 2.
    h.branch = Some(900);
    write(&s.repo, &h, 64).await;
    let (latest, id, tli) = plan_both_on(&s.repo, None).await;
    assert_eq!((id, tli), (common::catalog_fixture::manifest(&h, 11).id, 2));
    // After the branch, before backup 10: backup 9, crossing to timeline 2.
    let t = h.time_of(950);
    let (crossing, id, tli) = plan_both_on(&s.repo, Some(t)).await;
    assert_eq!((id, tli), (common::catalog_fixture::manifest(&h, 9).id, 2));
    // Before the last commit on timeline 1 (segment 895): timeline 1.
    let t = h.time_of(890);
    let (before, id, tli) = plan_both_on(&s.repo, Some(t)).await;
    assert_eq!((id, tli), (common::catalog_fixture::manifest(&h, 8).id, 1));
    eprintln!(
        "S3 requests to plan across a branch: latest {latest}, crossing {crossing}, before {before}"
    );
}

/// Keys of the WAL prefix summaries.
async fn complete(repo: &Repository) -> Vec<String> {
    let (_, objects) = repo.regions.list("pg/main/").await.expect("list");
    objects
        .iter()
        .filter(|o| o.key.contains(".full."))
        .map(|o| o.key.clone())
        .collect()
}

/// `dr list pg` both ways: the listing from summaries and the whole
/// catalog's, which must say the same (backups, sizes, WAL, windows,
/// timelines, gaps); returns the requests the listing from summaries cost
/// and what the whole catalog cost.
async fn list_both(repo: &Repository) -> (u64, u64) {
    let (n, listed) = counted(Listed::load(repo, "main")).await;
    let listed = listed.expect("listing from summaries");
    let (whole_cost, whole) = counted(Listed::whole(repo, "main")).await;
    let whole = whole.expect("whole catalog");
    assert!(
        listed.scoped,
        "listed from summaries, not the whole catalog"
    );
    assert!(!whole.scoped);
    let a = serde_json::to_string_pretty(&listed.to_json()).expect("json");
    let b = serde_json::to_string_pretty(&whole.to_json()).expect("json");
    if a != b {
        let diff: Vec<String> = a
            .lines()
            .zip(b.lines())
            .filter(|(x, y)| x != y)
            .take(10)
            .map(|(x, y)| format!("summaries: {x}\nwhole:     {y}"))
            .collect();
        panic!(
            "the listing from summaries differs from the whole catalog ({} vs {} lines):\n{}",
            a.lines().count(),
            b.lines().count(),
            diff.join("\n")
        );
    }
    let gaps = |l: &Listed| serde_json::to_string(&l.catalog.wal_gaps()).expect("json");
    assert_eq!(gaps(&listed), gaps(&whole), "same gaps");
    (n, whole_cost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_requests_do_not_grow_with_history() {
    let s = setup().await;
    let h = History::new("main", 12_000, 120);
    write(&s.repo, &h, 64).await;
    let (n, whole) = list_both(&s.repo).await;
    eprintln!("S3 requests to list 12,000 segments and 120 backups: {n} (whole catalog {whole})");
    assert!(
        whole > 10 * MAX_PLAN_REQUESTS,
        "the whole catalog cost only {whole} requests: the history is too short to test the bound"
    );
    assert!(
        n <= MAX_PLAN_REQUESTS,
        "dr list pg cost {n} requests (bound {MAX_PLAN_REQUESTS}); the whole catalog {whole}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_from_summaries_matches_the_whole_catalog_through_gaps_branches_and_expire() {
    // Retention keeps the 47 newest of 50 backups.
    let s = setup_with(
        "[postgres.main]\nconninfo = \"host=127.0.0.1 port=1 user=postgres dbname=postgres\"\n\
         data_dir = \"/nonexistent/data\"\nstate_dir = \"/nonexistent/state\"\n\
         retention = { keep_full = 47 }\n",
    )
    .await;
    let mut h = History::new("main", 5_000, 50);
    // Backups 0 and 1 as if taken before summaries, 2 and 30 with summaries
    // of the older form (no sizes); a gap after the commit in segment 2623
    // (prefix 0A, between backups 26 and 27) and one from the first segment
    // of prefix 0D, right after the complete 0C; timeline 2 branching in
    // segment 4000 (prefix 0F), holding the last 1,000 segments.
    h.without_summary = vec![0, 1];
    h.old_summary = vec![2, 30];
    h.missing = (2624..2634).chain(0xD00..0xD03).collect();
    h.branch = Some(4000);
    write(&s.repo, &h, 64).await;
    let before = complete(&s.repo).await;
    // Timeline 1: prefixes 01..09, 0B, 0C and 0E (0 lacks segment 0, 0A and
    // 0D have gaps, 0F the branch); timeline 2: 10..12.
    assert_eq!(before.len(), 9 + 3 + 3, "prefix summaries: {before:#?}");
    let (n, whole) = list_both(&s.repo).await;
    eprintln!("S3 requests to list (gap, branch, old backups): {n}; whole catalog {whole}");
    // What the listing reads, none of it per segment or per summarised
    // backup: system ids, backup directories, backup summaries, timelines
    // (4); each timeline's prefixes and their summaries (2); the branch's
    // history file (1); a HEAD and a GET per backup without a summary (4)
    // and a GET per older summary (2); each prefix without a summary (6:
    // 00, the gaps' 0A and 0D, the branch's 0F on both timelines, the
    // newest 13); the segments whose commits end windows (5: before each
    // gap, the last segment of 0C by the key its summary names; on
    // timeline 1 two, on timeline 2 one).
    let bound = 4 + 2 + 1 + 4 + 2 + 6 + 5;
    assert!(
        n <= bound,
        "listing cost {n} requests (bound {bound}), whole catalog {whole}"
    );
    assert!(
        whole > 2 * bound,
        "whole catalog only {whole}: history too short"
    );

    // Expire the three oldest backups and the WAL before backup 3: prefix 0
    // goes, prefix 01 loses segments 256..299 and so its summary first.
    let plans = dr::maintenance::expire::plan(&s.repo, &s.cfg, Utc::now())
        .await
        .expect("expire plan");
    for p in plans {
        let ex = dr::maintenance::expire::execute(&s.repo, p).await;
        assert!(
            ex.failed.is_empty() && ex.locked.is_empty(),
            "{:?}",
            ex.failed
        );
    }
    let after = complete(&s.repo).await;
    assert_eq!(
        after.len(),
        before.len() - 1,
        "only the summary of prefix 01 went: {after:#?}"
    );
    assert!(
        !after.iter().any(|k| k.contains("/00000001/00000001.full.")),
        "prefix 01's summary outlived its first segments"
    );
    let (n, whole) = list_both(&s.repo).await;
    eprintln!("S3 requests to list after expire: {n}; whole catalog {whole}");
    // The backups without a summary expired; one older summary is left.
    let bound = 4 + 2 + 1 + 1 + 6 + 5;
    assert!(
        n <= bound,
        "listing cost {n} requests (bound {bound}), whole catalog {whole}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_the_last_segment_of_a_complete_prefix_summarises_it() {
    use dr::postgres::wal::{WalFile, push_bytes};
    use dr::repo::layout::{TimelineId, WalSegmentName, WalSuffix};
    let s = setup().await;
    let sid = 7_400_000_000_000_000_002;
    // Prefix 01 complete; prefix 02 without segment 10, its FF archived.
    let mut segments: Vec<(u32, u32)> = (0..=0xFF).map(|n| (1, n)).collect();
    segments.extend((0..=0xFF).filter(|&n| n != 0x10).map(|n| (2, n)));
    let push = |log: u32, seg: u32| {
        let repo = &s.repo;
        async move {
            let name = WalSegmentName {
                timeline: TimelineId(1),
                log,
                seg,
            };
            let file = WalFile::Segment(name, WalSuffix::None);
            push_bytes(
                repo,
                "main",
                sid,
                file,
                &name.to_string(),
                vec![seg as u8; 64],
            )
            .await
            .expect("push a segment");
        }
    };
    // In order, as PostgreSQL archives: each prefix's FF last.
    let (last, rest): (Vec<_>, Vec<_>) = segments.into_iter().partition(|&(_, n)| n == 0xFF);
    futures::future::join_all(rest.into_iter().map(|(log, seg)| push(log, seg))).await;
    assert!(
        complete(&s.repo).await.is_empty(),
        "no summary before an FF"
    );
    for (log, seg) in last {
        push(log, seg).await;
    }
    let summaries = complete(&s.repo).await;
    assert_eq!(
        summaries.len(),
        1,
        "one summary, of the complete prefix: {summaries:#?}"
    );
    assert!(
        summaries[0].contains("/wal/00000001/00000001.full."),
        "{summaries:?}"
    );
}
