//! The playbook schema. A playbook is TOML; every table rejects unknown keys
//! and every error names the file, the line and the fix, because a typo found
//! during an outage costs minutes nobody has.
//!
//! ```toml
//! name = "pg-promote-standby"
//! env = "prod"
//!
//! [[step]]
//! name = "promote standby1"
//! pre = [{ type = "pg.role", target = "standby1", role = "standby" }]
//! action = { type = "pg.promote", target = "standby1" }
//! post = [{ type = "pg.writable", target = "standby1", timeout = "10s" }]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A parsed and checked playbook.
#[derive(Debug, Clone)]
pub struct Playbook {
    /// Short name (used in the audit log and the lock).
    pub name: String,
    /// What the playbook is for.
    pub description: String,
    /// Environment used when `--env` is not given.
    pub env: Option<String>,
    /// Steps, in order.
    pub steps: Vec<Step>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// One step: gates around at most one action.
#[derive(Debug, Clone)]
pub struct Step {
    /// Name shown in progress and reports.
    pub name: String,
    /// Line of the `[[step]]` in the playbook.
    pub line: usize,
    /// Gates that must all pass before the action runs.
    pub pre: Vec<Gate>,
    /// The action (a step without one is a checkpoint of gates).
    pub action: Option<Action>,
    /// Gates that must all pass, each within its timeout, after the action.
    pub post: Vec<Gate>,
    /// Extra attempts of action + post gates after a failure.
    pub retries: u32,
    /// Pause between attempts.
    pub retry_delay: Duration,
    /// What a failure of this step does to the run.
    pub on_failure: OnFailure,
    /// Actions that undo this step, run when a later failure asks for rollback.
    pub rollback: Vec<Action>,
}

/// What happens when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop; leave everything as it is.
    Abort,
    /// Run the rollback actions of the steps that acted, newest first, then stop.
    Rollback,
    /// Record the failure and go on with the next step.
    Continue,
}

/// A condition polled until it holds or its timeout expires.
#[derive(Debug, Clone)]
pub struct Gate {
    /// What is checked.
    pub check: Check,
    /// How long to keep polling.
    pub timeout: Duration,
    /// Pause between polls.
    pub interval: Duration,
    /// Pass when the check fails (e.g. "the fenced primary is not writable").
    pub negate: bool,
    /// Line in the playbook.
    pub line: usize,
}

/// PostgreSQL role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PgRole {
    /// Accepts writes (not in recovery).
    Primary,
    /// In recovery.
    Standby,
}

/// Redis role, as `INFO replication` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisRole {
    /// `role:master`.
    Master,
    /// `role:slave`.
    Replica,
}

/// The checks a gate can make. Targets are server names of the environment.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Check {
    /// A connection and `SELECT 1` succeed.
    #[serde(rename = "pg.reachable")]
    PgReachable {
        /// Server name.
        target: String,
    },
    /// The server is a primary or a standby.
    #[serde(rename = "pg.role")]
    PgRole {
        /// Server name.
        target: String,
        /// Expected role.
        role: PgRole,
    },
    /// Replay lag of a standby is at most `max`: measured against the
    /// primary's current WAL position when `primary` answers, else against
    /// what the standby itself has received.
    #[serde(rename = "pg.replay_lag_bytes")]
    PgReplayLag {
        /// The standby.
        target: String,
        /// The primary it follows (optional).
        primary: Option<String>,
        /// Limit, e.g. `1048576` or `"1MiB"`.
        #[serde(deserialize_with = "de_bytes")]
        max: u64,
    },
    /// A write to a scratch table (`dr_failover_probe`) commits.
    #[serde(rename = "pg.writable")]
    PgWritable {
        /// Server name.
        target: String,
    },
    /// The management API answers with these credentials.
    #[serde(rename = "rabbitmq.reachable")]
    RabbitReachable {
        /// Broker name.
        target: String,
    },
    /// A queue exists in a vhost.
    #[serde(rename = "rabbitmq.queue_exists")]
    RabbitQueueExists {
        /// Broker name.
        target: String,
        /// Virtual host (default `/`).
        #[serde(default = "default_vhost")]
        vhost: String,
        /// Queue name.
        queue: String,
    },
    /// `PING` answers.
    #[serde(rename = "redis.reachable")]
    RedisReachable {
        /// Server name.
        target: String,
    },
    /// The server is a master or a replica.
    #[serde(rename = "redis.role")]
    RedisRole {
        /// Server name.
        target: String,
        /// Expected role.
        role: RedisRole,
    },
    /// A replica's offset is at most `max` bytes behind its master's
    /// `master_repl_offset` (when `master` answers).
    #[serde(rename = "redis.lag")]
    RedisLag {
        /// The replica.
        target: String,
        /// Its master (optional).
        master: Option<String>,
        /// Limit in bytes.
        #[serde(deserialize_with = "de_bytes")]
        max: u64,
    },
    /// An HTTP request answers with `status` (and a body containing `body_contains`).
    #[serde(rename = "http")]
    Http {
        /// `http://host[:port]/path`.
        url: String,
        /// Request method.
        #[serde(default = "get")]
        method: String,
        /// Expected status.
        #[serde(default = "ok_status")]
        status: u16,
        /// A substring the body must contain.
        body_contains: Option<String>,
    },
    /// A TCP connection to `address` (`host:port`) opens.
    #[serde(rename = "tcp")]
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// A query returning one boolean returns true.
    #[serde(rename = "sql")]
    Sql {
        /// Server name.
        target: String,
        /// e.g. `SELECT count(*) > 0 FROM pg_stat_replication`.
        query: String,
    },
}

