//! `dr report`: the recoverable window, verifications and drills of every
//! source as one self-contained HTML file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dr::repo::Repository;

use super::{Out, load_config};

/// `dr report` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the HTML page (default: dr-report-<time>.html in the
    /// working directory). With --json, the data is printed as well.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let repo = Repository::open(&cfg).await?;
    let rep = dr::report::build(&repo, &cfg).await;
    let path = args.out.unwrap_or_else(|| {
        PathBuf::from(format!(
            "dr-report-{}.html",
            rep.generated.format("%Y%m%dT%H%M%SZ")
        ))
    });
    let page = dr::report::html(&rep);
    std::fs::write(&path, page)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    let ok = rep.errors.is_empty() && rep.sources.iter().all(|s| s.errors.is_empty());
    if out.json {
        out.json(&serde_json::json!({
            "ok": ok,
            "file": path.display().to_string(),
            "report": rep,
        }));
    } else {
        for s in &rep.sources {
            println!(
                "{} {}: {} backup(s), window {}, {} WAL gap(s), {} verification/drill result(s)",
                s.engine,
                s.name,
                s.backups.len(),
                s.window
                    .map(|(a, b)| format!(
                        "{} .. {}",
                        a.format("%Y-%m-%d %H:%M:%SZ"),
                        b.format("%Y-%m-%d %H:%M:%SZ")
                    ))
                    .unwrap_or_else(|| "-".into()),
                s.gaps.len(),
                s.results.len()
            );
            for e in &s.errors {
                eprintln!("warning: {} {}: {e}", s.engine, s.name);
            }
        }
        for e in &rep.errors {
            eprintln!("warning: {e}");
        }
        println!("report: {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
