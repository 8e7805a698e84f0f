//! TOML configuration: parsing, validation and error reporting with file:line.
//!
//! Every struct denies unknown fields so a typo is an error that names the key and
//! the line, never a silently ignored setting.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

/// A configuration error, already formatted as `file:line: message` plus a hint.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    /// `path:line` (or just the path when no position is known).
    pub location: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The whole `dr.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Encryption and write policy shared by all regions.
    pub repository: RepositoryConfig,
    /// Storage regions; the first listed is preferred for reads.
    #[serde(rename = "region", default)]
    pub regions: Vec<Spanned<RegionConfig>>,
    /// PostgreSQL clusters, by name (`[postgres.<name>]`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, Spanned<PgConfig>>,
    /// Redis instances, by name (`[redis.<name>]`).
    #[serde(default)]
    pub redis: std::collections::BTreeMap<String, Spanned<RedisConfig>>,
    /// Audit log settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Failover environments, by name (`[env.<name>]`): the servers playbooks act on.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, Spanned<EnvConfig>>,
    /// `dr daemon` settings (`[daemon]`).
    #[serde(default)]
    pub daemon: Option<Spanned<DaemonConfig>>,
    /// Retention (`[retention]`): when the daemon runs `dr expire`.
    #[serde(default)]
    pub retention: Option<Spanned<RetentionConfig>>,
    /// Region catch-up (`[sync]`): when the daemon runs `dr repo sync`.
    #[serde(default)]
    pub sync: Option<Spanned<SyncConfig>>,
    /// Disaster-recovery drills, by name (`[drill.<name>]`), run by `dr drill NAME`.
    #[serde(default)]
    pub drill: std::collections::BTreeMap<String, Spanned<DrillConfig>>,
    /// Where this file was loaded from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
    /// Validated regions, in preference order.
    #[serde(skip)]
    pub region_specs: Vec<RegionSpec>,
    /// Byte offsets where each line of the file starts, to name the line of
    /// a key after parsing (the text itself may hold secrets, so it is not kept).
    #[serde(skip)]
    line_starts: Vec<usize>,
}

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

/// `[redis.<name>]`: one Redis instance, snapshotted over the replication protocol.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user[:password]@]host[:port]` or `rediss://…` for TLS.
    pub url: String,
    /// Environment variable holding the password (instead of one in the URL).
    pub password_env: Option<String>,
    /// File holding the password (instead of one in the URL).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for `rediss://` servers with a private CA (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// `redis-server` binary, for servers `dr` starts on restored snapshots.
    #[serde(default = "default_redis_server")]
    pub server_bin: PathBuf,
    /// Unprivileged OS user for servers `dr` starts (default: the current user).
    pub os_user: Option<String>,
    /// Seconds without a byte from the server before a snapshot is abandoned.
    #[serde(default = "default_redis_timeout")]
    pub timeout_seconds: u64,
    /// What `dr expire` keeps (nothing is deleted without it).
    pub retention: Option<RedisRetention>,
    /// Scratch-restore verification (`dr verify redis --restore`).
    #[serde(default)]
    pub verify: RedisVerifyConfig,
    /// When `dr daemon` takes snapshots (`[redis.<name>.schedule]`).
    #[serde(default)]
    pub schedule: Option<RedisSchedule>,
}

/// `[redis.<name>.schedule]`: cron expressions, in UTC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSchedule {
    /// Snapshots (`dr backup redis`).
    pub snapshot: Option<Spanned<String>>,
}

/// One cron expression from the config and where it was set.
#[derive(Debug, Clone)]
pub struct ScheduleEntry<'a> {
    /// `"postgres"`, `"redis"` or `"retention"`.
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

/// `[postgres.<name>.schedule]`: cron expressions, in UTC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSchedule {
    /// Base backups (`dr backup pg`).
    pub backup: Option<Spanned<String>>,
    /// Scratch-restore verification.
    pub verify: Option<Spanned<String>>,
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

fn default_listen() -> String {
    "127.0.0.1:9187".into()
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

/// `[redis.<name>.verify]`: how a scratch restore of the instance is checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisVerifyConfig {
    /// Parent of the scratch directories (default: /var/tmp/dr-verify).
    pub scratch_dir: Option<PathBuf>,
    /// User checks (`[[redis.<name>.verify.check]]`).
    #[serde(default)]
    pub check: Vec<RedisCheck>,
}

/// One user check on a restored Redis: a command and the reply it must give.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisCheck {
    /// Shown in reports.
    pub name: String,
    /// The command and its arguments, e.g. `["EXISTS", "config:features"]`.
    pub command: Vec<String>,
    /// The expected reply as text (integers as digits, nil as `(nil)`).
    pub expect: String,
    /// Database to `SELECT` first (default 0).
    #[serde(default)]
    pub db: u32,
}

fn default_redis_server() -> PathBuf {
    PathBuf::from("/usr/bin/redis-server")
}

fn default_redis_timeout() -> u64 {
    60
}

/// `[postgres.<name>]`: one PostgreSQL cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    /// libpq-style connection string (key=value or postgresql:// URL).
    #[serde(default)]
    pub conninfo: String,
    /// PGDATA: read by local-mode backups and `wal-push`. Not needed by
    /// remote-mode backups, which run anywhere.
    #[serde(default)]
    pub data_dir: PathBuf,
    /// How base backups read the cluster: `"local"` (PGDATA on this host,
    /// between `pg_backup_start` and `pg_backup_stop`) or `"remote"`
    /// (`BASE_BACKUP` over the replication protocol, from any host).
    #[serde(default)]
    pub mode: BackupMode,
    /// Directory holding `postgres` and `pg_ctl`, for servers `dr` starts.
    #[serde(default = "default_pg_bin")]
    pub bin_dir: PathBuf,
    /// Unprivileged OS user that runs PostgreSQL servers `dr` starts.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// Files copied in parallel during a base backup.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Where `wal-fetch` keeps prefetched segments (default: `<PGDATA>/pg_wal/dr-spool`).
    pub spool_dir: Option<PathBuf>,
    /// Segments `wal-fetch` downloads ahead of the one PostgreSQL asked for.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Local state (the last backup's block map) for block-incremental backups
    /// (default: /var/lib/dr/state).
    pub state_dir: Option<PathBuf>,
    /// Take a full backup instead of a block-incremental one once the
    /// oldest backup the previous one references is this old, e.g. "7d"
    /// (default: never; blocks are referenced for as long as they are
    /// unchanged).
    #[serde(default, with = "humantime_serde_opt")]
    pub full_every: Option<std::time::Duration>,
    /// Verify page checksums while backing up (when the cluster has them).
    #[serde(default = "yes")]
    pub verify_checksums: bool,
    /// What `dr expire` keeps (nothing is deleted without it).
    pub retention: Option<PgRetention>,
    /// Scratch-restore verification (`dr verify pg --restore`).
    #[serde(default)]
    pub verify: PgVerifyConfig,
    /// When `dr daemon` runs jobs on this cluster (`[postgres.<name>.schedule]`).
    #[serde(default)]
    pub schedule: Option<PgSchedule>,
    /// How WAL reaches the repository: `"archive"` (archive_command runs
    /// `dr wal-push`) or `"stream"` (dr streams it over the replication
    /// protocol: `dr wal-stream`, or the daemon).
    #[serde(default)]
    pub wal: WalMode,
    /// Physical replication slot the streamer uses (created if missing).
    pub slot: Option<String>,
    /// `application_name` of the streamer: the name `synchronous_standby_names`
    /// refers to (default `dr_<cluster>`).
    pub application_name: Option<String>,
    /// Longest time streamed WAL waits before it is written to the regions
    /// (asynchronous mode).
    #[serde(default = "default_stream_flush", with = "humantime_serde")]
    pub stream_flush_interval: std::time::Duration,
    /// Write streamed WAL to the regions as soon as it arrives, for running as
    /// a synchronous standby (`synchronous_standby_names`): RPO = 0.
    #[serde(default)]
    pub synchronous: bool,
    /// Longest time a base backup waits, after the server ends backup mode,
    /// for the WAL segment the backup needs to reach the repository.
    #[serde(default = "default_stop_wal_timeout", with = "humantime_serde")]
    pub stop_wal_timeout: std::time::Duration,
}

