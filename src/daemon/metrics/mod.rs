//! What the daemon knows about its jobs, WAL archiving and regions, rendered
//! as Prometheus text for `/metrics` and judged for `/healthz`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::jobs::{JobKind, JobOutcome, JobSpec};

/// How stale the scheduler's last tick may be before `/healthz` calls the
/// loop stalled (it ticks at least once a second).
pub const STALL_SECONDS: i64 = 30;

/// Counters and last results of one job.
#[derive(Debug, Clone)]
pub struct JobStats {
    /// Kind of the job.
    pub kind: JobKind,
    /// Cluster or instance.
    pub source: String,
    /// End of the last successful run.
    pub last_success: Option<DateTime<Utc>>,
    /// Duration of the last successful run, seconds.
    pub last_duration: Option<f64>,
    /// Bytes read by the last successful run.
    pub last_bytes: Option<u64>,
    /// Recovery time of the last verified restore (verify jobs).
    pub last_rto: Option<f64>,
    /// Recovery point of the last verified restore (verify jobs).
    pub last_rpo: Option<f64>,
    /// Longest gap between consecutive scheduled times, seconds: how old the
    /// last success may get when every run happens.
    pub interval: Option<f64>,
    /// Finished runs.
    pub runs: u64,
    /// Failed runs (after retries).
    pub failures: u64,
    /// Failed runs since the last success.
    pub consecutive_failures: u32,
    /// Retries of failed attempts.
    pub retries: u64,
    /// Scheduled times skipped because a run was still going.
    pub skipped: u64,
    /// Scheduled times another daemon of the fleet ran (or was running).
    pub elsewhere: u64,
    /// A run is in progress (or waiting for a slot).
    pub running: bool,
    /// Why the last run failed.
    pub last_error: Option<String>,
    /// Next scheduled time.
    pub next_run: Option<DateTime<Utc>>,
    /// How late runs started after their scheduled time.
    pub start_delay: DelayHistogram,
}

/// Upper bounds (seconds) of the start-delay buckets: a run normally starts
/// within milliseconds; seconds mean the slots (`max_concurrent_jobs`) or
/// the fleet claim held it back.
pub const START_DELAY_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0];

/// A cumulative histogram of start delays, as Prometheus wants it.
#[derive(Debug, Clone, Default)]
pub struct DelayHistogram {
    /// Runs that started within each bound of [`START_DELAY_BUCKETS`].
    pub le: [u64; START_DELAY_BUCKETS.len()],
    /// All runs that started.
    pub count: u64,
    /// Sum of their delays, seconds.
    pub sum: f64,
}

