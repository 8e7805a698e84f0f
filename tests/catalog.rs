//! Restore planning on S3 costs the same few requests however long the WAL
//! and backup history, and plans exactly what the whole catalog would.
//! Against the Garage test server, with histories written by
//! `common::catalog_fixture`; every count is read from the S3 client.

mod common;

use chrono::{DateTime, Utc};
use common::catalog_fixture::{History, write};
use dr::postgres::catalog::Catalog;
use dr::postgres::timeline::TimelineChoice;
use dr::repo::Repository;

/// The bound the design sets for planning a restore, whatever the history.
const MAX_PLAN_REQUESTS: u64 = 10;

struct Setup {
    _dir: tempfile::TempDir,
    repo: Repository,
}

async fn setup() -> Setup {
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
        "[repository]\nrecipients = [\"{rcpt}\"]\nidentity_file = \"{}\"\n\n{}",
        id.display(),
        common::garage_region_toml("garage")
    );
    std::fs::write(&path, &text).expect("config");
    let cfg = dr::config::Config::parse(&text, &path).expect("config parses");
    Repository::init(&cfg).await.expect("repo init on Garage");
    let repo = Repository::open(&cfg).await.expect("repo open");
    Setup { _dir: dir, repo }
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
