//! Base-backup manifests: written last, encrypted like every other object, and
//! the only thing that makes a backup exist.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Lsn;
use crate::codec::{Encoded, Expect, PieceHash};
use crate::repo::layout::{BackupId, BackupSummary, ObjectKey};

/// Manifest format version. Version 2 records data objects with
/// [`PIECES_HASHED`] instead of a whole-object hash; version 1 manifests
/// are still read.
pub const MANIFEST_VERSION: u32 = 2;

/// The `plain_hash` of a data object checked by the hashes of its extents
/// (each block's BLAKE3, computed once while backing up) rather than by a
/// hash of the whole object. Were it taken for a whole-object hash, every
/// read would fail as corrupt: never silently unchecked.
pub const PIECES_HASHED: &str = "extents";

/// Per data object (owner backup id, number), the extents a manifest
/// reads from it.
pub type PieceIndex = std::collections::HashMap<(String, u32), Vec<PieceHash>>;

/// A PostgreSQL base backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgManifest {
    /// Always `"dr-pg-backup"`.
    pub kind: String,
    /// Manifest format version.
    pub version: u32,
    /// Cluster name from the config.
    pub cluster: String,
    /// Database system identifier.
    pub system_id: u64,
    /// Backup id.
    pub id: BackupIdStr,
    /// `server_version_num`.
    pub server_version: u32,
    /// When `pg_backup_start` returned.
    pub start_time: DateTime<Utc>,
    /// When `pg_backup_stop` returned (the earliest restorable time).
    pub stop_time: DateTime<Utc>,
    /// WAL position at start (replay begins at its checkpoint).
    pub start_lsn: Lsn,
    /// WAL position at stop (consistency is reached here).
    pub stop_lsn: Lsn,
    /// Timeline at start.
    pub timeline: u32,
    /// First WAL segment needed.
    pub start_segment: String,
    /// Last WAL segment needed for consistency.
    pub stop_segment: String,
    /// WAL segment size in bytes.
    pub wal_segment_size: u64,
    /// Content of `backup_label` from `pg_backup_stop`.
    pub backup_label: String,
    /// Content of `tablespace_map` (empty when there are no tablespaces).
    pub tablespace_map: String,
    /// Directories to create, relative to PGDATA.
    pub dirs: Vec<DirEntry>,
    /// Files and where their bytes are.
    pub files: Vec<FileEntry>,
    /// Data objects (packs of file extents), by number.
    pub objects: Vec<DataObject>,
    /// Plaintext bytes of all files.
    pub size: u64,
    /// Bytes stored for this backup.
    pub stored_size: u64,
    /// Seconds the backup took.
    pub duration_seconds: f64,
    /// Pages that failed checksum verification while reading (path, block).
    pub checksum_failures: Vec<(String, u64)>,
    /// User tablespaces; their files are under `pg_tblspc/<oid>/` in `files`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tablespaces: Vec<Tablespace>,
    /// The server's own `backup_manifest` (remote mode), stored like a file
    /// but never restored into PGDATA: kept for `pg_verifybackup` and audits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_manifest: Option<FileEntry>,
}

/// A tablespace outside PGDATA at backup time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tablespace {
    /// Its OID (the name of its link in `pg_tblspc`).
    pub oid: u32,
    /// `spcname`.
    pub name: String,
    /// Where it lived on the backed-up host.
    pub location: String,
}

/// A backup id kept as its string form in JSON.
pub type BackupIdStr = String;

/// A directory in PGDATA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirEntry {
    /// Path relative to PGDATA.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
}

/// A regular file in PGDATA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path relative to PGDATA.
    pub path: String,
    /// Bytes copied.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Where the file's bytes are, in order.
    pub extents: Vec<Extent>,
}

/// One block of a file (at most [`BLOCK_SIZE`] bytes, page-aligned) and where
/// its bytes are: in a data object of this backup, or — when unchanged since
/// the previous backup — in an object an earlier backup stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    /// Backup that stored the object (`None`: this backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Data object number within that backup.
    pub object: u32,
    /// Offset inside the object's plaintext.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// First 16 bytes of the block's BLAKE3, hex.
    pub hash: String,
}

/// Size of the blocks files are cut into for block-incremental backups
/// (16 PostgreSQL pages).
pub const BLOCK_SIZE: usize = 128 << 10;

/// A data object this backup's files use: its own, or an earlier backup's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataObject {
    /// Backup that stored it (`None`: this backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Number within that backup (key suffix).
    pub n: u32,
    /// Sizes and plaintext hash.
    pub encoded: Encoded,
}

