//! What `dr ha` does: read the cluster's state, request a planned
//! switchover and wait for it, pause and resume automatic actions. Each
//! change is written to the audit log.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::dcs::{Dcs, Switchover};
use super::{HaError, settings};
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, HaConfig, HaPgCluster};
use crate::postgres::Lsn;

/// One member as `dr ha status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// Member name.
    pub name: String,
    /// `primary`, `standby`, `down`, or `unknown` when its daemon publishes nothing.
    pub role: String,
    /// Holds the leader key.
    pub leader: bool,
    /// Timeline.
    pub timeline: Option<u32>,
    /// Received (standby) or flushed (primary) position.
    pub received_lsn: Option<Lsn>,
    /// Replayed position (standby).
    pub replayed_lsn: Option<Lsn>,
    /// Bytes behind the leader's last published position.
    pub lag_bytes: Option<u64>,
    /// Its server answered its daemon.
    pub healthy: bool,
}

/// `dr ha status` of one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub cluster: String,
    /// The leader, if the key is held.
    pub leader: Option<String>,
    /// Seconds left on the leader's lease.
    pub lease_left_seconds: Option<i64>,
    /// Automatic actions paused.
    pub paused: bool,
    /// A switchover in progress (`from → to`).
    pub switchover: Option<String>,
    /// Last position the leader published.
    pub leader_lsn: Option<Lsn>,
    /// Every configured member.
    pub members: Vec<MemberStatus>,
}

/// The cluster to act on: `name`, or the only one configured.
pub fn cluster<'a>(
    cfg: &'a Config,
    name: Option<&str>,
) -> Result<(&'a HaConfig, String, &'a HaPgCluster), HaError> {
    let ha = settings(cfg)?;
    let names: Vec<&String> = ha.postgres.keys().collect();
    let pick = match name {
        Some(n) => ha.postgres.get_key_value(n),
        None if names.len() == 1 => ha.postgres.iter().next(),
        None => None,
    };
    let list = names
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match pick {
        Some((n, c)) => Ok((ha, n.clone(), c.get_ref())),
        None => Err(HaError::Config(match name {
            Some(n) => format!("no [ha.postgres.{n}]; configured: {list}"),
            None if names.is_empty() => {
                "no [ha.postgres.<cluster>] is configured (a planned switchover is \
                 PostgreSQL-only; for a Redis group, dr ha status|pause|resume take --group NAME)"
                    .to_string()
            }
            None => format!("several clusters are configured ({list}); name one with --cluster"),
        })),
    }
}

async fn connect(ha: &HaConfig, cluster: &str) -> Result<Dcs, HaError> {
    Dcs::connect(ha, cluster, ha.loop_wait.max(Duration::from_secs(5))).await
}

/// Reads the state of `cluster` from etcd.
pub async fn status(cfg: &Config, name: Option<&str>) -> Result<ClusterStatus, HaError> {
    let (ha, cluster, spec) = cluster(cfg, name)?;
    let dcs = connect(ha, &cluster).await?;
    let view = dcs.view().await?;
    let lease_left = match &view.leader {
        Some(l) => dcs.lease_left(l.lease).await?,
        None => None,
    };
    let leader_name = view.leader.as_ref().map(|l| l.name.clone());
    // The live leader's own position is fresher than the published optime.
    let top = view.leader_lsn();
    let members = spec
        .member
        .keys()
        .map(|n| {
            let s = view.member(n);
            MemberStatus {
                name: n.clone(),
                role: s.map_or("unknown".into(), |s| s.role.clone()),
                leader: leader_name.as_deref() == Some(n),
                timeline: s.map(|s| s.timeline),
                received_lsn: s.and_then(|s| s.received_lsn),
                replayed_lsn: s.and_then(|s| s.replayed_lsn),
                lag_bytes: view.lag_bytes(s.and_then(|s| s.received_lsn)),
                healthy: s.is_some_and(|s| s.healthy),
            }
        })
        .collect();
    Ok(ClusterStatus {
        cluster,
        leader: leader_name,
        lease_left_seconds: lease_left,
        paused: view.paused,
        switchover: view.switchover.map(|s| format!("{} → {}", s.from, s.to)),
        leader_lsn: top,
        members,
    })
}

