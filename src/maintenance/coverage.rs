//! What the WAL archive covers, as `verify --list` judges it: holes that stop
//! a replay, and what no backup can use any more. A segment older than the
//! start of every backup of its system is not part of any recoverable window
//! (it is what `expire` deletes), so a hole down there is no hole: a sync that
//! ran beside an expire can copy such a segment back into a region, and that
//! must not fail verification. A hole from the oldest backup's start onwards
//! always does.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::repo::layout::{ObjectKey, WalSegmentName, WalSuffix};
use crate::repo::{RepoError, Repository};

/// Position of a segment in a system's WAL, ignoring the timeline: the
/// order `expire` and the floors use.
pub(crate) fn position(s: &WalSegmentName) -> (u32, u32) {
    (s.log, s.seg)
}

/// The WAL the readable backups need, from their manifests.
#[derive(Debug, Clone, Default)]
pub struct WalNeeds {
    /// Per `(cluster, system)`: the start position of the oldest backup.
    /// WAL below it is needed by nothing.
    floors: BTreeMap<(String, u64), (u32, u32)>,
    /// `(cluster, system, backup id, first, last)`: the segments a backup
    /// cannot be made consistent without.
    own: Vec<(String, u64, String, WalSegmentName, WalSegmentName)>,
}

impl WalNeeds {
    /// Records a backup of `cluster` that ran from segment `start` to `stop`.
    pub fn add(&mut self, cluster: &str, system_id: u64, id: &str, start: &str, stop: &str) {
        let (Ok(first), Ok(last)) = (start.parse::<WalSegmentName>(), stop.parse()) else {
            return;
        };
        let e = self
            .floors
            .entry((cluster.to_string(), system_id))
            .or_insert(position(&first));
        *e = (*e).min(position(&first));
        self.own
            .push((cluster.to_string(), system_id, id.to_string(), first, last));
    }

    /// Whether `segment` of `(cluster, system)` lies below every backup.
    pub fn below_floor(&self, cluster: &str, system_id: u64, segment: &WalSegmentName) -> bool {
        self.floors
            .get(&(cluster.to_string(), system_id))
            .is_some_and(|f| position(segment) < *f)
    }
}

/// Holes and unusable segments of the WAL archive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalCoverage {
    /// `cluster (system): first .. last missing`: segments missing between
    /// two archived ones at or after the oldest backup's start; replay
    /// cannot pass them.
    pub gaps: Vec<String>,
    /// Runs of archived segments before the start of every backup: no
    /// restore can use them, and `dr expire` removes them.
    pub unneeded: Vec<String>,
}

/// Checks each cluster's archive in `region` (or in the union of all
/// regions): every backup's own segments exist, and per timeline every
/// segment from the floor (or from the oldest archived one, for a system
/// without a readable backup) to the newest exists, complete or as the
/// start of a streamed segment.
pub async fn wal_coverage(
    repo: &Repository,
    clusters: &[String],
    needs: &WalNeeds,
    region: Option<&str>,
) -> Result<WalCoverage, RepoError> {
    let mut out = WalCoverage::default();
    for cluster in clusters {
        let prefix = format!("pg/{cluster}/");
        let objects = match region.and_then(|r| repo.regions.get_region(r)) {
            Some(r) => r.store.list(&prefix).await?,
            None => repo.regions.list(&prefix).await?.1,
        };
        let mut segs: BTreeMap<(u64, u32), BTreeSet<WalSegmentName>> = BTreeMap::new();
        for o in &objects {
            if let Ok(ObjectKey::Wal {
                system_id,
                segment,
                suffix:
                    WalSuffix::None
                    | WalSuffix::Stream { start: 0, .. }
                    | WalSuffix::Journal { start: 0 },
                ..
            }) = o.key.parse::<ObjectKey>()
            {
                segs.entry((system_id, segment.timeline.0))
                    .or_default()
                    .insert(segment);
            }
        }
        for (c, system_id, id, first, last) in needs.own.iter().filter(|n| n.0 == *cluster) {
            let have = segs.get(&(*system_id, first.timeline.0));
            let mut s = *first;
            while s <= *last {
                if !have.is_some_and(|h| h.contains(&s)) {
                    out.gaps.push(format!(
                        "{c} (system {system_id}): backup {id} needs WAL {first} .. {last}; {s} \
                         is missing"
                    ));
                    break;
                }
                s = crate::postgres::wal::next_segment(s);
            }
        }
        for ((system_id, _), set) in segs {
            let (below, needed): (Vec<WalSegmentName>, BTreeSet<WalSegmentName>) = {
                let (b, n): (Vec<_>, Vec<_>) = set
                    .into_iter()
                    .partition(|s| needs.below_floor(cluster, system_id, s));
                (b, n.into_iter().collect())
            };
            if let (Some(first), Some(last)) = (below.first(), below.last()) {
                out.unneeded.push(format!(
                    "{cluster} (system {system_id}): {} WAL segment(s) {first} .. {last} precede \
                     the start of every backup; no restore can use them (`dr expire` removes them)",
                    below.len()
                ));
            }
            out.gaps
                .extend(holes(&needed).into_iter().map(|(from, to)| {
                    format!("{cluster} (system {system_id}): WAL {from} .. {to} missing")
                }));
        }
    }
    Ok(out)
}

/// Runs of segments missing between the first and last of `set` (one
/// timeline), as `(first missing, last missing)`.
fn holes(set: &BTreeSet<WalSegmentName>) -> Vec<(WalSegmentName, WalSegmentName)> {
    let mut out = Vec::new();
    let mut prev: Option<WalSegmentName> = None;
    for &s in set {
        if let Some(p) = prev {
            let first = crate::postgres::wal::next_segment(p);
            if first != s {
                out.push((first, previous(s)));
            }
        }
        prev = Some(s);
    }
    out
}

fn previous(s: WalSegmentName) -> WalSegmentName {
    let per_log = (0x1_0000_0000u64 / crate::postgres::WAL_SEGMENT_SIZE) as u32;
    let (log, seg) = if s.seg == 0 {
        (s.log.wrapping_sub(1), per_log - 1)
    } else {
        (s.log, s.seg - 1)
    };
    WalSegmentName { log, seg, ..s }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(n: u32) -> WalSegmentName {
        format!("00000001000000000000{n:04X}")
            .parse()
            .expect("name")
    }

    #[test]
    fn holes_name_each_missing_run() {
        let set: BTreeSet<_> = [1, 2, 5, 6, 9].into_iter().map(seg).collect();
        let got: Vec<(String, String)> = holes(&set)
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (seg(3).to_string(), seg(4).to_string()),
                (seg(7).to_string(), seg(8).to_string())
            ]
        );
        assert!(holes(&[4, 5, 6].into_iter().map(seg).collect()).is_empty());
    }

    #[test]
    fn a_hole_across_a_log_boundary_names_the_last_segment_of_the_log() {
        let a: WalSegmentName = "0000000100000000000000FE".parse().expect("name");
        let b: WalSegmentName = "000000010000000100000001".parse().expect("name");
        let got = holes(&[a, b].into_iter().collect());
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.to_string(), "0000000100000000000000FF");
        assert_eq!(got[0].1.to_string(), "000000010000000100000000");
    }
}