impl PgManifest {
    /// The parsed backup id.
    pub fn backup_id(&self) -> Option<BackupId> {
        self.id.parse().ok()
    }

    /// The backup that owns `backup` (`None` = this one), as an id.
    pub fn owner(&self, backup: &Option<String>) -> Option<BackupId> {
        backup.as_deref().unwrap_or(&self.id).parse().ok()
    }

    /// When the oldest backup whose data objects this one references was
    /// taken (its own time when it references none): how far back a
    /// block-incremental chain reaches.
    pub fn base_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.objects
            .iter()
            .filter_map(|o| self.owner(&o.backup))
            .chain(self.backup_id())
            .map(|b| b.time())
            .min()
    }

    /// The extents of this manifest's files, per data object they point
    /// into (owner backup id, number): the ranges a reader checks, gathered
    /// in one pass rather than once per object.
    pub fn piece_index(&self) -> PieceIndex {
        let mut index = PieceIndex::new();
        for e in self
            .files
            .iter()
            .chain(&self.server_manifest)
            .flat_map(|f| &f.extents)
        {
            let owner = e.backup.clone().unwrap_or_else(|| self.id.clone());
            index.entry((owner, e.object)).or_default().push(PieceHash {
                offset: e.offset,
                len: e.len,
                hash: e.hash.clone(),
            });
        }
        index
    }

    /// What reading data object `o` under `key` must check: its recorded
    /// whole-object hash, or for a [`PIECES_HASHED`] object the hash of
    /// every extent of this manifest inside it.
    /// `index` is this manifest's [`PgManifest::piece_index`].
    pub fn expect_object(
        &self,
        key: &str,
        o: &DataObject,
        index: &PieceIndex,
    ) -> Result<Expect, String> {
        let mut expect = Expect::from_encoded(key, &o.encoded);
        if o.encoded.plain_hash == PIECES_HASHED {
            expect.plain_hash = None;
            let owner = o.backup.clone().unwrap_or_else(|| self.id.clone());
            let pieces = index.get(&(owner, o.n)).cloned().unwrap_or_default();
            let pieces = crate::codec::normalize_pieces(pieces)
                .map_err(|e| format!("manifest of backup {}: object {key}: {e}", self.id))?;
            expect.pieces = Some(pieces);
        }
        Ok(expect)
    }

    /// What the summary written after this manifest says of it; `None` when
    /// its id or segments do not parse (the catalog then reads the manifest).
    pub fn summary(&self) -> Option<BackupSummary> {
        Some(BackupSummary {
            backup: self.backup_id()?,
            timeline: self.timeline,
            start_lsn: self.start_lsn.0,
            stop_lsn: self.stop_lsn.0,
            start_segment: self.start_segment.parse().ok()?,
            stop_segment: self.stop_segment.parse().ok()?,
            start_time: self.start_time,
            stop_time: self.stop_time,
            sizes: Some(crate::repo::layout::BackupSizes {
                size: self.size,
                stored_size: self.stored_size,
                files: self.files.len() as u64,
            }),
        })
    }

    /// The key of that summary.
    pub fn summary_key(&self) -> Option<ObjectKey> {
        Some(ObjectKey::PgSummary {
            cluster: self.cluster.clone(),
            system_id: self.system_id,
            summary: self.summary()?,
        })
    }

    /// Stored bytes this backup added (objects it owns).
    pub fn own_stored_size(&self) -> u64 {
        self.objects
            .iter()
            .filter(|o| o.backup.is_none())
            .fold(0u64, |sum, o| sum.saturating_add(o.encoded.stored_size))
    }
}

/// Checks a manifest path: relative, no `..`, no empty or absolute components.
/// Restore refuses manifests that try to escape the target directory.
pub fn safe_relative_path(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_escapes_are_refused() {
        assert!(safe_relative_path("base/1/1234"));
        for bad in ["", "/etc/passwd", "../x", "base/../../x", "a//b", "./a"] {
            assert!(!safe_relative_path(bad), "{bad}");
        }
    }
}