/// How base backups read the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    /// Read PGDATA directly on the database host.
    #[default]
    Local,
    /// `BASE_BACKUP` over a replication connection.
    Remote,
}

/// How WAL is archived.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalMode {
    /// `archive_command = 'dr wal-push %p'`.
    #[default]
    Archive,
    /// Streaming replication into the repository.
    Stream,
}

fn default_stop_wal_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}

fn default_stream_flush() -> std::time::Duration {
    std::time::Duration::from_secs(1)
}

mod humantime_serde {
    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration like \"1s\" or \"200ms\": {e}"
            ))
        })
    }
}

/// `[postgres.<name>.retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgRetention {
    /// Keep the N newest base backups.
    pub keep_full: Option<usize>,
    /// Keep every backup and WAL segment needed to restore to any point of
    /// this recent span, e.g. "14d".
    #[serde(default, with = "humantime_serde_opt")]
    pub keep_within: Option<std::time::Duration>,
}

/// `[redis.<name>.retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisRetention {
    /// Keep the N newest snapshots.
    pub keep_snapshots: Option<usize>,
    /// Keep the snapshots needed for any point of this recent span, e.g. "7d".
    #[serde(default, with = "humantime_serde_opt")]
    pub keep_within: Option<std::time::Duration>,
}

/// `"14d"`-style durations in TOML.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            humantime::parse_duration(&s).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({e}); write e.g. \"14d\", \"36h\" or \"2weeks\""
                ))
            })
        })
        .transpose()
    }
}

/// `[postgres.<name>.verify]`: how a scratch restore of the cluster is checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgVerifyConfig {
    /// Parent of the scratch directories (default: /var/tmp/dr-verify). The
    /// restored cluster is written here, so it needs room for a full copy.
    pub scratch_dir: Option<PathBuf>,
    /// Database user the checks connect as (a superuser of the cluster).
    #[serde(default = "default_verify_user")]
    pub user: String,
    /// Largest accepted gap between the target and the last replayed
    /// transaction; a bigger one means WAL is missing or archiving lags.
    #[serde(default = "default_replay_lag")]
    pub max_replay_lag_seconds: u64,
    /// User checks (`[[postgres.<name>.verify.check]]`).
    #[serde(default)]
    pub check: Vec<PgCheck>,
}

impl Default for PgVerifyConfig {
    fn default() -> Self {
        PgVerifyConfig {
            scratch_dir: None,
            user: default_verify_user(),
            max_replay_lag_seconds: default_replay_lag(),
            check: Vec::new(),
        }
    }
}

fn default_verify_user() -> String {
    "postgres".into()
}

fn default_replay_lag() -> u64 {
    300
}

/// One user check on a restored cluster: SQL returning one boolean.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgCheck {
    /// Shown in reports.
    pub name: String,
    /// Database to run it in (default: postgres).
    #[serde(default = "default_check_db")]
    pub database: String,
    /// A query returning exactly one row with one boolean column; true passes.
    pub sql: String,
}

fn default_check_db() -> String {
    "postgres".into()
}

/// Where scratch restores go when no `scratch_dir` is configured.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp/dr-verify";

/// `[drill.<name>]`: a rehearsed recovery of several sources, with objectives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// PostgreSQL clusters to restore (names of `[postgres.*]`).
    #[serde(default)]
    pub postgres: Vec<String>,
    /// Redis instances to restore (names of `[redis.*]`).
    #[serde(default)]
    pub redis: Vec<String>,
    /// Recovery target: `latest` or a time (RFC 3339).
    #[serde(default = "default_drill_to")]
    pub to: String,
    /// Where the sources are restored: `scratch` (servers dr starts on
    /// loopback and removes afterwards) or the name of an `[env.<name>]`
    /// with `allow_overwrite = true` whose servers, named after the sources,
    /// are overwritten and left running.
    #[serde(default = "default_drill_environment")]
    pub environment: String,
    /// Failover playbook run once every source answers (name or path).
    pub playbook: Option<String>,
    /// Environment the playbook acts on; default: the restored servers,
    /// named after their sources (the staging environment itself, or the
    /// scratch servers).
    pub env: Option<String>,
    /// Recovery-time objective: drill start to every source answering (and
    /// the playbook's RTO point, when one runs).
    pub rto_seconds: Option<f64>,
    /// Recovery-point objective: the largest target-to-recovered-point gap.
    pub rpo_seconds: Option<f64>,
    /// Directory for the JSON and Markdown reports.
    pub report_dir: PathBuf,
}

fn default_drill_to() -> String {
    "latest".into()
}

fn default_drill_environment() -> String {
    SCRATCH.into()
}

/// The drill environment of servers dr starts and removes; reserved, so no
/// `[env.scratch]` can make it ambiguous.
pub const SCRATCH: &str = "scratch";

impl DrillConfig {
    /// The `[env.<name>]` the drill restores into, `None` for scratch servers.
    pub fn staging(&self) -> Option<&str> {
        (self.environment != SCRATCH).then_some(self.environment.as_str())
    }
}

fn yes() -> bool {
    true
}

impl PgConfig {
    /// Where local backup state lives.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/dr/state"))
    }

    /// The streamer's replication slot (default `dr_<cluster>`, with `-`
    /// made `_` as slot names allow only `[a-z0-9_]`).
    pub fn slot_name(&self, cluster: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("dr_{}", cluster.to_lowercase().replace('-', "_")))
    }

    /// The streamer's `application_name` (default `dr_<cluster>`).
    pub fn stream_application_name(&self, cluster: &str) -> String {
        self.application_name
            .clone()
            .unwrap_or_else(|| format!("dr_{cluster}"))
    }
}

fn default_pg_bin() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn default_os_user() -> String {
    "postgres".into()
}

fn default_parallel() -> usize {
    4
}

fn default_prefetch() -> usize {
    8
}

/// `[env.<name>]`: the servers of one environment, named so that playbooks
/// can refer to them (`target = "standby1"`) without holding addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Holds the failover lock of this environment (default: /var/lib/dr/state).
    pub state_dir: Option<PathBuf>,
    /// Drills may replace the data of these servers (`[drill.*] environment`
    /// naming this environment). Never set it on an environment with data
    /// that matters.
    #[serde(default)]
    pub allow_overwrite: bool,
    /// PostgreSQL servers, by name (`[env.<name>.postgres.<server>]`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, Spanned<PgTarget>>,
    /// Redis servers, by name (`[env.<name>.redis.<server>]`).
    #[serde(default)]
    pub redis: std::collections::BTreeMap<String, Spanned<RedisTarget>>,
}

impl EnvConfig {
    /// Where the failover lock lives.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/dr/state"))
    }
}

