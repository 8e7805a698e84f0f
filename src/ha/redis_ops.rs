//! What `dr ha` does for a Redis group: read its state, pause and resume
//! automatic actions (audited). A planned switchover is PostgreSQL-only.

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::dcs::Dcs;
use super::redis::GroupView;
use super::{HaError, settings};
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, HA_REDIS_SCOPE, HaConfig, HaRedisGroup};

/// One member of a Redis group as `dr ha status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RedisMemberStatus {
    /// Member name.
    pub name: String,
    /// `master`, `replica`, `down`, or `unknown` when its daemon publishes nothing.
    pub role: String,
    /// Holds the leader key.
    pub leader: bool,
    /// `master_repl_offset`.
    pub offset: Option<u64>,
    /// Bytes behind the leader's offset.
    pub lag_bytes: Option<u64>,
    /// Replica: the `host:port` it replicates from.
    pub master: Option<String>,
    /// Replica: the link to its master is up.
    pub link_up: bool,
    /// Fenced (a replica of nowhere, refusing writes).
    pub fenced: bool,
    /// Its server answered its daemon.
    pub healthy: bool,
}

/// `dr ha status` of one Redis group.
#[derive(Debug, Clone, Serialize)]
pub struct RedisGroupStatus {
    /// Group name.
    pub group: String,
    /// Always `redis`, to tell groups from PostgreSQL clusters in JSON.
    pub engine: &'static str,
    /// The leader, if the key is held.
    pub leader: Option<String>,
    /// Seconds left on the leader's lease.
    pub lease_left_seconds: Option<i64>,
    /// Automatic actions paused.
    pub paused: bool,
    /// The leader's offset (live, else the last published).
    pub leader_offset: Option<u64>,
    /// Every configured member.
    pub members: Vec<RedisMemberStatus>,
}

/// The group to act on: `name`, or the only one configured.
pub fn group<'a>(
    cfg: &'a Config,
    name: Option<&str>,
) -> Result<(&'a HaConfig, String, &'a HaRedisGroup), HaError> {
    let ha = settings(cfg)?;
    let pick = match name {
        Some(n) => ha.redis.get_key_value(n),
        None if ha.redis.len() == 1 => ha.redis.iter().next(),
        None => None,
    };
    let list = ha.redis.keys().cloned().collect::<Vec<_>>().join(", ");
    match pick {
        Some((n, g)) => Ok((ha, n.clone(), g.get_ref())),
        None => Err(HaError::Config(match name {
            Some(n) => format!("no [ha.redis.{n}]; configured Redis groups: {list}"),
            None if list.is_empty() => "no [ha.redis.<group>] is configured".into(),
            None => format!("several Redis groups are configured ({list}); name one with --group"),
        })),
    }
}

async fn connect(ha: &HaConfig, group: &str) -> Result<Dcs, HaError> {
    let scope = format!("{HA_REDIS_SCOPE}/{group}");
    Dcs::connect(ha, &scope, ha.loop_wait.max(Duration::from_secs(5))).await
}

/// Reads the state of Redis group `name` from etcd.
pub async fn status(cfg: &Config, name: Option<&str>) -> Result<RedisGroupStatus, HaError> {
    let (ha, group, spec) = group(cfg, name)?;
    let dcs = connect(ha, &group).await?;
    let view: GroupView = dcs.view_as().await?;
    let lease_left = match &view.leader {
        Some(l) => dcs.lease_left(l.lease).await?,
        None => None,
    };
    let leader = view.leader.as_ref().map(|l| l.name.clone());
    let top = leader
        .as_ref()
        .and_then(|n| view.member(n))
        .and_then(|m| m.offset)
        .or(view.optime.as_ref().map(|o| o.offset));
    let members = spec
        .member
        .keys()
        .map(|n| {
            let s = view.member(n);
            RedisMemberStatus {
                name: n.clone(),
                role: s.map_or("unknown".into(), |s| s.role.clone()),
                leader: leader.as_deref() == Some(n),
                offset: s.and_then(|s| s.offset),
                lag_bytes: top
                    .zip(s.and_then(|s| s.offset))
                    .map(|(t, o)| t.saturating_sub(o)),
                master: s.and_then(|s| s.master.clone()),
                link_up: s.is_some_and(|s| s.link_up),
                fenced: s.is_some_and(|s| s.fenced),
                healthy: s.is_some_and(|s| s.healthy),
            }
        })
        .collect();
    Ok(RedisGroupStatus {
        group,
        engine: "redis",
        leader,
        lease_left_seconds: lease_left,
        paused: view.paused,
        leader_offset: top,
        members,
    })
}

/// Pauses (`true`) or resumes automatic actions of a Redis group; audited.
pub async fn set_paused(cfg: &Config, name: Option<&str>, paused: bool) -> Result<String, HaError> {
    let (ha, group, _) = group(cfg, name)?;
    let dcs = connect(ha, &group).await?;
    let action = if paused { "ha.pause" } else { "ha.resume" };
    let target = format!("{HA_REDIS_SCOPE}/{group}");
    let a = Audit::begin(AuditLog::from_config(cfg), action, &target, json!({}))?;
    let r = dcs.set_paused(paused).await;
    a.finish(
        None,
        r.as_ref().map(|_| json!({})).map_err(|e| e.to_string()),
    )
    .await;
    r?;
    Ok(group)
}
