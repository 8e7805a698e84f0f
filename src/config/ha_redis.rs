//! `[ha.redis.<group>]`: automatic failover of a Redis master and its
//! replicas, through the same etcd, lease and loop timing as `[ha]`'s
//! PostgreSQL clusters. Plain data and the checks that need no engine.

use super::*;

/// `[ha.redis.<group>]`: the members of one replicated Redis group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaRedisGroup {
    /// Members by name (`[ha.redis.<group>.member.<name>]`): the same keys
    /// as a playbook's Redis server (`url`, …).
    #[serde(default)]
    pub member: std::collections::BTreeMap<String, Spanned<RedisTarget>>,
    /// A replica further behind the last replication offset the master
    /// published is not promoted automatically (default 1 MiB).
    #[serde(default = "default_redis_max_lag")]
    pub max_lag_bytes: u64,
    /// How long the leader's daemon waits for its server to answer again
    /// before it gives up the leader key to a replica (default: `ttl`).
    #[serde(default, with = "humantime_serde_opt")]
    pub down_timeout: Option<std::time::Duration>,
    /// Actions run by the new master's daemon after a promotion, in order
    /// (`[[ha.redis.<group>.hook]]`, the playbook action types: `exec`,
    /// `http`, …). Checked when the config is loaded.
    #[serde(default)]
    pub hook: Vec<Spanned<toml::Table>>,
}

fn default_redis_max_lag() -> u64 {
    1 << 20
}

/// The etcd key segment under `[ha] prefix` that holds every Redis group
/// (`<prefix>/redis/<group>/…`); a PostgreSQL cluster may not take it.
pub const HA_REDIS_SCOPE: &str = "redis";

impl HaRedisGroup {
    /// How long a leader waits for its server before it resigns.
    pub fn down_timeout(&self, ha: &HaConfig) -> std::time::Duration {
        self.down_timeout.unwrap_or(ha.ttl)
    }
}

impl HaConfig {
    /// Every member name of every PostgreSQL cluster and Redis group.
    pub fn member_names(&self) -> Vec<String> {
        let pg = self
            .postgres
            .values()
            .flat_map(|c| c.get_ref().member.keys().cloned());
        let redis = self
            .redis
            .values()
            .flat_map(|g| g.get_ref().member.keys().cloned());
        let mut names: Vec<String> = pg.chain(redis).collect();
        names.sort();
        names.dedup();
        names
    }
}

impl Config {
    /// Checks `[ha.redis.*]`: names, at least two members with a Redis URL,
    /// and no PostgreSQL cluster whose etcd keys would overlap the groups'.
    pub(super) fn validate_ha_redis(&self, text: &str, h: &HaConfig) -> Result<(), ConfigError> {
        if !h.redis.is_empty()
            && let Some(c) = h.postgres.get(HA_REDIS_SCOPE)
        {
            return Err(self.err(
                text,
                c.span(),
                format!(
                    "[ha.postgres.{HA_REDIS_SCOPE}]: the Redis groups' etcd keys live under \
                     {}/{HA_REDIS_SCOPE}/, which this cluster's keys would share; rename the \
                     PostgreSQL cluster",
                    h.prefix
                ),
            ));
        }
        for (group, g) in &h.redis {
            let gerr = |m: String| Err(self.err(text, g.span(), m));
            if !layout_name_ok(group) {
                return gerr(format!(
                    "[ha.redis.{group}]: use letters, digits, '-' and '_' in the group name"
                ));
            }
            let members = &g.get_ref().member;
            if members.len() < 2 {
                return gerr(format!(
                    "[ha.redis.{group}] has {} member(s); failover needs a master and at least one \
                     replica ([ha.redis.{group}.member.<name>] with url = \"redis://host:port\")",
                    members.len()
                ));
            }
            for (name, m) in members {
                let merr = |m2: String| Err(self.err(text, m.span(), m2));
                if !layout_name_ok(name) {
                    return merr(format!(
                        "[ha.redis.{group}.member.{name}]: use letters, digits, '-' and '_' in the member name"
                    ));
                }
                let url = &m.get_ref().url;
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return merr(format!(
                        "[ha.redis.{group}.member.{name}] url = {url:?} is not a Redis URL; write \
                         redis://[user:password@]host:port (rediss:// for TLS)"
                    ));
                }
            }
        }
        Ok(())
    }
}