/// How `pg.fence` stops writes on the old primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceMode {
    /// `pg_ctl stop -m fast` as the OS user (needs `data_dir`; `dr` on that host).
    Stop,
    /// `default_transaction_read_only = on`, reload, and end client sessions.
    ReadOnly,
}

/// The actions a step can run.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Action {
    /// `pg_promote()` on a standby, waiting until it is a primary.
    #[serde(rename = "pg.promote")]
    PgPromote {
        /// The standby.
        target: String,
        /// How long to wait for the promotion.
        #[serde(default = "secs60", deserialize_with = "de_duration")]
        timeout: Duration,
    },
    /// Make a primary stop accepting writes.
    #[serde(rename = "pg.fence")]
    PgFence {
        /// The old primary.
        target: String,
        /// `stop` or `read_only`.
        mode: FenceMode,
    },
    /// Undo `pg.fence` (start the server, or lift read-only).
    #[serde(rename = "pg.unfence")]
    PgUnfence {
        /// The fenced server.
        target: String,
        /// The mode it was fenced with.
        mode: FenceMode,
    },
    /// Point a standby at another primary and wait until it streams from it.
    #[serde(rename = "pg.repoint")]
    PgRepoint {
        /// The standby.
        target: String,
        /// The server to follow.
        primary: String,
        /// How long to wait for streaming to start.
        #[serde(default = "secs60", deserialize_with = "de_duration")]
        timeout: Duration,
    },
    /// `REPLICAOF NO ONE`.
    #[serde(rename = "redis.promote")]
    RedisPromote {
        /// The replica.
        target: String,
    },
    /// `REPLICAOF host port`, waiting until the link is up.
    #[serde(rename = "redis.replicaof")]
    RedisReplicaof {
        /// The server to repoint.
        target: String,
        /// The server to replicate from.
        master: String,
        /// How long to wait for `master_link_status:up`.
        #[serde(default = "secs60", deserialize_with = "de_duration")]
        timeout: Duration,
    },
    /// Run a program. No shell unless `shell = true` (then `argv` is one script).
    #[serde(rename = "exec")]
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Killed after this long.
        #[serde(default = "secs60", deserialize_with = "de_duration")]
        timeout: Duration,
        /// Run `argv[0]` with `/bin/sh -c`.
        #[serde(default)]
        shell: bool,
    },
    /// An HTTP request that must answer with `status`.
    #[serde(rename = "http")]
    Http {
        /// `http://host[:port]/path`.
        url: String,
        /// Request method.
        #[serde(default = "post")]
        method: String,
        /// Request body.
        body: Option<String>,
        /// Extra headers.
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Expected status.
        #[serde(default = "ok_status")]
        status: u16,
        /// Request timeout.
        #[serde(default = "secs10", deserialize_with = "de_duration")]
        timeout: Duration,
    },
    /// SQL statements on a PostgreSQL server (one simple-query batch).
    #[serde(rename = "sql")]
    Sql {
        /// Server name.
        target: String,
        /// Statement(s).
        statement: String,
    },
    /// Wait.
    #[serde(rename = "sleep")]
    Sleep {
        /// How long.
        #[serde(deserialize_with = "de_duration")]
        duration: Duration,
    },
}

/// A server an action or gate names, with its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// `[env.X.postgres.NAME]`.
    Postgres,
    /// `[env.X.redis.NAME]`.
    Redis,
    /// `[env.X.rabbitmq.NAME]`.
    Rabbitmq,
}

/// The default virtual host.
pub(super) fn default_vhost() -> String {
    "/".into()
}

pub(super) fn get() -> String {
    "GET".into()
}

pub(super) fn post() -> String {
    "POST".into()
}

pub(super) fn ok_status() -> u16 {
    200
}

pub(super) fn secs60() -> Duration {
    Duration::from_secs(60)
}

pub(super) fn secs10() -> Duration {
    Duration::from_secs(10)
}

