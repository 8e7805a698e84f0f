//! `dr repo sync`: copy what a region is missing, and replace copies that are
//! bad, from regions holding good copies. Copies are ciphertext as stored:
//! nothing is decrypted or re-encrypted, so a host without the identity can
//! run it (except `--read-data`, which decodes every copy to find bad ones).
//!
//! Data objects go first and manifests last, and a region that failed any
//! copy gets no manifests in that run: a manifest never becomes visible in a
//! region before the objects it lists.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use super::verify::{Expected, Level, Scope, Sources, expected_objects};
use crate::repo::layout::{ObjectKey, WalSuffix};
use crate::repo::{RepoError, Repository};
use crate::store::StoreError;

/// What one region received.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionSync {
    /// Region name.
    pub region: String,
    /// Objects it lacked.
    pub missing: u64,
    /// Copies it held that were bad (wrong size, or failing `--read-data`).
    pub bad: u64,
    /// Objects copied in.
    pub copied: u64,
    /// Bad copies replaced.
    pub replaced: u64,
    /// Stored bytes copied.
    pub bytes: u64,
    /// Objects deleted everywhere between the listing and their copy (by an
    /// `expire` running at the same time): not copied, and not a failure.
    pub vanished: u64,
    /// Manifests not copied because an object copy failed.
    pub manifests_held_back: u64,
    /// Failures, one line each.
    pub failed: Vec<String>,
    /// The region could not be listed.
    pub unreachable: Option<String>,
}

impl RegionSync {
    /// Counts the outcome of each copy `(key, replacing a bad copy, result)`.
    fn tally(&mut self, results: Vec<(String, bool, Result<Copied, String>)>) {
        for (k, replace, r) in results {
            match r {
                Ok(Copied::Bytes(n)) => {
                    self.bytes += n;
                    if replace {
                        self.replaced += 1;
                    } else {
                        self.copied += 1;
                    }
                }
                Ok(Copied::Vanished) => self.vanished += 1,
                Ok(Copied::AlreadyThere) => self.copied += 1,
                Err(e) => self.failed.push(format!("{k}: {e}")),
            }
        }
    }
}

/// Result of a sync.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// Distinct objects seen over all regions.
    pub objects: usize,
    /// Per target region.
    pub regions: Vec<RegionSync>,
}

impl SyncReport {
    /// True when every target region is now complete.
    pub fn complete(&self) -> bool {
        self.regions
            .iter()
            .all(|r| r.failed.is_empty() && r.unreachable.is_none() && r.manifests_held_back == 0)
    }
}

/// What the manifests say, when this host can read them: authoritative
/// sizes, and what no backup needs (not worth copying).
pub async fn manifests(repo: &Repository, all: &Sources) -> Result<Option<Expected>, RepoError> {
    if !repo.codec.can_decrypt() {
        return Ok(None);
    }
    Ok(Some(expected_objects(repo, &Scope::All, all).await?))
}

/// Brings `only` (or every region) up to date. `expected` (from the
/// manifests) gives authoritative sizes, leaves out what no manifest needs
/// (WAL below every backup's start, directories without a manifest: what
/// `expire` deletes, which a copy would only bring back) and, with
/// `read_data`, lets bad copies of the same size be found by decoding them.
pub async fn sync(
    repo: &Repository,
    only: Option<&str>,
    expected: Option<&Expected>,
    read_data: bool,
) -> Result<SyncReport, RepoError> {
    if let Some(name) = only
        && repo.regions.get_region(name).is_none()
    {
        let names: Vec<&str> = repo.regions.iter().map(|r| r.name.as_str()).collect();
        return Err(RepoError::Other(format!(
            "no region named {name:?}; configured: {}",
            names.join(", ")
        )));
    }
    let listings = repo.regions.list_each("").await;
    let mut have: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut unreachable = BTreeMap::new();
    for (region, res) in listings {
        match res {
            Ok(v) => {
                let m = v
                    .into_iter()
                    .filter(|o| !o.key.starts_with("selftest/"))
                    .map(|o| (o.key, o.size))
                    .collect();
                have.insert(region, m);
            }
            Err(e) => {
                unreachable.insert(region, e.to_string());
            }
        }
    }
    let order: Vec<String> = repo.regions.iter().map(|r| r.name.clone()).collect();
    let keys: BTreeSet<&String> = have
        .values()
        .flat_map(|m| m.keys())
        .filter(|k| !expected.is_some_and(|e| unneeded(e, k)))
        .collect();
    let authoritative: BTreeMap<&str, u64> = expected
        .map(|e| e.objects.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|o| Some((o.key.as_str(), o.expect.stored_size?)))
        .collect();
    // The right stored size of each key: from a manifest, else the size most
    // regions agree on (ties: the preferred region's).
    let mut reference: BTreeMap<String, u64> = BTreeMap::new();
    for k in &keys {
        let size = authoritative.get(k.as_str()).copied().or_else(|| {
            let mut votes: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
            for (i, r) in order.iter().enumerate() {
                if let Some(s) = have.get(r).and_then(|m| m.get(*k)) {
                    let v = votes.entry(*s).or_insert((0, i));
                    v.0 += 1;
                }
            }
            votes
                .into_iter()
                .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
                .map(|(s, _)| s)
        });
        if let Some(s) = size {
            reference.insert((*k).clone(), s);
        }
    }
    // Copies that decode badly, per region.
    let mut corrupt: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if read_data {
        let expected = expected.ok_or_else(|| {
            RepoError::Other("--read-data needs the manifests; configure identity_file".into())
        })?;
        let rep = super::verify::verify(repo, &expected.objects, Level::ReadData, None, Vec::new())
            .await?;
        for p in rep.problems.iter().filter(|p| p.kind == "corrupt") {
            corrupt
                .entry(p.region.clone())
                .or_default()
                .insert(p.key.clone());
        }
    }

    let mut out = Vec::new();
    for target in order
        .iter()
        .filter(|r| only.is_none_or(|n| n == r.as_str()))
    {
        let mut rs = RegionSync {
            region: target.clone(),
            ..RegionSync::default()
        };
        if let Some(e) = unreachable.get(target) {
            rs.unreachable = Some(e.clone());
            out.push(rs);
            continue;
        }
        let empty = BTreeMap::new();
        let mine = have.get(target).unwrap_or(&empty);
        let bad_here = corrupt.get(target);
        let mut todo: Vec<(String, bool)> = Vec::new();
        for (k, size) in &reference {
            match mine.get(k) {
                None => {
                    rs.missing += 1;
                    todo.push((k.clone(), false));
                }
                Some(s) if s != size || bad_here.is_some_and(|b| b.contains(k)) => {
                    rs.bad += 1;
                    todo.push((k.clone(), true));
                }
                Some(_) => {}
            }
        }
        let (manifests, objects): (Vec<_>, Vec<_>) = todo
            .into_iter()
            .partition(|(k, _)| k.ends_with("/manifest"));
        for batch in [objects, manifests] {
            let is_manifests = batch.first().is_some_and(|(k, _)| k.ends_with("/manifest"));
            if is_manifests && !rs.failed.is_empty() {
                rs.manifests_held_back = batch.len() as u64;
                break;
            }
            let results: Vec<(String, bool, Result<Copied, String>)> = futures::stream::iter(batch)
                .map(|(k, replace)| {
                    let sources = sources_for(&k, &order, target, &have, &reference, &corrupt);
                    async move {
                        let r = copy_one(repo, &k, target, &sources, replace).await;
                        (k, replace, r)
                    }
                })
                .buffer_unordered(4)
                .collect()
                .await;
            rs.tally(results);
        }
        out.push(rs);
    }
    Ok(SyncReport {
        objects: reference.len(),
        regions: out,
    })
}

