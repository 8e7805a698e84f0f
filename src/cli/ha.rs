//! `dr ha …`: automatic-failover status and operator commands.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::output::table;
use super::{Out, load_config};

/// `dr ha` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Members, roles, lag, the leader and the time left on its lease.
    Status {
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long)]
        cluster: Option<String>,
    },
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
        #[arg(long)]
        cluster: Option<String>,
    },
    /// End maintenance mode.
    Resume {
        /// Cluster (default: the only [ha.postgres.*]).
        #[arg(long)]
        cluster: Option<String>,
    },
}

pub async fn run(cmd: Command, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    match cmd {
        Command::Status { cluster } => {
            let s = dr::ha::ops::status(&cfg, cluster.as_deref()).await?;
            if out.json {
                out.json(&s);
                return Ok(ExitCode::SUCCESS);
            }
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
            match (&s.leader, s.lease_left_seconds) {
                (Some(l), Some(t)) => println!("\nleader {l}, lease {t}s left"),
                (Some(l), None) => println!("\nleader {l}"),
                _ => println!("\nno leader"),
            }
            if s.paused {
                println!("paused: no automatic action (dr ha resume)");
            }
            if let Some(sw) = &s.switchover {
                println!("switchover in progress: {sw}");
            }
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
        Command::Pause { cluster } => pause(&cfg, cluster.as_deref(), true, out).await,
        Command::Resume { cluster } => pause(&cfg, cluster.as_deref(), false, out).await,
    }
}

async fn pause(
    cfg: &dr::config::Config,
    cluster: Option<&str>,
    paused: bool,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let c = dr::ha::ops::set_paused(cfg, cluster, paused).await?;
    if out.json {
        out.json(&serde_json::json!({ "cluster": c, "paused": paused }));
    } else if paused {
        println!("{c}: paused; the daemons take no automatic action until `dr ha resume`");
    } else {
        println!("{c}: resumed");
    }
    Ok(ExitCode::SUCCESS)
}
