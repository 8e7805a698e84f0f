//! `dr expire`: apply each source's retention policy.

use std::path::Path;
use std::process::ExitCode;

use dr::repo::Repository;
use dr::repo::expire::{execute, plan};
use dr::repo::retention::SourcePlan;

use super::output::table;
use super::{Out, audited_open, load_config};

/// `dr expire` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print exactly what would be deleted and why; change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn print_plan(p: &SourcePlan) {
    println!(
        "[{}.{}]",
        if p.kind == "pg" { "postgres" } else { "redis" },
        p.name
    );
    let rows: Vec<Vec<String>> = p
        .decisions
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                if d.keep { "keep" } else { "delete" }.to_string(),
                d.why.clone(),
            ]
        })
        .collect();
    println!("{}", table(&["ID", "ACTION", "WHY"], &rows));
    for d in &p.deletions {
        println!("  delete {} {} ({})", d.kind, d.key, d.why);
    }
    if p.kept_shared > 0 {
        println!(
            "  {} data object(s) of expired backups kept: kept backups still read them",
            p.kept_shared
        );
    }
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let now = chrono::Utc::now();
    if args.dry_run {
        let repo = Repository::open(&cfg).await?;
        let plans = plan(&repo, &cfg, now).await?;
        if out.json {
            out.json(&serde_json::json!({ "ok": true, "dry_run": true, "plans": plans }));
        } else {
            for p in &plans {
                print_plan(p);
            }
            let n: usize = plans.iter().map(|p| p.deletions.len()).sum();
            println!("dry run: {n} object(s) would be deleted; nothing was changed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (audit, repo) = audited_open(&cfg, "expire", "repository", serde_json::Value::Null).await?;
    let plans = match plan(&repo, &cfg, now).await {
        Ok(p) => p,
        Err(e) => {
            audit.finish(Some(&repo), Err(e.to_string())).await;
            return Err(e.into());
        }
    };
    let mut results = Vec::new();
    for p in plans {
        results.push(execute(&repo, p).await);
    }
    let ok = results.iter().all(|r| r.failed.is_empty());
    let summary: Vec<_> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "source": format!("{}.{}", r.plan.kind, r.plan.name),
                "deleted": r.deleted.len(), "locked": r.locked.len(),
                "failed": r.failed.len(), "skipped": r.skipped,
                "expired": r.plan.decisions.iter().filter(|d| !d.keep).map(|d| &d.id).collect::<Vec<_>>(),
            })
        })
        .collect();
    let details = serde_json::json!({ "sources": summary });
    audit
        .finish(
            Some(&repo),
            if ok {
                Ok(details)
            } else {
                Err(format!("some deletions failed: {details}"))
            },
        )
        .await;
    if out.json {
        out.json(&serde_json::json!({ "ok": ok, "expire": results }));
    } else {
        for r in &results {
            let expired = r.plan.decisions.iter().filter(|d| !d.keep).count();
            println!(
                "[{}.{}] {} expired; {} object(s) deleted",
                if r.plan.kind == "pg" {
                    "postgres"
                } else {
                    "redis"
                },
                r.plan.name,
                expired,
                r.deleted.len()
            );
            for (k, why) in &r.locked {
                println!("  kept {k}: {why}");
            }
            for (k, why) in &r.failed {
                println!("  FAILED {k}: {why}");
            }
            if r.skipped > 0 {
                println!(
                    "  {} data/WAL deletion(s) skipped: a manifest could not be deleted everywhere, so its backup stays intact",
                    r.skipped
                );
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
