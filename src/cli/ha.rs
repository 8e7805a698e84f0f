//! `dr ha …`: automatic-failover status and operator commands.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::output::table;
use super::{Out, load_config};

/// `dr ha` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Members, roles, lag, the leader and the time left on its lease
    /// (every PostgreSQL cluster and Redis group unless one is named).
    Status {
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long, conflicts_with = "group")]
        cluster: Option<String>,
        /// Redis group (`[ha.redis.<group>]`).
        #[arg(long)]
        group: Option<String>,
    },
    /// The daemons sharing this config's jobs (`[ha]` fleet): who is live,
    /// what runs where now, and who claimed each job's latest time.
    Fleet,
    /// Planned, zero-loss handover to a standby: the leader stops, the
    /// target replays everything it wrote, then is promoted.
    Switchover {
        /// The standby that takes over.
        #[arg(long, value_name = "MEMBER")]
        to: String,
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long)]
        cluster: Option<String>,
        /// Give up (and withdraw the request) after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Maintenance mode: the daemons take no automatic action (no failover,
    /// restart or rejoin); a leader cut off from etcd still fences itself.
    Pause {
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long, conflicts_with = "group")]
        cluster: Option<String>,
        /// Redis group (`[ha.redis.<group>]`) instead of a cluster.
        #[arg(long)]
        group: Option<String>,
    },
    /// End maintenance mode.
    Resume {
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long, conflicts_with = "group")]
        cluster: Option<String>,
        /// Redis group (`[ha.redis.<group>]`) instead of a cluster.
        #[arg(long)]
        group: Option<String>,
    },
}

