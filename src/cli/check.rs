//! `dr check`.

use std::path::Path;
use std::process::ExitCode;

use dr::check::Status;

use super::{Out, load_config, output::table};

pub async fn run(config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let rep = dr::check::run(&cfg).await;
    if out.json {
        out.json(&serde_json::json!({ "ok": rep.ok(), "checks": rep.checks }));
    } else {
        let rows: Vec<Vec<String>> = rep
            .checks
            .iter()
            .map(|c| {
                let s = match c.status {
                    Status::Ok => "ok",
                    Status::Warn => "WARN",
                    Status::Fail => "FAIL",
                };
                vec![c.name.clone(), s.to_string(), c.detail.clone()]
            })
            .collect();
        println!("{}", table(&["CHECK", "STATUS", "DETAIL"], &rows));
    }
    Ok(if rep.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
