//! Failover playbooks: ordered steps of gated actions over the servers of one
//! environment, run under a per-environment lock and written to the audit log.
//!
//! [`model`] parses the TOML, [`gates`] checks conditions, [`actions`] changes
//! things, [`engine`] runs the steps (retries, rollback, RTO) and [`failover`]
//! wraps a run with the lock and the audit record.

pub mod actions;
mod describe;
pub mod engine;
pub mod gates;
pub mod http;
pub mod model;
pub mod parse;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::audit::{Audit, AuditError, AuditLog};
use crate::config::{Config, ConfigError, EnvConfig, PgTarget, RedisTarget};
use crate::postgres::{pg_cause, sql_cause};

pub use engine::{Event, Observer, RunOptions, RunReport};
pub use model::Playbook;

/// Errors that stop a failover before or around its steps. Failures of
/// gates and actions are not errors: they are outcomes in the [`RunReport`].
#[derive(Debug, thiserror::Error)]
pub enum PlaybookError {
    /// The config or the playbook is wrong (file:line and the fix).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another failover of the environment holds the lock.
    #[error(
        "another failover of environment {env} is running ({holder}; lock {path}); \
         wait for it to finish. The lock is released when that process exits"
    )]
    Locked {
        /// Environment.
        env: String,
        /// Lock file.
        path: PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The lock file could not be created or locked.
    #[error(
        "cannot take the failover lock {path}: {source}; set `state_dir` in [env.<name>] to a writable directory"
    )]
    Lock {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The audit log could not be written, so nothing was run.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The playbook could not be found.
    #[error("{0}")]
    NotFound(String),
}

/// An exclusive lock on one environment's failovers: an OS file lock, so a
/// crashed run never leaves a stale lock behind.
#[derive(Debug)]
pub struct FailoverLock(crate::lockfile::HeldLock);

