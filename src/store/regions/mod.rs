//! Multi-region fan-out: one write goes to every region concurrently and counts
//! once `min_regions` hold it; reads try regions in preference order.

use std::io;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::stall::{Stalled, region_put};
use super::{ByteStream, ObjectInfo, Store, StoreError};
use crate::config::{Config, RegionKind};

/// A named store.
pub struct Region {
    /// Region name from the config.
    pub name: String,
    /// Its backend (shared so each region's writes run on a task of their own).
    pub store: std::sync::Arc<Store>,
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

impl RegionsError {
    /// True when the same operation may succeed later (a region was
    /// unreachable or answered with a transient error), as opposed to a
    /// setup or key problem that needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            RegionsError::NotEnoughRegions { failures, .. } => {
                failures.iter().any(|(_, e)| !e.is_permanent())
            }
            RegionsError::Unavailable { .. } | RegionsError::Source { .. } => true,
            RegionsError::Setup { .. } => false,
        }
    }
}

/// All regions of a repository, in read-preference order.
pub struct Regions {
    regions: Vec<Region>,
    min_regions: usize,
    /// Regions that failed a write, in this process or (remembered) in an
    /// earlier one. They are skipped while the others can still make
    /// `min_regions`: paying a dead region's timeouts once per object would
    /// stall a backup, and it keeps the rule that a manifest goes only to
    /// regions that took every object before it.
    down: std::sync::Mutex<std::collections::BTreeMap<String, Down>>,
    /// Where failures are remembered across runs (see [`Regions::remember_failures`]).
    health_file: Option<std::path::PathBuf>,
    /// A region that takes no data of a put for this long is stalled: its
    /// write is abandoned and it counts as failed, so one hung connection
    /// cannot hold up a write the other regions can take.
    stall_timeout: std::time::Duration,
}

pub use crate::config::DEFAULT_STALL_TIMEOUT;

/// How long a region that failed stays skipped by later runs before it is
/// tried again.
pub const RETRY_AFTER_SECS: i64 = 60;

/// One remembered failure.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Failure {
    /// Unix time of the failure.
    since: i64,
    /// What failed.
    error: String,
}

/// Why a region is skipped for writes.
#[derive(Debug, Clone)]
struct Down {
    /// Unix time of the failure.
    since: i64,
    /// What failed.
    error: String,
    /// True when the failure was remembered from an earlier process, which
    /// skips the region only until [`RETRY_AFTER_SECS`] have passed.
    earlier_run: bool,
}

impl Down {
    /// One sentence: when and where it failed, and what happens next
    /// (`skipping`: whether writes skip it now).
    fn describe(&self, now: i64, skipping: bool) -> String {
        let ago = (now - self.since).max(0);
        let when = if self.earlier_run {
            "an earlier run"
        } else {
            "this run"
        };
        let next = match (skipping, self.earlier_run) {
            (false, _) => "no other region can take its writes, so each write tries it".to_string(),
            (true, true) => format!("tried again in {}s", (RETRY_AFTER_SECS - ago).max(0)),
            (true, false) => "skipped for the rest of this run".to_string(),
        };
        format!("failed {ago}s ago in {when} ({}); {next}", self.error)
    }
}

