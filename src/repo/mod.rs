//! The repository: regions + codec + the `dr-repo.json` descriptor.

mod journal;
pub mod layout;
pub mod retention;
pub mod snapshots;

pub use journal::{JournalWorker, Journals, WalJournal};

use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::codec::{Codec, CodecError, Encoded, Expect};
use crate::config::Config;
use crate::keys;
use crate::store::{ByteStream, Regions, RegionsError, StoreError};
use layout::{BackupId, ObjectKey};

/// The repository format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// `dr-repo.json`: written once per region by `dr repo init`, never rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoInfo {
    /// Always `"dr-repository"`.
    pub format: String,
    /// Format version; unknown versions are refused.
    pub version: u32,
    /// Random repository id.
    pub id: String,
    /// When the repository was created.
    pub created: DateTime<Utc>,
    /// Fingerprints of the recipients at creation (not the keys themselves).
    pub recipient_fingerprints: Vec<String>,
}

/// Repository-level errors, each with guidance.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No region holds a descriptor.
    #[error("no repository found in any region ({details}); run `dr repo init` first")]
    NotInitialized {
        /// What each region said.
        details: String,
    },
    /// Every region already holds a descriptor.
    #[error("repository {id} is already initialized in every region; nothing to do")]
    AlreadyInitialized {
        /// Existing id.
        id: String,
    },
    /// Regions hold descriptors of different repositories.
    #[error(
        "region {region} holds repository {theirs} but region {first} holds {ours}; \
         regions of one repository must not mix repositories — fix the region list"
    )]
    Mismatch {
        /// Region holding the odd one.
        region: String,
        /// Its id.
        theirs: String,
        /// Region holding the first.
        first: String,
        /// The first id.
        ours: String,
    },
    /// The descriptor is from a newer `dr` or is not ours.
    #[error("{region}: dr-repo.json {why}")]
    BadDescriptor {
        /// Region.
        region: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// No region holds a valid copy of an object.
    #[error("{key}: no region has a valid copy: {details}")]
    Unreadable {
        /// Object key.
        key: String,
        /// What each region said.
        details: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Regions(#[from] RegionsError),
    /// A single store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Encoding or decoding failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Key material problem.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

impl RepoError {
    /// True when retrying later may help: storage that was unreachable or
    /// busy. Missing repositories, bad keys and corrupt objects are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            RepoError::Regions(e) => e.is_transient(),
            RepoError::Store(e) => !e.is_permanent(),
            // Regions that answered "not found" mean no `dr repo init`;
            // any other answer (unreachable, timeout) may be an outage.
            RepoError::NotInitialized { details } => details
                .split("; ")
                .any(|region| !region.ends_with("not found")),
            _ => false,
        }
    }
}

/// The body of a running marker (`…/started`): who started the backup, for
/// people reading the repository. `dr expire` never reads it; it judges a
/// marker by its key and its age in the store, so a backup host holding only
/// public keys can run expire too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Started {
    /// When the backup or snapshot started.
    pub time: DateTime<Utc>,
    /// Host name of the process writing it.
    pub host: String,
    /// Its process id.
    pub pid: u32,
}

/// An open repository.
pub struct Repository {
    /// The descriptor.
    pub info: RepoInfo,
    /// Storage regions.
    pub regions: Regions,
    /// Encoder/decoder with this host's keys.
    pub codec: Codec,
    /// The codec for WAL (`wal_compression_level`).
    pub wal_codec: Codec,
}

/// Builds the codec from the config: recipients always, identities if the file
/// is configured and present.
pub fn codec_from_config(cfg: &Config) -> Result<Codec, RepoError> {
    let recipients = keys::parse_recipients(cfg.repository.recipients.get_ref());
    let level = *cfg.repository.compression_level.get_ref();
    match cfg.identity_file() {
        Some(p) if p.exists() => match keys::load_identities(p) {
            Ok(ids) => Ok(Codec::new(recipients, Some(ids), level)),
            // Only reading needs the key: archiving and backups go on, and
            // whatever decrypts reports this (as does `dr check`).
            Err(e) => {
                tracing::debug!(error = %e, "identity not loaded");
                Ok(Codec::new(recipients, None, level).with_unusable_identity(e.to_string()))
            }
        },
        Some(p) => Ok(Codec::new(recipients, None, level).with_unusable_identity(format!(
            "identity file {} does not exist; decrypting needs it (set [repository] identity_file \
             or DR_IDENTITY_FILE to the restore key)",
            p.display()
        ))),
        None => Ok(Codec::new(recipients, None, level)),
    }
}

