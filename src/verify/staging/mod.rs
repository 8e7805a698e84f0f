//! Drills into an existing staging environment (`[drill.*] environment =
//! "<env>"`): each source is restored into the `[env.<env>]` server of the
//! same name, which is stopped, overwritten and started again on the
//! restored data, and stays running afterwards.
//!
//! The drill destroys the staging servers' data, so before anything is
//! touched every target must pass [`preflight`]: the environment allows
//! overwriting, no target is (or lies inside) a protected server — any
//! `[postgres.*]`/`[redis.*]` source or a server of an environment without
//! `allow_overwrite` — by address or data directory, and the server that
//! answers at a target's address is the one on its data directory and is
//! not a production server reached under another name. A restored staging
//! cluster shares production's system identifier, so identity is the pair
//! (system identifier, postmaster start time) for PostgreSQL and `run_id`
//! for Redis: both belong to one running process.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::checks::PgAt;
use super::report::{CheckResult, SourceReport};
use crate::config::{
    Config, ConfigError, DrillConfig, PgConfig, PgTarget, RedisConfig, RedisTarget,
};
use crate::postgres::restore::{RestoreOptions, Target};
use crate::repo::Repository;

/// Why a staging drill must not touch its targets: every reason found, so
/// one run shows them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub Vec<String>);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Refusal {}

impl From<Vec<String>> for Refusal {
    fn from(why: Vec<String>) -> Self {
        Refusal(why)
    }
}

mod preflight;
mod protect;
mod redis_server;
#[cfg(test)]
mod tests;

pub use preflight::preflight;
use preflight::*;
use protect::*;
pub use protect::{check_config, pg_endpoint, redis_endpoint, refuse_protected};
use redis_server::*;

/// Files of a staging cluster that stay its own: without them the restored
/// cluster would start with production's port, access rules and archiving.
pub const KEPT_PG_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const INTERRUPTED_PG: &str = "stopped by a signal before the checks finished; \
                              the staging server may be left stopped or recovering";
const INTERRUPTED_REDIS: &str =
    "stopped by a signal before the checks finished; the staging server may be left stopped";

