//! What a member's daemon does to its own Redis server beyond the playbook
//! actions it reuses (`redis.promote`, `redis.replicaof`): observing it,
//! the state it publishes, choosing the replica to promote, and the fence.
//!
//! **The fence is `REPLICAOF 127.0.0.1 0`**: the server becomes a replica
//! of an address that refuses every connection at once (port 0), so it
//! answers writes with `READONLY` straight away, keeps its data for reads,
//! and stays fenced after its daemon dies, until a daemon points it at the
//! new master (a partial resync where the histories allow, a full one where
//! they diverged). `CLIENT PAUSE … WRITE` was not chosen: it lapses when
//! the daemon that renews it dies, and the writes it held back then land on
//! a server that is no longer the master; its clients hang instead of
//! being told to look for the master.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dcs::{ClusterView, Named};
use crate::playbook::Targets;

/// Where a fenced server "replicates" from: nothing listens on port 0.
pub const FENCE_HOST: &str = "127.0.0.1";
/// See [`FENCE_HOST`].
pub const FENCE_PORT: u16 = 0;

/// What a member's daemon last saw of its Redis server, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisMemberState {
    /// Member name.
    pub name: String,
    /// `master`, `replica` or `down`.
    pub role: String,
    /// `master_repl_offset`: written (master) or processed (replica) bytes
    /// of the replication stream.
    pub offset: Option<u64>,
    /// Replica: the `host:port` it replicates from.
    pub master: Option<String>,
    /// Replica: `master_link_status:up`.
    pub link_up: bool,
    /// Replica of the fence address ([`FENCE_HOST`]:[`FENCE_PORT`]).
    pub fenced: bool,
    /// The server answered.
    pub healthy: bool,
}

impl Named for RedisMemberState {
    fn name(&self) -> &str {
        &self.name
    }
}

/// The replication offset the master last published; it outlives the
/// master's lease so replicas can judge their lag against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedisOptime {
    /// Who published it.
    pub leader: String,
    /// Its `master_repl_offset` then.
    pub offset: u64,
}

/// One read of a Redis group's keys.
pub type GroupView = ClusterView<RedisMemberState, RedisOptime>;

impl ClusterView<RedisMemberState, RedisOptime> {
    /// The replica that should be promoted when nobody leads: healthy,
    /// within `max_lag` bytes of the last published master offset, the
    /// highest offset, then the name (so every member computes the same
    /// answer). `None` before any master has published.
    pub fn best_replica(&self, max_lag: u64) -> Option<&RedisMemberState> {
        let optime = self.optime.as_ref()?;
        self.members
            .iter()
            .filter(|m| m.role == "replica" && m.healthy)
            .filter(|m| {
                m.offset
                    .is_some_and(|o| optime.offset.saturating_sub(o) <= max_lag)
            })
            .max_by(|a, b| {
                (a.offset, std::cmp::Reverse(&a.name)).cmp(&(b.offset, std::cmp::Reverse(&b.name)))
            })
    }
}

/// The role a member's Redis plays right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes.
    Master,
    /// Replicates (or is fenced).
    Replica,
    /// Does not answer.
    Down,
}

/// One look at a server.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its role.
    pub role: Role,
    /// `master_repl_offset`.
    pub offset: Option<u64>,
    /// Replica: `master_host:master_port`.
    pub master: Option<(String, u16)>,
    /// Replica: the link to its master is up.
    pub link_up: bool,
    /// Why it is down.
    pub error: Option<String>,
}

impl Observed {
    /// Replica of the fence address.
    pub fn fenced(&self) -> bool {
        self.role == Role::Replica
            && self
                .master
                .as_ref()
                .is_some_and(|(h, p)| h == FENCE_HOST && *p == FENCE_PORT)
    }

    /// The state published for member `name`.
    pub fn state(&self, name: &str) -> RedisMemberState {
        RedisMemberState {
            name: name.into(),
            role: match self.role {
                Role::Master => "master",
                Role::Replica => "replica",
                Role::Down => "down",
            }
            .into(),
            offset: self.offset,
            master: self.master.as_ref().map(|(h, p)| format!("{h}:{p}")),
            link_up: self.link_up,
            fenced: self.fenced(),
            healthy: self.role != Role::Down,
        }
    }
}