/// Reads a repository descriptor (`dr-repo.json`) fetched from `region`,
/// checking its format name and version.
pub fn parse_info(region: &str, bytes: &[u8]) -> Result<RepoInfo, RepoError> {
    let info: RepoInfo = serde_json::from_slice(bytes).map_err(|e| RepoError::BadDescriptor {
        region: region.to_string(),
        why: format!("is not a dr repository descriptor ({e}); is this region pointing at another tool's data?"),
    })?;
    if info.format != "dr-repository" {
        return Err(RepoError::BadDescriptor {
            region: region.to_string(),
            why: format!("has format {:?}, expected \"dr-repository\"", info.format),
        });
    }
    if info.version != FORMAT_VERSION {
        return Err(RepoError::BadDescriptor {
            region: region.to_string(),
            why: format!(
                "has format version {} but this dr reads version {FORMAT_VERSION}; \
                 upgrade dr (or use the version that created the repository)",
                info.version
            ),
        });
    }
    Ok(info)
}

/// Outcome of `dr repo init`.
#[derive(Debug, Serialize)]
pub struct InitReport {
    /// Repository id.
    pub id: String,
    /// Regions the descriptor was written to now.
    pub initialized: Vec<String>,
    /// Regions that already held it.
    pub already: Vec<String>,
}

