//! `dr verify --list | --read-data`: does every region hold every object the
//! manifests and the WAL archive need, with the right size (`--list`), and does
//! every copy decrypt and hash to what was written (`--read-data`)?

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;
use serde::Serialize;

use super::coverage::WalNeeds;
use crate::codec::Expect;
use crate::repo::layout::{ObjectKey, WalSuffix};
use crate::repo::snapshots::{Catalog, SnapshotManifest, list_objects};
use crate::repo::{RepoError, Repository};
use crate::store::ObjectInfo;

/// How deep to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    /// Existence and stored size.
    List,
    /// Decode every copy and check its hash.
    ReadData,
}

/// Which sources to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every configured PostgreSQL cluster, Redis instance and RabbitMQ broker.
    All,
    /// PostgreSQL clusters (one, or all configured).
    Pg(Vec<String>),
    /// Redis instances (one, or all configured).
    Redis(Vec<String>),
    /// RabbitMQ brokers (one, or all configured).
    Rabbitmq(Vec<String>),
}

/// Every configured source, by kind: what [`Scope::All`] covers.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// PostgreSQL clusters.
    pub pg: Vec<String>,
    /// Redis instances.
    pub redis: Vec<String>,
    /// RabbitMQ brokers.
    pub rabbitmq: Vec<String>,
}

impl Sources {
    /// The sources `cfg` configures.
    pub fn of(cfg: &crate::config::Config) -> Sources {
        Sources {
            pg: cfg.postgres.keys().cloned().collect(),
            redis: cfg.redis.keys().cloned().collect(),
            rabbitmq: cfg.rabbitmq.keys().cloned().collect(),
        }
    }
}

/// One object the repository must hold.
#[derive(Debug, Clone)]
pub struct ExpectedObject {
    /// Object key.
    pub key: String,
    /// What a correct copy looks like (stored size, plaintext hash and size
    /// where known).
    pub expect: Expect,
}

/// A copy that is missing or bad.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Region holding the bad copy (or lacking it).
    pub region: String,
    /// Object key.
    pub key: String,
    /// `missing`, `corrupt` or `unreadable`.
    pub kind: String,
    /// What was seen.
    pub detail: String,
}

/// Per-region tally.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionTally {
    /// Region name.
    pub region: String,
    /// Good copies.
    pub ok: u64,
    /// Objects not there.
    pub missing: u64,
    /// Copies with the wrong size or content.
    pub corrupt: u64,
    /// Stored bytes checked.
    pub bytes: u64,
    /// The region could not be listed at all.
    pub unreachable: Option<String>,
}

/// Result of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Level used.
    pub level: Level,
    /// Objects expected in every region.
    pub objects: usize,
    /// Per region.
    pub regions: Vec<RegionTally>,
    /// Every problem found.
    pub problems: Vec<Problem>,
    /// Manifests that could not be read from any region.
    pub unreadable_manifests: Vec<(String, String)>,
    /// Segments missing in every region between archived ones of the same
    /// timeline, or among a backup's own: replay cannot pass them.
    pub wal_gaps: Vec<String>,
    /// Archived WAL below the start of every backup (not a problem).
    pub unneeded_wal: Vec<String>,
    /// Backup and snapshot directories no manifest accounts for: running,
    /// interrupted or expired (not a problem; `expire` removes them once
    /// older than `[retention] orphan_age`).
    pub orphans: Vec<String>,
}

impl VerifyReport {
    /// True when every region holds a good copy of everything.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
            && self.unreadable_manifests.is_empty()
            && self.wal_gaps.is_empty()
            && self.regions.iter().all(|r| r.unreachable.is_none())
    }
}

/// What the manifests of a scope say the repository must hold.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Objects every region must hold.
    pub objects: Vec<ExpectedObject>,
    /// `(key, error)` of manifests that could not be read.
    pub unreadable: Vec<(String, String)>,
    /// The WAL the PostgreSQL backups need.
    pub wal: WalNeeds,
    /// Directories no manifest accounts for, one line each.
    pub orphans: Vec<String>,
    /// The objects of those directories.
    pub orphan_keys: BTreeSet<String>,
}

