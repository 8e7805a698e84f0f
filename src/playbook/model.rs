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
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::config::{ConfigError, EnvConfig, line_of};
use crate::http::{HeaderValue, check_request, redact_url};

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
        /// `https://host[:port]/path` (or `http://`).
        url: String,
        /// Request method.
        #[serde(default = "get")]
        method: String,
        /// Extra headers; secrets as `{ env = "VAR" }` or `{ file = "/path" }`.
        #[serde(default)]
        headers: BTreeMap<String, HeaderValue>,
        /// CA certificate(s) (PEM) to verify the server with, instead of the system roots.
        ca_file: Option<PathBuf>,
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
        /// `https://host[:port]/path` (or `http://`).
        url: String,
        /// Request method.
        #[serde(default = "post")]
        method: String,
        /// Request body.
        body: Option<String>,
        /// Extra headers; secrets as `{ env = "VAR" }` or `{ file = "/path" }`.
        #[serde(default)]
        headers: BTreeMap<String, HeaderValue>,
        /// CA certificate(s) (PEM) to verify the server with, instead of the system roots.
        ca_file: Option<PathBuf>,
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
}

impl Check {
    /// The gate's `type` as written.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::PgReachable { .. } => "pg.reachable",
            Check::PgRole { .. } => "pg.role",
            Check::PgReplayLag { .. } => "pg.replay_lag_bytes",
            Check::PgWritable { .. } => "pg.writable",
            Check::RedisReachable { .. } => "redis.reachable",
            Check::RedisRole { .. } => "redis.role",
            Check::RedisLag { .. } => "redis.lag",
            Check::Http { .. } => "http",
            Check::Tcp { .. } => "tcp",
            Check::Sql { .. } => "sql",
        }
    }

    /// Servers the check refers to.
    pub fn targets(&self) -> Vec<(TargetKind, &str)> {
        use TargetKind::*;
        match self {
            Check::PgReachable { target }
            | Check::PgRole { target, .. }
            | Check::PgWritable { target }
            | Check::Sql { target, .. } => vec![(Postgres, target)],
            Check::PgReplayLag {
                target, primary, ..
            } => std::iter::once((Postgres, target.as_str()))
                .chain(primary.as_deref().map(|p| (Postgres, p)))
                .collect(),
            Check::RedisReachable { target } | Check::RedisRole { target, .. } => {
                vec![(Redis, target)]
            }
            Check::RedisLag { target, master, .. } => std::iter::once((Redis, target.as_str()))
                .chain(master.as_deref().map(|m| (Redis, m)))
                .collect(),
            Check::Http { .. } | Check::Tcp { .. } => Vec::new(),
        }
    }

    /// One line for plans and reports.
    pub fn describe(&self) -> String {
        match self {
            Check::PgReachable { target } => format!("pg.reachable {target}"),
            Check::PgRole { target, role } => format!("pg.role {target} = {role:?}").to_lowercase(),
            Check::PgReplayLag {
                target,
                primary,
                max,
            } => format!(
                "pg.replay_lag_bytes {target}{} <= {}",
                primary
                    .as_deref()
                    .map(|p| format!(" (vs {p})"))
                    .unwrap_or_default(),
                human_bytes(*max)
            ),
            Check::PgWritable { target } => format!("pg.writable {target}"),
            Check::RedisReachable { target } => format!("redis.reachable {target}"),
            Check::RedisRole { target, role } => {
                format!("redis.role {target} = {role:?}").to_lowercase()
            }
            Check::RedisLag {
                target,
                master,
                max,
            } => format!(
                "redis.lag {target}{} <= {}",
                master
                    .as_deref()
                    .map(|m| format!(" (vs {m})"))
                    .unwrap_or_default(),
                human_bytes(*max)
            ),
            Check::Http {
                url,
                method,
                status,
                body_contains,
                ..
            } => format!(
                "http {method} {} → {status}{}",
                redact_url(url),
                body_contains
                    .as_deref()
                    .map(|b| format!(" containing {b:?}"))
                    .unwrap_or_default()
            ),
            Check::Tcp { address } => format!("tcp {address}"),
            Check::Sql { target, query } => format!("sql {target}: {query}"),
        }
    }
}

