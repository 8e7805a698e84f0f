//! RabbitMQ catalog (`dr list rabbitmq`) and restore (`dr restore rabbitmq`):
//! the newest snapshot at or before a time is applied to a broker
//! (`POST /api/definitions`, then read back and compared), compared with it
//! (`--dry-run`), or written to a file for RabbitMQ's `load_definitions`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::RabbitError;
use super::api::Api;
use super::definitions::{self, KindDiff};
use super::manifest::RabbitManifest;
use crate::codec::Expect;
use crate::repo::Repository;
use crate::repo::layout::ObjectKey;

/// Snapshots of one broker, oldest first, plus manifests that could not be read.
pub type RabbitCatalog = crate::repo::snapshots::Catalog<RabbitManifest>;

/// Reads and checks the definitions of snapshot `m` (regions in order).
/// Returns the serving region and the document.
pub async fn fetch(repo: &Repository, m: &RabbitManifest) -> Result<(String, Value), RabbitError> {
    let key = ObjectKey::RabbitDefinitions {
        instance: m.instance.clone(),
        snapshot: m
            .id
            .parse()
            .map_err(|e| RabbitError::Other(format!("manifest has a bad snapshot id: {e}")))?,
    }
    .to_string();
    let (region, body) = repo
        .get_verified(&key, Expect::from_encoded(&key, &m.definitions))
        .await?;
    let defs: Value = serde_json::from_slice(&body)
        .map_err(|e| RabbitError::Other(format!("{key}: the definitions are not JSON ({e})")))?;
    Ok((region, defs))
}

/// Where a restore goes.
#[derive(Debug, Clone)]
pub enum Destination {
    /// Apply to the broker at this API (`POST /api/definitions`).
    Broker,
    /// Compare with the broker, change nothing.
    DryRun,
    /// Write the definitions to a new file (mode 0600).
    File(PathBuf),
}

/// Result of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// Snapshot restored.
    pub snapshot: String,
    /// Point in time of the snapshot.
    pub snapshot_time: DateTime<Utc>,
    /// Broker the snapshot was taken of.
    pub cluster_name: String,
    /// Region the data came from.
    pub region: String,
    /// `broker`, `dry-run` or `file`.
    pub mode: String,
    /// The broker's API (broker and dry-run).
    pub target: Option<String>,
    /// The file written (file).
    pub file: Option<String>,
    /// Items of each kind in the snapshot.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Differences between the snapshot and the broker by kind: before
    /// applying for a dry run, after applying for a restore (where
    /// `added` and `changed` must be empty).
    pub diff: std::collections::BTreeMap<String, KindDiff>,
    /// Seconds in all.
    pub seconds: f64,
}

/// The broker's definitions in the scope of snapshot `m` (its vhosts).
pub async fn live_in_scope(api: &Api, m: &RabbitManifest) -> Result<Value, RabbitError> {
    let raw = api.definitions().await?;
    Ok(definitions::scope(&raw, m.vhosts.as_deref()))
}

/// Restores snapshot `m` to `dest`; `api` is the broker for `Broker` and
/// `DryRun`.
pub async fn restore(
    repo: &Repository,
    m: &RabbitManifest,
    api: Option<&Api>,
    dest: &Destination,
) -> Result<RestoreReport, RabbitError> {
    let t0 = Instant::now();
    let need_api = || api.ok_or_else(|| RabbitError::Other("no broker to restore to".into()));
    // Reach the broker before fetching, so a bad target fails fast.
    if !matches!(dest, Destination::File(_)) {
        need_api()?.overview().await?;
    }
    if let Destination::File(p) = dest
        && p.exists()
    {
        return Err(RabbitError::Other(format!(
            "{} already exists; name a new file",
            p.display()
        )));
    }
    let (region, defs) = fetch(repo, m).await?;
    let mut report = RestoreReport {
        snapshot: m.id.clone(),
        snapshot_time: m.time,
        cluster_name: m.cluster_name.clone(),
        region,
        mode: String::new(),
        target: api.map(Api::url),
        file: None,
        counts: m.counts.clone(),
        diff: Default::default(),
        seconds: 0.0,
    };
    match dest {
        Destination::File(p) => {
            write_private(p, &defs)?;
            report.mode = "file".into();
            report.target = None;
            report.file = Some(p.display().to_string());
        }
        Destination::DryRun => {
            let api = need_api()?;
            report.mode = "dry-run".into();
            report.diff = definitions::diff(&defs, &live_in_scope(api, m).await?);
        }
        Destination::Broker => {
            let api = need_api()?;
            report.mode = "broker".into();
            api.load_definitions(&defs).await?;
            let after = live_in_scope(api, m).await?;
            report.diff = definitions::diff(&defs, &after);
            let missing: Vec<String> = report
                .diff
                .iter()
                .flat_map(|(k, d)| {
                    d.added
                        .iter()
                        .map(move |i| format!("{k} {i} is missing"))
                        .chain(d.changed.iter().map(move |c| {
                            format!("{k} {} differs in {}", c.item, c.fields.join(", "))
                        }))
                })
                .collect();
            if !missing.is_empty() {
                return Err(RabbitError::Other(format!(
                    "the broker accepted the definitions but does not hold them all afterwards: {}",
                    missing.join("; ")
                )));
            }
        }
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Writes `defs` to a new file readable by its owner only (it holds
/// password hashes).
fn write_private(path: &Path, defs: &Value) -> Result<(), RabbitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| RabbitError::Other(format!("{}: {e}", path.display()));
    let body = serde_json::to_vec_pretty(defs)
        .map_err(|e| RabbitError::Other(format!("definitions encoding: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)
}
