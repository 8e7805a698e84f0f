//! Snapshot manifests: written after the definitions object is durable; a
//! snapshot exists only once its manifest does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::codec::Encoded;
use crate::repo::layout::{BackupId, ObjectKey};

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// The `kind` of every RabbitMQ manifest.
pub const MANIFEST_KIND: &str = "dr-rabbitmq-snapshot";

/// One RabbitMQ definitions snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitManifest {
    /// Always [`MANIFEST_KIND`].
    pub kind: String,
    /// Manifest format version.
    pub version: u32,
    /// Broker name from the config.
    pub instance: String,
    /// Snapshot id.
    pub id: String,
    /// When the export was requested: the point in time the snapshot represents.
    pub time: DateTime<Utc>,
    /// When the definitions were durable.
    pub finished: DateTime<Utc>,
    /// `rabbitmq_version` of the broker.
    pub server_version: String,
    /// `cluster_name` of the broker.
    pub cluster_name: String,
    /// The vhosts the snapshot holds (`None`: the whole broker).
    pub vhosts: Option<Vec<String>>,
    /// Items of each kind (`users`, `vhosts`, `queues`, …).
    pub counts: BTreeMap<String, u64>,
    /// Identities of the items of each kind, for checks after a restore.
    pub items: BTreeMap<String, Vec<String>>,
    /// The encoded definitions (JSON).
    pub definitions: Encoded,
    /// Seconds from the first request to the durable manifest.
    pub seconds: f64,
}

impl crate::repo::snapshots::SnapshotManifest for RabbitManifest {
    const KIND: &'static str = MANIFEST_KIND;
    const VERSION: u32 = MANIFEST_VERSION;
    const PREFIX: &'static str = "rabbitmq";
    const BACKUP_COMMAND: &'static str = "dr backup rabbitmq";
    const ENGINE: &'static str = "RabbitMQ";
    const INSTANCE: &'static str = "broker";

    fn kind(&self) -> &str {
        &self.kind
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn id(&self) -> &str {
        &self.id
    }
    fn time(&self) -> DateTime<Utc> {
        self.time
    }
    fn manifest_key(instance: &str, snapshot: BackupId) -> ObjectKey {
        ObjectKey::RabbitManifest {
            instance: instance.to_string(),
            snapshot,
        }
    }
    fn is_manifest(key: &ObjectKey) -> bool {
        matches!(key, ObjectKey::RabbitManifest { .. })
    }
    fn data_key(instance: &str, snapshot: BackupId) -> ObjectKey {
        ObjectKey::RabbitDefinitions {
            instance: instance.to_string(),
            snapshot,
        }
    }
    fn data(&self) -> &Encoded {
        &self.definitions
    }
    fn stored_part(key: &ObjectKey) -> Option<(BackupId, &'static str)> {
        match key {
            ObjectKey::RabbitDefinitions { snapshot, .. } => {
                Some((snapshot.clone(), "definitions"))
            }
            ObjectKey::RabbitStarted { snapshot, .. } => Some((snapshot.clone(), "marker")),
            _ => None,
        }
    }
}

impl RabbitManifest {
    /// Count of one kind (0 when absent).
    pub fn count(&self, kind: &str) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }
}
