//! `dr backup rabbitmq`: export the definitions through the management API
//! and store them (zstd + age) in every region, the manifest last. Nothing
//! is written anywhere before the broker has answered with a complete export,
//! so a refused login, an unreachable URL or a certificate that does not
//! verify leave the repository untouched.

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::RabbitError;
use super::api::Api;
use super::definitions;
use super::manifest::{MANIFEST_KIND, MANIFEST_VERSION, RabbitManifest};
use crate::config::RabbitConfig;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

/// Result of one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Snapshot id.
    pub id: String,
    /// Broker name.
    pub instance: String,
    /// Point in time the snapshot represents.
    pub time: DateTime<Utc>,
    /// `rabbitmq_version`.
    pub server_version: String,
    /// `cluster_name`.
    pub cluster_name: String,
    /// The vhosts backed up (`None`: all).
    pub vhosts: Option<Vec<String>>,
    /// Items of each kind.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// Definitions bytes (JSON).
    pub size: u64,
    /// Bytes stored (compressed and encrypted).
    pub stored_size: u64,
    /// Seconds from the first request to the durable manifest.
    pub seconds: f64,
    /// Regions that hold the snapshot.
    pub regions: Vec<String>,
}

/// The definitions of the broker as backed up (the configured vhosts),
/// with its overview and the time the export was requested.
pub async fn export(
    api: &Api,
    vhosts: Option<&[String]>,
) -> Result<(super::api::Overview, DateTime<Utc>, serde_json::Value), RabbitError> {
    let overview = api.overview().await?;
    let time = Utc::now();
    let raw = api.definitions().await?;
    let defs = definitions::select(&raw, vhosts).map_err(|why| {
        RabbitError::Other(format!("{}: {why}; fix vhosts in the config", api.url()))
    })?;
    Ok((overview, time, defs))
}

/// Takes one snapshot of `instance`.
pub async fn snapshot(
    repo: &Repository,
    instance: &str,
    cfg: &RabbitConfig,
) -> Result<SnapshotReport, RabbitError> {
    let t0 = Instant::now();
    let api = Api::from_config(cfg)?;
    let (overview, time, defs) = export(&api, cfg.vhosts.as_deref()).await?;
    let body = serde_json::to_vec(&defs)
        .map_err(|e| RabbitError::Other(format!("definitions encoding: {e}")))?;
    tracing::info!(instance, url = %api.url(), bytes = body.len(), "definitions exported");

    let id = BackupId::new(time);
    repo.mark_started(&ObjectKey::RabbitStarted {
        instance: instance.to_string(),
        snapshot: id.clone(),
    })
    .await?;
    let dkey = ObjectKey::RabbitDefinitions {
        instance: instance.to_string(),
        snapshot: id.clone(),
    };
    let (enc, report) = repo.put_buffer(&dkey, Bytes::from(body), None).await?;
    let manifest = RabbitManifest {
        kind: MANIFEST_KIND.into(),
        version: MANIFEST_VERSION,
        instance: instance.to_string(),
        id: id.to_string(),
        time,
        finished: Utc::now(),
        server_version: overview.version.clone(),
        cluster_name: overview.cluster_name.clone(),
        vhosts: cfg.vhosts.clone(),
        counts: definitions::counts(&defs),
        items: definitions::names(&defs),
        definitions: enc.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let mbody = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| RabbitError::Other(format!("manifest encoding: {e}")))?;
    let mkey = ObjectKey::RabbitManifest {
        instance: instance.to_string(),
        snapshot: id.clone(),
    };
    repo.put_buffer(&mkey, Bytes::from(mbody), None).await?;
    Ok(SnapshotReport {
        id: id.to_string(),
        instance: instance.to_string(),
        time,
        server_version: overview.version,
        cluster_name: overview.cluster_name,
        vhosts: cfg.vhosts.clone(),
        counts: manifest.counts,
        size: enc.plain_size,
        stored_size: enc.stored_size,
        seconds: t0.elapsed().as_secs_f64(),
        regions: report.ok,
    })
}
