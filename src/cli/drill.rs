//! `dr drill NAME`: runs the drill, prints each source and the objectives.

use std::path::Path;
use std::process::ExitCode;

use dr::repo::Repository;
use dr::verify::report::secs;

use super::output::table;
use super::verify::print_source;
use super::{Out, cancel_on_signal, load_config};

/// `dr drill` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The drill: a `[drill.NAME]` section of the config.
    name: String,
    /// Run the safety checks and print what would be done; touch nothing.
    #[arg(long)]
    dry_run: bool,
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let d = cfg.drill(&args.name)?;
    if args.dry_run {
        let plan = dr::verify::drill::dry_run(&cfg, &args.name).await?;
        if out.json {
            out.json(&serde_json::json!({ "ok": plan.ok, "plan": plan }));
        } else {
            for s in &plan.steps {
                println!("would: {s}");
            }
            for n in &plan.notes {
                println!("note: {n}");
            }
            for r in &plan.refused {
                println!("refused: {r}");
            }
            println!(
                "drill {} (dry run): {}",
                plan.drill,
                if plan.ok {
                    "the repository covers the target and the safety checks pass; nothing was touched"
                } else {
                    "would be refused; nothing was touched"
                }
            );
        }
        return Ok(if plan.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let dr_command = dr::postgres::quote::current_dr_command(&cfg.source)?;
    let repo = Repository::open(&cfg).await?;
    let cancel = cancel_on_signal();
    if !out.json {
        eprintln!(
            "drill {}: restoring {} source(s) as of {} into {}…",
            args.name,
            d.postgres.len() + d.redis.len(),
            d.to,
            match d.staging() {
                Some(env) => format!("the servers of [env.{env}] (their data is replaced)"),
                None => "scratch servers".to_string(),
            }
        );
    }
    let rep = dr::verify::drill::run(&repo, &cfg, &args.name, &dr_command, &cancel).await?;
    for w in &rep.warnings {
        eprintln!("warning: {w}");
    }
    if out.json {
        out.json(&serde_json::json!({ "ok": rep.ok, "drill": rep }));
    } else {
        for s in &rep.sources {
            print_source(s);
        }
        let rows: Vec<Vec<String>> = rep
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.name.clone(),
                    if c.ok { "ok" } else { "FAIL" }.into(),
                    c.detail.clone(),
                ]
            })
            .collect();
        if !rows.is_empty() {
            println!("{}", table(&["DRILL CHECK", "RESULT", "DETAIL"], &rows));
        }
        println!(
            "drill {} ({}): {}; RTO {} (objective {}), RPO {} (objective {})",
            rep.drill,
            rep.id,
            if rep.ok { "PASSED" } else { "FAILED" },
            secs(rep.achieved.rto_seconds),
            secs(rep.objectives.rto_seconds),
            secs(rep.achieved.rpo_seconds),
            secs(rep.objectives.rpo_seconds)
        );
        for f in &rep.files {
            println!("report: {f}");
        }
    }
    Ok(if rep.ok && !cancel.is_cancelled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
