//! Snapshot catalogs shared by the engines that store one data object per
//! snapshot under `<engine>/<instance>/snapshots/<id>/` (Redis, RabbitMQ):
//! listing and decoding the manifests, and picking the newest snapshot at or
//! before a time.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::layout::{BackupId, ObjectKey};
use super::{RepoError, Repository};
use crate::codec::Expect;
use crate::store::ObjectInfo;

/// An engine's snapshot manifest.
pub trait SnapshotManifest: DeserializeOwned + Send {
    /// The `kind` field every manifest of this engine has.
    const KIND: &'static str;
    /// The manifest format version this build reads.
    const VERSION: u32;
    /// The engine's key prefix (`redis`, `rabbitmq`).
    const PREFIX: &'static str;
    /// The engine's `dr backup` subcommand, for messages.
    const BACKUP_COMMAND: &'static str;
    /// The engine's name, for messages ("Redis").
    const ENGINE: &'static str;
    /// The word for an instance in messages ("instance", "broker").
    const INSTANCE: &'static str;

    /// `kind` as stored.
    fn kind(&self) -> &str;
    /// `version` as stored.
    fn version(&self) -> u32;
    /// The instance the snapshot is of.
    fn instance(&self) -> &str;
    /// Snapshot id.
    fn id(&self) -> &str;
    /// The point in time the snapshot represents.
    fn time(&self) -> DateTime<Utc>;

    /// Key of the manifest of `snapshot`.
    fn manifest_key(instance: &str, snapshot: BackupId) -> ObjectKey;
    /// True when `key` is a manifest of this engine.
    fn is_manifest(key: &ObjectKey) -> bool;
    /// Key of the data object of `snapshot`.
    fn data_key(instance: &str, snapshot: BackupId) -> ObjectKey;
    /// The encoded data object, as the manifest records it.
    fn data(&self) -> &crate::codec::Encoded;
    /// For a data object or running marker of this engine: its snapshot and
    /// what it is (`rdb`, `definitions`, `marker`), as retention counts them.
    fn stored_part(key: &ObjectKey) -> Option<(BackupId, &'static str)>;
}

/// Snapshots of one instance, oldest first, plus manifests that could not be read.
#[derive(Debug)]
pub struct Catalog<M> {
    /// Readable snapshots, by time.
    pub snapshots: Vec<M>,
    /// `(key, error)` of manifests that could not be read.
    pub unreadable: Vec<(String, String)>,
}

impl<M> Default for Catalog<M> {
    fn default() -> Self {
        Catalog {
            snapshots: Vec::new(),
            unreadable: Vec::new(),
        }
    }
}

impl<M: SnapshotManifest> Catalog<M> {
    /// Lists and decodes every manifest of `instance`.
    pub async fn load(repo: &Repository, instance: &str) -> Result<Catalog<M>, RepoError> {
        if !repo.codec.can_decrypt() {
            return Err(RepoError::Other(format!(
                "manifests are encrypted and listing and restoring need the private key: {}",
                repo.codec.cannot_decrypt_because()
            )));
        }
        let manifests: Vec<_> = list_objects::<M>(repo, instance)
            .await?
            .into_iter()
            .filter(|o| o.key.parse::<ObjectKey>().is_ok_and(|k| M::is_manifest(&k)))
            .collect();
        let read: Vec<_> = futures::stream::iter(manifests)
            .map(|o| async move {
                let expect = Expect {
                    key: o.key.clone(),
                    stored_size: Some(o.size),
                    ..Expect::default()
                };
                let r = match repo.get_verified(&o.key, expect).await {
                    Ok((_, b)) => parse::<M>(&o.key, &b),
                    Err(e) => Err(e.to_string()),
                };
                (o.key, r)
            })
            .buffered(8)
            .collect()
            .await;
        let mut cat = Catalog::default();
        for (key, r) in read {
            match r {
                Ok(m) if m.instance() == instance => cat.snapshots.push(m),
                Ok(m) => cat.unreadable.push((
                    key,
                    format!(
                        "manifest is for {} {:?}, not {instance:?}",
                        M::INSTANCE,
                        m.instance()
                    ),
                )),
                Err(e) => cat.unreadable.push((key, e)),
            }
        }
        cat.snapshots
            .sort_by(|a, b| (a.time(), a.id()).cmp(&(b.time(), b.id())));
        Ok(cat)
    }

    /// The newest snapshot at or before `target` (`None`: the newest).
    pub fn pick(&self, target: Option<DateTime<Utc>>) -> Result<&M, RepoError> {
        let (Some(first), Some(last)) = (self.snapshots.first(), self.snapshots.last()) else {
            return Err(RepoError::Other(format!(
                "no snapshots in the repository; take one with `{}`",
                M::BACKUP_COMMAND
            )));
        };
        let Some(t) = target else { return Ok(last) };
        self.snapshots
            .iter()
            .rev()
            .find(|m| m.time() <= t)
            .ok_or_else(|| {
                RepoError::Other(format!(
                    "target {} is before the first snapshot ({}); snapshots cover {} to {} ({} in all)",
                    fmt_time(t),
                    fmt_time(first.time()),
                    fmt_time(first.time()),
                    fmt_time(last.time()),
                    self.snapshots.len()
                ))
            })
    }

    /// Manifest keys of the readable snapshots, with their snapshots.
    pub fn manifest_keys(&self, instance: &str) -> Vec<(String, &M)> {
        self.snapshots
            .iter()
            .filter_map(|m| {
                let id = m.id().parse().ok()?;
                Some((M::manifest_key(instance, id).to_string(), m))
            })
            .collect()
    }
}

/// Every object of `instance` under the engine's prefix, listed.
pub async fn list_objects<M: SnapshotManifest>(
    repo: &Repository,
    instance: &str,
) -> Result<Vec<ObjectInfo>, RepoError> {
    let (_, objects) = repo
        .regions
        .list(&format!("{}/{instance}/snapshots/", M::PREFIX))
        .await?;
    Ok(objects)
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn parse<M: SnapshotManifest>(key: &str, b: &[u8]) -> Result<M, String> {
    let m: M = serde_json::from_slice(b)
        .map_err(|e| format!("{key}: not a dr {} manifest ({e})", M::ENGINE))?;
    if m.kind() != M::KIND || m.version() != M::VERSION {
        return Err(format!(
            "{key}: manifest kind {:?} version {} is not supported by this dr",
            m.kind(),
            m.version()
        ));
    }
    Ok(m)
}