impl FailoverLock {
    /// Takes the lock of `env` in `dir` without waiting.
    pub fn acquire(dir: &Path, env: &str) -> Result<FailoverLock, PlaybookError> {
        use crate::lockfile::LockFailure;
        let path = dir.join(format!("failover-{env}.lock"));
        // Who holds it, for the message a second run prints.
        let who = format!(
            "held by pid {} since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
        );
        match crate::lockfile::try_lock(&path, &who) {
            Ok(l) => Ok(FailoverLock(l)),
            Err(LockFailure::Busy(holder)) => Err(PlaybookError::Locked {
                env: env.to_string(),
                path,
                holder,
            }),
            Err(LockFailure::Io(source)) => Err(PlaybookError::Lock { path, source }),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.0.path
    }
}

/// Finds a playbook: a path as given when it names a file (contains '/' or
/// ends in `.toml`), else `<name>.toml` in `./playbooks`, next to the config
/// in `playbooks/`, then in `/etc/dr/playbooks`.
pub fn resolve_path(arg: &str, config_path: &Path) -> Result<PathBuf, PlaybookError> {
    if arg.contains('/') || arg.ends_with(".toml") {
        let p = PathBuf::from(arg);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(PlaybookError::NotFound(format!(
                "playbook {arg} does not exist"
            )))
        };
    }
    let file = format!("{arg}.toml");
    let mut dirs: Vec<PathBuf> = Vec::new();
    let beside_config = config_path.parent().map(|d| d.join("playbooks"));
    for d in [
        Some(PathBuf::from("playbooks")),
        beside_config,
        Some(PathBuf::from("/etc/dr/playbooks")),
    ]
    .into_iter()
    .flatten()
    {
        // A config in the working directory would list ./playbooks twice.
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a
                .components()
                .filter(|c| *c != std::path::Component::CurDir)
                .eq(b
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)),
        };
        if !dirs.iter().any(|x| same(x, &d)) {
            dirs.push(d);
        }
    }
    for d in &dirs {
        let p = d.join(&file);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(PlaybookError::NotFound(format!(
        "no playbook {arg:?}: looked for {file} in {}; pass a path instead",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// The servers of one environment, as gates and actions reach them.
#[derive(Debug, Clone)]
pub struct Targets {
    env: String,
    postgres: HashMap<String, PgTarget>,
    redis: HashMap<String, RedisTarget>,
    rabbitmq: HashMap<String, crate::config::RabbitTarget>,
}

/// How long connecting to a server may take before the probe counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Targets {
    /// The servers of `[env.<name>]`.
    pub fn new(name: &str, env: &EnvConfig) -> Targets {
        Targets {
            env: name.to_string(),
            postgres: env
                .postgres
                .iter()
                .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                .collect(),
            redis: env
                .redis
                .iter()
                .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                .collect(),
            rabbitmq: env
                .rabbitmq
                .iter()
                .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                .collect(),
        }
    }

    /// The management API of a RabbitMQ broker by name.
    pub fn rabbitmq_api(&self, name: &str) -> Result<crate::rabbitmq::api::Api, String> {
        let t = self
            .rabbitmq
            .get(name)
            .ok_or_else(|| format!("no server {name:?} in [env.{}.rabbitmq]", self.env))?;
        let password = crate::rabbitmq::api::password_from(
            t.password_env.as_deref(),
            t.password_file.as_deref(),
        )
        .map_err(|e| format!("{name}: {e}"))?;
        crate::rabbitmq::api::Api::new(
            &t.url,
            &t.user,
            password,
            t.ca_file.as_deref(),
            CONNECT_TIMEOUT,
        )
        .map_err(|e| format!("{name}: {e}"))
    }

    /// The environment name.
    pub fn env(&self) -> &str {
        &self.env
    }

    /// A PostgreSQL server by name.
    pub fn pg(&self, name: &str) -> Result<&PgTarget, String> {
        self.postgres
            .get(name)
            .ok_or_else(|| format!("no server {name:?} in [env.{}.postgres]", self.env))
    }

    /// A Redis server by name.
    pub fn redis(&self, name: &str) -> Result<&RedisTarget, String> {
        self.redis
            .get(name)
            .ok_or_else(|| format!("no server {name:?} in [env.{}.redis]", self.env))
    }

    /// Connects to a PostgreSQL server.
    pub async fn pg_client(&self, name: &str) -> Result<tokio_postgres::Client, String> {
        let t = self.pg(name)?;
        crate::postgres::connect_to(&t.conninfo, Some(CONNECT_TIMEOUT))
            .await
            .map_err(|e| format!("cannot connect to {name}: {}", pg_cause(&e)))
    }

    /// Runs `sql` on a fresh connection to a PostgreSQL server; the error
    /// names the server and carries the server's own message.
    pub async fn pg_rows(&self, name: &str, sql: &str) -> Result<Vec<tokio_postgres::Row>, String> {
        self.pg_client(name)
            .await?
            .query(sql, &[])
            .await
            .map_err(|e| format!("{name}: {}", sql_cause(&e)))
    }

    /// Like [`Targets::pg_rows`] for a query that returns exactly one row.
    pub async fn pg_row(&self, name: &str, sql: &str) -> Result<tokio_postgres::Row, String> {
        self.pg_rows(name, sql)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| format!("{name}: the query returned no rows"))
    }

    /// Connects to a Redis server.
    pub async fn redis_conn(
        &self,
        name: &str,
    ) -> Result<redis::aio::MultiplexedConnection, String> {
        let t = self.redis(name)?;
        let client = redis::Client::open(t.url.as_str())
            .map_err(|e| format!("{name}: bad Redis URL: {e}"))?;
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| {
                format!(
                    "cannot connect to {name}: {}",
                    crate::redis::client_cause(&e, &t.url)
                )
            })
    }

    /// `INFO replication` of a Redis server, as key → value.
    pub async fn redis_replication(&self, name: &str) -> Result<HashMap<String, String>, String> {
        let mut conn = self.redis_conn(name).await?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                let t = self.redis(name).map(|t| t.url.clone()).unwrap_or_default();
                format!(
                    "INFO replication on {name}: {}",
                    crate::redis::client_cause(&e, &t)
                )
            })?;
        Ok(info
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Host and port of a Redis server's URL, as REPLICAOF wants them.
    pub fn redis_addr(&self, name: &str) -> Result<(String, u16), String> {
        let t = self.redis(name)?;
        let client = redis::Client::open(t.url.as_str())
            .map_err(|e| format!("{name}: bad Redis URL: {e}"))?;
        match client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(h, p) => Ok((h.clone(), *p)),
            redis::ConnectionAddr::TcpTls { host, port, .. } => Ok((host.clone(), *port)),
            other => Err(format!(
                "{name}: {other:?} has no host and port for REPLICAOF; use a TCP URL"
            )),
        }
    }
}

