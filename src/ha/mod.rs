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

pub mod dcs;
pub mod fleet;
mod lease;
mod member;
pub mod ops;
pub mod pg;
pub mod stats;

use crate::audit::AuditError;
use crate::config::{Config, HaConfig};
use crate::playbook::model::Action;
use serde::Deserialize;

pub use member::run;
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
    c.get_ref()
        .hook
        .iter()
        .map(|h| {
            Action::deserialize(toml::Value::Table(h.get_ref().clone())).map_err(|e| {
                cfg.error_at(
                    h.span(),
                    format!(
                        "[[ha.postgres.{cluster}.hook]]: {}; a hook is a playbook action \
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
    }
    Ok(())
}