/// Observes server `name` of `t` (`INFO replication`) within `timeout`.
/// Never fails: a server that does not answer is `Down`.
pub async fn observe(t: &Targets, name: &str, timeout: Duration) -> Observed {
    let info = match tokio::time::timeout(timeout, t.redis_replication(name)).await {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => return down(e.0),
        Err(_) => return down(format!("no answer within {timeout:?}")),
    };
    parse(&info)
}

fn down(e: String) -> Observed {
    Observed {
        role: Role::Down,
        offset: None,
        master: None,
        link_up: false,
        error: Some(e),
    }
}

fn parse(info: &HashMap<String, String>) -> Observed {
    let get = |k: &str| info.get(k).map(String::as_str);
    let role = match get("role") {
        Some("master") => Role::Master,
        Some("slave") => Role::Replica,
        other => return down(format!("INFO replication reports role {other:?}")),
    };
    let master = match (get("master_host"), get("master_port")) {
        (Some(h), Some(p)) if role == Role::Replica => p.parse().ok().map(|p| (h.to_string(), p)),
        _ => None,
    };
    Observed {
        role,
        offset: get("master_repl_offset").and_then(|o| o.parse().ok()),
        master,
        link_up: get("master_link_status") == Some("up"),
        error: None,
    }
}

/// Fences server `name`: `REPLICAOF` the fence address (see the module
/// documentation for why), so it refuses writes at once.
pub async fn fence(t: &Targets, name: &str, timeout: Duration) -> Result<String, String> {
    let r = tokio::time::timeout(timeout, async {
        let mut conn = t.redis_conn(name).await.map_err(|e| e.0)?;
        ::redis::cmd("REPLICAOF")
            .arg(FENCE_HOST)
            .arg(FENCE_PORT)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| format!("REPLICAOF {FENCE_HOST} {FENCE_PORT} on {name}: {e}"))
    })
    .await;
    match r {
        Ok(Ok(())) => Ok(format!(
            "{name} fenced (replica of {FENCE_HOST}:{FENCE_PORT}; writes get READONLY)"
        )),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("{name}: no answer within {timeout:?} to the fence")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, role: &str, offset: u64, healthy: bool) -> RedisMemberState {
        RedisMemberState {
            name: name.into(),
            role: role.into(),
            offset: Some(offset),
            master: None,
            link_up: false,
            fenced: false,
            healthy,
        }
    }

    #[test]
    fn the_replica_with_the_highest_offset_within_the_bound_wins() {
        let mut v = GroupView {
            optime: Some(RedisOptime {
                leader: "a".into(),
                offset: 1000,
            }),
            members: vec![
                m("a", "down", 0, false),
                m("b", "replica", 900, true),
                m("c", "replica", 990, true),
                m("d", "replica", 999, false),
                m("e", "master", 5000, true),
            ],
            ..Default::default()
        };
        assert_eq!(v.best_replica(200).map(|m| m.name.as_str()), Some("c"));
        assert_eq!(v.best_replica(5).map(|m| m.name.as_str()), None);
        v.members[1].offset = Some(990);
        assert_eq!(v.best_replica(200).map(|m| m.name.as_str()), Some("b"));
        v.optime = None;
        assert!(v.best_replica(200).is_none());
    }

    #[test]
    fn info_replication_is_read_and_the_fence_recognised() {
        let info = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let o = parse(&info(&[("role", "master"), ("master_repl_offset", "42")]));
        assert_eq!(
            (o.role, o.offset, o.fenced()),
            (Role::Master, Some(42), false)
        );
        let o = parse(&info(&[
            ("role", "slave"),
            ("master_host", "127.0.0.1"),
            ("master_port", "0"),
            ("master_link_status", "down"),
            ("master_repl_offset", "7"),
        ]));
        assert!(o.fenced());
        assert_eq!(o.state("a").master.as_deref(), Some("127.0.0.1:0"));
        let o = parse(&info(&[
            ("role", "slave"),
            ("master_host", "10.0.0.1"),
            ("master_port", "6379"),
            ("master_link_status", "up"),
        ]));
        assert!(!o.fenced() && o.link_up);
        assert_eq!(parse(&info(&[])).role, Role::Down);
    }
}