/// Runs `playbook` on environment `env` of `cfg`: checks the targets, takes
/// the environment's lock (not for dry runs), writes the audit record before
/// acting and finishes it with every step's outcome.
pub async fn failover(
    cfg: &Config,
    playbook: &Playbook,
    env: &str,
    opts: RunOptions,
    observer: &dyn Observer,
) -> Result<RunReport, PlaybookError> {
    let env_cfg = cfg.environment(env)?;
    playbook.check_targets(env, env_cfg)?;
    let _lock = if opts.dry_run {
        None
    } else {
        Some(FailoverLock::acquire(&env_cfg.state_dir(), env)?)
    };
    let action = if opts.dry_run {
        "failover.dry-run"
    } else {
        "failover"
    };
    let mut audit = Audit::begin(
        AuditLog::from_config(cfg),
        action,
        env,
        serde_json::json!({
            "playbook": playbook.name,
            "playbook_path": playbook.source,
            "dry_run": opts.dry_run,
        }),
    )?;
    let targets = Targets::new(env, env_cfg);
    let mut report = engine::run(playbook, &targets, opts, observer).await;
    // The repository copy of the record is best effort: the repository may
    // live in the region that just failed.
    let repo =
        match tokio::time::timeout(Duration::from_secs(10), crate::repo::Repository::open(cfg))
            .await
        {
            Ok(Ok(r)) => Some(r),
            Ok(Err(e)) => {
                report.warnings.push(format!(
                    "audit record kept only in {}: the repository is not usable ({e})",
                    cfg.audit.resolved_path().display()
                ));
                None
            }
            Err(_) => {
                report.warnings.push(format!(
                    "audit record kept only in {}: the repository did not answer within 10s",
                    cfg.audit.resolved_path().display()
                ));
                None
            }
        };
    report.audit_id = Some(audit.id());
    let details = serde_json::to_value(&report).unwrap_or(serde_json::Value::Null);
    audit.set_details(details.clone());
    let result = match &report.error {
        None => Ok(details),
        Some(e) => Err(e.clone()),
    };
    let (_, warnings) = audit.finish(repo.as_ref(), result).await;
    report.warnings.extend(warnings);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_path_names_each_directory_once() {
        let e = resolve_path("no-such-playbook", Path::new("dr.toml"))
            .expect_err("missing")
            .to_string();
        assert!(!e.contains("playbooks, playbooks"), "{e}");
        assert!(e.contains("/etc/dr/playbooks"), "{e}");
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = FailoverLock::acquire(dir.path(), "prod").expect("first");
        let e = FailoverLock::acquire(dir.path(), "prod").expect_err("second must fail");
        let msg = e.to_string();
        assert!(
            msg.contains("another failover of environment prod"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        // Another environment is independent.
        let _other = FailoverLock::acquire(dir.path(), "staging").expect("other env");
        drop(first);
        FailoverLock::acquire(dir.path(), "prod").expect("free again after drop");
    }

    #[test]
    fn samples_parse_and_name_servers_of_the_example_config() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cfg = root.join("config/dr.toml");
        let text = std::fs::read_to_string(&cfg).expect("read config/dr.toml");
        let cfg = Config::parse(&text, &cfg).expect("config/dr.toml is valid");
        let env = cfg.environment("prod").expect("[env.prod]");
        for name in [
            "pg-promote-standby",
            "redis-promote-replica",
            "region-failover",
        ] {
            let pb = Playbook::load(&root.join(format!("playbooks/{name}.toml")))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(pb.name, name);
            pb.check_targets("prod", env)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn playbook_names_resolve_next_to_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("playbooks")).expect("mkdir");
        let pb = dir.path().join("playbooks/db-failover-test-x.toml");
        std::fs::write(&pb, "").expect("write");
        let cfg = dir.path().join("dr.toml");
        assert_eq!(resolve_path("db-failover-test-x", &cfg).expect("found"), pb);
        let e = resolve_path("db-failover-test-y", &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("db-failover-test-y.toml"), "{e}");
    }
}
