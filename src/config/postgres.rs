//! `[postgres.<name>]`: clusters, their backup and WAL modes, retention and
//! verification.

use super::*;

/// `[postgres.<name>.schedule]`: cron expressions, in UTC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSchedule {
    /// Base backups (`dr backup pg`).
    pub backup: Option<Spanned<String>>,
    /// Scratch-restore verification.
    pub verify: Option<Spanned<String>>,
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

pub(super) fn default_pg_bin() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

pub(super) fn default_os_user() -> String {
    "postgres".into()
}

fn default_parallel() -> usize {
    4
}

fn default_prefetch() -> usize {
    8
}