/// Collects the objects a scope needs: manifests, the data objects they list,
/// WAL from the oldest backup's start and timeline histories, Redis and
/// RabbitMQ snapshots. Needs the identity (manifests are encrypted).
pub async fn expected_objects(
    repo: &Repository,
    scope: &Scope,
    all: &Sources,
) -> Result<Expected, RepoError> {
    if !repo.codec.can_decrypt() {
        return Err(RepoError::Other(format!(
            "verify needs the private key: which data objects a backup needs, and their sizes, \
             are recorded only in its encrypted manifest, so without it a missing object cannot \
             be noticed ({}). Run `dr verify` where identity_file is set; on this host \
             `dr list` shows backups and WAL ranges by name and `dr repo sync` compares the \
             regions with each other",
            repo.codec.cannot_decrypt_because()
        )));
    }
    let none = Vec::new;
    let (pg, redis, rabbitmq) = match scope {
        Scope::All => (all.pg.clone(), all.redis.clone(), all.rabbitmq.clone()),
        Scope::Pg(v) => (v.clone(), none(), none()),
        Scope::Redis(v) => (none(), v.clone(), none()),
        Scope::Rabbitmq(v) => (none(), none(), v.clone()),
    };
    let mut out = BTreeMap::new();
    let mut found = Expected::default();
    for cluster in &pg {
        add_pg(repo, cluster, &mut out, &mut found).await?;
    }
    for instance in &redis {
        add_snapshots::<crate::redis::manifest::RedisManifest>(
            repo, instance, &mut out, &mut found,
        )
        .await?;
    }
    for broker in &rabbitmq {
        add_snapshots::<crate::rabbitmq::manifest::RabbitManifest>(
            repo, broker, &mut out, &mut found,
        )
        .await?;
    }
    found.objects = out.into_values().collect();
    Ok(found)
}

/// One cluster's manifests, the data objects they list, the WAL from the
/// oldest backup's start, and timeline histories; then the backup
/// directories none of them accounts for.
async fn add_pg(
    repo: &Repository,
    cluster: &str,
    out: &mut BTreeMap<String, ExpectedObject>,
    found: &mut Expected,
) -> Result<(), RepoError> {
    let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
    let keys: Vec<(ObjectKey, &ObjectInfo)> = objects
        .iter()
        .filter_map(|o| Some((o.key.parse::<ObjectKey>().ok()?, o)))
        .collect();
    let mut with_manifest = BTreeSet::new();
    for (k, o) in &keys {
        let ObjectKey::PgManifest {
            system_id, backup, ..
        } = k
        else {
            continue;
        };
        with_manifest.insert(backup.to_string());
        let m = match crate::postgres::catalog::read_manifest(repo, &o.key, o.size).await {
            Ok(m) => m,
            Err(e) => {
                found.unreadable.push((o.key.clone(), e.to_string()));
                continue;
            }
        };
        add(out, &o.key, stored(&o.key, o.size));
        found.wal.add(
            cluster,
            *system_id,
            &m.id.to_string(),
            &m.start_segment,
            &m.stop_segment,
        );
        let index = m.piece_index();
        for d in &m.objects {
            let backup = d.backup.clone().unwrap_or_else(|| m.id.to_string());
            let Ok(backup) = backup.parse() else {
                found
                    .unreadable
                    .push((o.key.clone(), format!("bad backup id {backup:?}")));
                continue;
            };
            let key = ObjectKey::PgData {
                cluster: cluster.to_string(),
                system_id: *system_id,
                backup,
                n: d.n,
            }
            .to_string();
            match m.expect_object(&key, d, &index) {
                Ok(e) => add(out, &key, e),
                Err(e) => found.unreadable.push((o.key.clone(), e)),
            }
        }
    }
    let mut loose: BTreeMap<String, u64> = BTreeMap::new();
    for (k, o) in &keys {
        match k {
            // A journal is appended to while its segment fills and has no
            // content hash: fetches read it, and it goes once the segment
            // is stored whole.
            ObjectKey::Wal {
                suffix: WalSuffix::Journal { .. },
                ..
            } => {}
            ObjectKey::Wal {
                system_id,
                segment,
                hash,
                ..
            } if !found.wal.below_floor(cluster, *system_id, segment) => {
                let mut e = stored(&o.key, o.size);
                e.plain_hash = Some(hash.clone());
                add(out, &o.key, e);
            }
            ObjectKey::TimelineHistory { hash, .. } => {
                let mut e = stored(&o.key, o.size);
                e.plain_hash = Some(hash.clone());
                add(out, &o.key, e);
            }
            ObjectKey::PgData { backup, .. } | ObjectKey::PgStarted { backup, .. }
                if !out.contains_key(&o.key) && !with_manifest.contains(&backup.to_string()) =>
            {
                *loose.entry(backup.to_string()).or_default() += 1;
                found.orphan_keys.insert(o.key.clone());
            }
            _ => {}
        }
    }
    found.orphans.extend(loose.into_iter().map(|(id, n)| {
        format!(
            "postgres {cluster}: backup {id}: {n} object(s) and no manifest (running, \
             interrupted or expired)"
        )
    }));
    Ok(())
}