/// Pauses (`true`) or resumes automatic actions of a cluster; audited.
pub async fn set_paused(cfg: &Config, name: Option<&str>, paused: bool) -> Result<String, HaError> {
    let (ha, cluster, _) = cluster(cfg, name)?;
    let dcs = connect(ha, &cluster).await?;
    let action = if paused { "ha.pause" } else { "ha.resume" };
    let a = Audit::begin(AuditLog::from_config(cfg), action, &cluster, json!({}))?;
    let r = dcs.set_paused(paused).await;
    a.finish(
        None,
        r.as_ref().map(|_| json!({})).map_err(|e| e.to_string()),
    )
    .await;
    r?;
    Ok(cluster)
}

/// How a switchover went.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchoverReport {
    /// Cluster.
    pub cluster: String,
    /// The old leader.
    pub from: String,
    /// The new one.
    pub to: String,
    /// From the request until the new primary accepted a write.
    pub rto_seconds: f64,
    /// The old primary's final position, replayed by the new one first.
    pub final_lsn: Option<Lsn>,
    /// Audit record id.
    pub audit_id: String,
}

/// Planned switchover to `to`: the leader's daemon stops its server, the
/// target replays everything up to that server's final checkpoint and is
/// promoted. Waits up to `timeout` for the target to accept a write.
pub async fn switchover(
    cfg: &Config,
    name: Option<&str>,
    to: &str,
    timeout: Duration,
) -> Result<SwitchoverReport, HaError> {
    let (ha, cluster, spec) = cluster(cfg, name)?;
    let target = spec.member.get(to).map(|m| m.get_ref()).ok_or_else(|| {
        HaError::Config(format!(
            "{to:?} is not a member of [ha.postgres.{cluster}]; members: {}",
            spec.member.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let dcs = connect(ha, &cluster).await?;
    let view = dcs.view().await?;
    let refuse = |m: String| Err(HaError::Refused(m));
    let Some(leader) = view.leader.clone() else {
        return refuse(format!(
            "{cluster} has no leader; a switchover needs one (see `dr ha status`)"
        ));
    };
    if leader.name == to {
        return refuse(format!("{to} already leads {cluster}"));
    }
    if view.paused {
        return refuse(format!("{cluster} is paused; run `dr ha resume` first"));
    }
    if view.switchover.is_some() {
        return refuse(format!("a switchover of {cluster} is already in progress"));
    }
    if !view
        .member(to)
        .is_some_and(|m| m.role == "standby" && m.healthy)
    {
        return refuse(format!(
            "{to} is not a live, healthy standby (its daemon must run; see `dr ha status`)"
        ));
    }
    let details = json!({ "from": leader.name, "to": to });
    let mut audit = Audit::begin(
        AuditLog::from_config(cfg),
        "ha.switchover.request",
        &cluster,
        details,
    )?;
    let t0 = Instant::now();
    let req = Switchover {
        from: leader.name.clone(),
        to: to.to_string(),
        requested_at: chrono::Utc::now().timestamp(),
        final_lsn: None,
    };
    let r = async {
        dcs.set_switchover(Some(&req)).await?;
        let mut final_lsn = None;
        loop {
            if t0.elapsed() > timeout {
                let _ = dcs.set_switchover(None).await;
                return Err(HaError::Refused(format!(
                    "{to} did not take over within {timeout:?}; the request was withdrawn (see the daemons' logs and `dr ha status`)"
                )));
            }
            let v = dcs.view().await?;
            if let Some(s) = &v.switchover {
                final_lsn = s.final_lsn.or(final_lsn);
            }
            if v.leader.as_ref().is_some_and(|l| l.name == to) && writable(&target.conninfo).await {
                return Ok(final_lsn);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    .await;
    let rto = t0.elapsed().as_secs_f64();
    let id = audit.id();
    let out = r
        .as_ref()
        .map(|f| json!({ "from": leader.name, "to": to, "rto_seconds": rto, "final_lsn": f }));
    if let Ok(d) = &out {
        audit.set_details(d.clone());
    }
    audit.finish(None, out.map_err(|e| e.to_string())).await;
    let final_lsn = r?;
    Ok(SwitchoverReport {
        cluster,
        from: leader.name,
        to: to.to_string(),
        rto_seconds: rto,
        final_lsn,
        audit_id: id,
    })
}

/// True when the server accepts a write (a primary, not read-only).
async fn writable(conninfo: &str) -> bool {
    let Ok(c) = crate::postgres::connect_to(conninfo, Some(Duration::from_secs(2))).await else {
        return false;
    };
    c.query_one(
        "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'",
        &[],
    )
    .await
    .is_ok_and(|r| r.get::<_, bool>(0))
}
