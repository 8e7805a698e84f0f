//! Model-based tests of the catalog against a brute-force oracle.

//! The catalog against a brute-force model: random histories of one
//! timeline and a branch (with gaps, short stray branches and backups on
//! either side), checked segment by segment without the catalog's walk.
use super::*;
use crate::postgres::timeline::HistoryEntry;
use crate::repo::layout::TimelineId;
use proptest::prelude::*;

const SEG: u64 = WAL_SEGMENT_SIZE;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("time")
}

fn seg(tl: u32, n: u64) -> WalSegmentName {
    let per_log = 0x1_0000_0000u64 / SEG;
    WalSegmentName {
        timeline: TimelineId(tl),
        log: (n / per_log) as u32,
        seg: (n % per_log) as u32,
    }
}

fn manifest(id: &str, tl: u32, start: u64, stop: u64) -> PgManifest {
    PgManifest {
        kind: "dr-pg-backup".into(),
        version: super::super::manifest::MANIFEST_VERSION,
        cluster: "main".into(),
        system_id: 1,
        id: id.into(),
        server_version: 150000,
        // Segment n is archived at second 10n; a backup ends inside its
        // stop segment.
        start_time: at(10 * start as i64 - 5),
        stop_time: at(10 * stop as i64 - 5),
        start_lsn: Lsn(start * SEG + 40),
        stop_lsn: Lsn(stop * SEG + 100),
        timeline: tl,
        start_segment: seg(tl, start).to_string(),
        stop_segment: seg(tl, stop).to_string(),
        wal_segment_size: SEG,
        backup_label: String::new(),
        tablespace_map: String::new(),
        dirs: Vec::new(),
        files: Vec::new(),
        objects: Vec::new(),
        size: 0,
        stored_size: 0,
        duration_seconds: 0.0,
        checksum_failures: Vec::new(),
        tablespaces: Vec::new(),
        server_manifest: None,
    }
}

/// A history: timeline 1 has segments 1..=n1 minus `gaps1`; timeline 2
/// branches at `k` (inside segment k) and has segments k..=n2 minus
/// `gaps2`, archived `delay` seconds later than timeline 1's would be.
#[derive(Debug, Clone)]
struct History {
    n1: u64,
    gaps1: Vec<u64>,
    branch: Option<(u64, u64, Vec<u64>, i64)>,
    backups: Vec<(u32, u64)>,
}

fn history() -> impl Strategy<Value = History> {
    (4u64..14, prop::collection::vec(1u64..14, 0..2))
        .prop_flat_map(|(n1, gaps1)| {
            let branch = prop::option::of((
                2u64..n1,
                0u64..6,
                prop::collection::vec(0u64..20, 0..2),
                0i64..200,
            ));
            let backups = prop::collection::vec((1u32..3, 1u64..n1), 1..4);
            (Just(n1), Just(gaps1), branch, backups)
        })
        .prop_map(|(n1, gaps1, branch, backups)| History {
            n1,
            gaps1,
            branch: branch.map(|(k, len, gaps, delay)| (k, k + len, gaps, delay)),
            backups,
        })
}

fn catalog(h: &History) -> Catalog {
    let mut wal = BTreeMap::new();
    for n in 1..=h.n1 {
        if !h.gaps1.contains(&n) {
            let e = WalEntry {
                key: format!("tl1-{n}"),
                archived: Some(at(10 * n as i64)),
            };
            wal.insert(seg(1, n), e);
        }
    }
    let mut timelines = BTreeMap::new();
    if let Some((k, n2, gaps, delay)) = &h.branch {
        for n in *k..=*n2 {
            if !gaps.contains(&(n - k)) {
                let e = WalEntry {
                    key: format!("tl2-{n}"),
                    archived: Some(at(10 * n as i64 + delay)),
                };
                wal.insert(seg(2, n), e);
            }
        }
        let mut t2 = timeline_info(
            2,
            vec![HistoryEntry {
                parent: 1,
                switch: Lsn(k * SEG + 200),
            }],
            Some(at(10 * *k as i64 + delay)),
        );
        t2.segments = 1;
        timelines.insert(2, t2);
    }
    timelines.insert(1, timeline_info(1, Vec::new(), None));
    let mut backups = Vec::new();
    for (i, (tl, start)) in h.backups.iter().enumerate() {
        let (tl, start) = match (&h.branch, tl) {
            (Some((k, n2, _, _)), 2) if *start > *k && *start < *n2 => (2, *start),
            _ => (1, *start),
        };
        backups.push(manifest(&format!("b{i}"), tl, start, start + 1));
    }
    backups.sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
    let mut cat = Catalog::empty();
    (cat.backups, cat.wal, cat.timelines) = (backups, wal, timelines);
    cat.windows = cat.compute_windows();
    cat
}

/// Which timeline holds segment n on the way to `target`.
fn holder(h: &History, target: u32, n: u64) -> u32 {
    match (&h.branch, target) {
        (Some((k, ..)), 2) if n >= *k => 2,
        _ => 1,
    }
}