/// The manifests of one snapshot source (as stored) and the data objects
/// they record (with hash and sizes).
async fn add_snapshots<M: SnapshotManifest>(
    repo: &Repository,
    instance: &str,
    out: &mut BTreeMap<String, ExpectedObject>,
    found: &mut Expected,
) -> Result<(), RepoError> {
    let cat = Catalog::<M>::load(repo, instance).await?;
    found.unreadable.extend(cat.unreadable.iter().cloned());
    let objects = list_objects::<M>(repo, instance).await?;
    let sizes: BTreeMap<&str, u64> = objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
    for (mkey, m) in cat.manifest_keys(instance) {
        if let Some(size) = sizes.get(mkey.as_str()) {
            add(out, &mkey, stored(&mkey, *size));
        }
        let Ok(id) = m.id().parse() else { continue };
        let dkey = M::data_key(instance, id).to_string();
        let e = Expect::from_encoded(&dkey, m.data());
        add(out, &dkey, e);
    }
    let with_manifest: BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| o.key.strip_suffix("/manifest")?.rsplit('/').next())
        .collect();
    let mut loose: BTreeMap<String, u64> = BTreeMap::new();
    for o in &objects {
        let Some((id, _)) = o
            .key
            .parse::<ObjectKey>()
            .ok()
            .and_then(|k| M::stored_part(&k))
        else {
            continue;
        };
        let id = id.to_string();
        if !out.contains_key(&o.key) && !with_manifest.contains(id.as_str()) {
            *loose.entry(id).or_default() += 1;
            found.orphan_keys.insert(o.key.clone());
        }
    }
    found.orphans.extend(loose.into_iter().map(|(id, n)| {
        format!(
            "{} {instance}: snapshot {id}: {n} object(s) and no manifest (running, interrupted \
             or expired)",
            M::PREFIX
        )
    }));
    Ok(())
}

fn stored(key: &str, size: u64) -> Expect {
    Expect {
        key: key.to_string(),
        stored_size: Some(size),
        ..Expect::default()
    }
}

fn add(out: &mut BTreeMap<String, ExpectedObject>, key: &str, expect: Expect) {
    let entry = out.entry(key.to_string()).or_insert(ExpectedObject {
        key: key.to_string(),
        expect: expect.clone(),
    });
    // An object checked by pieces: every manifest that uses it adds the
    // extents it reads (the owner's cover it whole; it may be expired).
    if let (Some(have), Some(more)) = (&entry.expect.pieces, &expect.pieces)
        && have != more
    {
        let union = have.iter().chain(more.iter()).cloned().collect();
        if let Ok(p) = crate::codec::normalize_pieces(union) {
            entry.expect.pieces = Some(p);
        }
    }
}

