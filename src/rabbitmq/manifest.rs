//! Snapshot manifests: written after the definitions object is durable; a
//! snapshot exists only once its manifest does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::codec::Encoded;

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

impl RabbitManifest {
    /// Count of one kind (0 when absent).
    pub fn count(&self, kind: &str) -> u64 {
        self.counts.get(kind).copied().unwrap_or(0)
    }
}
