//! Plain-language descriptions of gates and actions, for plans, dry runs and
//! the audit log.

use super::model::*;

impl Check {
    /// The gate's `type` as written.
    pub fn kind(&self) -> &'static str {
        match self {
            Check::PgReachable { .. } => "pg.reachable",
            Check::PgRole { .. } => "pg.role",
            Check::PgReplayLag { .. } => "pg.replay_lag_bytes",
            Check::PgWritable { .. } => "pg.writable",
            Check::RedisReachable { .. } => "redis.reachable",
            Check::RabbitReachable { .. } => "rabbitmq.reachable",
            Check::RabbitQueueExists { .. } => "rabbitmq.queue_exists",
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
            Check::RabbitReachable { target } | Check::RabbitQueueExists { target, .. } => {
                vec![(Rabbitmq, target)]
            }
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
            Check::RabbitReachable { target } => format!("rabbitmq.reachable {target}"),
            Check::RabbitQueueExists {
                target,
                vhost,
                queue,
            } => format!("rabbitmq.queue_exists {target} {queue:?} in vhost {vhost:?}"),
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
            } => format!(
                "http {method} {url} → {status}{}",
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
            } => format!("http {method} {url} → {status}"),
            Action::Sql { target, statement } => format!("sql {target}: {statement}"),
            Action::Sleep { duration } => {
                format!("sleep {}", humantime::format_duration(*duration))
            }
        }
    }
}

pub(super) fn fence_mode_name(m: FenceMode) -> &'static str {
    match m {
        FenceMode::Stop => "stop",
        FenceMode::ReadOnly => "read_only",
    }
}