/// Checks `expected` in every region (or only `only`).
pub async fn verify(
    repo: &Repository,
    expected: &[ExpectedObject],
    level: Level,
    only: Option<&str>,
    unreadable_manifests: Vec<(String, String)>,
) -> Result<VerifyReport, RepoError> {
    if let Some(name) = only
        && repo.regions.get_region(name).is_none()
    {
        let names: Vec<&str> = repo.regions.iter().map(|r| r.name.as_str()).collect();
        return Err(RepoError::Other(format!(
            "no region named {name:?}; configured: {}",
            names.join(", ")
        )));
    }
    let mut regions = Vec::new();
    let mut problems = Vec::new();
    for r in repo
        .regions
        .iter()
        .filter(|r| only.is_none_or(|n| n == r.name))
    {
        let mut t = RegionTally {
            region: r.name.clone(),
            ..RegionTally::default()
        };
        let present = match list_region(repo, &r.name, expected).await {
            Ok(p) => p,
            Err(e) => {
                t.unreachable = Some(e);
                regions.push(t);
                continue;
            }
        };
        let mut to_read = Vec::new();
        for (i, o) in expected.iter().enumerate() {
            match (present.get(&o.key), o.expect.stored_size) {
                (None, _) => {
                    t.missing += 1;
                    problems.push(problem(
                        &r.name,
                        &o.key,
                        "missing",
                        "not in this region".into(),
                    ));
                }
                (Some(&have), Some(want)) if have != want => {
                    t.corrupt += 1;
                    problems.push(problem(
                        &r.name,
                        &o.key,
                        "corrupt",
                        format!("stored size {have} bytes, expected {want}"),
                    ));
                }
                (Some(&have), _) => {
                    t.bytes += have;
                    if level == Level::ReadData {
                        to_read.push(i);
                    } else {
                        t.ok += 1;
                    }
                }
            }
        }
        // Indices, not references, so the stream is provably `Send`.
        let results: Vec<(String, Result<(), String>)> = futures::stream::iter(to_read)
            .map(|i| async move {
                let o = &expected[i];
                let res = read_copy(repo, &r.name, o).await;
                (o.key.clone(), res)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (key, res) in results {
            match res {
                Ok(()) => t.ok += 1,
                Err(e) => {
                    t.corrupt += 1;
                    problems.push(problem(&r.name, &key, "corrupt", e));
                }
            }
        }
        regions.push(t);
    }
    problems.sort_by(|a, b| (&a.key, &a.region).cmp(&(&b.key, &b.region)));
    Ok(VerifyReport {
        level,
        objects: expected.len(),
        regions,
        problems,
        unreadable_manifests,
        wal_gaps: Vec::new(),
        unneeded_wal: Vec::new(),
        orphans: Vec::new(),
    })
}

fn problem(region: &str, key: &str, kind: &str, detail: String) -> Problem {
    Problem {
        region: region.to_string(),
        key: key.to_string(),
        kind: kind.to_string(),
        detail,
    }
}

/// Key → stored size in one region, for the top-level prefixes `expected` uses.
pub(crate) async fn list_region(
    repo: &Repository,
    region: &str,
    expected: &[ExpectedObject],
) -> Result<BTreeMap<String, u64>, String> {
    let Some(r) = repo.regions.get_region(region) else {
        return Err(format!("no region {region}"));
    };
    let mut prefixes: Vec<String> = expected
        .iter()
        .filter_map(|o| {
            let mut parts = o.key.splitn(3, '/');
            Some(format!("{}/{}/", parts.next()?, parts.next()?))
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    let mut out = BTreeMap::new();
    for p in prefixes {
        for o in r.store.list(&p).await.map_err(|e| e.to_string())? {
            out.insert(o.key, o.size);
        }
    }
    Ok(out)
}

/// Decodes one region's copy and checks it against the expectation.
async fn read_copy(repo: &Repository, region: &str, o: &ExpectedObject) -> Result<(), String> {
    let key: ObjectKey = o.key.parse().map_err(|e| format!("{e}"))?;
    let mut s = repo
        .get_decoded_from(region, &key, o.expect.clone())
        .await
        .map_err(|e| e.to_string())?;
    while let Some(chunk) = s.next().await {
        chunk.map_err(|e| crate::codec::into_codec_error(e, &o.key).to_string())?;
    }
    Ok(())
}