/// One PostgreSQL server a playbook may act on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgTarget {
    /// How `dr` connects (libpq key=value or URL; sslmode honoured).
    pub conninfo: String,
    /// What standbys put in `primary_conninfo` to stream from this server
    /// (`pg.repoint`); default: `conninfo`. Differs when standbys reach it by
    /// another address or user.
    pub replication_conninfo: Option<String>,
    /// PGDATA, for actions that run pg_ctl (`pg.fence mode = "stop"`, restarts).
    /// Those actions only work when `dr` runs on this server's host.
    pub data_dir: Option<PathBuf>,
    /// Directory holding `pg_ctl`.
    #[serde(default = "default_pg_bin")]
    pub bin_dir: PathBuf,
    /// Unprivileged OS user pg_ctl runs as.
    #[serde(default = "default_os_user")]
    pub os_user: String,
}

impl PgTarget {
    /// The conninfo standbys stream from.
    pub fn replication_conninfo(&self) -> &str {
        self.replication_conninfo
            .as_deref()
            .unwrap_or(&self.conninfo)
    }
}

/// One Redis server a playbook may act on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTarget {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// The server's own config file, which a drill restarts it with (the
    /// snapshot loads only at start-up). Needed for drills into this server.
    pub config_file: Option<PathBuf>,
    /// Its `dir`: where a drill places the restored snapshot.
    pub dir: Option<PathBuf>,
    /// Its `dbfilename`.
    #[serde(default = "default_dbfilename")]
    pub dbfilename: String,
    /// `redis-server` binary a drill restarts it with.
    #[serde(default = "default_redis_server")]
    pub server_bin: PathBuf,
    /// OS user the server runs as (default: the current user).
    pub os_user: Option<String>,
}

impl RedisTarget {
    /// A server known only by its URL (playbooks need no more).
    pub fn at_url(url: String) -> RedisTarget {
        RedisTarget {
            url,
            config_file: None,
            dir: None,
            dbfilename: default_dbfilename(),
            server_bin: default_redis_server(),
            os_user: None,
        }
    }
}

fn default_dbfilename() -> String {
    "dump.rdb".into()
}

/// A validated region: its name and backend.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSpec {
    /// Unique region name.
    pub name: String,
    /// Backend settings.
    pub kind: RegionKind,
}

fn pick_secret(
    literal: &Option<String>,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<SecretSource>, ()> {
    let mut out = Vec::new();
    if let Some(v) = literal {
        out.push(SecretSource::Literal(v.clone()));
    }
    if let Some(v) = env {
        out.push(SecretSource::Env(v.clone()));
    }
    if let Some(v) = file {
        out.push(SecretSource::File(v.clone()));
    }
    match out.len() {
        0 => Ok(None),
        1 => Ok(out.pop()),
        _ => Err(()),
    }
}

/// `[repository]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// age recipients (public keys). Backup hosts need only these.
    #[serde(default = "no_recipients")]
    pub recipients: Spanned<Vec<String>>,
    /// age identity file (private key); needed only where restores run.
    #[serde(default)]
    pub identity_file: Option<Spanned<PathBuf>>,
    /// zstd level (1..=19).
    #[serde(default = "default_level")]
    pub compression_level: Spanned<i32>,
    /// zstd level for WAL segments, where archive latency matters more than size.
    #[serde(default = "default_wal_level")]
    pub wal_compression_level: Spanned<i32>,
    /// Regions that must hold an object durably before a write counts.
    #[serde(default = "default_min_regions")]
    pub min_regions: Spanned<usize>,
    /// A region that takes no data of a write for this long is stalled: its
    /// write is abandoned and the region counts as failed for that write.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: std::time::Duration,
}

fn default_stall_timeout() -> std::time::Duration {
    crate::store::DEFAULT_STALL_TIMEOUT
}

fn no_recipients() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}

fn default_level() -> Spanned<i32> {
    Spanned::new(0..0, 3)
}

fn default_wal_level() -> Spanned<i32> {
    Spanned::new(0..0, 1)
}

fn default_min_regions() -> Spanned<usize> {
    Spanned::new(0..0, 1)
}

/// One `[[region]]`. Kept flat (no serde `flatten`) so that unknown keys are
/// rejected and every key keeps its line number.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Unique name, used in messages and `--region`.
    pub name: Spanned<String>,
    /// `"fs"` or `"s3"`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// fs: directory that holds the repository.
    pub path: Option<PathBuf>,
    /// s3: endpoint URL; omitted means AWS.
    pub endpoint: Option<String>,
    /// s3: bucket name.
    pub bucket: Option<String>,
    /// s3: key prefix inside the bucket.
    pub prefix: Option<String>,
    /// s3: signing region.
    pub s3_region: Option<String>,
    /// s3: path-style addressing (most S3-compatible servers want this).
    pub path_style: Option<bool>,
    /// s3: literal access key id (prefer `_env` or `_file`).
    pub access_key_id: Option<String>,
    /// s3: environment variable holding the access key id.
    pub access_key_id_env: Option<String>,
    /// s3: file holding the access key id.
    pub access_key_id_file: Option<PathBuf>,
    /// s3: literal secret key (prefer `_env` or `_file`).
    pub secret_access_key: Option<String>,
    /// s3: environment variable holding the secret key.
    pub secret_access_key_env: Option<String>,
    /// s3: file holding the secret key.
    pub secret_access_key_file: Option<PathBuf>,
    /// s3: multipart part size in MiB.
    pub part_size_mib: Option<usize>,
    /// s3: write every object with S3 Object Lock retention of this many days
    /// (the bucket must have Object Lock enabled).
    pub object_lock_days: Option<u32>,
    /// s3: `"compliance"` (default; nobody can shorten it) or `"governance"`.
    pub object_lock_mode: Option<String>,
}

/// A validated region backend.
#[derive(Debug, Clone, PartialEq)]
pub enum RegionKind {
    /// A local (or mounted) filesystem directory.
    Fs {
        /// Directory that holds the repository.
        path: PathBuf,
    },
    /// An S3-compatible bucket.
    S3(S3Region),
}

/// Validated `type = "s3"` settings.
#[derive(Clone, PartialEq)]
pub struct S3Region {
    /// Endpoint URL; `None` means AWS.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing '/').
    pub prefix: String,
    /// Signing region.
    pub s3_region: String,
    /// Path-style addressing.
    pub path_style: bool,
    /// Where the access key id comes from; `None` = standard AWS chain.
    pub access_key_id: Option<SecretSource>,
    /// Where the secret key comes from.
    pub secret_access_key: Option<SecretSource>,
    /// Multipart part size in bytes.
    pub part_size: usize,
    /// Object Lock retention written with every object, if any.
    pub object_lock: Option<ObjectLock>,
}

/// S3 Object Lock retention applied to every object a region stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Retention period.
    pub days: u32,
    /// COMPLIANCE (true) or GOVERNANCE mode.
    pub compliance: bool,
}

/// Where a secret is read from.
#[derive(Clone, PartialEq)]
pub enum SecretSource {
    /// Written in the config (discouraged).
    Literal(String),
    /// An environment variable name.
    Env(String),
    /// A file path.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal([redacted])"),
            SecretSource::Env(n) => write!(f, "Env({n})"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl SecretSource {
    /// Resolves the secret; the error says which variable or file is missing.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            SecretSource::Literal(s) => Ok(s.clone()),
            SecretSource::Env(n) => std::env::var(n).map_err(|_| {
                format!("environment variable {n} is not set; export it or use a *_file setting")
            }),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display())),
        }
    }
}

impl fmt::Debug for S3Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Region")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("s3_region", &self.s3_region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("part_size", &self.part_size)
            .field("object_lock", &self.object_lock)
            .finish()
    }
}

