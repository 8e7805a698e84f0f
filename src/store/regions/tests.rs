//! Unit tests of the multi-region fan-out: skipping failed regions, retrying
//! them once back, abandoning stalled ones.

use super::*;
use crate::store::{FaultPlan, FaultyStore, FsStore};

/// Regions over real directories under `dir`, each behind a fault switch.
fn regions(dir: &std::path::Path, names: &[&str], min: usize) -> Regions {
    let rs = names
        .iter()
        .map(|n| Region {
            name: n.to_string(),
            store: std::sync::Arc::new(Store::Faulty(Box::new(FaultyStore::new(
                Store::Fs(FsStore::new(dir.join(n))),
                FaultPlan::default(),
            )))),
        })
        .collect();
    Regions::new(rs, min)
}

fn set_down(r: &Regions, name: &str, down: bool) {
    let Some(Store::Faulty(f)) = r.get_region(name).map(|r| &*r.store) else {
        panic!("region {name} has no fault switch");
    };
    f.set_plan(FaultPlan {
        unavailable: down,
        ..Default::default()
    });
}

async fn put(r: &Regions, key: &str) -> Result<PutReport, RegionsError> {
    r.put_bytes(key, Bytes::from_static(b"data")).await
}

#[tokio::test]
async fn a_single_region_is_retried_as_soon_as_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = dir.path().join("state/region-health.json");
    let mut r = regions(dir.path(), &["only"], 1);
    r.remember_failures(health.clone());
    set_down(&r, "only", true);
    assert!(put(&r, "a").await.is_err(), "a write to a dead region");
    let d = r.degraded();
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].1.contains("in this run")
            && !d[0].1.contains("earlier")
            && d[0].1.contains("each write tries it"),
        "{d:?}"
    );
    // Back in the same process: the next write goes through at once.
    set_down(&r, "only", false);
    let rep = put(&r, "b").await.expect("write once the region is back");
    assert_eq!(rep.ok, vec!["only".to_string()]);
    assert!(r.degraded().is_empty(), "{:?}", r.degraded());

    // A failure remembered by an earlier run does not stop the next run.
    set_down(&r, "only", true);
    assert!(put(&r, "c").await.is_err());
    let mut next = regions(dir.path(), &["only"], 1);
    next.remember_failures(health);
    let d = next.degraded();
    assert!(
        d.len() == 1 && d[0].1.contains("in an earlier run") && !d[0].1.contains("this run"),
        "{d:?}"
    );
    next.put_bytes("d", Bytes::from_static(b"data"))
        .await
        .expect("the next run writes at once to the only region");
}

#[tokio::test]
async fn a_failed_region_is_skipped_only_while_the_others_make_min_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = dir.path().join("state/region-health.json");
    let mut r = regions(dir.path(), &["a", "b", "c"], 2);
    r.remember_failures(health.clone());
    set_down(&r, "c", true);
    let rep = put(&r, "k1").await.expect("two of three regions suffice");
    assert_eq!(rep.failed.len(), 1);
    // The next run skips c (within RETRY_AFTER_SECS) and says why, once.
    let mut next = regions(dir.path(), &["a", "b", "c"], 2);
    next.remember_failures(health);
    set_down(&next, "c", false);
    let rep = put(&next, "k2").await.expect("write");
    assert_eq!(rep.ok, vec!["a".to_string(), "b".to_string()]);
    let why = rep.failed[0].1.to_string();
    assert!(
        why.contains("skipped: failed")
            && why.contains("tried again in")
            && why.contains("in an earlier run")
            && !why.contains("this run"),
        "{why}"
    );
    // Once b fails too, skipping c would leave one region: c is tried again.
    set_down(&next, "b", true);
    assert!(put(&next, "k3").await.is_err(), "only a took it");
    let rep = put(&next, "k4")
        .await
        .expect("c is tried again and takes it");
    assert_eq!(rep.ok, vec!["a".to_string(), "c".to_string()]);
}

fn set_plan(r: &Regions, name: &str, plan: FaultPlan) {
    let Some(Store::Faulty(f)) = r.get_region(name).map(|r| &*r.store) else {
        panic!("region {name} has no fault switch");
    };
    f.set_plan(plan);
}

/// A region that stops taking data (mid-body, or after the last byte)
/// is abandoned after `stall_timeout`: the write completes in the other
/// regions when they make min_regions, and fails otherwise, instead of
/// hanging on the stalled one.
#[tokio::test]
async fn a_stalled_region_is_abandoned_after_the_stall_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (min, stall_after) in [(1, 0u64), (1, 100_000), (2, 100_000)] {
        let mut r = regions(dir.path(), &["a", "b"], min);
        r.set_stall_timeout(std::time::Duration::from_millis(300));
        set_plan(
            &r,
            "b",
            FaultPlan {
                stall_put_after: Some(stall_after),
                ..Default::default()
            },
        );
        let key = format!("k-{min}-{stall_after}");
        // One chunk: every byte is handed over before b stalls. Eight:
        // the hand-over itself blocks on b.
        let body = crate::store::generated(if stall_after == 0 { 1 << 20 } else { 8 << 20 });
        let t = std::time::Instant::now();
        let res = tokio::time::timeout(std::time::Duration::from_secs(20), r.put(&key, body))
            .await
            .expect("the write hung on a stalled region");
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        match (min, res) {
            (1, Ok(rep)) => {
                assert_eq!(rep.ok, vec!["a".to_string()]);
                let why = rep.failed[0].1.to_string();
                assert!(why.contains("stalled"), "{why}");
                assert_eq!(r.degraded().len(), 1);
            }
            (2, Err(RegionsError::NotEnoughRegions { details, .. })) => {
                assert!(details.contains("stalled"), "{details}");
            }
            (m, other) => panic!("min_regions {m}: {other:?}"),
        }
        // Nothing under the key in the stalled region.
        let b = FsStore::new(dir.path().join("b"));
        assert_eq!(b.head(&key).await.expect("head"), None);
    }
}
