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
    /// A run is in progress (or waiting for a slot).
    pub running: bool,
    /// Why the last run failed.
    pub last_error: Option<String>,
    /// Next scheduled time.
    pub next_run: Option<DateTime<Utc>>,
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
                    running: false,
                    last_error: None,
                    next_run: None,
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

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, now: DateTime<Utc>) -> String {
        let mut m = Metrics::default();
        let ts = |t: &DateTime<Utc>| t.timestamp_millis() as f64 / 1000.0;
        m.family(
            "dr_daemon_start_timestamp_seconds",
            "gauge",
            "When the daemon started.",
        );
        m.sample(&[], ts(&self.started));
        m.family(
            "dr_daemon_scheduler_heartbeat_timestamp_seconds",
            "gauge",
            "Last tick of the scheduler loop.",
        );
        m.sample(&[], ts(&self.heartbeat));
        m.family("dr_daemon_healthy", "gauge", "1 when /healthz answers 200.");
        m.sample(&[], f64::from(u8::from(self.problems(now).is_empty())));
        m.family(
            "dr_daemon_config_reloads_total",
            "counter",
            "Config reloads on SIGHUP, by outcome.",
        );
        m.sample(&[("outcome", "applied")], self.reloads.0 as f64);
        m.sample(&[("outcome", "rejected")], self.reloads.1 as f64);

        type Get = fn(&JobStats) -> Option<f64>;
        let per_job: [(&str, &str, &str, Get); 11] = [
            (
                "dr_job_last_success_timestamp_seconds",
                "gauge",
                "End of the job's last successful run.",
                |j| {
                    j.last_success
                        .as_ref()
                        .map(|t| t.timestamp_millis() as f64 / 1000.0)
                },
            ),
            (
                "dr_job_last_duration_seconds",
                "gauge",
                "Duration of the job's last successful run.",
                |j| j.last_duration,
            ),
            (
                "dr_job_last_bytes",
                "gauge",
                "Bytes read from the source by the job's last successful run.",
                |j| j.last_bytes.map(|b| b as f64),
            ),
            ("dr_job_runs_total", "counter", "Finished runs.", |j| {
                Some(j.runs as f64)
            }),
            (
                "dr_job_failures_total",
                "counter",
                "Runs that failed (after retries).",
                |j| Some(j.failures as f64),
            ),
            (
                "dr_job_consecutive_failures",
                "gauge",
                "Failed runs since the last success.",
                |j| Some(f64::from(j.consecutive_failures)),
            ),
            (
                "dr_job_retries_total",
                "counter",
                "Retried attempts after transient failures.",
                |j| Some(j.retries as f64),
            ),
            (
                "dr_job_skipped_total",
                "counter",
                "Scheduled times skipped because the previous run was still going.",
                |j| Some(j.skipped as f64),
            ),
            (
                "dr_job_running",
                "gauge",
                "1 while a run is in progress or waiting for a slot.",
                |j| Some(f64::from(u8::from(j.running))),
            ),
            (
                "dr_job_next_run_timestamp_seconds",
                "gauge",
                "Next scheduled time (UTC).",
                |j| j.next_run.as_ref().map(|t| t.timestamp() as f64),
            ),
            (
                "dr_job_schedule_interval_seconds",
                "gauge",
                "Longest gap between consecutive scheduled times (the age the last success may reach when every run happens).",
                |j| j.interval,
            ),
        ];
        for (name, kind, help, get) in per_job {
            m.family(name, kind, help);
            for (job, j) in &self.jobs {
                if let Some(v) = get(j) {
                    m.sample(&job_labels(job, j), v);
                }
            }
        }
        // Verification gauges exist only once a verify job has succeeded.
        let verified: Vec<_> = self
            .jobs
            .values()
            .filter(|j| j.kind == JobKind::PgVerify)
            .filter_map(|j| Some((j, j.last_success?, j.last_rto?)))
            .collect();
        if !verified.is_empty() {
            m.family(
                "dr_last_verified_restore_timestamp_seconds",
                "gauge",
                "When a scratch restore last proved a backup.",
            );
            for (j, t, _) in &verified {
                m.sample(&[("source", &j.source)], ts(t));
            }
            m.family(
                "dr_verified_restore_rto_seconds",
                "gauge",
                "Recovery time the last verified restore took.",
            );
            for (j, _, rto) in &verified {
                m.sample(&[("source", &j.source)], *rto);
            }
            m.family(
                "dr_verified_restore_rpo_seconds",
                "gauge",
                "Recovery point of the last verified restore: its target minus the point the restored data represents.",
            );
            for (j, _, _) in &verified {
                if let Some(rpo) = j.last_rpo {
                    m.sample(&[("source", &j.source)], rpo);
                }
            }
        }

        type WalGet = fn(&WalStats) -> Option<f64>;
        let per_cluster: [(&str, &str, &str, WalGet); 12] = [
            (
                "dr_wal_stream_lag_bytes",
                "gauge",
                "Streaming: WAL bytes the server has that the repository does not hold durably yet.",
                |w| w.stream_lag_bytes,
            ),
            (
                "dr_wal_stream_lag_seconds",
                "gauge",
                "Streaming: seconds since the repository last held all WAL received.",
                |w| w.stream_lag_seconds,
            ),
            (
                "dr_wal_stream_status_age_seconds",
                "gauge",
                "Streaming: age of the streamer's last status report.",
                |w| w.stream_status_age_seconds,
            ),
            (
                "dr_wal_stream_connected",
                "gauge",
                "Streaming: 1 when the server lists the streamer as streaming in pg_stat_replication.",
                |w| w.stream_connected.map(|b| f64::from(u8::from(b))),
            ),
            (
                "dr_wal_stream_synchronous",
                "gauge",
                "Streaming: 1 when the server counts the streamer as a synchronous standby.",
                |w| w.stream_synchronous.map(|b| f64::from(u8::from(b))),
            ),
            (
                "dr_wal_stream_synchronous_expected",
                "gauge",
                "Streaming: 1 when the config asks for synchronous streaming (synchronous = true).",
                |w| {
                    w.stream_connected
                        .map(|_| f64::from(u8::from(w.stream_sync_expected)))
                },
            ),
            (
                "dr_wal_archive_failing",
                "gauge",
                "1 when archive_command's last failure is newer than its last success.",
                |w| (w.error.is_none()).then_some(f64::from(u8::from(w.failing.is_some()))),
            ),
            (
                "dr_postgres_up",
                "gauge",
                "1 when the last probe reached the cluster.",
                |w| Some(f64::from(u8::from(w.error.is_none()))),
            ),
            (
                "dr_wal_archive_lag_segments",
                "gauge",
                "Completed WAL segments not yet archived.",
                |w| w.lag_segments.map(|v| v as f64),
            ),
            (
                "dr_wal_archive_lag_seconds",
                "gauge",
                "How long WAL archiving has been behind (0 when caught up).",
                |w| w.lag_seconds,
            ),
            (
                "dr_wal_last_archived_timestamp_seconds",
                "gauge",
                "pg_stat_archiver.last_archived_time.",
                |w| {
                    w.last_archived
                        .as_ref()
                        .map(|t| t.timestamp_millis() as f64 / 1000.0)
                },
            ),
            (
                "dr_wal_archive_failures_total",
                "counter",
                "pg_stat_archiver.failed_count (since the statistics were reset).",
                |w| (w.error.is_none()).then_some(w.failed_count as f64),
            ),
        ];
        for (name, kind, help, get) in per_cluster {
            m.family(name, kind, help);
            for (cluster, w) in &self.wal {
                if let Some(v) = get(w) {
                    m.sample(&[("cluster", cluster)], v);
                }
            }
        }
        if !self.streams.is_empty() {
            m.family(
                "dr_wal_stream_failures_total",
                "counter",
                "Times the WAL streamer lost its connection or failed to store WAL (it reconnects).",
            );
            for (cluster, st) in &self.streams {
                m.sample(&[("cluster", cluster)], st.failures as f64);
            }
        }

        type CatGet = fn(&CatalogStats) -> Option<f64>;
        let per_source: [(&str, &str, &str, CatGet); 6] = [
            (
                "dr_recoverable_window_start_timestamp_seconds",
                "gauge",
                "Earliest point a restore can reach (oldest backup's end or snapshot).",
                |c| {
                    c.window_start
                        .as_ref()
                        .map(|t| t.timestamp_millis() as f64 / 1000.0)
                },
            ),
            (
                "dr_recoverable_window_end_timestamp_seconds",
                "gauge",
                "Latest point a restore can reach (end of contiguous WAL, or newest snapshot).",
                |c| {
                    c.window_end
                        .as_ref()
                        .map(|t| t.timestamp_millis() as f64 / 1000.0)
                },
            ),
            (
                "dr_last_backup_timestamp_seconds",
                "gauge",
                "End of the newest backup or snapshot in the repository.",
                |c| {
                    c.newest_backup
                        .as_ref()
                        .map(|t| t.timestamp_millis() as f64 / 1000.0)
                },
            ),
            (
                "dr_repository_backups",
                "gauge",
                "Backups or snapshots of the source in the repository.",
                |c| c.error.is_none().then_some(c.backups as f64),
            ),
            (
                "dr_wal_gap_segments",
                "gauge",
                "WAL segments missing between archived ones (restores cannot cross them).",
                |c| c.error.is_none().then_some(c.wal_gaps as f64),
            ),
            (
                "dr_catalog_up",
                "gauge",
                "1 when the daemon could read the source's backups from the repository.",
                |c| Some(f64::from(u8::from(c.error.is_none()))),
            ),
        ];
        for (name, kind, help, get) in per_source {
            m.family(name, kind, help);
            for ((engine, source), c) in &self.catalogs {
                if name == "dr_wal_gap_segments" && engine != "postgres" {
                    continue;
                }
                if let Some(v) = get(c) {
                    m.sample(&[("engine", engine), ("source", source)], v);
                }
            }
        }
        m.family(
            "dr_failovers_total",
            "counter",
            "Failover playbook runs (not dry runs) in the audit log, by environment and outcome.",
        );
        for ((env, outcome), n) in &self.failovers {
            m.sample(&[("env", env), ("outcome", outcome)], *n as f64);
        }
        m.family(
            "dr_last_failover_timestamp_seconds",
            "gauge",
            "End of the last failover playbook run in the environment (audit log).",
        );
        for (env, t) in &self.last_failover {
            m.sample(&[("env", env)], ts(t));
        }

        m.family(
            "dr_region_up",
            "gauge",
            "1 when the last probe read the repository descriptor from the region.",
        );
        for (name, r) in &self.regions {
            if let Some(p) = &r.probe_error {
                m.sample(&[("region", name)], f64::from(u8::from(p.is_none())));
            }
        }
        m.family(
            "dr_region_write_degraded",
            "gauge",
            "1 when the region missed writes in the last job that wrote to the repository.",
        );
        for (name, r) in &self.regions {
            m.sample(
                &[("region", name)],
                f64::from(u8::from(r.write_error.is_some())),
            );
        }
        m.out
    }
}

