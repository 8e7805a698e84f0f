//! `plan_pg` against a model: random histories of finished, running and
//! orphaned backups (block-incremental, reading each other's objects), WAL
//! of one or two systems, and random policies. The oracle states what each
//! thing needs in the model's own terms and checks that the plan never
//! deletes a needed object and deletes exactly the rest it may delete.

use super::*;
use proptest::prelude::*;

const HOUR: i64 = 3600;

#[derive(Debug, Clone)]
struct B {
    /// Hours before now.
    age: i64,
    /// Data objects it stores itself.
    own: u32,
    /// Objects of earlier finished backups it reads (picked by index).
    refs: Vec<prop::sample::Index>,
    /// Finished (has a manifest)?
    manifest: bool,
    /// Hours before now of its last write, when it has no manifest;
    /// `None`: the store does not tell.
    last_write: Option<i64>,
    /// Wrote its `started` marker?
    marker: bool,
    /// System id 8 instead of 7 (a re-initialised cluster).
    other_system: bool,
}

fn backup() -> impl Strategy<Value = B> {
    (
        0i64..400,
        0u32..3,
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        prop::bool::weighted(0.75),
        prop::option::weighted(0.85, 0i64..60),
        any::<bool>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |(age, own, refs, manifest, last_write, marker, other_system)| B {
                age,
                own,
                refs,
                manifest,
                last_write,
                marker,
                other_system,
            },
        )
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        prop::option::of(1usize..5),
        prop::option::of((1u64..300).prop_map(|h| Duration::from_secs(h * 3600))),
    )
        .prop_map(|(keep, keep_within)| Policy { keep, keep_within })
}

struct World {
    backups: Vec<PgBackup>,
    stored: Vec<Stored>,
    wal: Vec<PgWal>,
    /// Every object a manifest-less backup that may still be running
    /// needs: its own, what it reads, the WAL from its start on.
    running_needs: BTreeSet<String>,
    running: BTreeSet<String>,
    /// Objects of each manifest-less directory, by id.
    orphan_objects: BTreeMap<String, Vec<String>>,
    /// Own objects (data and marker) of each finished backup, by id.
    own_objects: BTreeMap<String, Vec<String>>,
}