/// What a drill into `[env.<env>]` would do to each server, for a dry run.
pub fn plan(cfg: &Config, env: &str, d: &DrillConfig) -> Vec<String> {
    let Ok(e) = cfg.environment(env) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for n in &d.postgres {
        if let Some(t) = e.postgres.get(n).map(|t| t.get_ref()) {
            out.push(format!(
                "{}: stop it (pg_ctl stop -m fast as {}), restore [postgres.{n}] as of {} into its data \
                 directory with --delta keeping its {}, start it as configured with archive_mode=off, \
                 wait for promotion through its conninfo, run the checks; it stays running",
                pg_server(env, n, t),
                t.os_user,
                d.to,
                KEPT_PG_FILES.join(", ")
            ));
        }
    }
    out.extend(crate::verify::rabbitmq_staging::plan(env, e, d));
    for n in &d.redis {
        if let Some(t) = e.redis.get(n).map(|t| t.get_ref()) {
            let dir = t.dir.as_deref().unwrap_or(Path::new("?"));
            let (h, port) = redis_endpoint(&t.url).unwrap_or_default();
            out.push(format!(
                "[env.{env}.redis.{n}] {h}:{port}: decode [redis.{n}] as of {} into {}, SHUTDOWN NOSAVE, \
                 rename it to {}, start {} {} --daemonize yes --appendonly no{}, check key counts and \
                 run the checks; it stays running",
                d.to,
                dir.join(".dr-drill-<id>").display(),
                dir.join(&t.dbfilename).display(),
                t.server_bin.display(),
                t.config_file.as_deref().unwrap_or(Path::new("?")).display(),
                if t.config_file.as_deref().is_some_and(wants_aof) {
                    ", then CONFIG SET appendonly yes (AOF rewritten from the restored data)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

/// Describes a staging PostgreSQL server for reports.
fn pg_server(env: &str, n: &str, t: &PgTarget) -> String {
    let (h, p) = pg_endpoint(&t.conninfo).unwrap_or_default();
    format!(
        "[env.{env}.postgres.{n}] {h}:{p} data_dir {}",
        t.data_dir.as_deref().unwrap_or(Path::new("?")).display()
    )
}

/// Restores cluster `cluster` into the staging server `t`: stop it, delta
/// restore into its data directory keeping its own configuration, start it
/// as configured (without archiving: it shares production's system
/// identifier, so its WAL must never reach production's archive), wait for
/// the target, and run the same checks as a scratch restore.
#[allow(clippy::too_many_arguments)]
pub async fn restore_pg(
    repo: &Repository,
    env: &str,
    cluster: &str,
    cfg: &PgConfig,
    t: &PgTarget,
    target: &Target,
    dr_command: &str,
    t0: Instant,
    cancel: &CancellationToken,
) -> SourceReport {
    let mut rep = SourceReport::new("pg", cluster, &super::pg::target_text(target));
    rep.staging = Some(pg_server(env, cluster, t));
    let port = pg_endpoint(&t.conninfo).map_or(5432, |(_, p)| p);
    rep.port = Some(port);
    let Some(data) = t.data_dir.clone() else {
        rep.checks
            .push(CheckResult::fail("staging server", "no data_dir", 0.0));
        return rep;
    };
    let work = async {
        // A restore that cannot work must fail before staging is stopped.
        if let Err(e) = restorable(repo, cluster, target).await {
            rep.checks
                .push(CheckResult::fail("restore", e, t0.elapsed().as_secs_f64()));
            return;
        }
        if let Some(pid) = postmaster_running(&data) {
            let s = Instant::now();
            match crate::postgres::server::stop(&t.bin_dir, &t.os_user, &data).await {
                Ok(()) => rep.checks.push(CheckResult::pass(
                    "staging stopped",
                    format!(
                        "stopped the staging server (pid {pid}) on {}",
                        data.display()
                    ),
                    s.elapsed().as_secs_f64(),
                )),
                Err(e) => {
                    rep.checks.push(CheckResult::fail(
                        "staging stopped",
                        e.to_string(),
                        s.elapsed().as_secs_f64(),
                    ));
                    return;
                }
            }
        }
        // The staging server's own binaries and OS user run it.
        let mut pg = cfg.clone();
        pg.bin_dir = t.bin_dir.clone();
        pg.os_user = t.os_user.clone();
        let opts = RestoreOptions {
            start: Some(port),
            no_archive: true,
            delta: true,
            // allow_overwrite consented to replacing the staging cluster.
            replace_other_cluster: true,
            settings: vec!["hot_standby=on".into()],
            keep_files: KEPT_PG_FILES.iter().map(|s| s.to_string()).collect(),
            conninfo: Some(t.conninfo.clone()),
            ..RestoreOptions::new(
                target.clone(),
                data.clone(),
                crate::postgres::quote::wal_fetch_command(dr_command, cluster),
            )
        };
        let at = PgAt {
            host: String::new(),
            port,
            user: String::new(),
            conninfo: Some(t.conninfo.clone()),
        };
        super::pg::restore_then_check(repo, cluster, &pg, &opts, &at, t0, &mut rep).await;
    };
    let interrupted = super::interruptible(work, cancel, t0, INTERRUPTED_PG).await;
    rep.checks.extend(interrupted);
    rep
}

/// Whether `cluster` has a backup for `target` that a delta restore into
/// a staging data directory can use (no tablespaces).
async fn restorable(repo: &Repository, cluster: &str, target: &Target) -> Result<(), String> {
    let catalog = crate::postgres::catalog::Catalog::load(repo, cluster)
        .await
        .map_err(|e| e.to_string())?;
    let when = match target {
        Target::Latest => None,
        Target::Time(t) => Some(*t),
    };
    let m = catalog.pick(when).map_err(|e| e.to_string())?;
    if m.tablespaces.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "backup {} has tablespaces, which a restore into a staging data directory does not \
             support yet; the staging server was left as it was",
            m.id
        ))
    }
}

/// Restores instance `instance` into the staging server `t`: decode the
/// snapshot next to its data file, stop it with `SHUTDOWN NOSAVE` (so it
/// cannot write its old dataset over the snapshot), move the snapshot into
/// place, start `redis-server` with its own config file (AOF off while it
/// loads, since Redis prefers an AOF over the RDB at start-up; turned back
/// on afterwards when the config wants it, which rewrites the AOF from the
/// restored data), then check key counts and run the user checks.
#[allow(clippy::too_many_arguments)]
pub async fn restore_redis(
    repo: &Repository,
    env: &str,
    instance: &str,
    cfg: &RedisConfig,
    t: &RedisTarget,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    cancel: &CancellationToken,
) -> SourceReport {
    let mut rep = super::redis::new_report(instance, target, "drill start (latest)");
    let (h, port) = redis_endpoint(&t.url).unwrap_or_default();
    rep.port = Some(port);
    let (Some(dir), Some(conf)) = (t.dir.clone(), t.config_file.clone()) else {
        rep.checks.push(CheckResult::fail(
            "staging server",
            "config_file and dir are needed",
            0.0,
        ));
        return rep;
    };
    rep.staging = Some(format!(
        "[env.{env}.redis.{instance}] {h}:{port} {}",
        dir.join(&t.dbfilename).display()
    ));
    let work = async {
        if let Err(e) = redis_steps(repo, instance, cfg, t, &dir, &conf, target, t0, &mut rep).await
        {
            rep.checks
                .push(CheckResult::fail(e.0, e.1, t0.elapsed().as_secs_f64()));
        }
    };
    let interrupted = super::interruptible(work, cancel, t0, INTERRUPTED_REDIS).await;
    rep.checks.extend(interrupted);
    rep
}
