//! The Prometheus text exposition of the daemon's state, one family group
//! per part of the platform.

use super::*;

mod ha;

/// Seconds since the epoch, as Prometheus timestamps are written.
fn ts(t: &DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

impl State {
    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, now: DateTime<Utc>) -> String {
        let mut m = Metrics::default();
        self.render_daemon(&mut m, now);
        self.render_jobs(&mut m);
        self.render_verified(&mut m);
        self.render_wal(&mut m);
        self.render_catalog(&mut m);
        self.render_failovers(&mut m);
        self.render_regions(&mut m);
        ha::render(&self.ha, &mut m, std::time::Instant::now());
        m.out
    }

    /// The daemon itself: start, scheduler heartbeat, health, reloads.
    fn render_daemon(&self, m: &mut Metrics, now: DateTime<Utc>) {
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
    }

    /// Per scheduled job: runs, failures, durations, sizes, schedule.
    fn render_jobs(&self, m: &mut Metrics) {
        type Get = fn(&JobStats) -> Option<f64>;
        let per_job: [(&str, &str, &str, Get); 12] = [
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
                "dr_job_runs_elsewhere_total",
                "counter",
                "Scheduled times run by another daemon of the fleet ([ha] fleet).",
                |j| Some(j.elsewhere as f64),
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
        self.render_start_delay(m);
    }

    /// How late runs started: `dr_job_start_delay_seconds`, a histogram.
    fn render_start_delay(&self, m: &mut Metrics) {
        let name = "dr_job_start_delay_seconds";
        m.family(
            name,
            "histogram",
            "Seconds from a scheduled time to the start of its run (after waiting for a slot and, in a fleet, the claim).",
        );
        for (job, j) in &self.jobs {
            let [a, b, c] = job_labels(job, j);
            let h = &j.start_delay;
            m.current = format!("{name}_bucket");
            for (n, bound) in h.le.iter().zip(START_DELAY_BUCKETS) {
                m.sample(&[a, b, c, ("le", &bound.to_string())], *n as f64);
            }
            m.sample(&[a, b, c, ("le", "+Inf")], h.count as f64);
            m.current = format!("{name}_sum");
            m.sample(&[a, b, c], h.sum);
            m.current = format!("{name}_count");
            m.sample(&[a, b, c], h.count as f64);
        }
    }

    /// Verified restores: when, RTO and RPO (once a verify job succeeded).
    fn render_verified(&self, m: &mut Metrics) {
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
    }

    /// Per cluster: WAL archiving and streaming.
    fn render_wal(&self, m: &mut Metrics) {
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
    }

    /// Per source, read from the repository: window, newest backup, gaps.
    fn render_catalog(&self, m: &mut Metrics) {
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
    }

    /// Failovers recorded in the audit log.
    fn render_failovers(&self, m: &mut Metrics) {
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
    }

    /// Per region: reachable, and writes missed.
    fn render_regions(&self, m: &mut Metrics) {
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