fn build(hist: &[B], now: DateTime<Utc>, orphan_age: Duration, wal_segs: u32) -> World {
    let mut hist = hist.to_vec();
    hist.sort_by_key(|b| std::cmp::Reverse(b.age));
    let mut w = World {
        backups: Vec::new(),
        stored: Vec::new(),
        wal: Vec::new(),
        running_needs: BTreeSet::new(),
        running: BTreeSet::new(),
        orphan_objects: BTreeMap::new(),
        own_objects: BTreeMap::new(),
    };
    // Objects that finished backups made readable so far.
    let mut readable: Vec<String> = Vec::new();
    let mut systems = BTreeSet::new();
    for (rank, b) in hist.iter().enumerate() {
        let sys = if b.other_system { 8 } else { 7 };
        systems.insert(sys);
        let id = format!("{:06}-{rank:02}", 1_000_000 - b.age);
        let time = now - chrono::Duration::seconds(b.age * HOUR);
        let start = (0u32, 2 * rank as u32 + 1);
        let dir = format!("pg/main/{sys}/backups/{id}");
        let modified = if b.manifest {
            Some(time)
        } else {
            b.last_write
                .map(|h| now - chrono::Duration::seconds(h * HOUR))
        };
        let mut own: Vec<String> = (0..b.own).map(|n| format!("{dir}/data/{n:08x}")).collect();
        let mut objects: Vec<(String, &'static str)> =
            own.iter().map(|k| (k.clone(), "data")).collect();
        if b.marker || (!b.manifest && b.own == 0) {
            objects.push((format!("{dir}/started"), "marker"));
        }
        for (key, kind) in &objects {
            w.stored.push(Stored {
                key: key.clone(),
                id: id.clone(),
                kind,
                modified,
            });
        }
        let refs: Vec<String> = if readable.is_empty() {
            Vec::new()
        } else {
            b.refs
                .iter()
                .map(|i| readable[i.index(readable.len())].clone())
                .collect()
        };
        let keys: Vec<String> = objects.into_iter().map(|(k, _)| k).collect();
        if b.manifest {
            own.extend(refs);
            w.backups.push(PgBackup {
                item: Item {
                    id: id.clone(),
                    time,
                },
                manifest: format!("{dir}/manifest"),
                system_id: sys,
                start_pos: start,
                reads: own.clone(),
            });
            readable.extend(keys.iter().filter(|k| k.contains("/data/")).cloned());
            w.own_objects.insert(id, keys);
        } else {
            // The model's own rule, not the planner's: a directory
            // written to within orphan_age, or of unknown age, may
            // belong to a backup still running.
            let age = chrono::Duration::from_std(orphan_age).expect("age");
            if modified.is_none_or(|t| now - t < age) {
                w.running.insert(id.clone());
                w.running_needs.extend(keys.iter().cloned());
                w.running_needs.extend(refs);
                for s in start.1..wal_segs {
                    w.running_needs.insert(wal_key(sys, s));
                }
            }
            w.orphan_objects.insert(id, keys);
        }
    }
    for sys in systems {
        for s in 0..wal_segs {
            w.wal.push(PgWal {
                key: wal_key(sys, s),
                system_id: sys,
                pos: (0, s),
            });
        }
    }
    w
}

fn wal_key(sys: u64, s: u32) -> String {
    format!("pg/main/{sys}/wal/00000001/00000000/00000001000000000000{s:04X}-h")
}

/// The backups a policy keeps, stated as what it promises: the newest,
/// the `keep` newest, and every point of the last `keep_within`
/// restorable (so the newest backup at or before its start too).
fn kept_by_policy(backups: &[PgBackup], p: &Policy, now: DateTime<Utc>) -> BTreeSet<String> {
    let mut newest_first: Vec<&PgBackup> = backups.iter().collect();
    newest_first.sort_by(|a, b| (b.item.time, &b.item.id).cmp(&(a.item.time, &a.item.id)));
    let mut kept = BTreeSet::new();
    for (rank, b) in newest_first.iter().enumerate() {
        let t = b.item.time;
        let by_count = p.keep.is_some_and(|n| rank < n);
        let by_window = p.keep_within.is_some_and(|d| {
            let start = now - chrono::Duration::from_std(d).expect("duration");
            // Inside the window, or the last backup before its start
            // (no other backup lies between it and the start).
            t > start
                || !newest_first
                    .iter()
                    .any(|o| o.item.time <= start && (o.item.time, &o.item.id) > (t, &b.item.id))
        });
        if rank == 0 || by_count || by_window || p.is_empty() {
            kept.insert(b.item.id.clone());
        }
    }
    kept
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn expire_never_deletes_what_is_needed_and_deletes_the_rest(
        hist in prop::collection::vec(backup(), 0..9),
        p in policy(),
        orphan_age_h in 1u64..48,
        wal_segs in 0u32..24,
    ) {
        let now = DateTime::from_timestamp(1_800_000_000, 0).expect("now");
        let orphan_age = Duration::from_secs(orphan_age_h * 3600);
        let w = build(&hist, now, orphan_age, wal_segs);
        let plan = plan_pg("main", &w.backups, &w.stored, &w.wal, &p, now, orphan_age);
        let deleted: BTreeSet<&str> = plan.deletions.iter().map(|d| d.key.as_str()).collect();
        prop_assert_eq!(deleted.len(), plan.deletions.len(), "a key planned twice");

        // What is needed.
        let kept = kept_by_policy(&w.backups, &p, now);
        let mut needed: BTreeSet<String> = w.running_needs.clone();
        let mut oldest_start: BTreeMap<u64, (u32, u32)> = BTreeMap::new();
        for b in w.backups.iter().filter(|b| kept.contains(&b.item.id)) {
            needed.insert(b.manifest.clone());
            needed.extend(b.reads.iter().cloned());
            let e = oldest_start.entry(b.system_id).or_insert(b.start_pos);
            *e = (*e).min(b.start_pos);
        }
        for wal in &w.wal {
            if oldest_start.get(&wal.system_id).is_some_and(|s| wal.pos >= *s) {
                needed.insert(wal.key.clone());
            }
        }
        // With no backup at all, WAL is all there is.
        if kept.is_empty() {
            needed.extend(w.wal.iter().map(|x| x.key.clone()));
        }
        for k in &deleted {
            prop_assert!(!needed.contains(*k), "{} is needed but planned for deletion", k);
        }
        let running: BTreeSet<String> = plan.running.iter().cloned().collect();
        prop_assert_eq!(&running, &w.running);

        // What may go, and so must: manifests of expired backups; their
        // data and orphans' objects unless a kept backup reads them;
        // WAL no kept backup needs. Expired data and WAL wait while a
        // backup may be running.
        let mut expect: BTreeSet<String> = BTreeSet::new();
        let reads: BTreeSet<&String> = w
            .backups
            .iter()
            .filter(|b| kept.contains(&b.item.id))
            .flat_map(|b| &b.reads)
            .collect();
        let quiet = w.running.is_empty();
        for b in w.backups.iter().filter(|b| !kept.contains(&b.item.id)) {
            expect.insert(b.manifest.clone());
            if quiet {
                expect.extend(w.own_objects[&b.item.id].iter().filter(|k| !reads.contains(k)).cloned());
            }
        }
        for (id, keys) in &w.orphan_objects {
            if !w.running.contains(id) {
                expect.extend(keys.iter().filter(|k| !reads.contains(k)).cloned());
            }
        }
        if quiet && !kept.is_empty() {
            expect.extend(w.wal.iter().filter(|x| !needed.contains(&x.key)).map(|x| x.key.clone()));
        }
        let got: BTreeSet<String> = deleted.iter().map(|k| k.to_string()).collect();
        prop_assert_eq!(got, expect);

        // Manifests go first.
        let first_other = plan.deletions.iter().position(|d| d.kind != "manifest").unwrap_or(plan.deletions.len());
        prop_assert!(plan.deletions[first_other..].iter().all(|d| d.kind != "manifest"));
        let decided: BTreeSet<String> = plan.decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect();
        prop_assert_eq!(decided, kept);
    }
}
