//! Snapshot manifests: written after the RDB object is durable; a snapshot
//! exists only once its manifest does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::codec::Encoded;

/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// The `kind` of every Redis manifest.
pub const MANIFEST_KIND: &str = "dr-redis-snapshot";

/// Keys in one database, from `INFO keyspace` taken with the snapshot.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DbKeys {
    /// Keys.
    pub keys: u64,
    /// Keys with a TTL (they may be gone by the time a snapshot is restored).
    pub expires: u64,
}

/// One Redis snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisManifest {
    /// Always [`MANIFEST_KIND`].
    pub kind: String,
    /// Manifest format version.
    pub version: u32,
    /// Instance name from the config.
    pub instance: String,
    /// Snapshot id.
    pub id: String,
    /// When the server accepted the sync (it forks for the snapshot then);
    /// the point in time the snapshot represents.
    pub time: DateTime<Utc>,
    /// When the RDB was durable.
    pub finished: DateTime<Utc>,
    /// `redis_version` of the server.
    pub server_version: String,
    /// Replication id and offset from `+FULLRESYNC` (absent after `SYNC`).
    pub replid: Option<String>,
    /// Replication offset the snapshot corresponds to.
    pub offset: Option<u64>,
    /// `psync` or `sync`.
    pub sync: String,
    /// True when the server streamed the RDB without a file (`$EOF:` framing).
    pub diskless: bool,
    /// RDB format version.
    pub rdb_version: u32,
    /// False when the server writes RDBs without a CRC (`rdbchecksum no`).
    pub rdb_checksummed: bool,
    /// Keys per database number (`INFO keyspace`) just before the sync request.
    pub keyspace: BTreeMap<u32, DbKeys>,
    /// The same, taken once the server had forked for the snapshot. The
    /// snapshot's true counts lie between the two unless keys were both
    /// added and removed in between.
    pub keyspace_after: Option<BTreeMap<u32, DbKeys>>,
    /// The encoded RDB object.
    pub rdb: Encoded,
    /// Seconds from connect to durable manifest.
    pub seconds: f64,
}

impl crate::repo::snapshots::SnapshotManifest for RedisManifest {
    const KIND: &'static str = MANIFEST_KIND;
    const VERSION: u32 = MANIFEST_VERSION;
    const PREFIX: &'static str = "redis";
    const BACKUP_COMMAND: &'static str = "dr backup redis";
    const ENGINE: &'static str = "Redis";
    const INSTANCE: &'static str = "instance";

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
    fn manifest_key(
        instance: &str,
        snapshot: crate::repo::layout::BackupId,
    ) -> crate::repo::layout::ObjectKey {
        crate::repo::layout::ObjectKey::RedisManifest {
            instance: instance.to_string(),
            snapshot,
        }
    }
    fn is_manifest(key: &crate::repo::layout::ObjectKey) -> bool {
        matches!(key, crate::repo::layout::ObjectKey::RedisManifest { .. })
    }
    fn data_key(
        instance: &str,
        snapshot: crate::repo::layout::BackupId,
    ) -> crate::repo::layout::ObjectKey {
        crate::repo::layout::ObjectKey::RedisRdb {
            instance: instance.to_string(),
            snapshot,
        }
    }
    fn data(&self) -> &Encoded {
        &self.rdb
    }
    fn stored_part(
        key: &crate::repo::layout::ObjectKey,
    ) -> Option<(crate::repo::layout::BackupId, &'static str)> {
        use crate::repo::layout::ObjectKey;
        match key {
            ObjectKey::RedisRdb { snapshot, .. } => Some((snapshot.clone(), "rdb")),
            ObjectKey::RedisStarted { snapshot, .. } => Some((snapshot.clone(), "marker")),
            _ => None,
        }
    }
}

impl RedisManifest {
    /// Total keys over all databases.
    pub fn total_keys(&self) -> u64 {
        self.keyspace.values().map(|d| d.keys).sum()
    }
}

/// Parses the body of `INFO keyspace` (`db0:keys=1,expires=0,avg_ttl=0`).
pub fn parse_keyspace(info: &str) -> BTreeMap<u32, DbKeys> {
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((db, rest)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(n) = db.strip_prefix("db").and_then(|n| n.parse().ok()) else {
            continue;
        };
        let mut d = DbKeys::default();
        for kv in rest.split(',') {
            match kv.split_once('=') {
                Some(("keys", v)) => d.keys = v.parse().unwrap_or(0),
                Some(("expires", v)) => d.expires = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(n, d);
    }
    out
}

/// Value of `field` in an `INFO` reply.
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyspace_and_fields_parse() {
        let info = "# Keyspace\r\ndb0:keys=1000000,expires=12,avg_ttl=0\r\ndb3:keys=5,expires=0,avg_ttl=0,subexpiry=0\r\n";
        let k = parse_keyspace(info);
        assert_eq!(
            k[&0],
            DbKeys {
                keys: 1_000_000,
                expires: 12
            }
        );
        assert_eq!(k[&3].keys, 5);
        assert_eq!(k.len(), 2);
        let s = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(info_field(s, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field(s, "redis"), None);
    }
}