impl Action {
    /// Servers the action refers to.
    pub fn targets(&self) -> Vec<(TargetKind, &str)> {
        use TargetKind::*;
        match self {
            Action::PgPromote { target, .. }
            | Action::PgFence { target, .. }
            | Action::PgUnfence { target, .. }
            | Action::Sql { target, .. } => vec![(Postgres, target)],
            Action::PgRepoint {
                target, primary, ..
            } => vec![(Postgres, target), (Postgres, primary)],
            Action::RedisPromote { target } => vec![(Redis, target)],
            Action::RedisReplicaof { target, master, .. } => vec![(Redis, target), (Redis, master)],
            Action::Exec { .. } | Action::Http { .. } | Action::Sleep { .. } => Vec::new(),
        }
    }

    /// True for the actions after which a new primary exists (RTO accounting).
    pub fn is_promotion(&self) -> bool {
        matches!(self, Action::PgPromote { .. } | Action::RedisPromote { .. })
    }

    /// One line for plans and reports.
    pub fn describe(&self) -> String {
        match self {
            Action::PgPromote { target, .. } => format!("pg.promote {target}"),
            Action::PgFence { target, mode } => {
                format!("pg.fence {target} ({})", fence_mode_name(*mode))
            }
            Action::PgUnfence { target, mode } => {
                format!("pg.unfence {target} ({})", fence_mode_name(*mode))
            }
            Action::PgRepoint {
                target, primary, ..
            } => format!("pg.repoint {target} → {primary}"),
            Action::RedisPromote { target } => format!("redis.promote {target}"),
            Action::RedisReplicaof { target, master, .. } => {
                format!("redis.replicaof {target} → {master}")
            }
            Action::Exec { argv, shell, .. } => {
                let cmd = argv.join(" ");
                if *shell {
                    format!("exec sh -c {cmd:?}")
                } else {
                    format!("exec {cmd}")
                }
            }
            Action::Http {
                method,
                url,
                status,
                ..
            } => format!("http {method} {} → {status}", redact_url(url)),
            Action::Sql { target, statement } => format!("sql {target}: {statement}"),
            Action::Sleep { duration } => {
                format!("sleep {}", humantime::format_duration(*duration))
            }
        }
    }
}

fn fence_mode_name(m: FenceMode) -> &'static str {
    match m {
        FenceMode::Stop => "stop",
        FenceMode::ReadOnly => "read_only",
    }
}

fn get() -> String {
    "GET".into()
}

fn post() -> String {
    "POST".into()
}

fn ok_status() -> u16 {
    200
}

fn secs60() -> Duration {
    Duration::from_secs(60)
}

fn secs10() -> Duration {
    Duration::from_secs(10)
}

/// Parses `"10s"`, `"250ms"`, `"1m 30s"` (humantime).
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"10s\" or \"250ms\""
        ))
    })
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Parses a byte count: an integer or a string such as `"1MiB"`, `"512 kB"`.
fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
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
pub fn parse_bytes(s: &str) -> Result<u64, String> {
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
            ));
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlaybook {
    name: String,
    #[serde(default)]
    description: String,
    env: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(rename = "step", default)]
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    interval: Option<Duration>,
    on_failure: Option<OnFailure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    #[serde(default)]
    pre: Vec<Spanned<toml::Table>>,
    action: Option<Spanned<toml::Table>>,
    #[serde(default)]
    post: Vec<Spanned<toml::Table>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    retries: u32,
    #[serde(default, deserialize_with = "de_opt_duration")]
    retry_delay: Option<Duration>,
    on_failure: Option<OnFailure>,
    #[serde(default)]
    rollback: Vec<Spanned<toml::Table>>,
}