impl Regions {
    /// Wraps already-built regions.
    pub fn new(regions: Vec<Region>, min_regions: usize) -> Regions {
        let min_regions = min_regions.clamp(1, regions.len().max(1));
        Regions {
            regions,
            min_regions,
            down: Default::default(),
            health_file: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }

    /// Sets how long a region may take no data of a write before it counts
    /// as stalled and failed.
    pub fn set_stall_timeout(&mut self, t: std::time::Duration) {
        self.stall_timeout = t;
    }

    /// Remembers write failures in `file` so that the next short-lived runs
    /// (one `wal-push` per segment) skip a dead region for
    /// [`RETRY_AFTER_SECS`] instead of each paying its timeouts, and marks
    /// regions that failed recently as degraded for this run.
    pub fn remember_failures(&mut self, file: std::path::PathBuf) {
        let now = chrono::Utc::now().timestamp();
        if let Some(dir) = file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let known = read_health(&file);
        if let Ok(mut d) = self.down.lock() {
            for (region, f) in known {
                if now - f.since < RETRY_AFTER_SECS && self.get_region(&region).is_some() {
                    d.insert(
                        region,
                        Down {
                            since: f.since,
                            error: f.error,
                            earlier_run: true,
                        },
                    );
                }
            }
        }
        self.health_file = Some(file);
    }

    fn save_health(&self, region: &str, failure: Option<String>) {
        let Some(file) = &self.health_file else {
            return;
        };
        let mut known = read_health(file);
        let changed = match failure {
            Some(error) => {
                known.insert(
                    region.to_string(),
                    Failure {
                        since: chrono::Utc::now().timestamp(),
                        error,
                    },
                );
                true
            }
            None => known.remove(region).is_some(),
        };
        if !changed {
            return;
        }
        let tmp = file.with_extension("tmp");
        let ok = serde_json::to_vec(&known)
            .ok()
            .and_then(|b| std::fs::write(&tmp, b).ok())
            .and_then(|_| std::fs::rename(&tmp, file).ok());
        if ok.is_none() {
            tracing::debug!(file = %file.display(), "cannot record region health");
        }
    }

    /// Regions skipped for writes after a failure, each with when it failed
    /// (in this process or an earlier one) and what happens next.
    pub fn degraded(&self) -> Vec<(String, String)> {
        self.described(false)
    }

    /// The regions a write skips, with the reason. None are skipped when
    /// skipping would leave fewer than `min_regions` (with one region, always):
    /// the write would fail for certain, so the failed regions are tried again
    /// at once instead.
    fn skipped(&self) -> std::collections::BTreeMap<String, String> {
        self.described(true).into_iter().collect()
    }

    /// Failed regions with their description; with `only_skipped`, none
    /// unless writes skip them.
    fn described(&self, only_skipped: bool) -> Vec<(String, String)> {
        let now = chrono::Utc::now().timestamp();
        let Ok(d) = self.down.lock() else {
            return Vec::new();
        };
        let down = self
            .regions
            .iter()
            .filter(|r| d.contains_key(&r.name))
            .count();
        let skipping = self.regions.len() - down >= self.min_regions;
        if only_skipped && !skipping {
            return Vec::new();
        }
        d.iter()
            .map(|(k, v)| (k.clone(), v.describe(now, skipping)))
            .collect()
    }

    /// A region took a write: it is healthy again, in this process and for
    /// the next runs.
    fn mark_up(&self, name: &str) {
        // Only a change is written: a put must not read and rewrite the
        // health file each time it succeeds.
        let was_down = self.down.lock().is_ok_and(|mut d| d.remove(name).is_some());
        if was_down {
            tracing::info!(region = %name, "region took a write again; no longer skipped");
            self.save_health(name, None);
        }
    }

    fn mark_down(&self, name: &str, why: &StoreError) {
        // Only backend failures say something about the region itself.
        if !matches!(why, StoreError::Backend { .. }) {
            return;
        }
        if let Ok(mut d) = self.down.lock()
            && d.get(name).is_none_or(|f| f.earlier_run)
        {
            tracing::warn!(region = %name, error = %why, "region marked degraded: further writes skip it while the other regions make min_regions; `dr repo sync` catches it up");
            d.insert(
                name.to_string(),
                Down {
                    since: chrono::Utc::now().timestamp(),
                    error: why.to_string(),
                    earlier_run: false,
                },
            );
            drop(d);
            self.save_health(name, Some(why.to_string()));
        }
    }

    /// Builds the regions a config describes (no network traffic for fs; S3
    /// clients are created but not contacted).
    pub async fn from_config(cfg: &Config) -> Result<Regions, RegionsError> {
        let mut out = Vec::new();
        // Injected faults (tests and scripts/chaos.sh only; see store::faults).
        let faults = match std::env::var(super::faults::FAULTS_ENV) {
            Ok(v) if !v.trim().is_empty() => {
                super::FaultPlan::parse_env(&v).map_err(|message| RegionsError::Setup {
                    region: super::faults::FAULTS_ENV.to_string(),
                    message: message.into(),
                })?
            }
            _ => Vec::new(),
        };
        for (region, _) in &faults {
            if !cfg.region_specs.iter().any(|s| &s.name == region) {
                return Err(RegionsError::Setup {
                    region: region.clone(),
                    message: format!(
                        "{} names a region that is not configured",
                        super::faults::FAULTS_ENV
                    ),
                });
            }
        }
        for spec in &cfg.region_specs {
            let store = match &spec.kind {
                RegionKind::Fs { path } => Store::Fs(super::FsStore::new(path.clone())),
                RegionKind::S3(s3) => {
                    Store::S3(super::S3Store::connect(s3).await.map_err(|message| {
                        RegionsError::Setup {
                            region: spec.name.clone(),
                            message: message.into(),
                        }
                    })?)
                }
            };
            let store = match faults.iter().find(|(r, _)| r == &spec.name) {
                Some((_, plan)) => {
                    tracing::warn!(region = %spec.name, ?plan, "injecting store faults ({})", super::faults::FAULTS_ENV);
                    Store::Faulty(Box::new(super::FaultyStore::new(store, plan.clone())))
                }
                None => store,
            };
            out.push(Region {
                name: spec.name.clone(),
                store: std::sync::Arc::new(store),
            });
        }
        let mut r = Regions::new(out, *cfg.repository.min_regions.get_ref());
        r.set_stall_timeout(cfg.repository.stall_timeout);
        Ok(r)
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
        let mut skipped = Vec::new();
        let mut live_regions = Vec::new();
        let mut aborts = Vec::with_capacity(self.regions.len());
        let stall_timeout = self.stall_timeout;
        let stall = std::sync::Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        // Closed (the sender dropped) once the pump has handed over the
        // whole body.
        let (done_tx, done_rx) = tokio::sync::watch::channel(());
        for r in self.writable(key, &mut skipped) {
            let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
            senders.push(Some(tx));
            let stalled = Stalled {
                timeout: stall_timeout,
                regions: stall.clone(),
                idx: puts.len(),
            };
            let (abort, put) = region_put(
                r.store.clone(),
                r.name.clone(),
                key,
                rx,
                done_rx.clone(),
                stalled,
            );
            aborts.push(abort);
            puts.push(put);
            live_regions.push(r);
        }
        let pump = async move {
            let _done = done_tx;
            let mut total = 0u64;
            while let Some(item) = body.next().await {
                match item {
                    Ok(chunk) => {
                        total += chunk.len() as u64;
                        let mut live = 0;
                        for (i, slot) in senders.iter_mut().enumerate() {
                            if let Some(tx) = slot {
                                match tokio::time::timeout(
                                    stall_timeout,
                                    tx.send(Ok(chunk.clone())),
                                )
                                .await
                                {
                                    Ok(Ok(())) => live += 1,
                                    Ok(Err(_)) => *slot = None,
                                    Err(_) => {
                                        // The region stopped reading: abandon its write
                                        // (the task ends with an error, never with a
                                        // short object) and go on with the others.
                                        if let Ok(mut s) = stall.lock() {
                                            s.push(i);
                                        }
                                        aborts[i].abort();
                                        *slot = None;
                                    }
                                }
                            }
                        }
                        if live == 0 {
                            return Ok(total);
                        }
                    }
                    Err(e) => {
                        for (i, tx) in senders.iter().enumerate() {
                            let Some(tx) = tx else { continue };
                            let err = Err(io::Error::new(e.kind(), e.to_string()));
                            if tokio::time::timeout(stall_timeout, tx.send(err))
                                .await
                                .is_err()
                            {
                                aborts[i].abort();
                            }
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
        self.settle(key, live_regions, results, skipped)
    }

    /// The regions a write goes to; the skipped ones (see `down`) are added
    /// to `skipped` with the reason.
    fn writable<'r>(
        &'r self,
        key: &str,
        skipped: &mut Vec<(String, StoreError)>,
    ) -> Vec<&'r Region> {
        let down = self.skipped();
        let mut live = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            match down.get(&r.name) {
                Some(why) => skipped.push((
                    r.name.clone(),
                    StoreError::Backend {
                        store: r.name.clone(),
                        op: "put",
                        key: key.to_string(),
                        message: format!("skipped: {why}"),
                        transient: true,
                    },
                )),
                None => live.push(r),
            }
        }
        live
    }

    /// Turns the per-region outcomes of a write into its report, marking
    /// regions up or down, and fails it below `min_regions`.
    fn settle(
        &self,
        key: &str,
        live_regions: Vec<&Region>,
        results: Vec<Result<u64, StoreError>>,
        skipped: Vec<(String, StoreError)>,
    ) -> Result<PutReport, RegionsError> {
        let mut report = PutReport {
            bytes: 0,
            ok: Vec::new(),
            failed: skipped,
        };
        for (r, res) in live_regions.into_iter().zip(results) {
            match res {
                Ok(n) => {
                    report.bytes = n;
                    report.ok.push(r.name.clone());
                    self.mark_up(&r.name);
                }
                Err(e) => {
                    tracing::warn!(region = %r.name, key, error = %e, "region write failed");
                    self.mark_down(&r.name, &e);
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

    /// Writes a buffer to every region. Unlike [`Regions::put`] nothing is
    /// pumped through channels and no task is spawned: each region gets the
    /// whole buffer at once, so a put costs one round trip (for fs, one
    /// blocking call), which is what a synchronous WAL stream waits for per
    /// commit group. A region that has not finished `stall_timeout` after
    /// the hand-over is abandoned, as in [`Regions::put`].
    pub async fn put_bytes(&self, key: &str, body: Bytes) -> Result<PutReport, RegionsError> {
        let mut skipped = Vec::new();
        let live = self.writable(key, &mut skipped);
        let timeout = self.stall_timeout;
        let puts = live.iter().map(|r| {
            let body = body.clone();
            async move {
                match tokio::time::timeout(timeout, r.store.put_bytes(key, body)).await {
                    Ok(res) => res,
                    Err(_) => Err(StoreError::Backend {
                        store: r.name.clone(),
                        op: "put",
                        key: key.to_string(),
                        message: super::stall::stalled_message(timeout),
                        transient: true,
                    }),
                }
            }
        });
        let results = futures::future::join_all(puts).await;
        self.settle(key, live, results, skipped)
    }

    /// Lists `prefix` in every region and returns the union (an object one
    /// region lost is still found in another), with the first answering
    /// region's name. Fails only when no region answers.
    pub async fn list(&self, prefix: &str) -> Result<(String, Vec<ObjectInfo>), RegionsError> {
        let listings = self.list_each(prefix).await;
        let mut tried = Vec::new();
        let mut first = None;
        let mut union: std::collections::BTreeMap<String, ObjectInfo> = Default::default();
        for (name, res) in listings {
            match res {
                Ok(v) => {
                    first.get_or_insert(name);
                    for o in v {
                        union.entry(o.key.clone()).or_insert(o);
                    }
                }
                Err(e) => {
                    tracing::warn!(region = %name, error = %e, "listing failed; using the other regions");
                    tried.push(format!("[{name}] {e}"));
                }
            }
        }
        match first {
            Some(name) => Ok((name, union.into_values().collect())),
            None => Err(RegionsError::Unavailable {
                key: prefix.to_string(),
                details: tried.join("; "),
            }),
        }
    }

    /// One level of `prefix` (see [`crate::store::Store::list_dirs`]), the
    /// union over the regions that answer, as [`Regions::list`] does.
    pub async fn list_dirs(&self, prefix: &str) -> Result<crate::store::Listing, RegionsError> {
        let lists = self
            .regions
            .iter()
            .map(|r| async move { (r.name.clone(), r.store.list_dirs(prefix).await) });
        let mut tried = Vec::new();
        let mut any = false;
        let mut dirs = std::collections::BTreeSet::new();
        let mut objects: std::collections::BTreeMap<String, ObjectInfo> = Default::default();
        for (name, res) in futures::future::join_all(lists).await {
            match res {
                Ok(l) => {
                    any = true;
                    dirs.extend(l.dirs);
                    for o in l.objects {
                        objects.entry(o.key.clone()).or_insert(o);
                    }
                }
                Err(e) => {
                    tracing::warn!(region = %name, error = %e, "listing failed; using the other regions");
                    tried.push(format!("[{name}] {e}"));
                }
            }
        }
        if !any {
            return Err(RegionsError::Unavailable {
                key: prefix.to_string(),
                details: tried.join("; "),
            });
        }
        Ok(crate::store::Listing {
            dirs: dirs.into_iter().collect(),
            objects: objects.into_values().collect(),
        })
    }

    /// Lists `prefix` in every region concurrently, in preference order.
    pub async fn list_each(
        &self,
        prefix: &str,
    ) -> Vec<(String, Result<Vec<ObjectInfo>, StoreError>)> {
        let lists = self
            .regions
            .iter()
            .map(|r| async move { (r.name.clone(), r.store.list(prefix).await) });
        futures::future::join_all(lists).await
    }
}

fn read_health(file: &std::path::Path) -> std::collections::BTreeMap<String, Failure> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