impl DelayHistogram {
    /// Adds one start `seconds` after its scheduled time.
    pub fn observe(&mut self, seconds: f64) {
        let seconds = seconds.max(0.0);
        for (n, bound) in self.le.iter_mut().zip(START_DELAY_BUCKETS) {
            if seconds <= bound {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Last probe of one cluster's WAL archiving.
#[derive(Debug, Clone, Default)]
pub struct WalStats {
    /// When it was probed.
    pub probed: Option<DateTime<Utc>>,
    /// Why the server could not be asked, if it could not.
    pub error: Option<String>,
    /// The server is a standby (no WAL of its own to archive).
    pub in_recovery: bool,
    /// Completed segments not yet archived.
    pub lag_segments: Option<u64>,
    /// How long archiving has been behind (0 when it is not).
    pub lag_seconds: Option<f64>,
    /// `pg_stat_archiver.last_archived_time`.
    pub last_archived: Option<DateTime<Utc>>,
    /// `pg_stat_archiver.failed_count`.
    pub failed_count: i64,
    /// The last failure is newer than the last success: archiving is failing now.
    pub failing: Option<String>,
    /// Streaming (`wal = "stream"`): bytes between the server's end of WAL and
    /// what is durable in the repository, as the streamer last saw them.
    pub stream_lag_bytes: Option<f64>,
    /// Streaming: seconds since the repository last held everything received.
    pub stream_lag_seconds: Option<f64>,
    /// Streaming: age of the streamer's last status (a dead streamer stops
    /// updating it).
    pub stream_status_age_seconds: Option<f64>,
    /// Streaming: the server lists the streamer in `pg_stat_replication`
    /// with state `streaming`.
    pub stream_connected: Option<bool>,
    /// Streaming: the server counts the streamer as a synchronous standby
    /// (`sync_state` is `sync` or `quorum`).
    pub stream_synchronous: Option<bool>,
    /// Streaming: the config asks for synchronous streaming (RPO 0).
    pub stream_sync_expected: bool,
}

/// What the repository holds for one source (read from its catalog).
#[derive(Debug, Clone, Default)]
pub struct CatalogStats {
    /// Earliest point a restore can reach.
    pub window_start: Option<DateTime<Utc>>,
    /// Latest point a restore can reach.
    pub window_end: Option<DateTime<Utc>>,
    /// End of the newest backup or snapshot.
    pub newest_backup: Option<DateTime<Utc>>,
    /// Backups or snapshots stored.
    pub backups: u64,
    /// Missing WAL segments between archived ones (PostgreSQL).
    pub wal_gaps: u64,
    /// Why the catalog could not be read, if it could not.
    pub error: Option<String>,
}

/// The daemon's WAL streamer of one cluster.
#[derive(Debug, Clone, Default)]
pub struct StreamStats {
    /// Failures (connection lost, server down, storage) since the start.
    pub failures: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// What is known about one region.
#[derive(Debug, Clone, Default)]
pub struct RegionStats {
    /// Last probe: `None` = reachable, `Some(why)` = not.
    pub probe_error: Option<Option<String>>,
    /// When it was last probed.
    pub probed: Option<DateTime<Utc>>,
    /// Set when the last job that wrote to the repository found the region
    /// failing: (job, reason).
    pub write_error: Option<(String, String)>,
}

/// Everything `/metrics` and `/healthz` report.
#[derive(Debug)]
pub struct State {
    /// Per job, by name.
    pub jobs: BTreeMap<String, JobStats>,
    /// Per PostgreSQL cluster.
    pub wal: BTreeMap<String, WalStats>,
    /// Per region.
    pub regions: BTreeMap<String, RegionStats>,
    /// Per streaming cluster.
    pub streams: BTreeMap<String, StreamStats>,
    /// When the daemon started.
    pub started: DateTime<Utc>,
    /// Last tick of the scheduler loop.
    pub heartbeat: DateTime<Utc>,
    /// SIGTERM received.
    pub stopping: bool,
    /// Successful and rejected reloads.
    pub reloads: (u64, u64),
    /// Why the last reload was rejected, if the last one was.
    pub reload_error: Option<String>,
    /// Failed runs in a row that make a job unhealthy.
    pub unhealthy_after: u32,
    /// Per (engine, source): `postgres`/`redis` and the config name.
    pub catalogs: BTreeMap<(String, String), CatalogStats>,
    /// Failovers in the audit log, by (environment, outcome).
    pub failovers: BTreeMap<(String, String), u64>,
    /// End of the last failover per environment.
    pub last_failover: BTreeMap<String, DateTime<Utc>>,
    /// Finished runs of all jobs: the catalog probe rereads the repository
    /// when it changed.
    pub finished_runs: u64,
    /// What the automatic-failover loops report (empty without `[ha]`).
    pub ha: std::sync::Arc<crate::ha::HaStats>,
}

/// The state behind a lock; every update is a short, non-async section.
#[derive(Debug)]
pub struct Shared(Mutex<State>);

impl Shared {
    /// Fresh state.
    pub fn new(unhealthy_after: u32) -> Shared {
        let now = Utc::now();
        Shared(Mutex::new(State {
            jobs: BTreeMap::new(),
            wal: BTreeMap::new(),
            regions: BTreeMap::new(),
            streams: BTreeMap::new(),
            started: now,
            heartbeat: now,
            stopping: false,
            reloads: (0, 0),
            reload_error: None,
            unhealthy_after,
            catalogs: BTreeMap::new(),
            failovers: BTreeMap::new(),
            last_failover: BTreeMap::new(),
            finished_runs: 0,
            ha: Default::default(),
        }))
    }

    /// Runs `f` on the state. A poisoned lock is recovered: the state is
    /// plain counters, always consistent enough to report.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g)
    }

    /// Makes the job list match `jobs`: new jobs appear, removed idle ones go.
    pub fn set_jobs(&self, jobs: &[JobSpec]) {
        let now = Utc::now();
        self.with(|s| {
            s.jobs
                .retain(|name, st| st.running || jobs.iter().any(|j| &j.name == name));
            for j in jobs {
                s.jobs.entry(j.name.clone()).or_insert_with(|| JobStats {
                    kind: j.kind,
                    source: j.source.clone(),
                    last_success: None,
                    last_duration: None,
                    last_bytes: None,
                    last_rto: None,
                    last_rpo: None,
                    interval: None,
                    runs: 0,
                    failures: 0,
                    consecutive_failures: 0,
                    retries: 0,
                    skipped: 0,
                    elsewhere: 0,
                    running: false,
                    last_error: None,
                    next_run: None,
                    start_delay: DelayHistogram::default(),
                });
                if let Some(st) = s.jobs.get_mut(&j.name) {
                    st.interval = j.cron.longest_interval(now, 32);
                }
            }
        })
    }

    /// Marks `job` running unless it already is; false means skip this run.
    pub fn try_start(&self, job: &str) -> bool {
        self.with(|s| match s.jobs.get_mut(job) {
            Some(j) if j.running => {
                j.skipped += 1;
                false
            }
            Some(j) => {
                j.running = true;
                true
            }
            None => false,
        })
    }

    /// Records a finished run.
    pub fn finish(&self, job: &str, seconds: f64, result: Result<&JobOutcome, String>) {
        let now = Utc::now();
        self.with(|s| {
            if let Ok(o) = &result {
                for r in &o.regions {
                    let st = s.regions.entry(r.clone()).or_default();
                    st.write_error = o
                        .degraded
                        .iter()
                        .find(|(name, _)| name == r)
                        .map(|(_, why)| (job.to_string(), why.clone()));
                }
            }
            s.finished_runs += 1;
            let Some(j) = s.jobs.get_mut(job) else {
                return;
            };
            j.running = false;
            j.runs += 1;
            match result {
                Ok(o) => {
                    j.last_success = Some(now);
                    j.last_duration = Some(seconds);
                    j.last_bytes = Some(o.bytes);
                    if o.rto_seconds.is_some() {
                        j.last_rto = o.rto_seconds;
                    }
                    if o.rpo_seconds.is_some() {
                        j.last_rpo = o.rpo_seconds;
                    }
                    j.consecutive_failures = 0;
                    j.last_error = None;
                }
                Err(e) => {
                    j.failures += 1;
                    j.consecutive_failures += 1;
                    j.last_error = Some(e);
                }
            }
        })
    }

    /// Records that a run of `job` started `seconds` after its scheduled time.
    pub fn started(&self, job: &str, seconds: f64) {
        self.with(|s| {
            if let Some(j) = s.jobs.get_mut(job) {
                j.start_delay.observe(seconds);
            }
        })
    }

    /// Records that another daemon of the fleet has this scheduled time.
    pub fn ran_elsewhere(&self, job: &str) {
        self.with(|s| {
            if let Some(j) = s.jobs.get_mut(job) {
                j.running = false;
                j.elsewhere += 1;
            }
        })
    }

    /// Clears the running flag of a run that never started (shutdown while it
    /// waited for a slot).
    pub fn cancel(&self, job: &str) {
        self.with(|s| {
            if let Some(j) = s.jobs.get_mut(job) {
                j.running = false;
            }
        })
    }
}

impl State {
    /// Why the daemon is unhealthy; empty when it is healthy.
    pub fn problems(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        if self.stopping {
            out.push("stopping (SIGTERM received)".into());
        }
        let tick = (now - self.heartbeat).num_seconds();
        if tick > STALL_SECONDS {
            out.push(format!(
                "scheduler loop stalled: last tick {tick}s ago; restart the daemon and report the logs"
            ));
        }
        if let Some(e) = &self.reload_error {
            out.push(format!(
                "the config on disk was rejected at reload ({e}); the previous config is still \
                 running, but a restart would fail: fix the file and send SIGHUP"
            ));
        }
        for (name, j) in &self.jobs {
            if j.consecutive_failures >= self.unhealthy_after {
                out.push(format!(
                    "job {name} failed {} times in a row; last error: {}",
                    j.consecutive_failures,
                    j.last_error.as_deref().unwrap_or("unknown")
                ));
            }
        }
        for (name, r) in &self.regions {
            if let Some(Some(why)) = &r.probe_error {
                out.push(format!("region {name} is unreachable: {why}"));
            }
            if let Some((job, why)) = &r.write_error {
                out.push(format!(
                    "region {name} missed writes in the last run of {job}: it {why}; run `dr repo sync` once it is back"
                ));
            }
        }
        for (cluster, w) in &self.wal {
            if let Some(e) = &w.error {
                out.push(format!(
                    "PostgreSQL cluster {cluster} cannot be asked for its WAL archive status: {e}"
                ));
            }
            if let Some(f) = &w.failing {
                out.push(format!(
                    "WAL archiving of cluster {cluster} is failing: {f}"
                ));
            }
        }
        out
    }
}

mod render;
#[cfg(test)]
mod tests;