pub async fn run(cmd: Command, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    match cmd {
        Command::Fleet => fleet(&cfg, out).await,
        Command::Status { cluster, group } => {
            let ha = dr::ha::settings(&cfg)?;
            if cluster.is_none() && group.is_none() && ha.postgres.is_empty() && ha.redis.is_empty()
            {
                return fleet(&cfg, out).await;
            }
            let redis = group.is_some()
                || (cluster.is_none() && ha.postgres.is_empty() && !ha.redis.is_empty());
            if redis {
                let s = dr::ha::redis_ops::status(&cfg, group.as_deref()).await?;
                if out.json {
                    out.json(&s);
                } else {
                    print_redis(&s);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if cluster.is_none() && !ha.redis.is_empty() {
                return status_all(&cfg, out).await;
            }
            let s = dr::ha::ops::status(&cfg, cluster.as_deref()).await?;
            if out.json {
                out.json(&s);
                return Ok(ExitCode::SUCCESS);
            }
            print_pg(&s);
            Ok(ExitCode::SUCCESS)
        }
        Command::Switchover {
            to,
            cluster,
            timeout,
        } => {
            let r = dr::ha::ops::switchover(&cfg, cluster.as_deref(), &to, timeout).await?;
            if out.json {
                out.json(&r);
            } else {
                println!(
                    "{}: {} → {} in {:.2}s (RTO, request to first accepted write); final position {}; audit {}",
                    r.cluster,
                    r.from,
                    r.to,
                    r.rto_seconds,
                    r.final_lsn.map_or("-".into(), |l| l.to_string()),
                    r.audit_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { cluster, group } => {
            pause(&cfg, cluster.as_deref(), group.as_deref(), true, out).await
        }
        Command::Resume { cluster, group } => {
            pause(&cfg, cluster.as_deref(), group.as_deref(), false, out).await
        }
    }
}

async fn pause(
    cfg: &dr::config::Config,
    cluster: Option<&str>,
    group: Option<&str>,
    paused: bool,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let ha = dr::ha::settings(cfg)?;
    let redis =
        group.is_some() || (cluster.is_none() && ha.postgres.is_empty() && !ha.redis.is_empty());
    let c = if redis {
        dr::ha::redis_ops::set_paused(cfg, group, paused).await?
    } else {
        dr::ha::ops::set_paused(cfg, cluster, paused).await?
    };
    if out.json {
        out.json(&serde_json::json!({ "cluster": c, "paused": paused }));
    } else if paused {
        println!("{c}: paused; the daemons take no automatic action until `dr ha resume`");
    } else {
        println!("{c}: resumed");
    }
    Ok(ExitCode::SUCCESS)
}

/// The table of a PostgreSQL cluster's members, its leader and state.
pub(super) fn print_pg(s: &dr::ha::ops::ClusterStatus) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                if m.leader {
                    format!("{} (leader)", m.role)
                } else {
                    m.role.clone()
                },
                opt(m.timeline.map(|t| t.to_string())),
                opt(m.received_lsn.map(|l| l.to_string())),
                opt(m.replayed_lsn.map(|l| l.to_string())),
                opt(m.lag_bytes.map(|l| l.to_string())),
                if m.healthy { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "MEMBER",
                "ROLE",
                "TL",
                "RECEIVED",
                "REPLAYED",
                "LAG BYTES",
                "HEALTHY"
            ],
            &rows
        )
    );
    print_leader(&s.leader, s.lease_left_seconds, s.paused, "");
    if let Some(sw) = &s.switchover {
        println!("switchover in progress: {sw}");
    }
}

/// The table of a Redis group's members, its leader and state.
pub(super) fn print_redis(s: &dr::ha::redis_ops::RedisGroupStatus) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let role = match (m.leader, m.fenced) {
                (true, _) => format!("{} (leader)", m.role),
                (false, true) => format!("{} (fenced)", m.role),
                _ => m.role.clone(),
            };
            vec![
                m.name.clone(),
                role,
                opt(m.offset.map(|o| o.to_string())),
                opt(m.lag_bytes.map(|l| l.to_string())),
                opt(m.master.clone()),
                if m.link_up { "up" } else { "-" }.into(),
                if m.healthy { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    println!("redis group {}", s.group);
    println!(
        "{}",
        table(
            &[
                "MEMBER",
                "ROLE",
                "OFFSET",
                "LAG BYTES",
                "MASTER",
                "LINK",
                "HEALTHY"
            ],
            &rows
        )
    );
    let resume = format!(" --group {}", s.group);
    print_leader(&s.leader, s.lease_left_seconds, s.paused, &resume);
}

/// The leader line under a members table; `resume` completes the hint.
fn print_leader(leader: &Option<String>, lease_left: Option<i64>, paused: bool, resume: &str) {
    match (leader, lease_left) {
        (Some(l), Some(t)) => println!("\nleader {l}, lease {t}s left"),
        (Some(l), None) => println!("\nleader {l}"),
        _ => println!("\nno leader"),
    }
    if paused {
        println!("paused: no automatic action (dr ha resume{resume})");
    }
}

/// Every PostgreSQL cluster and Redis group; JSON as
/// `{"postgres": [...], "redis": [...]}`.
async fn status_all(cfg: &dr::config::Config, out: &Out) -> anyhow::Result<ExitCode> {
    let ha = dr::ha::settings(cfg)?;
    let mut pg = Vec::new();
    for c in ha.postgres.keys() {
        pg.push(dr::ha::ops::status(cfg, Some(c)).await?);
    }
    let mut redis = Vec::new();
    for g in ha.redis.keys() {
        redis.push(dr::ha::redis_ops::status(cfg, Some(g)).await?);
    }
    if out.json {
        out.json(&serde_json::json!({ "postgres": pg, "redis": redis }));
        return Ok(ExitCode::SUCCESS);
    }
    for s in &pg {
        println!("postgres cluster {}", s.cluster);
        print_pg(s);
        println!();
    }
    for s in &redis {
        print_redis(s);
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// `dr ha fleet`: live daemons and each job's claims.
async fn fleet(cfg: &dr::config::Config, out: &Out) -> anyhow::Result<ExitCode> {
    let ha = dr::ha::settings(cfg)?;
    if !ha.fleet {
        anyhow::bail!(
            "{}: [ha] fleet = false, so the daemons do not share jobs; remove it to let them",
            cfg.source.display()
        );
    }
    let v = dr::ha::fleet::view(ha).await?;
    if out.json {
        out.json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let t = |d: &chrono::DateTime<chrono::Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let nodes: Vec<Vec<String>> = v
        .nodes
        .iter()
        .map(|n| vec![n.node.clone(), n.pid.to_string(), t(&n.since)])
        .collect();
    println!("{}", table(&["DAEMON", "PID", "SINCE"], &nodes));
    if nodes.is_empty() {
        println!("no daemon of this config holds a fleet lease: start `dr daemon` on the hosts");
    }
    let jobs: Vec<Vec<String>> = v
        .jobs
        .iter()
        .map(|j| {
            let running = j.running.as_ref().map_or("-".into(), |(n, at, since)| {
                format!("{n} (time {}, since {})", t(at), t(since))
            });
            let last = j
                .last
                .as_ref()
                .map_or("-".into(), |(n, at)| format!("{n} at {}", t(at)));
            vec![j.job.clone(), running, last]
        })
        .collect();
    println!(
        "\n{}",
        table(&["JOB", "RUNNING ON", "LAST CLAIMED BY"], &jobs)
    );
    Ok(ExitCode::SUCCESS)
}