impl fmt::Debug for RegionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionConfig")
            .field("name", self.name.get_ref())
            .field("type", self.kind.get_ref())
            .finish_non_exhaustive()
    }
}

/// Where to look for the config when `--config` is not given.
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DR_CONFIG") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("dr.toml");
    if local.exists() {
        return local;
    }
    PathBuf::from("/etc/dr/dr.toml")
}

impl Config {
    /// Reads and parses a config file, checking everything that needs no
    /// engine knowledge. Parse-only: entry points load through
    /// `dr::validate::load`, which also runs the engines' checks.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: path.display().to_string(),
            message: format!(
                "cannot read config: {e}; pass --config FILE, set DR_CONFIG, or create ./dr.toml \
                 (see config/dr.toml for an example)"
            ),
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text and checks what needs no engine knowledge; `path`
    /// is used in messages only. Entry points use `dr::validate::parse`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            ConfigError {
                location: location(path, text, span.clone()),
                message: with_hint(e.message().trim()),
            }
        })?;
        cfg.source = path.to_path_buf();
        cfg.line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        if let Ok(id) = std::env::var("DR_IDENTITY_FILE")
            && !id.is_empty()
        {
            cfg.repository.identity_file = Some(Spanned::new(0..0, PathBuf::from(id)));
        }
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn err(&self, text: &str, span: Range<usize>, message: String) -> ConfigError {
        ConfigError {
            location: location(&self.source, text, Some(span)),
            message,
        }
    }

    fn validate(&mut self, text: &str) -> Result<(), ConfigError> {
        let mut specs = Vec::new();
        let repo = &self.repository;
        if repo.recipients.get_ref().is_empty() {
            return Err(self.err(
                text,
                repo.recipients.span(),
                "[repository] has no recipients; add `recipients = [\"age1…\"]` \
                 (create a key pair with `dr keygen --output identity.txt`)"
                    .into(),
            ));
        }
        for r in repo.recipients.get_ref() {
            if r.parse::<age::x25519::Recipient>().is_err() {
                return Err(self.err(
                    text,
                    repo.recipients.span(),
                    format!(
                        "recipient {r:?} is not an age X25519 public key (expected \"age1…\"); \
                         `dr keygen` prints one"
                    ),
                ));
            }
        }
        for (name, l) in [
            ("compression_level", &repo.compression_level),
            ("wal_compression_level", &repo.wal_compression_level),
        ] {
            let level = *l.get_ref();
            if !(1..=19).contains(&level) {
                return Err(self.err(
                    text,
                    l.span(),
                    format!("{name} = {level} is out of range; use 1 (fastest) to 19"),
                ));
            }
        }
        if self.regions.is_empty() {
            return Err(ConfigError {
                location: self.source.display().to_string(),
                message: "no [[region]] is configured; add one, e.g. \
                          [[region]] name = \"local\" type = \"fs\" path = \"/var/lib/dr/repo\""
                    .into(),
            });
        }
        let min = *repo.min_regions.get_ref();
        if min == 0 || min > self.regions.len() {
            return Err(self.err(
                text,
                repo.min_regions.span(),
                format!(
                    "min_regions = {min} but {} region(s) are configured; use a value from 1 to {}",
                    self.regions.len(),
                    self.regions.len()
                ),
            ));
        }
        for (i, region) in self.regions.iter().enumerate() {
            let r = region.get_ref();
            let name = r.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.err(
                    text,
                    r.name.span(),
                    format!("region name {name:?} must be non-empty and use only letters, digits, '-' and '_'"),
                ));
            }
            if let Some(prev) = self.regions[..i]
                .iter()
                .find(|p| p.get_ref().name.get_ref() == name)
            {
                let prev_line = line_of(text, prev.get_ref().name.span().start);
                return Err(self.err(
                    text,
                    r.name.span(),
                    format!(
                        "duplicate region name {name:?} (first used on line {prev_line}); \
                         give each [[region]] a unique name"
                    ),
                ));
            }
            let spec = self.region_kind(text, region)?;
            specs.push(RegionSpec {
                name: name.clone(),
                kind: spec,
            });
        }
        for (name, r) in &self.redis {
            if !layout_name_ok(name) {
                return Err(self.err(
                    text,
                    r.span(),
                    format!(
                        "[redis.{name}]: names may use only letters, digits, '-' and '_' (max 64)"
                    ),
                ));
            }
            if r.get_ref().timeout_seconds == 0 {
                return Err(self.err(
                    text,
                    r.span(),
                    format!("[redis.{name}]: timeout_seconds must be at least 1"),
                ));
            }
        }
        for (name, pg) in &self.postgres {
            let p = pg.get_ref();
            if !layout_name_ok(name) {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!("[postgres.{name}]: names may use only letters, digits, '-' and '_' (max 64)"),
                ));
            }
            if p.data_dir.as_os_str().is_empty() && p.mode == BackupMode::Local {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: data_dir is missing; local-mode backups read PGDATA \
                         (set data_dir), or set mode = \"remote\" to back up over the \
                         replication protocol"
                    ),
                ));
            }
            if !p.data_dir.as_os_str().is_empty() && !p.data_dir.is_absolute() {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: data_dir {} must be absolute",
                        p.data_dir.display()
                    ),
                ));
            }
            if p.conninfo.trim().is_empty() {
                let what = match p.mode {
                    BackupMode::Remote => {
                        "mode = \"remote\" needs conninfo naming the server and a user with \
                         the REPLICATION attribute (e.g. \"host=db1 user=dr_backup dbname=postgres\")"
                    }
                    BackupMode::Local => {
                        "conninfo is missing (e.g. \"host=127.0.0.1 port=5432 user=postgres dbname=postgres\")"
                    }
                };
                return Err(self.err(text, pg.span(), format!("[postgres.{name}]: {what}")));
            }
            if p.parallel == 0 || p.parallel > 64 {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: parallel = {} is out of range; use 1 to 64",
                        p.parallel
                    ),
                ));
            }
            let slot = p.slot_name(name);
            if slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: slot {slot:?} is not a replication slot name; \
                         use lower-case letters, digits and '_' (max 63)"
                    ),
                ));
            }
            if p.stream_flush_interval.is_zero() {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!("[postgres.{name}]: stream_flush_interval must be above zero"),
                ));
            }
            if p.synchronous && p.wal != WalMode::Stream {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: synchronous = true needs wal = \"stream\" \
                         (archive_command cannot make commits wait)"
                    ),
                ));
            }
        }
        for (name, env) in &self.env {
            self.validate_env(text, name, env)?;
        }
        self.validate_verify(text)?;
        for (name, d) in &self.drill {
            self.validate_drill(text, name, d)?;
        }
        self.validate_daemon(text)?;
        self.region_specs = specs;
        Ok(())
    }

    fn validate_verify(&self, text: &str) -> Result<(), ConfigError> {
        for (name, pg) in &self.postgres {
            let v = &pg.get_ref().verify;
            let fail = |msg: String| {
                Err(self.err(text, pg.span(), format!("[postgres.{name}.verify]: {msg}")))
            };
            if let Some(d) = v.scratch_dir.as_ref().filter(|d| !scratch_path_ok(d)) {
                return fail(format!(
                    "scratch_dir {} must be absolute and free of spaces and quotes",
                    d.display()
                ));
            }
            for c in &v.check {
                if c.name.trim().is_empty() || c.sql.trim().is_empty() {
                    return fail(
                        "every [[check]] needs a name and sql, e.g. name = \"users exist\" sql = \"SELECT count(*) > 0 FROM users\"".into(),
                    );
                }
            }
        }
        for (name, r) in &self.redis {
            let v = &r.get_ref().verify;
            let fail = |msg: String| {
                Err(self.err(text, r.span(), format!("[redis.{name}.verify]: {msg}")))
            };
            if let Some(d) = v.scratch_dir.as_ref().filter(|d| !scratch_path_ok(d)) {
                return fail(format!(
                    "scratch_dir {} must be absolute and free of spaces and quotes",
                    d.display()
                ));
            }
            for c in &v.check {
                if c.name.trim().is_empty() || c.command.is_empty() {
                    return fail(
                        "every [[check]] needs a name and a command, e.g. command = [\"DBSIZE\"] expect = \"42\"".into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn validate_drill(
        &self,
        text: &str,
        name: &str,
        d: &Spanned<DrillConfig>,
    ) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(self.err(text, d.span(), format!("[drill.{name}]: {msg}")));
        let c = d.get_ref();
        if !layout_name_ok(name) {
            return fail("names may use only letters, digits, '-' and '_' (max 64)".into());
        }
        if c.postgres.is_empty() && c.redis.is_empty() {
            return fail(
                "restores nothing; add postgres = [\"main\"] and/or redis = [\"cache\"]".into(),
            );
        }
        for p in &c.postgres {
            if !self.postgres.contains_key(p) {
                return fail(format!("postgres = [{p:?}] names no [postgres.{p}]"));
            }
        }
        for r in &c.redis {
            if !self.redis.contains_key(r) {
                return fail(format!("redis = [{r:?}] names no [redis.{r}]"));
            }
        }
        if c.to != "latest" && crate::time::parse_time(&c.to).is_err() {
            return fail(format!(
                "to = {:?} is neither \"latest\" nor a time like \"2026-11-25T18:44:12Z\"",
                c.to
            ));
        }
        if let Some(env) = c.staging() {
            self.validate_staging(env, c).or_else(fail)?;
        }
        if let Some(e) = &c.env
            && !self.env.contains_key(e)
        {
            return fail(format!("env = {e:?} names no [env.{e}]"));
        }
        if c.env.is_some() && c.playbook.is_none() {
            return fail(
                "env is only used by a playbook; add playbook = \"…\" or remove env".into(),
            );
        }
        for (k, v) in [
            ("rto_seconds", c.rto_seconds),
            ("rpo_seconds", c.rpo_seconds),
        ] {
            // NaN fails too: it is not a finite positive number.
            if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
                return fail(format!("{k} must be a positive number of seconds"));
            }
        }
        if !c.report_dir.is_absolute() {
            return fail(format!(
                "report_dir {} must be absolute",
                c.report_dir.display()
            ));
        }
        Ok(())
    }

    /// A drill into `[env.<env>]`: the environment exists, allows
    /// overwriting, has a server for every source with what the restore
    /// needs, and none of them is (or lies inside) a protected server.
    fn validate_staging(&self, env: &str, d: &DrillConfig) -> Result<(), String> {
        let e = self.env.get(env).map(|e| e.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.env.keys().collect();
            format!(
                "environment = {env:?} is neither \"scratch\" nor an [env.<name>]{}",
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" (configured: {})", join(&names))
                }
            )
        })?;
        if !e.allow_overwrite {
            return Err(format!(
                "environment = {env:?}: the drill replaces the data of every server it restores into, \
                 and [env.{env}] does not set allow_overwrite = true; set it only on a staging environment"
            ));
        }
        for p in &d.postgres {
            let t = e.postgres.get(p).map(|t| t.get_ref()).ok_or_else(|| {
                format!("postgres = [{p:?}] has no server [env.{env}.postgres.{p}] to restore into")
            })?;
            if t.data_dir.is_none() {
                return Err(format!(
                    "[env.{env}.postgres.{p}] needs data_dir (and bin_dir, os_user): the drill stops the server, \
                     restores into its data directory and starts it again"
                ));
            }
        }
        for r in &d.redis {
            let t = e.redis.get(r).map(|t| t.get_ref()).ok_or_else(|| {
                format!("redis = [{r:?}] has no server [env.{env}.redis.{r}] to restore into")
            })?;
            if t.config_file.is_none() || t.dir.is_none() {
                return Err(format!(
                    "[env.{env}.redis.{r}] needs config_file and dir: the drill places the snapshot in dir \
                     and restarts the server with its config file"
                ));
            }
        }
        Ok(())
    }

    /// Checks `[daemon]` and every cron expression, so `dr check` reports a
    /// bad schedule with its line before the daemon ever reads it.
    fn validate_daemon(&self, text: &str) -> Result<(), ConfigError> {
        for e in self.schedules() {
            crate::schedule::Cron::parse(e.expr.get_ref()).map_err(|why| {
                self.err(
                    text,
                    e.expr.span(),
                    format!("{} {} = {:?}: {why}", e.table(), e.key, e.expr.get_ref()),
                )
            })?;
        }
        let Some(d) = &self.daemon else {
            return Ok(());
        };
        let c = d.get_ref();
        let fail = |msg: String| Err(self.err(text, d.span(), format!("[daemon]: {msg}")));
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!(
                "listen = {:?} is not an address and port; use e.g. \"127.0.0.1:9187\"",
                c.listen
            ));
        }
        if !(1..=64).contains(&c.max_concurrent_jobs) {
            return fail(format!(
                "max_concurrent_jobs = {} is out of range; use 1 to 64",
                c.max_concurrent_jobs
            ));
        }
        if c.retry_initial_seconds == 0 || c.retry_max_seconds < c.retry_initial_seconds {
            return fail(
                "retry_initial_seconds must be at least 1 and at most retry_max_seconds".into(),
            );
        }
        if c.unhealthy_after_failures == 0 || c.probe_seconds == 0 {
            return fail("unhealthy_after_failures and probe_seconds must be at least 1".into());
        }
        if !c.state_dir.is_absolute() {
            return fail(format!(
                "state_dir {} must be absolute",
                c.state_dir.display()
            ));
        }
        Ok(())
    }

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

    /// `path:line` of a key's span in this config, for messages about it.
    pub fn location_of(&self, span: Range<usize>) -> String {
        if span.end == 0 || self.line_starts.is_empty() {
            return self.source.display().to_string();
        }
        let line = self.line_starts.partition_point(|&s| s <= span.start);
        format!("{}:{line}", self.source.display())
    }

    /// An error about the config text at `span`, for checks that run after
    /// parsing (the engines' own checks).
    pub fn error_at(&self, span: Range<usize>, message: String) -> ConfigError {
        ConfigError {
            location: self.location_of(span),
            message,
        }
    }

    fn validate_env(
        &self,
        text: &str,
        name: &str,
        env: &Spanned<EnvConfig>,
    ) -> Result<(), ConfigError> {
        let fail = |span: Range<usize>, msg: String| Err(self.err(text, span, msg));
        let check_name = |n: &str, section: &str, span: Range<usize>| {
            if layout_name_ok(n) {
                Ok(())
            } else {
                fail(
                    span,
                    format!("{section}: names may use only letters, digits, '-' and '_' (max 64)"),
                )
            }
        };
        check_name(name, &format!("[env.{name}]"), env.span())?;
        if name == SCRATCH {
            return fail(
                env.span(),
                "[env.scratch]: the name is reserved for the servers drills start and remove; rename the environment".into(),
            );
        }
        let e = env.get_ref();
        if e.postgres.is_empty() && e.redis.is_empty() {
            return fail(
                env.span(),
                format!(
                    "[env.{name}] names no server; add [env.{name}.postgres.<server>] with conninfo or [env.{name}.redis.<server>] with url"
                ),
            );
        }
        for (server, t) in &e.postgres {
            let section = format!("[env.{name}.postgres.{server}]");
            check_name(server, &section, t.span())?;
            let p = t.get_ref();
            if let Some(d) = p.data_dir.as_ref().filter(|d| !d.is_absolute()) {
                return fail(
                    t.span(),
                    format!("{section}: data_dir {} must be absolute", d.display()),
                );
            }
        }
        for (server, t) in &e.redis {
            let section = format!("[env.{name}.redis.{server}]");
            check_name(server, &section, t.span())?;
            let r = t.get_ref();
            for (k, p) in [("config_file", &r.config_file), ("dir", &r.dir)] {
                if let Some(p) = p.as_ref().filter(|p| !p.is_absolute()) {
                    return fail(
                        t.span(),
                        format!("{section}: {k} {} must be absolute", p.display()),
                    );
                }
            }
            if r.dbfilename.is_empty() || r.dbfilename.contains('/') {
                return fail(
                    t.span(),
                    format!(
                        "{section}: dbfilename {:?} must be a plain file name",
                        r.dbfilename
                    ),
                );
            }
            if let Err(err) = redis::Client::open(t.get_ref().url.as_str()) {
                return fail(
                    t.span(),
                    format!(
                        "{section}: url is not a Redis URL ({err}); use e.g. \"redis://127.0.0.1:6379\""
                    ),
                );
            }
        }
        Ok(())
    }

    fn region_kind(
        &self,
        text: &str,
        region: &Spanned<RegionConfig>,
    ) -> Result<RegionKind, ConfigError> {
        let r = region.get_ref();
        let name = r.name.get_ref();
        let fail =
            |msg: String| Err(self.err(text, region.span(), format!("region {name:?}: {msg}")));
        let s3_keys = [
            ("endpoint", r.endpoint.is_some()),
            ("bucket", r.bucket.is_some()),
            ("prefix", r.prefix.is_some()),
            ("s3_region", r.s3_region.is_some()),
            ("path_style", r.path_style.is_some()),
            ("access_key_id", r.access_key_id.is_some()),
            ("access_key_id_env", r.access_key_id_env.is_some()),
            ("access_key_id_file", r.access_key_id_file.is_some()),
            ("secret_access_key", r.secret_access_key.is_some()),
            ("secret_access_key_env", r.secret_access_key_env.is_some()),
            ("secret_access_key_file", r.secret_access_key_file.is_some()),
            ("part_size_mib", r.part_size_mib.is_some()),
            ("object_lock_days", r.object_lock_days.is_some()),
            ("object_lock_mode", r.object_lock_mode.is_some()),
        ];
        match r.kind.get_ref().as_str() {
            "fs" => {
                if let Some((k, _)) = s3_keys.iter().find(|(_, set)| *set) {
                    return fail(format!("`{k}` only applies to type = \"s3\"; remove it"));
                }
                match &r.path {
                    None => {
                        fail("type = \"fs\" needs a path; add `path = \"/var/lib/dr/repo\"`".into())
                    }
                    Some(p) if !p.is_absolute() => fail(format!(
                        "path {} is relative; use an absolute path",
                        p.display()
                    )),
                    Some(p) => Ok(RegionKind::Fs { path: p.clone() }),
                }
            }
            "s3" => {
                if r.path.is_some() {
                    return fail(
                        "`path` only applies to type = \"fs\"; use bucket and prefix".into(),
                    );
                }
                let bucket = r.bucket.clone().unwrap_or_default();
                if bucket.is_empty() {
                    return fail("type = \"s3\" needs a bucket; add `bucket = \"…\"`".into());
                }
                let key = pick_secret(
                    &r.access_key_id,
                    &r.access_key_id_env,
                    &r.access_key_id_file,
                );
                let secret = pick_secret(
                    &r.secret_access_key,
                    &r.secret_access_key_env,
                    &r.secret_access_key_file,
                );
                let (Ok(key), Ok(secret)) = (key, secret) else {
                    return fail(
                        "set at most one of access_key_id / access_key_id_env / access_key_id_file \
                         (and of the secret_access_key settings)"
                            .into(),
                    );
                };
                if key.is_some() != secret.is_some() {
                    return fail(
                        "set both an access key id and a secret access key, or neither to use \
                         the standard AWS credential chain"
                            .into(),
                    );
                }
                let part_mib = r.part_size_mib.unwrap_or(8);
                if !(5..=4096).contains(&part_mib) {
                    return fail(format!(
                        "part_size_mib = {part_mib} is out of range; S3 needs 5 to 4096"
                    ));
                }
                let prefix = r.prefix.clone().unwrap_or_default();
                if prefix.starts_with('/') || prefix.split('/').any(|c| c == "..") {
                    return fail(format!(
                        "prefix {prefix:?} must be relative and must not contain '..'"
                    ));
                }
                if let Some(ep) = &r.endpoint
                    && !(ep.starts_with("http://") || ep.starts_with("https://"))
                {
                    return fail(format!(
                        "endpoint {ep:?} must start with http:// or https://"
                    ));
                }
                let object_lock = match (r.object_lock_days, r.object_lock_mode.as_deref()) {
                    (None, None) => None,
                    (None, Some(_)) => {
                        return fail(
                            "object_lock_mode needs object_lock_days (the retention period)".into(),
                        );
                    }
                    (Some(0), _) => {
                        return fail("object_lock_days must be at least 1".into());
                    }
                    (Some(days), mode) => {
                        let compliance = match mode.unwrap_or("compliance") {
                            "compliance" => true,
                            "governance" => false,
                            m => {
                                return fail(format!(
                                    "object_lock_mode {m:?} is unknown; use \"compliance\" or \"governance\""
                                ));
                            }
                        };
                        Some(ObjectLock { days, compliance })
                    }
                };
                Ok(RegionKind::S3(S3Region {
                    object_lock,
                    endpoint: r.endpoint.clone(),
                    bucket,
                    prefix: prefix.trim_matches('/').to_string(),
                    s3_region: r.s3_region.clone().unwrap_or_else(|| "us-east-1".into()),
                    path_style: r.path_style.unwrap_or(false),
                    access_key_id: key,
                    secret_access_key: secret,
                    part_size: part_mib << 20,
                }))
            }
            other => Err(self.err(
                text,
                r.kind.span(),
                format!("region {name:?}: unknown type {other:?}; use \"fs\" or \"s3\""),
            )),
        }
    }

    /// The identity file, if configured.
    pub fn identity_file(&self) -> Option<&Path> {
        self.repository
            .identity_file
            .as_ref()
            .map(|s| s.get_ref().as_path())
    }
}