crate::message_error!(
    /// A size that is not a number of bytes (`1MiB`, `512kB`, `4096`).
    SizeError
);

/// Parses `"10s"`, `"250ms"`, `"1m 30s"` (humantime).
pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"10s\" or \"250ms\""
        ))
    })
}

pub(super) fn de_opt_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Parses a byte count: an integer or a string such as `"1MiB"`, `"512 kB"`.
pub(super) fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }
    match Raw::deserialize(d)? {
        Raw::N(n) => Ok(n),
        Raw::S(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses `"1MiB"`, `"1.5 GiB"`, `"512kB"`, `"100"` into bytes.
pub fn parse_bytes(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 1048576 or \"1MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?}; use B, kB, MB, GB, KiB, MiB or GiB"
            ).into());
        }
    };
    Ok((n * mult as f64).round() as u64)
}

/// Formats bytes as the messages print them (`12.3 MiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

// ---- raw file structure ------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigError, EnvConfig};

    fn parse(t: &str) -> Result<Playbook, ConfigError> {
        Playbook::parse(t, Path::new("pb.toml"))
    }

    const GOOD: &str = r#"name = "x"
env = "prod"

[defaults]
timeout = "5s"

[[step]]
name = "fence"
pre = [{ type = "pg.replay_lag_bytes", target = "standby1", primary = "primary", max = "1MiB" }]
action = { type = "pg.fence", target = "primary", mode = "stop" }
rollback = [{ type = "pg.unfence", target = "primary", mode = "stop" }]

[[step]]
name = "promote"
on_failure = "rollback"
action = { type = "pg.promote", target = "standby1" }
post = [{ type = "pg.writable", target = "standby1", interval = "100ms" }]
"#;

    #[test]
    fn sample_shape_parses() {
        let p = parse(GOOD).expect("valid");
        assert_eq!(p.steps.len(), 2);
        let g = &p.steps[0].pre[0];
        assert_eq!(g.timeout, Duration::from_secs(5));
        assert!(matches!(g.check, Check::PgReplayLag { max: 1_048_576, .. }));
        assert_eq!(p.steps[1].on_failure, OnFailure::Rollback);
        assert_eq!(p.steps[1].post[0].interval, Duration::from_millis(100));
        assert_eq!(p.steps[0].on_failure, OnFailure::Abort);
    }

    #[test]
    fn unknown_gate_key_names_line_and_key() {
        let t = GOOD.replace("max = \"1MiB\"", "mxa = \"1MiB\"");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("pb.toml:9:"), "{e}");
        assert!(e.contains("mxa"), "{e}");
        assert!(e.contains("step \"fence\", pre gate"), "{e}");
    }

    #[test]
    fn unknown_action_type_lists_the_valid_ones() {
        let t = GOOD.replace("type = \"pg.promote\"", "type = \"pg.promot\"");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("pb.toml:16:"), "{e}");
        assert!(e.contains("pg.promot") && e.contains("pg.promote"), "{e}");
    }

    #[test]
    fn unknown_step_key_is_an_error() {
        let t = GOOD.replace("on_failure = \"rollback\"", "on_fail = \"rollback\"");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.starts_with("pb.toml:15:"), "{e}");
        assert!(e.contains("on_fail"), "{e}");
    }

    #[test]
    fn bad_on_failure_and_duration() {
        let t = GOOD.replace("\"rollback\"\n", "\"retry\"\n");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("retry") && e.contains("rollback"), "{e}");
        let t = GOOD.replace("\"100ms\"", "\"soon\"");
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("not a duration"), "{e}");
    }

    #[test]
    fn shell_exec_needs_one_string() {
        let t = GOOD.replace(
            "{ type = \"pg.promote\", target = \"standby1\" }",
            "{ type = \"exec\", argv = [\"echo\", \"hi\"], shell = true }",
        );
        let e = parse(&t).unwrap_err().to_string();
        assert!(e.contains("must be one string"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("1.5 KiB"), Ok(1536));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("1 parsec").is_err());
        assert_eq!(human_bytes(12_900_000), "12.3 MiB");
    }

    #[test]
    fn targets_are_checked_against_the_environment() {
        let p = parse(GOOD).expect("valid");
        let env: EnvConfig = toml::from_str(
            "[postgres.primary]\nconninfo = \"host=127.0.0.1\"\n[postgres.standby2]\nconninfo = \"host=127.0.0.1\"\n",
        )
        .expect("env");
        let e = p.check_targets("prod", &env).unwrap_err().to_string();
        assert!(e.starts_with("pb.toml:9:"), "{e}");
        assert!(
            e.contains("no server \"standby1\" in [env.prod.postgres]"),
            "{e}"
        );
        assert!(e.contains("primary, standby2"), "{e}");
    }
}