/// The model's window of backup `b` on `target`: the last segment
/// reachable one by one from the backup's start.
fn model_window(
    h: &History,
    cat: &Catalog,
    b: &PgManifest,
    target: u32,
) -> Option<(u64, DateTime<Utc>)> {
    let per_log = 0x1_0000_0000u64 / SEG;
    let n_of = |s: &str| {
        s.parse::<WalSegmentName>()
            .map(|s| u64::from(s.log) * per_log + u64::from(s.seg))
    };
    let start = n_of(&b.start_segment).ok()?;
    let stop = n_of(&b.stop_segment).ok()?;
    if target == 1 && b.timeline == 2 {
        return None;
    }
    if let (2, Some((k, ..))) = (target, &h.branch)
        && b.timeline == 1
        && b.stop_lsn.0 > k * SEG + 200
    {
        return None; // the backup ended after timeline 1 was left
    }
    if target == 2 && h.branch.is_none() {
        return None;
    }
    let mut n = start;
    let mut last = None;
    while let Some(e) = cat.wal.get(&seg(holder(h, target, n), n)) {
        last = Some((n, e.archived?));
        n += 1;
    }
    let (ln, t) = last?;
    if ln < stop || holder(h, target, ln) != target {
        return None;
    }
    Some((ln, t.max(b.stop_time)))
}

proptest! {
    #[test]
    fn windows_match_the_model(h in history()) {
        let cat = catalog(&h);
        let mut expect = Vec::new();
        for b in &cat.backups {
            for target in [1, 2] {
                if let Some((ln, to)) = model_window(&h, &cat, b, target) {
                    expect.push((b.id.clone(), target, seg(target, ln).to_string(), to));
                }
            }
        }
        let mut got: Vec<_> = cat
            .windows
            .iter()
            .map(|w| (w.backup.clone(), w.timeline, w.last_segment.clone(), w.to))
            .collect();
        expect.sort();
        got.sort();
        prop_assert_eq!(got, expect);
    }

    #[test]
    fn an_accepted_target_is_reachable_on_the_chosen_timeline(h in history(), t in 0i64..250) {
        let cat = catalog(&h);
        let target = at(t);
        match cat.plan(Some(target), false, TimelineChoice::Auto) {
            Ok(p) => {
                // Covered by a model window of that backup on that timeline.
                let w = model_window(&h, &cat, p.backup, p.timeline);
                prop_assert!(w.is_some_and(|(_, to)| p.backup.stop_time <= target && target <= to),
                    "{:?} accepted {} via {} on {}", h, target, p.backup.id, p.timeline);
                // No other timeline holds a different history at the target.
                for other in [1u32, 2] {
                    if other == p.timeline { continue; }
                    let diverged = h.branch.as_ref().is_some_and(|(k, _, _, d)| target >= at(10 * *k as i64 + d));
                    let covers = cat.backups.iter().any(|b| model_window(&h, &cat, b, other)
                        .is_some_and(|(_, to)| b.stop_time <= target && target <= to));
                    prop_assert!(!(diverged && covers), "{:?}: {} is ambiguous but was accepted", h, target);
                }
            }
            Err(e) => {
                // Refused: no model window covers it, or two diverged ones do.
                let covering: Vec<u32> = [1u32, 2].into_iter().filter(|tl| cat.backups.iter().any(|b| {
                    model_window(&h, &cat, b, *tl).is_some_and(|(_, to)| b.stop_time <= target && target <= to)
                })).collect();
                let ambiguous = covering.len() == 2
                    && h.branch.as_ref().is_some_and(|(k, _, _, d)| target >= at(10 * *k as i64 + d));
                prop_assert!(covering.is_empty() || ambiguous, "{:?}: {} refused: {}", h, target, e);
            }
        }
    }

    #[test]
    fn gaps_are_the_missing_runs_from_the_oldest_backup_on(h in history()) {
        let cat = catalog(&h);
        let floor = cat.backups.iter().map(|b| {
            let s: WalSegmentName = b.start_segment.parse().expect("segment");
            u64::from(s.seg)
        }).min().expect("a backup");
        let mut want = Vec::new();
        for tl in [1u32, 2] {
            let have: Vec<u64> = cat.wal.keys()
                .filter(|s| s.timeline.0 == tl && u64::from(s.seg) >= floor)
                .map(|s| u64::from(s.seg))
                .collect();
            for w in have.windows(2) {
                if w[1] > w[0] + 1 {
                    want.push((tl, seg(tl, w[0] + 1).to_string(), w[1] - w[0] - 1));
                }
            }
        }
        let got: Vec<(u32, String, u64)> = cat.wal_gaps().into_iter()
            .map(|g| (g.timeline, g.first_missing, g.missing))
            .collect();
        prop_assert_eq!(got, want, "{:?}", h);
    }
}

#[test]
fn a_target_between_windows_names_the_nearest_points_and_backups() {
    let h = History {
        n1: 10,
        gaps1: vec![4],
        branch: None,
        backups: vec![(1, 1), (1, 6)],
    };
    let cat = catalog(&h);
    let e = cat
        .plan(Some(at(50)), false, TimelineChoice::Auto)
        .expect_err("between windows")
        .to_string();
    assert!(
        e.contains("is in no recoverable window: the nearest points are")
            && e.contains("backup b0 stops")
            && e.contains("when backup b1 ended"),
        "{e}"
    );
    assert!(!e.contains("  "), "{e}");
}