/// Manifests written and read back: any manifest (any strings, sizes,
/// times, extents) reads back to the same value, so what a backup records
/// is what a restore gets.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn encoded() -> impl Strategy<Value = Encoded> {
        (any::<u64>(), "[0-9a-f]{64}", any::<u64>()).prop_map(
            |(plain_size, plain_hash, stored_size)| Encoded {
                plain_size,
                plain_hash,
                stored_size,
            },
        )
    }

    fn time() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..4_102_444_800, 0u32..1_000_000_000)
            .prop_map(|(s, ns)| DateTime::from_timestamp(s, ns).expect("time"))
    }

    fn file() -> impl Strategy<Value = FileEntry> {
        (
            ".{0,30}",
            any::<u64>(),
            any::<u32>(),
            prop::collection::vec(
                (
                    prop::option::of(".{0,24}"),
                    any::<u32>(),
                    any::<u64>(),
                    any::<u64>(),
                    "[0-9a-f]{64}",
                )
                    .prop_map(|(backup, object, offset, len, hash)| Extent {
                        backup,
                        object,
                        offset,
                        len,
                        hash,
                    }),
                0..4,
            ),
        )
            .prop_map(|(path, size, mode, extents)| FileEntry {
                path,
                size,
                mode,
                extents,
            })
    }

    prop_compose! {
        fn manifest()(
            (cluster, system_id, id, server_version) in (".{0,20}", any::<u64>(), ".{0,24}", any::<u32>()),
            (start_time, stop_time, start_lsn, stop_lsn, timeline) in (time(), time(), any::<u64>(), any::<u64>(), any::<u32>()),
            (start_segment, stop_segment, backup_label, tablespace_map) in (".{0,24}", ".{0,24}", ".{0,80}", ".{0,40}"),
            dirs in prop::collection::vec((".{0,30}", any::<u32>()).prop_map(|(path, mode)| DirEntry { path, mode }), 0..4),
            files in prop::collection::vec(file(), 0..4),
            objects in prop::collection::vec(
                (prop::option::of(".{0,24}"), any::<u32>(), encoded())
                    .prop_map(|(backup, n, encoded)| DataObject { backup, n, encoded }),
                0..4,
            ),
            (size, stored_size, duration_seconds) in (any::<u64>(), any::<u64>(), 0f64..1e9),
            checksum_failures in prop::collection::vec((".{0,20}", any::<u64>()), 0..3),
            tablespaces in prop::collection::vec(
                (any::<u32>(), ".{0,12}", ".{0,30}").prop_map(|(oid, name, location)| Tablespace { oid, name, location }),
                0..3,
            ),
            server_manifest in prop::option::of(file()),
        ) -> PgManifest {
            PgManifest {
                kind: "dr-pg-backup".into(),
                version: MANIFEST_VERSION,
                cluster,
                system_id,
                id,
                server_version,
                start_time,
                stop_time,
                start_lsn: Lsn(start_lsn),
                stop_lsn: Lsn(stop_lsn),
                timeline,
                start_segment,
                stop_segment,
                wal_segment_size: 16 << 20,
                backup_label,
                tablespace_map,
                dirs,
                files,
                objects,
                size,
                stored_size,
                duration_seconds,
                checksum_failures,
                tablespaces,
                server_manifest,
            }
        }
    }

    /// Sizes from a damaged or foreign manifest add up without overflow.
    #[test]
    fn own_stored_size_saturates() {
        let mut m: PgManifest = serde_json::from_value(serde_json::json!({
            "kind": "dr-pg-backup", "version": 1, "cluster": "c", "system_id": 1,
            "id": "x", "server_version": 1, "start_time": "2026-01-01T00:00:00Z",
            "stop_time": "2026-01-01T00:00:00Z", "start_lsn": "0/0", "stop_lsn": "0/0",
            "timeline": 1, "start_segment": "", "stop_segment": "", "wal_segment_size": 1,
            "backup_label": "", "tablespace_map": "", "dirs": [], "files": [], "objects": [],
            "size": 0, "stored_size": 0, "duration_seconds": 0.0, "checksum_failures": []
        }))
        .expect("manifest");
        let object = DataObject {
            backup: None,
            n: 0,
            encoded: Encoded {
                plain_size: 0,
                plain_hash: String::new(),
                stored_size: u64::MAX,
            },
        };
        m.objects = vec![object.clone(), object];
        assert_eq!(m.own_stored_size(), u64::MAX);
        // Found by the round-trip property: exact floats.
        m.duration_seconds = 212_228_279.272_909_58;
        let back: PgManifest =
            serde_json::from_slice(&serde_json::to_vec(&m).expect("json")).expect("back");
        assert_eq!(
            back.duration_seconds.to_bits(),
            m.duration_seconds.to_bits()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn manifests_round_trip(m in manifest()) {
            let once = serde_json::to_vec(&m).expect("serialize");
            let back: PgManifest = serde_json::from_slice(&once).expect("reads back");
            // Debug shows every field: equal Debug, equal manifests.
            prop_assert_eq!(format!("{back:?}"), format!("{m:?}"));
            prop_assert_eq!(serde_json::to_vec(&back).expect("serialize"), once);
        }
    }
}