/// Not worth copying: a WAL segment below the start of every backup of its
/// system, an object of a directory without a manifest (a running
/// backup writes every region itself; an expired one's leftovers would
/// only come back), or a streamer's journal (still growing: a copy would be
/// a snapshot never brought up to date).
fn unneeded(expected: &Expected, key: &str) -> bool {
    expected.orphan_keys.contains(key)
        || match key.parse::<ObjectKey>() {
            Ok(ObjectKey::Wal {
                suffix: WalSuffix::Journal { .. },
                ..
            }) => true,
            Ok(ObjectKey::Wal {
                cluster,
                system_id,
                segment,
                ..
            }) => expected.wal.below_floor(&cluster, system_id, &segment),
            _ => false,
        }
}

/// Regions holding a good copy of `key`, in preference order.
fn sources_for(
    key: &str,
    order: &[String],
    target: &str,
    have: &BTreeMap<String, BTreeMap<String, u64>>,
    reference: &BTreeMap<String, u64>,
    corrupt: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let want = reference.get(key);
    order
        .iter()
        .filter(|r| r.as_str() != target)
        .filter(|r| have.get(*r).and_then(|m| m.get(key)) == want)
        .filter(|r| !corrupt.get(*r).is_some_and(|b| b.contains(key)))
        .cloned()
        .collect()
}

/// How one copy ended.
enum Copied {
    /// Stored bytes written.
    Bytes(u64),
    /// Every source's copy was deleted after the listing (an `expire`
    /// running beside the sync): nothing to copy any more.
    Vanished,
    /// The target got the object after the listing (another sync, a
    /// `wal-push`): create-only puts leave it as it is.
    AlreadyThere,
}

/// Copies the stored bytes of `key` from the first source that works.
async fn copy_one(
    repo: &Repository,
    key: &str,
    target: &str,
    sources: &[String],
    replace: bool,
) -> Result<Copied, String> {
    let t = repo
        .regions
        .get_region(target)
        .ok_or_else(|| format!("no region {target}"))?;
    if sources.is_empty() {
        return Err("no region holds a good copy".into());
    }
    let mut errors = Vec::new();
    let mut gone = 0;
    for s in sources {
        let Some(src) = repo.regions.get_region(s) else {
            continue;
        };
        let body = match src.store.get(key, None).await {
            Ok(b) => b,
            Err(e) => {
                gone += usize::from(matches!(e, StoreError::NotFound { .. }));
                errors.push(format!("[{s}] {e}"));
                continue;
            }
        };
        // Puts are create-only in every store: a bad copy goes first (in a
        // versioned bucket, behind a delete marker).
        if replace {
            t.store
                .hide(key)
                .await
                .map_err(|e| format!("removing the bad copy: {e}"))?;
        }
        match t.store.put(key, body).await {
            Ok(n) => return Ok(Copied::Bytes(n)),
            Err(StoreError::AlreadyExists { .. }) if !replace => return Ok(Copied::AlreadyThere),
            Err(e) => errors.push(format!("[{s} → {target}] {e}")),
        }
    }
    if gone == sources.len() {
        return Ok(Copied::Vanished);
    }
    Err(errors.join("; "))
}
