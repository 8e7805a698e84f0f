//! `[redis.<name>]`: Redis instances, their schedules, retention and verification.

use super::*;

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
    /// How the server sends the snapshot: `auto` (default), `disk` or `diskless`.
    #[serde(default)]
    pub sync: RedisSyncMode,
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

/// `[redis.<name>] sync`: whether a snapshot asks for a diskless transfer.
///
/// A diskless sync streams the RDB straight from the forked child, but the
/// server first waits `repl-diskless-sync-delay` seconds (5 by default) for
/// more replicas to share the fork. A disk-based sync writes the RDB to the
/// server's own `dir` first (disk space and I/O on the server) and starts at
/// once, or joins a save already running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisSyncMode {
    /// Disk-based when the server would delay a diskless sync
    /// (`repl-diskless-sync yes` with a delay above 0, read by `CONFIG GET`);
    /// otherwise, or when `CONFIG GET` is not allowed, the server's choice.
    #[default]
    Auto,
    /// Never announce diskless support: the server saves to disk and sends the file.
    Disk,
    /// Announce diskless support (`REPLCONF capa eof`): the server's choice,
    /// diskless when `repl-diskless-sync yes`.
    Diskless,
}

/// `[redis.<name>.schedule]`: cron expressions, in UTC.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSchedule {
    /// Snapshots (`dr backup redis`).
    pub snapshot: Option<Spanned<String>>,
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

pub(super) fn default_redis_server() -> PathBuf {
    PathBuf::from("/usr/bin/redis-server")
}

fn default_redis_timeout() -> u64 {
    60
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
