//! Multi-region fan-out: one write goes to every region concurrently and counts
//! once `min_regions` hold it; reads try regions in preference order.

use std::io;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{ByteStream, ObjectInfo, Store, StoreError};
use crate::config::{Config, RegionKind};

/// A named store.
pub struct Region {
    /// Region name from the config.
    pub name: String,
    /// Its backend.
    pub store: Store,
}

/// Outcome of a fan-out write.
#[derive(Debug)]
pub struct PutReport {
    /// Bytes written (per region).
    pub bytes: u64,
    /// Regions that hold the object durably.
    pub ok: Vec<String>,
    /// Regions that failed, with the reason.
    pub failed: Vec<(String, StoreError)>,
}

/// Errors of region-level operations.
#[derive(Debug, thiserror::Error)]
pub enum RegionsError {
    /// Too few regions took a write.
    #[error(
        "{key}: stored in {ok} of {total} region(s) but min_regions = {min}; failures: {details}"
    )]
    NotEnoughRegions {
        /// Object key.
        key: String,
        /// Regions that succeeded.
        ok: usize,
        /// Regions configured.
        total: usize,
        /// Required.
        min: usize,
        /// One line per failed region.
        details: String,
        /// The failures themselves.
        failures: Vec<(String, StoreError)>,
    },
    /// No region could serve a read.
    #[error("{key}: no region could serve it: {details}")]
    Unavailable {
        /// Object key.
        key: String,
        /// One entry per region tried.
        details: String,
    },
    /// The body being written failed at its source.
    #[error("writing {key} aborted, nothing stored: {source}")]
    Source {
        /// Object key.
        key: String,
        /// Cause.
        source: io::Error,
    },
    /// A region could not be set up from the config.
    #[error("region {region}: {message}")]
    Setup {
        /// Region name.
        region: String,
        /// Cause.
        message: String,
    },
}

/// All regions of a repository, in read-preference order.
pub struct Regions {
    regions: Vec<Region>,
    min_regions: usize,
}

impl Regions {
    /// Wraps already-built regions.
    pub fn new(regions: Vec<Region>, min_regions: usize) -> Regions {
        let min_regions = min_regions.clamp(1, regions.len().max(1));
        Regions {
            regions,
            min_regions,
        }
    }

    /// Builds the regions a config describes (no network traffic for fs; S3
    /// clients are created but not contacted).
    pub async fn from_config(cfg: &Config) -> Result<Regions, RegionsError> {
        let mut out = Vec::new();
        for spec in &cfg.region_specs {
            let store = match &spec.kind {
                RegionKind::Fs { path } => Store::Fs(super::FsStore::new(path.clone())),
                RegionKind::S3(s3) => {
                    Store::S3(super::S3Store::connect(s3).await.map_err(|message| {
                        RegionsError::Setup {
                            region: spec.name.clone(),
                            message,
                        }
                    })?)
                }
            };
            out.push(Region {
                name: spec.name.clone(),
                store,
            });
        }
        Ok(Regions::new(out, *cfg.repository.min_regions.get_ref()))
    }

    /// The regions, in preference order.
    pub fn iter(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// True when there are no regions.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Regions required for a write to count.
    pub fn min_regions(&self) -> usize {
        self.min_regions
    }

    /// A region by name.
    pub fn get_region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Writes `key` to every region concurrently from one stream. Each region gets
    /// its own bounded channel, so memory stays bounded; a region that fails is
    /// dropped from the fan-out and the others continue.
    pub async fn put(&self, key: &str, mut body: ByteStream) -> Result<PutReport, RegionsError> {
        let mut senders = Vec::with_capacity(self.regions.len());
        let mut puts = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
            senders.push(Some(tx));
            puts.push(r.store.put(key, super::channel_stream(rx)));
        }
        let pump = async move {
            let mut total = 0u64;
            while let Some(item) = body.next().await {
                match item {
                    Ok(chunk) => {
                        total += chunk.len() as u64;
                        let mut live = 0;
                        for slot in senders.iter_mut() {
                            if let Some(tx) = slot {
                                if tx.send(Ok(chunk.clone())).await.is_err() {
                                    *slot = None;
                                } else {
                                    live += 1;
                                }
                            }
                        }
                        if live == 0 {
                            return Ok(total);
                        }
                    }
                    Err(e) => {
                        for tx in senders.iter().flatten() {
                            let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string()))).await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(total)
        };
        let (pumped, results) = tokio::join!(pump, futures::future::join_all(puts));
        if let Err(source) = pumped {
            return Err(RegionsError::Source {
                key: key.to_string(),
                source,
            });
        }
        let mut report = PutReport {
            bytes: 0,
            ok: Vec::new(),
            failed: Vec::new(),
        };
        for (r, res) in self.regions.iter().zip(results) {
            match res {
                Ok(n) => {
                    report.bytes = n;
                    report.ok.push(r.name.clone());
                }
                Err(e) => {
                    tracing::warn!(region = %r.name, key, error = %e, "region write failed");
                    report.failed.push((r.name.clone(), e));
                }
            }
        }
        if report.ok.len() < self.min_regions {
            let details = report
                .failed
                .iter()
                .map(|(n, e)| format!("[{n}] {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(RegionsError::NotEnoughRegions {
                key: key.to_string(),
                ok: report.ok.len(),
                total: self.regions.len(),
                min: self.min_regions,
                details,
                failures: report.failed,
            });
        }
        Ok(report)
    }

    /// Writes a small buffer to every region.
    pub async fn put_bytes(&self, key: &str, body: Bytes) -> Result<PutReport, RegionsError> {
        self.put(key, super::once(body)).await
    }

    /// Lists `prefix` in the first region that answers.
    pub async fn list(&self, prefix: &str) -> Result<(String, Vec<ObjectInfo>), RegionsError> {
        let mut tried = Vec::new();
        for r in &self.regions {
            match r.store.list(prefix).await {
                Ok(v) => return Ok((r.name.clone(), v)),
                Err(e) => tried.push(format!("[{}] {e}", r.name)),
            }
        }
        Err(RegionsError::Unavailable {
            key: prefix.to_string(),
            details: tried.join("; "),
        })
    }
}