/// Scratch paths end up in `pg_ctl -o` settings; keep them plain.
fn scratch_path_ok(p: &Path) -> bool {
    p.is_absolute()
        && !p
            .to_string_lossy()
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '\\' | '$' | '`'))
}

fn layout_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Clusters whose WAL the daemon streams (`wal = "stream"`).
    pub fn streaming_clusters(&self) -> Vec<String> {
        self.postgres
            .iter()
            .filter(|(_, p)| p.get_ref().wal == WalMode::Stream)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The PostgreSQL cluster named `name`, or the only one when `name` is `None`.
    pub fn pg(&self, name: Option<&str>) -> Result<(String, &PgConfig), ConfigError> {
        self.pick(
            &self.postgres,
            name,
            "postgres",
            "PostgreSQL clusters",
            "conninfo and data_dir",
        )
    }

    /// The named Redis instance, or the only one when `name` is `None`.
    pub fn redis(&self, name: Option<&str>) -> Result<(String, &RedisConfig), ConfigError> {
        self.pick(&self.redis, name, "redis", "Redis instances", "a url")
    }

    fn pick<'a, T>(
        &self,
        map: &'a std::collections::BTreeMap<String, Spanned<T>>,
        name: Option<&str>,
        section: &str,
        what: &str,
        needs: &str,
    ) -> Result<(String, &'a T), ConfigError> {
        let names: Vec<&String> = map.keys().collect();
        let pick = match name {
            Some(n) => map.get_key_value(n),
            None if names.len() == 1 => map.iter().next(),
            None => None,
        };
        match pick {
            Some((n, c)) => Ok((n.clone(), c.get_ref())),
            None => Err(ConfigError {
                location: self.source.display().to_string(),
                message: match (name, names.is_empty()) {
                    (_, true) => {
                        format!("no [{section}.<name>] section is configured; add one with {needs}")
                    }
                    (Some(n), false) => format!(
                        "no [{section}.{n}] in the config; configured: {}",
                        join(&names)
                    ),
                    (None, false) => {
                        format!("several {what} are configured ({}); name one", join(&names))
                    }
                },
            }),
        }
    }
}

