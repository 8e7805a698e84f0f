//! Automatic failover of PostgreSQL clusters, coordinated through etcd
//! (Patroni's model, design.md §11).
//!
//! Each member's daemon observes its own server and publishes its state
//! under a lease; the primary's daemon holds the cluster's leader key under
//! that lease and renews it every `loop_wait`. When the key is gone the most
//! caught-up eligible standby takes it in an etcd transaction (exactly one
//! wins) and promotes. A leader that cannot renew stops its own server
//! before its lease can expire ([`lease`]'s watchdog), so a standby never
//! promotes while the old primary still accepts writes from a daemon that
//! is alive. [`ops`] holds what `dr ha` does: status, switchover, pause.
//!
//! Redis groups (`[ha.redis.<group>]`) run the same lease logic with
//! Redis's actions ([`redis`], `redis_member`): the master's daemon holds
//! the key, the replica with the highest offset takes it, and the fence is
//! `REPLICAOF` to an address that refuses connections.

pub mod dcs;
mod driver;
pub mod fleet;
mod lease;
mod member;
pub mod ops;
pub mod pg;
pub mod redis;
mod redis_member;
pub mod redis_ops;
pub mod stats;

use crate::audit::AuditError;
use crate::config::{Config, HaConfig};
use crate::playbook::model::Action;
use serde::Deserialize;

/// Runs the automatic-failover loops of member `member` (every PostgreSQL
/// cluster and Redis group it belongs to) until `stop` is cancelled,
/// reporting through `stats`.
pub async fn run(
    cfg: std::sync::Arc<Config>,
    member: String,
    stats: std::sync::Arc<HaStats>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), HaError> {
    let ha = settings(&cfg)?;
    let clusters: Vec<String> = ha
        .postgres
        .iter()
        .filter(|(_, c)| c.get_ref().member.contains_key(&member))
        .map(|(n, _)| n.clone())
        .collect();
    let groups: Vec<String> = ha
        .redis
        .iter()
        .filter(|(_, g)| g.get_ref().member.contains_key(&member))
        .map(|(n, _)| n.clone())
        .collect();
    if clusters.is_empty() && groups.is_empty() {
        return Err(HaError::Config(format!(
            "member {member:?} is in no [ha.postgres.<cluster>] or [ha.redis.<group>]; pass --member \
             with one of the configured member names: {}",
            ha.member_names().join(", ")
        )));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for c in clusters {
        let report = stats::Report::new(stats.clone(), &c, &member);
        tasks.spawn(member::run_member(
            cfg.clone(),
            c,
            member.clone(),
            report,
            stop.clone(),
        ));
    }
    for g in groups {
        let scope = format!("{}/{g}", crate::config::HA_REDIS_SCOPE);
        let report = stats::Report::new(stats.clone(), &scope, &member);
        tasks.spawn(redis_member::run_member(
            cfg.clone(),
            g,
            member.clone(),
            report,
            stop.clone(),
        ));
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(HaError::Refused(format!("failover loop crashed: {e}"))),
        }
    }
    Ok(())
}

pub use stats::HaStats;

/// Why an automatic-failover operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// `[ha]` is missing or does not fit the request (what to set).
    #[error("{0}")]
    Config(String),
    /// etcd did not answer or refused.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A PostgreSQL operation failed.
    #[error("{0}")]
    Pg(String),
    /// A Redis operation failed.
    #[error("{0}")]
    Redis(String),
    /// The audit log could not be written, so nothing was done.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The cluster is not in a state that allows the request.
    #[error("{0}")]
    Refused(String),
}

/// The configured `[ha]`, or an error saying how to add it.
pub fn settings(cfg: &Config) -> Result<&HaConfig, HaError> {
    cfg.ha().ok_or_else(|| {
        HaError::Config(format!(
            "{}: no [ha] section; add one with etcd endpoints and [ha.postgres.<cluster>.member.<name>] \
             sections (see config/dr.toml)",
            cfg.source.display()
        ))
    })
}

/// The hooks of `[ha.postgres.<cluster>]`, parsed as playbook actions.
pub fn hooks(cfg: &Config, cluster: &str) -> Result<Vec<Action>, crate::config::ConfigError> {
    let Some(ha) = cfg.ha() else {
        return Ok(Vec::new());
    };
    let Some(c) = ha.postgres.get(cluster) else {
        return Ok(Vec::new());
    };
    parse_hooks(cfg, &format!("ha.postgres.{cluster}"), &c.get_ref().hook)
}

/// The hooks of `[ha.redis.<group>]`, parsed as playbook actions.
pub fn redis_hooks(cfg: &Config, group: &str) -> Result<Vec<Action>, crate::config::ConfigError> {
    let Some(g) = cfg.ha().and_then(|ha| ha.redis.get(group)) else {
        return Ok(Vec::new());
    };
    parse_hooks(cfg, &format!("ha.redis.{group}"), &g.get_ref().hook)
}

fn parse_hooks(
    cfg: &Config,
    table: &str,
    hooks: &[toml::Spanned<toml::Table>],
) -> Result<Vec<Action>, crate::config::ConfigError> {
    hooks
        .iter()
        .map(|h| {
            Action::deserialize(toml::Value::Table(h.get_ref().clone())).map_err(|e| {
                cfg.error_at(
                    h.span(),
                    format!(
                        "[[{table}.hook]]: {}; a hook is a playbook action \
                         (type = \"exec\", \"http\", \"sql\", …; see playbooks/)",
                        e.message()
                    ),
                )
            })
        })
        .collect()
}

/// Checks what `[ha]` needs beyond parsing: that hooks are valid actions.
pub fn check_config(cfg: &Config) -> Result<(), crate::config::ConfigError> {
    if let Some(ha) = cfg.ha() {
        for cluster in ha.postgres.keys() {
            hooks(cfg, cluster)?;
        }
        for group in ha.redis.keys() {
            redis_hooks(cfg, group)?;
        }
    }
    Ok(())
}
