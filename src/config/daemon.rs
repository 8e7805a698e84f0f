//! `[daemon]`, `[retention]`, `[sync]` and `[audit]`: how the daemon runs,
//! what it keeps, and where operations are recorded.

use super::*;

/// `[audit]`: where the append-only audit log lives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON-lines file. Unset: /var/log/dr/audit.jsonl where the user
    /// running dr can write it, else `$XDG_STATE_HOME/dr/audit.jsonl`
    /// (`~/.local/state/dr/audit.jsonl`), so that the first restore run as
    /// `postgres` in an emergency is not refused. A configured path that
    /// cannot be written refuses audited operations.
    pub path: Option<PathBuf>,
}

/// The system-wide audit log, used when it is writable.
pub const SYSTEM_AUDIT_PATH: &str = "/var/log/dr/audit.jsonl";

impl AuditConfig {
    /// The file audited operations append to.
    pub fn resolved_path(&self) -> PathBuf {
        if let Some(p) = &self.path {
            return p.clone();
        }
        let system = PathBuf::from(SYSTEM_AUDIT_PATH);
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        // HOME survives `runuser -u postgres`: the passwd home comes last.
        let home = crate::os::current_uid()
            .and_then(crate::os::passwd_entry)
            .map(|(_, h)| h.join(".local/state"));
        let candidates = [
            Some(system.clone()),
            var("XDG_STATE_HOME").map(|d| d.join("dr/audit.jsonl")),
            var("HOME").map(|h| h.join(".local/state/dr/audit.jsonl")),
            home.map(|d| d.join("dr/audit.jsonl")),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|p| crate::os::can_append(p))
            .unwrap_or(system)
    }
}

/// One cron expression from the config and where it was set.
#[derive(Debug, Clone)]
pub struct ScheduleEntry<'a> {
    /// `"postgres"`, `"redis"`, `"rabbitmq"`, `"retention"` or `"sync"`.
    pub section: &'static str,
    /// The cluster or instance name (empty for `[retention]`).
    pub source: String,
    /// The key: `backup`, `verify`, `snapshot` or `schedule`.
    pub key: &'static str,
    /// The expression, with its position in the file.
    pub expr: &'a Spanned<String>,
}

impl ScheduleEntry<'_> {
    /// The TOML table holding the key, as a user would write it.
    pub fn table(&self) -> String {
        match self.section {
            "retention" => "[retention]".into(),
            "sync" => "[sync]".into(),
            s => format!("[{s}.{}.schedule]", self.source),
        }
    }
}

/// `[retention]`: when the daemon runs `dr expire`, and how long a backup
/// without a manifest may still be running.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Cron expression (UTC).
    pub schedule: Option<Spanned<String>>,
    /// A backup or snapshot directory without a manifest whose newest object
    /// is younger than this may belong to a backup still running, so expire
    /// leaves it alone; older, it is an orphan and expire removes it, as it
    /// does temp files of killed writers. Set it well above the longest
    /// backup (including `stop_wal_timeout`).
    #[serde(default = "default_orphan_age", with = "humantime_serde")]
    pub orphan_age: std::time::Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            schedule: None,
            orphan_age: default_orphan_age(),
        }
    }
}

fn default_orphan_age() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

/// `[sync]`: when the daemon runs `dr repo sync`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Cron expression (UTC).
    pub schedule: Option<Spanned<String>>,
}

/// `[daemon]`: how `dr daemon` runs its jobs and where it reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Address of the `/metrics` and `/healthz` endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Jobs running at once, over all sources.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_jobs: usize,
    /// Seconds running jobs get to finish after SIGTERM before they are aborted.
    #[serde(default = "default_grace")]
    pub grace_seconds: u64,
    /// Extra attempts of a run that failed transiently.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First retry delay; doubles per attempt, with jitter.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_seconds: u64,
    /// Longest retry delay.
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: u64,
    /// Failed runs in a row after which `/healthz` reports the job unhealthy.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after_failures: u32,
    /// How often WAL archive status and region reachability are probed.
    #[serde(default = "default_probe")]
    pub probe_seconds: u64,
    /// Holds the daemon lock (`daemon.lock`); one daemon per state_dir.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: default_listen(),
            max_concurrent_jobs: default_max_concurrent(),
            grace_seconds: default_grace(),
            retries: default_retries(),
            retry_initial_seconds: default_retry_initial(),
            retry_max_seconds: default_retry_max(),
            unhealthy_after_failures: default_unhealthy_after(),
            probe_seconds: default_probe(),
            state_dir: default_state_dir(),
        }
    }
}

/// 8597: outside the range Prometheus allocates to exporters (its default
/// port allocations list; 9187 there is postgres_exporter, which runs on the
/// same database hosts as the daemon).
fn default_listen() -> String {
    "127.0.0.1:8597".into()
}

fn default_max_concurrent() -> usize {
    2
}

fn default_grace() -> u64 {
    300
}

fn default_retries() -> u32 {
    3
}

fn default_retry_initial() -> u64 {
    30
}

fn default_retry_max() -> u64 {
    600
}

fn default_unhealthy_after() -> u32 {
    3
}

fn default_probe() -> u64 {
    30
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/dr/state")
}

impl Config {
    /// Every configured schedule, in a stable order.
    pub fn schedules(&self) -> Vec<ScheduleEntry<'_>> {
        let mut out = Vec::new();
        for (name, pg) in &self.postgres {
            if let Some(s) = &pg.get_ref().schedule {
                for (key, v) in [("backup", &s.backup), ("verify", &s.verify)] {
                    if let Some(expr) = v {
                        out.push(ScheduleEntry {
                            section: "postgres",
                            source: name.clone(),
                            key,
                            expr,
                        });
                    }
                }
            }
        }
        for (name, r) in &self.redis {
            if let Some(expr) = r
                .get_ref()
                .schedule
                .as_ref()
                .and_then(|s| s.snapshot.as_ref())
            {
                out.push(ScheduleEntry {
                    section: "redis",
                    source: name.clone(),
                    key: "snapshot",
                    expr,
                });
            }
        }
        for (name, r) in &self.rabbitmq {
            if let Some(expr) = r
                .get_ref()
                .schedule
                .as_ref()
                .and_then(|s| s.snapshot.as_ref())
            {
                out.push(ScheduleEntry {
                    section: "rabbitmq",
                    source: name.clone(),
                    key: "snapshot",
                    expr,
                });
            }
        }
        if let Some(expr) = self
            .retention
            .as_ref()
            .and_then(|r| r.get_ref().schedule.as_ref())
        {
            out.push(ScheduleEntry {
                section: "retention",
                source: String::new(),
                key: "schedule",
                expr,
            });
        }
        if let Some(expr) = self
            .sync
            .as_ref()
            .and_then(|r| r.get_ref().schedule.as_ref())
        {
            out.push(ScheduleEntry {
                section: "sync",
                source: String::new(),
                key: "schedule",
                expr,
            });
        }
        out
    }

    /// `[retention] orphan_age`, the default where the section is absent.
    pub fn orphan_age(&self) -> std::time::Duration {
        self.retention
            .as_ref()
            .map(|r| r.get_ref().orphan_age)
            .unwrap_or_else(default_orphan_age)
    }

    /// `[daemon]` settings, defaults where the section is absent.
    pub fn daemon(&self) -> DaemonConfig {
        self.daemon
            .as_ref()
            .map(|d| d.get_ref().clone())
            .unwrap_or_default()
    }
}
