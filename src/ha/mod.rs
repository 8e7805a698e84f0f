//! Automatic failover of PostgreSQL clusters, coordinated through etcd
//! (Patroni's model, design.md §11).
//!
//! Each member's daemon observes its own server and publishes its state
//! under a lease; the primary's daemon holds the cluster's leader key under
//! that lease and renews it every `loop_wait`. When the key is gone the most
//! caught-up eligible standby takes it in an etcd transaction (exactly one
//! wins) and promotes. A leader that cannot renew stops its own server
//! before its lease can expire ([`member`]'s watchdog), so a standby never
//! promotes while the old primary still accepts writes from a daemon that
//! is alive. [`ops`] holds what `dr ha` does: status, switchover, pause.

pub mod dcs;
mod member;
pub mod ops;
pub mod pg;

use std::sync::Arc;

use crate::audit::AuditError;
use crate::config::{Config, HaConfig};
use crate::playbook::model::Action;
use dcs::{ClusterView, MemberState};

pub use member::run_member;

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

use serde::Deserialize;

/// The standby that should take over when nobody leads: healthy, within
/// `max_lag` of the last published leader position, synchronous standbys
/// first, then the most received WAL, then the name (so every member
/// computes the same answer). `None` before any leader has published.
pub fn best_candidate(view: &ClusterView, max_lag: u64) -> Option<&MemberState> {
    let optime = view.optime.as_ref()?;
    view.members
        .iter()
        .filter(|m| m.role == "standby" && m.healthy)
        .filter(|m| {
            m.received_lsn
                .is_some_and(|r| optime.lsn.0.saturating_sub(r.0) <= max_lag)
        })
        .max_by(|a, b| {
            let sync = |m: &MemberState| optime.sync_standbys.contains(&m.name);
            (sync(a), a.received_lsn, std::cmp::Reverse(&a.name)).cmp(&(
                sync(b),
                b.received_lsn,
                std::cmp::Reverse(&b.name),
            ))
        })
}

/// Runs the automatic-failover loops of member `member` (every cluster it
/// belongs to) until `stop` is cancelled.
pub async fn run(
    cfg: Arc<Config>,
    member: String,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), HaError> {
    let ha = settings(&cfg)?;
    let clusters: Vec<String> = ha
        .postgres
        .iter()
        .filter(|(_, c)| c.get_ref().member.contains_key(&member))
        .map(|(n, _)| n.clone())
        .collect();
    if clusters.is_empty() {
        return Err(HaError::Config(format!(
            "member {member:?} is in no [ha.postgres.<cluster>]; pass --member with one of the configured member names"
        )));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for cluster in clusters {
        tasks.spawn(run_member(
            cfg.clone(),
            cluster,
            member.clone(),
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

#[cfg(test)]
mod tests {
    use super::dcs::Optime;
    use super::*;
    use crate::postgres::Lsn;

    fn m(name: &str, role: &str, lsn: u64, healthy: bool) -> MemberState {
        MemberState {
            name: name.into(),
            role: role.into(),
            timeline: 1,
            received_lsn: Some(Lsn(lsn)),
            replayed_lsn: Some(Lsn(lsn)),
            healthy,
            sync_standbys: vec![],
        }
    }

    #[test]
    fn the_most_caught_up_eligible_standby_wins_sync_first() {
        let mut v = ClusterView {
            optime: Some(Optime {
                leader: "a".into(),
                lsn: Lsn(1000),
                sync_standbys: vec![],
            }),
            members: vec![
                m("a", "down", 0, false),
                m("b", "standby", 900, true),
                m("c", "standby", 990, true),
                m("d", "standby", 999, false),
            ],
            ..Default::default()
        };
        assert_eq!(best_candidate(&v, 200).map(|m| m.name.as_str()), Some("c"));
        // Too far behind: nobody.
        assert_eq!(best_candidate(&v, 5).map(|m| m.name.as_str()), None);
        // A synchronous standby goes first, even if behind.
        if let Some(o) = v.optime.as_mut() {
            o.sync_standbys = vec!["b".into()];
        }
        assert_eq!(best_candidate(&v, 200).map(|m| m.name.as_str()), Some("b"));
        // Equal positions: the name decides, the same on every member.
        if let Some(o) = v.optime.as_mut() {
            o.sync_standbys.clear();
        }
        v.members[1].received_lsn = Some(Lsn(990));
        assert_eq!(best_candidate(&v, 200).map(|m| m.name.as_str()), Some("b"));
        // Before any leader published a position, nobody runs.
        v.optime = None;
        assert!(best_candidate(&v, 200).is_none());
    }
}
