//! `dr expire`: apply each source's retention policy.

use std::path::Path;
use std::process::ExitCode;

use dr::maintenance::expire::{TempFile, plan, stale_temp_files};
use dr::repo::Repository;
use dr::repo::retention::SourcePlan;

use super::output::table;
use super::{Out, load_config};

/// `dr expire` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print exactly what would be deleted and why; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The config section a plan's kind is written under (`pg` is
/// `[postgres.*]`; `redis` and `rabbitmq` are their own names).
fn kind_label(kind: &str) -> &str {
    if kind == "pg" { "postgres" } else { kind }
}

fn print_plan(p: &SourcePlan) {
    println!("[{}.{}]", kind_label(&p.kind), p.name);
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
    print_running(p);
}

/// Says which backups may still be running and what waits for them.
fn print_running(p: &SourcePlan) {
    for id in &p.running {
        println!(
            "  {id} has no manifest yet and was written to within orphan_age: may still be running, kept"
        );
    }
    if p.deferred > 0 {
        println!(
            "  {} deletion(s) of expired data/WAL put off while a backup may be running; a later expire does them",
            p.deferred
        );
    }
}

fn print_temp(verb: &str, files: &[TempFile]) {
    for f in files {
        println!(
            "  {verb} temp file [{}] .tmp/{} (left by a killed writer; last written {})",
            f.region,
            f.name,
            f.modified.format("%Y-%m-%dT%H:%M:%SZ")
        );
    }
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let now = chrono::Utc::now();
    if args.dry_run {
        let repo = Repository::open(&cfg).await?;
        let plans = plan(&repo, &cfg, now).await?;
        let temp = stale_temp_files(&repo, now, cfg.orphan_age()).await?;
        if out.json {
            out.json(&serde_json::json!({
                "ok": true, "dry_run": true, "plans": plans, "temp_files": temp,
            }));
        } else {
            for p in &plans {
                print_plan(p);
            }
            print_temp("would remove", &temp);
            let n: usize = plans.iter().map(|p| p.deletions.len()).sum::<usize>() + temp.len();
            println!("dry run: {n} object(s) would be deleted; nothing was changed");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (_, run) = dr::maintenance::expire::run(&cfg, now, "cli").await?;
    let ok = run.ok();
    let (results, temp_removed, temp_failed) = (run.expire, run.temp_removed, run.temp_failed);
    if out.json {
        let temp_failed: Vec<_> = temp_failed
            .iter()
            .map(|(f, e)| serde_json::json!({ "file": f, "error": e }))
            .collect();
        out.json(&serde_json::json!({
            "ok": ok, "expire": results,
            "temp_files": { "removed": temp_removed, "failed": temp_failed },
        }));
    } else {
        for r in &results {
            let expired = r.plan.decisions.iter().filter(|d| !d.keep).count();
            println!(
                "[{}.{}] {} expired; {} object(s) deleted, {} of them orphans",
                kind_label(&r.plan.kind),
                r.plan.name,
                expired,
                r.deleted.len(),
                r.orphans_deleted()
            );
            print_running(&r.plan);
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
    if !out.json {
        print_temp("removed", &temp_removed);
        for (f, e) in &temp_failed {
            println!("  FAILED temp file [{}] .tmp/{}: {e}", f.region, f.name);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