impl Config {
    /// The drill named `name`; the error lists the configured ones.
    pub fn drill(&self, name: &str) -> Result<&DrillConfig, ConfigError> {
        self.drill.get(name).map(|d| d.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.drill.keys().collect();
            ConfigError {
                location: self.source.display().to_string(),
                message: if names.is_empty() {
                    format!("no [drill.{name}] in the config; add one with postgres/redis sources and report_dir")
                } else {
                    format!("no [drill.{name}] in the config; configured: {}", join(&names))
                },
            }
        })
    }

    /// The environment named `name`; the error lists the configured ones.
    pub fn environment(&self, name: &str) -> Result<&EnvConfig, ConfigError> {
        self.env.get(name).map(|e| e.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.env.keys().collect();
            ConfigError {
                location: self.source.display().to_string(),
                message: if names.is_empty() {
                    format!("no [env.{name}] in the config; add one naming its servers, e.g. [env.{name}.postgres.primary] conninfo = \"…\"")
                } else {
                    format!("no [env.{name}] in the config; configured: {}", join(&names))
                },
            }
        })
    }
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn with_hint(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove or correct the key (see config/dr.toml for every supported key)")
    } else if msg.starts_with("missing field") {
        format!("{msg}; add it (see config/dr.toml)")
    } else if msg.contains("unknown variant") {
        format!("{msg}; use one of the values listed (see config/dr.toml)")
    } else if let Some((_, expected)) = msg
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    {
        // serde names Rust types ("expected i32"); say what to write.
        let want = match expected.trim() {
            "i8" | "i16" | "i32" | "i64" => "a whole number, without quotes (e.g. 3)",
            "u8" | "u16" | "u32" | "u64" | "usize" => {
                "a whole number of 0 or more, without quotes (e.g. 4)"
            }
            "f32" | "f64" => "a number, without quotes (e.g. 1.5)",
            "a boolean" => "true or false, without quotes",
            "a string" => "a quoted string (e.g. \"…\")",
            "a sequence" => "a list in brackets (e.g. [\"a\", \"b\"])",
            _ => return format!("{msg}; see config/dr.toml for the expected form"),
        };
        format!("{msg}; write {want}")
    } else {
        msg.to_string()
    }
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn location(path: &Path, text: &str, span: Option<Range<usize>>) -> String {
    match span {
        Some(s) if s.end > 0 => format!("{}:{}", path.display(), line_of(text, s.start)),
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
        /// The shipped example configs, damaged anywhere (a line dropped,
        /// bytes replaced), are parsed or refused with an error naming a
        /// line; never a panic.
        #[test]
        fn damaged_configs_never_panic(
            which in 0usize..2,
            drop_line in proptest::prelude::any::<proptest::sample::Index>(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            junk in "[\\[\\]=\"a-z0-9. \\n{}#-]{0,12}",
        ) {
            let text = [
                include_str!("../config/dr.toml"),
                include_str!("../config/dr-multi-region.toml"),
            ][which];
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                lines.remove(drop_line.index(lines.len()));
            }
            let mut t = lines.join("\n");
            let mut i = at.index(t.len() + 1);
            while !t.is_char_boundary(i) {
                i -= 1;
            }
            t.insert_str(i, &junk);
            if let Err(e) = crate::validate::parse(&t, Path::new("fuzz.toml")) {
                let msg = e.to_string();
                proptest::prop_assert!(!msg.is_empty());
            }
        }
    }

    const RCPT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn parse(t: &str) -> Result<Config, ConfigError> {
        crate::validate::parse(t, Path::new("dr.toml"))
    }

    fn base() -> String {
        format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\n\n[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"/tmp/x\"\n"
        )
    }

    #[test]
    fn backup_mode_decides_what_is_required() {
        let remote =
            base() + "[postgres.main]\nmode = \"remote\"\nconninfo = \"host=db1 user=dr\"\n";
        let c = parse(&remote).expect("remote mode needs no data_dir");
        assert_eq!(c.postgres["main"].get_ref().mode, BackupMode::Remote);
        let local = base() + "[postgres.main]\nconninfo = \"host=db1 user=dr\"\n";
        let e = parse(&local)
            .expect_err("local mode needs data_dir")
            .to_string();
        assert!(
            e.contains("data_dir is missing") && e.contains("mode = \"remote\""),
            "{e}"
        );
        let no_conn = base() + "[postgres.main]\nmode = \"remote\"\n";
        let e = parse(&no_conn).expect_err("conninfo").to_string();
        assert!(e.contains("REPLICATION"), "{e}");
        let bad = base() + "[postgres.main]\nmode = \"ssh\"\nconninfo = \"host=x\"\n";
        assert!(parse(&bad).is_err());
    }

    #[test]
    fn minimal_config_parses() {
        let c = parse(&base()).expect("valid");
        assert_eq!(c.regions.len(), 1);
        assert_eq!(*c.repository.compression_level.get_ref(), 3);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let t = base() + "compresion = 3\n";
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:8:"), "{e}");
        assert!(e.contains("compresion"), "{e}");
        assert!(e.contains("remove or correct"), "{e}");
    }

    #[test]
    fn wrong_value_type_says_what_to_write() {
        let t = base().replace("[[region]]", "compression_level = \"3\"\n\n[[region]]");
        let e = parse(&t).unwrap_err().to_string();
        assert!(
            e.contains("expected i32") && e.contains("write a whole number"),
            "{e}"
        );
    }

    #[test]
    fn missing_recipients() {
        let t = "[repository]\n\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n";
        let e = parse(t).unwrap_err().to_string();
        assert!(e.contains("no recipients"), "{e}");
        assert!(e.contains("dr keygen"), "{e}");
    }

    #[test]
    fn bad_recipient() {
        let t = "[repository]\nrecipients = [\"age1nope\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n";
        let e = parse(t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:2:"), "{e}");
        assert!(e.contains("not an age X25519 public key"), "{e}");
    }

    #[test]
    fn region_without_path() {
        let t = format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\n"
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("needs a path"), "{e}");
        assert!(e.starts_with("dr.toml:3:"), "{e}");
    }

    #[test]
    fn duplicate_region_name() {
        let t = base() + "[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"/tmp/y\"\n";
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:9:"), "{e}");
        assert!(
            e.contains("duplicate region name \"local\" (first used on line 5)"),
            "{e}"
        );
    }

    #[test]
    fn min_regions_out_of_range() {
        let t = format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\nmin_regions = 2\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n"
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:3:"), "{e}");
        assert!(e.contains("min_regions = 2"), "{e}");
    }

    #[test]
    fn unknown_region_type() {
        let t = format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"ftp\"\n"
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("\"fs\" or \"s3\""), "{e}");
    }

    #[test]
    fn s3_half_credentials_rejected() {
        let t = format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id_env = \"K\"\n"
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("set both an access key id"), "{e}");
    }

    #[test]
    fn env_targets_parse_and_are_checked() {
        let t = base()
            + "[env.prod]\nstate_dir = \"/tmp/s\"\n[env.prod.postgres.primary]\nconninfo = \"host=127.0.0.1 port=5432\"\ndata_dir = \"/d\"\n[env.prod.redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n";
        let c = parse(&t).expect("valid");
        let e = c.environment("prod").expect("prod");
        assert_eq!(e.postgres["primary"].get_ref().os_user, "postgres");
        assert!(e.redis.contains_key("cache"));
        let missing = c.environment("staging").unwrap_err().to_string();
        assert!(missing.contains("configured: prod"), "{missing}");

        let t = base() + "[env.prod.postgres.primary]\nconninfo = \"host=x\"\ndatadir = \"/d\"\n";
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:10:") && e.contains("datadir"), "{e}");

        let t = base() + "[env.prod.redis.cache]\nurl = \"http://x\"\n";
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("dr.toml:8:"), "{e}");
        assert!(
            e.contains("[env.prod.redis.cache]: url is not a Redis URL"),
            "{e}"
        );

        let t = base() + "[env.prod.postgres.primary]\nconninfo = \"host=x\"\ndata_dir = \"rel\"\n";
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("must be absolute"), "{e}");
    }

    #[test]
    fn verify_checks_and_drills_parse_and_are_checked() {
        let pg = "[postgres.main]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/d\"\n";
        let redis = "[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n";
        let t = base()
            + pg
            + "[postgres.main.verify]\nmax_replay_lag_seconds = 60\n[[postgres.main.verify.check]]\nname = \"users\"\ndatabase = \"app\"\nsql = \"SELECT true\"\n"
            + redis
            + "[[redis.cache.verify.check]]\nname = \"size\"\ncommand = [\"DBSIZE\"]\nexpect = \"1\"\n"
            + "[drill.nightly]\npostgres = [\"main\"]\nredis = [\"cache\"]\nrto_seconds = 600\nreport_dir = \"/r\"\n";
        let c = parse(&t).expect("valid");
        let v = &c.postgres["main"].get_ref().verify;
        assert_eq!(v.max_replay_lag_seconds, 60);
        assert_eq!(v.user, "postgres");
        assert_eq!(v.check[0].database, "app");
        assert_eq!(
            c.redis["cache"].get_ref().verify.check[0].command,
            ["DBSIZE"]
        );
        let d = c.drill("nightly").expect("drill");
        assert_eq!(
            (d.to.as_str(), d.environment.as_str()),
            ("latest", "scratch")
        );
        assert!(
            c.drill("weekly")
                .unwrap_err()
                .to_string()
                .contains("configured: nightly")
        );

        let e = parse(
            &(base() + pg + "[[postgres.main.verify.check]]\nname = \"x\"\nsq = \"SELECT 1\"\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("dr.toml:13:") && e.contains("sq"), "{e}");
        let drill = |body: &str| {
            parse(&(base() + pg + redis + "[drill.d]\n" + body))
                .unwrap_err()
                .to_string()
        };
        let e = drill("postgres = [\"other\"]\nreport_dir = \"/r\"\n");
        assert!(
            e.starts_with("dr.toml:13:") && e.contains("names no [postgres.other]"),
            "{e}"
        );
        let e = drill("redis = [\"cache\"]\nto = \"yesterday\"\nreport_dir = \"/r\"\n");
        assert!(e.contains("neither \"latest\" nor a time"), "{e}");
        let e = drill("redis = [\"cache\"]\nrto_seconds = 0\nreport_dir = \"/r\"\n");
        assert!(e.contains("rto_seconds must be a positive"), "{e}");
        let e = drill("redis = [\"cache\"]\nreport_dir = \"r\"\n");
        assert!(e.contains("must be absolute"), "{e}");
        let e = drill("redis = [\"cache\"]\nenvironment = \"prod\"\nreport_dir = \"/r\"\n");
        assert!(e.contains("neither \"scratch\" nor an [env.<name>]"), "{e}");
        let e = parse(&(base() + pg + "[postgres.main.verify]\nscratch_dir = \"/a b\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("free of spaces"), "{e}");
    }

    #[test]
    fn staging_drills_need_an_overwritable_environment_apart_from_production() {
        let sources = "[postgres.main]\nconninfo = \"host=127.0.0.1 port=5432\"\ndata_dir = \"/srv/pg/main\"\n\
                       [redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n\
                       [env.prod.postgres.main]\nconninfo = \"host=10.0.0.1\"\ndata_dir = \"/srv/pg/prod\"\n";
        let drill = "[drill.d]\npostgres = [\"main\"]\nredis = [\"cache\"]\nenvironment = \"staging\"\nreport_dir = \"/r\"\n";
        let with = |env: &str| parse(&(base() + sources + env + drill));
        let good_pg = "[env.staging.postgres.main]\nconninfo = \"host=localhost port=5433\"\ndata_dir = \"/srv/pg/staging\"\n";
        let good_redis = "[env.staging.redis.cache]\nurl = \"redis://127.0.0.1:6380\"\nconfig_file = \"/etc/redis/staging.conf\"\ndir = \"/srv/redis/staging\"\n";
        let ok = format!("[env.staging]\nallow_overwrite = true\n{good_pg}{good_redis}");
        let c = with(&ok).expect("valid staging drill");
        assert_eq!(c.drill("d").expect("drill").staging(), Some("staging"));
        assert_eq!(
            c.env["staging"].get_ref().redis["cache"]
                .get_ref()
                .dbfilename,
            "dump.rdb"
        );

        let e = with(&format!("[env.staging]\n{good_pg}{good_redis}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not set allow_overwrite = true"), "{e}");
        let e = with(&format!("[env.staging]\nallow_overwrite = true\n{good_pg}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no server [env.staging.redis.cache]"), "{e}");
        let e = with(&ok.replace("/srv/pg/staging", "/srv/pg/main"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_dir /srv/pg/main is (or overlaps) /srv/pg/main")
                && e.contains("[postgres.main]"),
            "{e}"
        );
        let e = with(&ok.replace("/srv/pg/staging", "/srv/pg/prod/sub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[env.prod.postgres.main]"), "{e}");
        let e = with(&ok.replace("port=5433", "port=5432"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reaches local:5432"), "{e}");
        let e = with(&ok.replace("127.0.0.1:6380", "localhost:6379"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the production instance [redis.cache]"), "{e}");
        let e = with(&ok.replace("config_file = \"/etc/redis/staging.conf\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs config_file and dir"), "{e}");
        let e = parse(&(base() + "[env.scratch.redis.a]\nurl = \"redis://127.0.0.1:1\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn s3_debug_redacts_secrets() {
        let t = format!(
            "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AKIDSECRETVALUE\"\nsecret_access_key = \"TOPSECRETVALUE\"\n"
        );
        let c = parse(&t).expect("valid");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("TOPSECRETVALUE") && !dbg.contains("AKIDSECRETVALUE"),
            "{dbg}"
        );
    }
}