/// Gate timeout when neither the gate, its step nor `[defaults]` set one.
pub const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Gate poll interval when none is set.
pub const DEFAULT_GATE_INTERVAL: Duration = Duration::from_millis(250);

impl Playbook {
    /// Reads and parses a playbook file.
    pub fn load(path: &Path) -> Result<Playbook, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: path.display().to_string(),
            message: format!("cannot read playbook: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses playbook text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Playbook, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| ConfigError {
            location: match span {
                Some(s) if s.end > 0 => format!("{}:{}", path.display(), line_of(text, s.start)),
                _ => path.display().to_string(),
            },
            message,
        };
        let raw: RawPlaybook =
            toml::from_str(text).map_err(|e| at(e.span(), hint(e.message().trim())))?;
        if raw.steps.is_empty() {
            return Err(at(
                None,
                "the playbook has no steps; add at least one [[step]] with a name and an action"
                    .into(),
            ));
        }
        let d = &raw.defaults;
        let mut steps = Vec::new();
        for s in &raw.steps {
            let span = s.span();
            let r = s.get_ref();
            let line = line_of(text, span.start);
            if let Some(prev) = steps.iter().find(|p: &&Step| p.name == r.name) {
                return Err(at(
                    Some(span),
                    format!(
                        "duplicate step name {:?} (first used on line {}); give each step a unique name",
                        r.name, prev.line
                    ),
                ));
            }
            let timeout = r.timeout.or(d.timeout).unwrap_or(DEFAULT_GATE_TIMEOUT);
            let interval = d.interval.unwrap_or(DEFAULT_GATE_INTERVAL);
            let gates = |list: &[Spanned<toml::Table>], which: &str| {
                list.iter()
                    .map(|g| {
                        let line = line_of(text, g.span().start);
                        parse_gate(g, timeout, interval, line).map_err(|m| {
                            at(
                                Some(g.span()),
                                format!("step {:?}, {which} gate: {m}", r.name),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let action = |t: &Spanned<toml::Table>, which: &str| {
                parse_action(t)
                    .map_err(|m| at(Some(t.span()), format!("step {:?}, {which}: {m}", r.name)))
            };
            let step = Step {
                name: r.name.clone(),
                line,
                pre: gates(&r.pre, "pre")?,
                action: r.action.as_ref().map(|a| action(a, "action")).transpose()?,
                post: gates(&r.post, "post")?,
                retries: r.retries,
                retry_delay: r.retry_delay.unwrap_or(Duration::from_secs(1)),
                on_failure: r.on_failure.or(d.on_failure).unwrap_or(OnFailure::Abort),
                rollback: r
                    .rollback
                    .iter()
                    .map(|a| action(a, "rollback action"))
                    .collect::<Result<_, _>>()?,
            };
            if step.action.is_none() && !step.post.is_empty() {
                return Err(at(
                    Some(span),
                    format!(
                        "step {:?} has post gates but no action; make them pre gates, or add an action",
                        r.name
                    ),
                ));
            }
            if step.action.is_none() && step.pre.is_empty() {
                return Err(at(
                    Some(span),
                    format!("step {:?} does nothing; add an action or gates", r.name),
                ));
            }
            steps.push(step);
        }
        Ok(Playbook {
            name: raw.name,
            description: raw.description,
            env: raw.env,
            steps,
            source: path.to_path_buf(),
        })
    }

    /// Checks that every server the playbook names exists in `env`, naming
    /// the playbook line of the first one that does not.
    pub fn check_targets(&self, env_name: &str, env: &EnvConfig) -> Result<(), ConfigError> {
        for step in &self.steps {
            let gates = step.pre.iter().chain(&step.post);
            let named = gates
                .flat_map(|g| g.check.targets().into_iter().map(move |t| (t, g.line)))
                .chain(
                    step.action
                        .iter()
                        .chain(&step.rollback)
                        .flat_map(|a| a.targets().into_iter().map(move |t| (t, step.line))),
                );
            for ((kind, name), line) in named {
                let (known, section): (Vec<&String>, _) = match kind {
                    TargetKind::Postgres => (env.postgres.keys().collect(), "postgres"),
                    TargetKind::Redis => (env.redis.keys().collect(), "redis"),
                };
                if !known.iter().any(|k| *k == name) {
                    return Err(ConfigError {
                        location: format!("{}:{line}", self.source.display()),
                        message: format!(
                            "step {:?}: no server {name:?} in [env.{env_name}.{section}] (configured: {}); \
                             add [env.{env_name}.{section}.{name}] to the config or fix the name",
                            step.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    });
                }
            }
            // pg_ctl needs the data directory: say so now, not mid-failover.
            for a in step.action.iter().chain(&step.rollback) {
                if let Action::PgFence {
                    target,
                    mode: FenceMode::Stop,
                }
                | Action::PgUnfence {
                    target,
                    mode: FenceMode::Stop,
                } = a
                {
                    let has_dir = env
                        .postgres
                        .get(target)
                        .is_some_and(|t| t.get_ref().data_dir.is_some());
                    if !has_dir {
                        return Err(ConfigError {
                            location: format!("{}:{}", self.source.display(), step.line),
                            message: format!(
                                "step {:?}: mode = \"stop\" runs pg_ctl, which needs data_dir in \
                                 [env.{env_name}.postgres.{target}] (and dr on that host); add it, \
                                 or fence with mode = \"read_only\"",
                                step.name
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

fn parse_gate(
    t: &Spanned<toml::Table>,
    step_timeout: Duration,
    interval: Duration,
    line: usize,
) -> Result<Gate, String> {
    let mut table = t.get_ref().clone();
    let mut take_duration = |key: &str| -> Result<Option<Duration>, String> {
        match table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => humantime::parse_duration(&s)
                .map(Some)
                .map_err(|e| format!("{key} = {s:?} is not a duration ({e}); write e.g. \"10s\"")),
            Some(v) => Err(format!(
                "{key} must be a duration string such as \"10s\", not {v}"
            )),
        }
    };
    let timeout = take_duration("timeout")?.unwrap_or(step_timeout);
    let interval = take_duration("interval")?.unwrap_or(interval);
    let negate = match table.remove("negate") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(v) => return Err(format!("negate must be true or false, not {v}")),
    };
    if interval.is_zero() {
        return Err("interval must be greater than zero".into());
    }
    let check: Check = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| hint(e.message().trim()))?;
    if let Check::Http { url, headers, .. } = &check {
        check_request(url, headers)?;
    }
    Ok(Gate {
        check,
        timeout,
        interval,
        negate,
        line,
    })
}

fn parse_action(t: &Spanned<toml::Table>) -> Result<Action, String> {
    let a: Action = toml::Value::Table(t.get_ref().clone())
        .try_into()
        .map_err(|e: toml::de::Error| hint(e.message().trim()))?;
    if let Action::Exec { argv, shell, .. } = &a {
        if argv.is_empty() {
            return Err("exec needs argv = [\"program\", \"arg\", …]".into());
        }
        if *shell && argv.len() != 1 {
            return Err("with shell = true, argv must be one string: the script sh -c runs".into());
        }
    }
    if let Action::Http { url, headers, .. } = &a {
        check_request(url, headers)?;
    }
    Ok(a)
}

fn hint(msg: &str) -> String {
    if msg.contains("missing field `type`") {
        format!("{msg}; every gate and action needs a type, e.g. type = \"pg.promote\"")
    } else if msg.starts_with("unknown field") {
        format!("{msg}; remove or correct the key (README.md, section Failover, lists every key)")
    } else if msg.starts_with("missing field") {
        format!("{msg}; add it (README.md, section Failover)")
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
