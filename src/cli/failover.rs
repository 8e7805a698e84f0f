//! `dr failover PLAYBOOK`: shows the plan, asks for confirmation, runs the
//! playbook with live progress on stderr, prints the report.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use dr::playbook::engine::{Event, GatePhase, Observer, RunOptions, StepReport, plan};
use dr::playbook::{Playbook, RunReport};

use super::output::table;
use super::{Out, load_config};

/// `dr failover` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// A playbook file, or a name looked up as playbooks/<name>.toml.
    playbook: String,
    /// Environment whose servers to use (default: the playbook's `env`).
    #[arg(long)]
    env: Option<String>,
    /// Evaluate the pre gates and print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run without asking (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
}

/// Prints progress lines on stderr as the run goes.
struct Progress;

/// The serde name of an enum value (`rolled_back`), as the JSON report spells it.
fn label(v: impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn mark(ok: bool) -> &'static str {
    if ok { "ok  " } else { "FAIL" }
}

impl Observer for Progress {
    fn event(&self, e: &Event<'_>) {
        match e {
            Event::StepStarted { index, total, step } => {
                eprintln!("[{}/{total}] {}", index + 1, step.name)
            }
            Event::Gate { phase, result } => eprintln!(
                "  {} {} {} ({:.2}s): {}",
                match phase {
                    GatePhase::Pre => "pre ",
                    GatePhase::Post => "post",
                },
                mark(result.ok),
                result.gate,
                result.seconds,
                result.observed
            ),
            Event::ActionStarted { action, attempt } => {
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                eprintln!("  do   …    {}{again}", action.describe())
            }
            Event::ActionFinished { result } => eprintln!(
                "  do   {} {} ({:.2}s): {}",
                mark(result.ok),
                result.action,
                result.seconds,
                result.detail
            ),
            Event::StepFinished { report } => eprintln!(
                "  step {:?} {} in {:.2}s (at {:.2}s)",
                report.name,
                label(report.status),
                report.seconds,
                report.started_at_seconds + report.seconds
            ),
            Event::RollbackStarted { steps } => {
                eprintln!("rolling back {steps} step(s), newest first")
            }
            Event::RollbackAction { result } => eprintln!(
                "  undo {} {} [{}] ({:.2}s): {}",
                mark(result.result.ok),
                result.result.action,
                result.step,
                result.result.seconds,
                result.result.detail
            ),
        }
    }
}

/// The plan as text: each step's gates, action and rollback.
fn plan_text(steps: &[StepReport]) -> String {
    let mut s = String::new();
    for (i, st) in steps.iter().enumerate() {
        s.push_str(&format!(
            "{}. {} (line {}, on failure: {})\n",
            i + 1,
            st.name,
            st.line,
            label(st.on_failure)
        ));
        for (j, g) in st.pre_gates.iter().enumerate() {
            match st.pre.get(j) {
                Some(r) => s.push_str(&format!(
                    "     pre   {g}: {} now ({})\n",
                    if r.ok { "passes" } else { "FAILS" },
                    r.observed
                )),
                None => s.push_str(&format!("     pre   {g}\n")),
            }
        }
        if let Some(a) = &st.action {
            s.push_str(&format!("     do    {a}\n"));
        }
        for g in &st.post_gates {
            s.push_str(&format!("     post  {g}\n"));
        }
        for a in &st.rollback_actions {
            s.push_str(&format!("     undo  {a}\n"));
        }
    }
    s
}

/// Asks on the terminal; without one, refuses.
fn confirm(env: &str, pb: &Playbook) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to run failover {:?} on {env} without confirmation: stdin is not a terminal. \
             Check the plan with --dry-run, then pass --yes",
            pb.name
        );
    }
    eprint!(
        "{}\nThis changes the servers of environment {env}. Type {env:?} to go on: ",
        plan_text(&plan(pb))
    );
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the confirmation")?;
    if answer.trim() != env {
        bail!("not confirmed; nothing was changed");
    }
    Ok(())
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let path = dr::playbook::resolve_path(&args.playbook, &cfg.source)?;
    let pb = Playbook::load(&path)?;
    let Some(env) = args.env.clone().or_else(|| pb.env.clone()) else {
        bail!(
            "{}: no environment; pass --env NAME or set env = \"NAME\" in the playbook",
            path.display()
        );
    };
    // Wrong target names must fail before anyone is asked to confirm.
    pb.check_targets(&env, cfg.environment(&env)?)?;
    if !args.dry_run && !args.yes {
        confirm(&env, &pb)?;
    }
    eprintln!(
        "{} {:?} ({}) on {env}{}",
        if args.dry_run {
            "dry run of"
        } else {
            "failover"
        },
        pb.name,
        path.display(),
        if args.dry_run {
            ": pre gates are checked once, nothing is changed"
        } else {
            ""
        }
    );
    let opts = RunOptions {
        dry_run: args.dry_run,
    };
    let report = dr::playbook::failover(&cfg, &pb, &env, opts, &Progress).await?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if out.json {
        out.json(&serde_json::json!({ "ok": report.ok(), "failover": report }));
    } else {
        print_summary(&report);
    }
    if let Some(e) = &report.error {
        eprintln!("error: {e}");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(r: &RunReport) {
    if r.dry_run {
        println!(
            "plan of {:?} on {}:\n{}",
            r.playbook,
            r.env,
            plan_text(&r.steps)
        );
        println!(
            "{}",
            if r.ok() {
                "every pre gate passes now (gates of later steps may depend on earlier actions)"
            } else {
                "some pre gates fail now"
            }
        );
        return;
    }
    let total = r.total_seconds.max(1e-9);
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                label(s.status),
                format!("{:.3}s", s.seconds),
                format!("{:.0}%", s.seconds * 100.0 / total),
            ]
        })
        .collect();
    println!("{}", table(&["step", "status", "time", "share"], &rows));
    println!(
        "failover {:?} on {}: {} in {:.2}s",
        r.playbook,
        r.env,
        if r.ok() { "done" } else { "FAILED" },
        r.total_seconds
    );
    if let (Some(rto), Some(basis)) = (r.rto_seconds, &r.rto_basis) {
        println!("failover RTO: {rto:.2}s (start to {basis})");
    }
    if let Some(id) = &r.audit_id {
        println!("audit record: {id}");
    }
}
