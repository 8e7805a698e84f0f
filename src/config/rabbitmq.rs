//! `[rabbitmq.<name>]`: a RabbitMQ broker whose definitions (vhosts, users,
//! permissions, exchanges, queues, bindings, policies, parameters) `dr`
//! exports through the management HTTP API.
//!
//! Kept apart from the rest of the config so that the RabbitMQ pieces stay in
//! one place; `config.rs` only holds the map of these sections.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{RedisRetention, RedisSchedule};

/// `[rabbitmq.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitConfig {
    /// Management API base URL, e.g. `https://mq.internal:15671`. `http://`
    /// is accepted only for a loopback host (the password and the exported
    /// password hashes would otherwise cross the network in clear).
    pub url: String,
    /// Management user (tag `administrator` to export users and permissions).
    pub user: String,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for an `https://` API with a private CA (default: system roots).
    pub ca_file: Option<PathBuf>,
    /// Virtual hosts to back up (default: the whole broker). With a list,
    /// a snapshot holds those vhosts, everything in them, the users with
    /// permissions in them and their permissions; global parameters are left
    /// out.
    pub vhosts: Option<Vec<String>>,
    /// Seconds a request to the management API may take.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// `rabbitmq-server` start script, for the scratch brokers of
    /// `dr verify rabbitmq --restore`.
    #[serde(default = "default_server_bin")]
    pub server_bin: PathBuf,
    /// Unprivileged OS user for scratch brokers (default: the current user).
    pub os_user: Option<String>,
    /// What `dr expire` keeps (`keep_snapshots`, `keep_within`), as for Redis.
    pub retention: Option<RedisRetention>,
    /// When `dr daemon` takes snapshots (`[rabbitmq.<name>.schedule]`, key `snapshot`).
    #[serde(default)]
    pub schedule: Option<RedisSchedule>,
    /// Scratch-restore verification (`dr verify rabbitmq --restore`).
    #[serde(default)]
    pub verify: RabbitVerifyConfig,
}

/// `[rabbitmq.<name>.verify]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitVerifyConfig {
    /// Parent of the scratch directories (default: /var/tmp/dr-verify).
    pub scratch_dir: Option<PathBuf>,
    /// User checks (`[[rabbitmq.<name>.verify.check]]`).
    #[serde(default)]
    pub check: Vec<RabbitCheck>,
}

/// One user check on a restored broker: an item that must exist, and
/// optionally arguments it must have.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitCheck {
    /// Shown in reports.
    pub name: String,
    /// `vhost`, `user`, `exchange`, `queue` or `policy`.
    pub kind: String,
    /// Virtual host of the item (not for `vhost` and `user`; default `/`).
    #[serde(default = "default_vhost")]
    pub vhost: String,
    /// The item's name.
    pub item: String,
    /// Arguments the item must have (queues, exchanges), each equal.
    #[serde(default)]
    pub arguments: toml::Table,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_timeout() -> u64 {
    30
}

fn default_server_bin() -> PathBuf {
    PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server")
}

/// The kinds a user check may name.
pub const CHECK_KINDS: &[&str] = &["vhost", "user", "exchange", "queue", "policy"];

/// Checks of `[rabbitmq.*]` that need no engine: names, timeout, password
/// source, check kinds. The URL is checked by the engine.
pub fn check(
    name: &str,
    r: &Spanned<RabbitConfig>,
    name_ok: fn(&str) -> bool,
) -> Result<(), String> {
    let c = r.get_ref();
    if !name_ok(name) {
        return Err(format!(
            "[rabbitmq.{name}]: names may use only letters, digits, '-' and '_' (max 64)"
        ));
    }
    if c.timeout_seconds == 0 {
        return Err(format!(
            "[rabbitmq.{name}]: timeout_seconds must be at least 1"
        ));
    }
    if c.user.is_empty() {
        return Err(format!("[rabbitmq.{name}]: user is empty"));
    }
    match (&c.password_env, &c.password_file) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "[rabbitmq.{name}]: give the password once: password_env or password_file, not both"
            ));
        }
        (None, None) => {
            return Err(format!(
                "[rabbitmq.{name}]: no password; add password_env = \"VAR\" or password_file = \"/path\""
            ));
        }
        _ => {}
    }
    if let Some(v) = &c.vhosts
        && v.is_empty()
    {
        return Err(format!(
            "[rabbitmq.{name}]: vhosts = [] backs up nothing; list vhosts or leave the key out for all"
        ));
    }
    for chk in &c.verify.check {
        if !CHECK_KINDS.contains(&chk.kind.as_str()) {
            return Err(format!(
                "[[rabbitmq.{name}.verify.check]] {:?}: kind {:?} is not one of {}",
                chk.name,
                chk.kind,
                CHECK_KINDS.join(", ")
            ));
        }
        if !chk.arguments.is_empty() && !matches!(chk.kind.as_str(), "queue" | "exchange") {
            return Err(format!(
                "[[rabbitmq.{name}.verify.check]] {:?}: only queue and exchange checks take arguments",
                chk.name
            ));
        }
    }
    Ok(())
}

/// `[env.<name>.rabbitmq.<server>]`: a broker playbook gates may check
/// (`rabbitmq.reachable`, `rabbitmq.queue_exists`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitTarget {
    /// Management API base URL (`https://`, or `http://` on loopback).
    pub url: String,
    /// Management user.
    pub user: String,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle for a private CA (default: system roots).
    pub ca_file: Option<PathBuf>,
}