/// Reads the descriptor in every region: `(region, Some(info))` or `None` when absent.
async fn read_infos(regions: &Regions) -> Result<Vec<(String, Option<RepoInfo>)>, RepoError> {
    let key = ObjectKey::RepoInfo.to_string();
    let mut out = Vec::new();
    for r in regions.iter() {
        match r.store.get_bytes(&key).await {
            Ok(b) => out.push((r.name.clone(), Some(parse_info(&r.name, &b)?))),
            Err(e) if e.is_not_found() => out.push((r.name.clone(), None)),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

impl Repository {
    /// Creates the repository in every region that lacks it. Refuses when all
    /// regions already hold it and when regions disagree about the repository.
    /// A region added to an existing repository receives the existing descriptor.
    pub async fn init(cfg: &Config) -> Result<InitReport, RepoError> {
        let regions = Regions::from_config(cfg).await?;
        for r in regions.iter() {
            if let crate::store::Store::S3(s3) = r.store.as_ref() {
                s3.ensure_bucket().await?;
            }
        }
        let infos = read_infos(&regions).await?;
        let existing = existing_info(&infos)?;
        let info = match &existing {
            Some((_, info)) => info.clone(),
            None => RepoInfo {
                format: "dr-repository".into(),
                version: FORMAT_VERSION,
                id: hex::encode(rand::random::<[u8; 8]>()),
                created: Utc::now(),
                recipient_fingerprints: cfg
                    .repository
                    .recipients
                    .get_ref()
                    .iter()
                    .map(|r| keys::fingerprint(r))
                    .collect(),
            },
        };
        let missing: Vec<&String> = infos
            .iter()
            .filter(|(_, i)| i.is_none())
            .map(|(n, _)| n)
            .collect();
        if missing.is_empty() {
            return Err(RepoError::AlreadyInitialized { id: info.id });
        }
        let body = Bytes::from(serde_json::to_vec_pretty(&info).map_err(|e| {
            RepoError::BadDescriptor {
                region: "-".into(),
                why: e.to_string(),
            }
        })?);
        let key = ObjectKey::RepoInfo.to_string();
        let mut report = InitReport {
            id: info.id.clone(),
            initialized: Vec::new(),
            already: infos
                .iter()
                .filter(|(_, i)| i.is_some())
                .map(|(n, _)| n.clone())
                .collect(),
        };
        for name in missing {
            if let Some(r) = regions.get_region(name) {
                r.store.put_bytes(&key, body.clone()).await?;
                report.initialized.push(name.clone());
            }
        }
        Ok(report)
    }

    /// Opens the repository: reads the descriptor from the first region that has
    /// one and checks the others agree.
    pub async fn open(cfg: &Config) -> Result<Repository, RepoError> {
        let regions = Regions::from_config(cfg).await?;
        let key = ObjectKey::RepoInfo.to_string();
        let mut info = None;
        let mut tried = Vec::new();
        for r in regions.iter() {
            match r.store.get_bytes(&key).await {
                Ok(b) => {
                    info = Some(parse_info(&r.name, &b)?);
                    break;
                }
                Err(e) => tried.push(format!("[{}] {e}", r.name)),
            }
        }
        let Some(info) = info else {
            return Err(RepoError::NotInitialized {
                details: tried.join("; "),
            });
        };
        let codec = codec_from_config(cfg)?;
        Ok(Repository {
            info,
            regions,
            wal_codec: codec.with_level(*cfg.repository.wal_compression_level.get_ref()),
            codec,
        })
    }

    /// Encodes `body` and writes it to every region (at least `min_regions`).
    pub async fn put_encoded(
        &self,
        key: &ObjectKey,
        body: ByteStream,
        size_hint: Option<u64>,
    ) -> Result<(Encoded, crate::store::PutReport), RepoError> {
        let codec = match key {
            ObjectKey::Wal { .. } | ObjectKey::TimelineHistory { .. } => &self.wal_codec,
            _ => &self.codec,
        };
        let k = key.to_string();
        let (stream, done) = codec.encode(body, size_hint);
        let report = self.regions.put(&k, stream).await?;
        let enc = done
            .await
            .map_err(|_| CodecError::Pipeline("encoder stopped".into()))??;
        Ok((enc, report))
    }

    /// Encodes an in-memory object in one step and writes it to every region.
    /// `known_hash`: the plaintext BLAKE3, if the caller already has it.
    pub async fn put_buffer(
        &self,
        key: &ObjectKey,
        data: Bytes,
        known_hash: Option<String>,
    ) -> Result<(Encoded, crate::store::PutReport), RepoError> {
        let codec = match key {
            ObjectKey::Wal { .. } | ObjectKey::TimelineHistory { .. } => &self.wal_codec,
            _ => &self.codec,
        };
        let (stored, enc) = codec.encode_bytes(data, known_hash).await?;
        let report = self.regions.put_bytes(&key.to_string(), stored).await?;
        Ok((enc, report))
    }

    /// Writes the running marker `key` of a backup or snapshot starting now,
    /// before any of its data, so `dr expire` leaves that data alone while
    /// the marker is younger than `orphan_age`.
    pub async fn mark_started(&self, key: &ObjectKey) -> Result<(), RepoError> {
        let started = Started {
            time: Utc::now(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            pid: std::process::id(),
        };
        let body = serde_json::to_vec(&started).map_err(|e| RepoError::Other(e.to_string()))?;
        self.put_buffer(key, Bytes::from(body), None).await?;
        Ok(())
    }

    /// Reads and decodes a whole object, trying regions in preference order and
    /// falling back on a missing, unreachable, truncated or corrupt copy.
    /// Returns the serving region with the plaintext.
    pub async fn get_verified(
        &self,
        key: &str,
        expect: Expect,
    ) -> Result<(String, Bytes), RepoError> {
        let mut details = Vec::new();
        for r in self.regions.iter() {
            let stream = match r.store.get(key, None).await {
                Ok(s) => s,
                Err(e) => {
                    details.push(format!("[{}] {e}", r.name));
                    continue;
                }
            };
            match self.codec.decode_bytes(stream, expect.clone()).await {
                Ok(b) => return Ok((r.name.clone(), b)),
                Err(e) => {
                    tracing::warn!(region = %r.name, key, error = %e, "bad copy; trying the next region");
                    details.push(format!("[{}] {e}", r.name));
                }
            }
        }
        Err(RepoError::Unreadable {
            key: key.to_string(),
            details: details.join("; "),
        })
    }

    /// Reads and decodes an object from one named region.
    pub async fn get_decoded_from(
        &self,
        region: &str,
        key: &ObjectKey,
        expect: Expect,
    ) -> Result<ByteStream, RepoError> {
        let k = key.to_string();
        let r = self
            .regions
            .get_region(region)
            .ok_or_else(|| RepoError::BadDescriptor {
                region: region.into(),
                why: "no such region in the config".into(),
            })?;
        let s = r.store.get(&k, None).await?;
        Ok(self.codec.decode(s, expect))
    }
}

fn existing_info(
    infos: &[(String, Option<RepoInfo>)],
) -> Result<Option<(String, RepoInfo)>, RepoError> {
    let mut first: Option<(String, RepoInfo)> = None;
    for (name, info) in infos {
        let Some(info) = info else { continue };
        match &first {
            None => first = Some((name.clone(), info.clone())),
            Some((fname, finfo)) if finfo.id != info.id => {
                return Err(RepoError::Mismatch {
                    region: name.clone(),
                    theirs: info.id.clone(),
                    first: fname.clone(),
                    ours: finfo.id.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(first)
}

/// Per-region result of a self-test round trip.
#[derive(Debug, Serialize)]
pub struct SelftestRegion {
    /// Region name.
    pub region: String,
    /// True when the object came back identical.
    pub ok: bool,
    /// Seconds to read + decode from this region.
    pub read_seconds: f64,
    /// Error text, if any.
    pub error: Option<String>,
}

/// Result of `dr repo selftest`.
#[derive(Debug, Serialize)]
pub struct SelftestReport {
    /// Object key used.
    pub key: String,
    /// Plaintext bytes.
    pub plain_size: u64,
    /// Stored bytes.
    pub stored_size: u64,
    /// BLAKE3 of the plaintext.
    pub plain_hash: String,
    /// Seconds to encode + write to all regions.
    pub write_seconds: f64,
    /// Per-region read-back results.
    pub regions: Vec<SelftestRegion>,
    /// Whether the temporary object was removed afterwards.
    pub cleaned_up: bool,
    /// Why the object was kept in some region (e.g. locked by Object Lock).
    pub cleanup_notes: Vec<String>,
}

impl Repository {
    /// Round-trips `body` through the codec and every region: encode, write,
    /// read back from each region, decode, compare hashes, then delete.
    pub async fn selftest(
        &self,
        body: ByteStream,
        size_hint: Option<u64>,
    ) -> Result<SelftestReport, RepoError> {
        let key = ObjectKey::Selftest {
            id: BackupId::new(Utc::now()),
        };
        let t0 = Instant::now();
        let (enc, _report) = self.put_encoded(&key, body, size_hint).await?;
        let write_seconds = t0.elapsed().as_secs_f64();
        let mut regions = Vec::new();
        for r in self.regions.iter() {
            let t = Instant::now();
            let res = async {
                let s = self
                    .get_decoded_from(&r.name, &key, Expect::from_encoded(&key.to_string(), &enc))
                    .await?;
                let mut s = s;
                use futures::StreamExt;
                while let Some(chunk) = s.next().await {
                    chunk.map_err(|e| codec_err(e, &key.to_string()))?;
                }
                Ok::<(), RepoError>(())
            }
            .await;
            regions.push(SelftestRegion {
                region: r.name.clone(),
                ok: res.is_ok(),
                read_seconds: t.elapsed().as_secs_f64(),
                error: res.err().map(|e| e.to_string()),
            });
        }
        let mut cleaned_up = true;
        let mut cleanup_notes = Vec::new();
        for r in self.regions.iter() {
            if let Err(e) = r.store.delete(&key.to_string()).await {
                cleaned_up = false;
                cleanup_notes.push(format!("[{}] {e}", r.name));
            }
        }
        Ok(SelftestReport {
            key: key.to_string(),
            plain_size: enc.plain_size,
            stored_size: enc.stored_size,
            plain_hash: enc.plain_hash,
            write_seconds,
            regions,
            cleaned_up,
            cleanup_notes,
        })
    }
}

fn codec_err(e: std::io::Error, key: &str) -> RepoError {
    RepoError::Codec(crate::codec::into_codec_error(e, key))
}
