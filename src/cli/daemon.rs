//! `dr daemon`: run scheduled jobs, or with `--check` print what would run.

use std::path::Path;
use std::process::ExitCode;

use super::Out;
use super::output::table;

/// `dr daemon` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Check the config and print each job with its next run times (UTC), then exit.
    #[arg(long)]
    pub check: bool,
    /// Which `[ha]` member this daemon is (default: `[ha] member`).
    #[arg(long, env = "DR_HA_MEMBER")]
    pub member: Option<String>,
    /// Metrics and health address, over `[daemon] listen` (several daemons
    /// sharing one config file on one host).
    #[arg(long, env = "DR_DAEMON_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// State directory (holds the daemon lock), over `[daemon] state_dir`.
    #[arg(long, env = "DR_DAEMON_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let path = config
        .map(Path::to_path_buf)
        .unwrap_or_else(dr::config::default_config_path);
    let overrides = dr::daemon::Overrides {
        member: args.member.clone(),
        listen: args.listen.clone(),
        state_dir: args.state_dir.clone(),
    };
    if !args.check {
        dr::daemon::run(&path, &overrides).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan = dr::daemon::load_plan_with(&path, &overrides)?;
    let member = dr::daemon::ha_member(&plan.cfg, args.member.as_deref())?;
    let now = chrono::Utc::now();
    let next = |j: &dr::daemon::jobs::JobSpec| -> Vec<String> {
        let mut t = now;
        let mut v = Vec::new();
        for _ in 0..3 {
            match j.cron.next_after(t) {
                Some(n) => {
                    v.push(n.format("%Y-%m-%dT%H:%M:%SZ").to_string());
                    t = n;
                }
                None => break,
            }
        }
        v
    };
    let d = plan.cfg.daemon();
    // The name this daemon claims jobs under, when daemons share them.
    let fleet = plan.cfg.ha().filter(|h| h.fleet).map(|_| {
        dr::daemon::fleet::node_name(&plan.cfg, member.as_deref().or(args.member.as_deref()))
    });
    if out.json {
        let jobs: Vec<_> = plan
            .jobs
            .iter()
            .map(|j| serde_json::json!({ "name": j.name, "kind": j.kind.label(), "schedule": j.cron.expr(), "next_utc": next(j) }))
            .collect();
        out.json(
            &serde_json::json!({ "ok": true, "timezone": "UTC", "listen": d.listen, "jobs": jobs, "wal_streams": plan.cfg.streaming_clusters(), "fleet": fleet }),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = plan
        .jobs
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                j.cron.expr().to_string(),
                next(j).join(", "),
            ]
        })
        .collect();
    println!("{}", table(&["JOB", "SCHEDULE", "NEXT RUNS (UTC)"], &rows));
    println!(
        "\nschedules are in UTC; metrics and health on http://{}/metrics and /healthz; lock {}",
        d.listen,
        d.state_dir.join("daemon.lock").display()
    );
    if let Some(m) = &member {
        println!("automatic failover ([ha]) as member {m}");
    }
    if let Some(n) = &fleet {
        println!(
            "jobs shared through etcd with the daemons of this config (fleet), as {n}: each run on one daemon"
        );
    }
    let streams = plan.cfg.streaming_clusters();
    for c in &streams {
        println!("WAL of [postgres.{c}] is streamed continuously (slot and lag: `dr check`)");
    }
    if plan.jobs.is_empty() && streams.is_empty() {
        println!("no job is scheduled; add e.g. [postgres.<name>.schedule] backup = \"0 2 * * *\"");
    }
    Ok(ExitCode::SUCCESS)
}