fn job_labels<'a>(name: &'a str, j: &'a JobStats) -> [(&'static str, &'a str); 3] {
    [
        ("name", name),
        ("kind", j.kind.label()),
        ("source", &j.source),
    ]
}

#[derive(Default)]
struct Metrics {
    out: String,
    current: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self.current = name.to_string();
    }

    fn sample(&mut self, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(&self.current);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let esc = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{esc}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Cron;

    fn job(name: &str, kind: JobKind) -> JobSpec {
        JobSpec {
            name: name.into(),
            kind,
            source: "main".into(),
            cron: Cron::parse("* * * * * *").expect("cron"),
        }
    }

    #[test]
    fn runs_show_in_metrics_and_health() {
        let s = Shared::new(2);
        s.set_jobs(&[job("postgres.main.backup", JobKind::PgBackup)]);
        assert!(s.try_start("postgres.main.backup"));
        assert!(
            !s.try_start("postgres.main.backup"),
            "overlap must be refused"
        );
        let ok = JobOutcome {
            id: "x".into(),
            bytes: 1234,
            regions: vec!["a".into(), "b".into()],
            degraded: vec![("b".into(), "connection refused".into())],
            rto_seconds: None,
            rpo_seconds: None,
        };
        s.finish("postgres.main.backup", 2.5, Ok(&ok));
        let text = s.with(|st| st.render(Utc::now()));
        let labels = r#"{name="postgres.main.backup",kind="backup",source="main"}"#;
        assert!(
            text.contains(&format!("dr_job_last_bytes{labels} 1234\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("dr_job_skipped_total{labels} 1\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("dr_job_running{labels} 0\n")),
            "{text}"
        );
        assert!(
            text.contains("dr_region_write_degraded{region=\"b\"} 1\n"),
            "{text}"
        );
        assert!(!text.contains("dr_verified_restore_rto_seconds"), "{text}");
        let p = s.with(|st| st.problems(Utc::now()));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("region b missed writes"), "{p:?}");

        for _ in 0..2 {
            assert!(s.try_start("postgres.main.backup"));
            s.finish("postgres.main.backup", 0.1, Err("refused".into()));
        }
        let p = s.with(|st| st.problems(Utc::now()));
        assert!(
            p.iter()
                .any(|m| m.contains("failed 2 times in a row; last error: refused")),
            "{p:?}"
        );
        let text = s.with(|st| st.render(Utc::now()));
        assert!(
            text.contains(&format!("dr_job_failures_total{labels} 2\n")),
            "{text}"
        );
        assert!(text.contains("dr_daemon_healthy 0\n"), "{text}");
    }

    #[test]
    fn verify_gauges_appear_once_a_verify_job_succeeds() {
        let s = Shared::new(3);
        s.set_jobs(&[job("postgres.main.verify", JobKind::PgVerify)]);
        assert!(s.try_start("postgres.main.verify"));
        let ok = JobOutcome {
            rto_seconds: Some(42.0),
            ..Default::default()
        };
        s.finish("postgres.main.verify", 50.0, Ok(&ok));
        let text = s.with(|st| st.render(Utc::now()));
        assert!(
            text.contains("dr_verified_restore_rto_seconds{source=\"main\"} 42\n"),
            "{text}"
        );
    }

    #[test]
    fn catalog_failover_and_schedule_gauges_render_with_their_labels() {
        let s = Shared::new(3);
        s.set_jobs(&[JobSpec {
            cron: Cron::parse("0 2 * * 1-5").expect("cron"),
            ..job("postgres.main.backup", JobKind::PgBackup)
        }]);
        let t = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
        s.with(|st| {
            st.catalogs.insert(
                ("postgres".into(), "main".into()),
                CatalogStats {
                    window_start: Some(t),
                    window_end: Some(t + chrono::Duration::seconds(60)),
                    newest_backup: Some(t),
                    backups: 2,
                    wal_gaps: 1,
                    error: None,
                },
            );
            st.catalogs.insert(
                ("redis".into(), "cache".into()),
                CatalogStats {
                    error: Some("unreachable".into()),
                    ..Default::default()
                },
            );
            st.failovers.insert(("prod".into(), "ok".into()), 2);
            st.last_failover.insert("prod".into(), t);
        });
        let text = s.with(|st| st.render(Utc::now()));
        for want in [
            "dr_job_schedule_interval_seconds{name=\"postgres.main.backup\",kind=\"backup\",source=\"main\"} 259200\n",
            "dr_recoverable_window_start_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000000\n",
            "dr_recoverable_window_end_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000060\n",
            "dr_last_backup_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000000\n",
            "dr_repository_backups{engine=\"postgres\",source=\"main\"} 2\n",
            "dr_wal_gap_segments{engine=\"postgres\",source=\"main\"} 1\n",
            "dr_catalog_up{engine=\"redis\",source=\"cache\"} 0\n",
            "dr_failovers_total{env=\"prod\",outcome=\"ok\"} 2\n",
            "dr_last_failover_timestamp_seconds{env=\"prod\"} 1700000000\n",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        // An unreadable catalog reports no count and no window.
        assert!(
            !text.contains("dr_repository_backups{engine=\"redis\""),
            "{text}"
        );
        assert!(
            !text.contains("dr_wal_gap_segments{engine=\"redis\""),
            "{text}"
        );
    }
}
