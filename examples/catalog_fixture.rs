//! Writes a PostgreSQL history of SEGMENTS WAL segments and BACKUPS backups
//! for cluster `main` into the repository of CONFIG (see
//! tests/common/catalog_fixture.rs), then prints what a benchmark needs as
//! JSON: the time of a target in the middle of the history.
//!
//! Usage: catalog_fixture CONFIG SEGMENTS BACKUPS

#[path = "../tests/common/catalog_fixture.rs"]
mod catalog_fixture;

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(config), Some(Ok(segments)), Some(Ok(backups))) = (
        args.get(1),
        args.get(2).map(|s| s.parse::<u64>()),
        args.get(3).map(|s| s.parse::<u64>()),
    ) else {
        eprintln!("usage: catalog_fixture CONFIG SEGMENTS BACKUPS (segments > 3 * backups)");
        return ExitCode::from(2);
    };
    if backups == 0 || segments < 3 * backups {
        eprintln!("error: SEGMENTS must be at least 3 × BACKUPS, and BACKUPS at least 1");
        return ExitCode::from(2);
    }
    let cfg = match dr::config::Config::load(std::path::Path::new(config)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let repo = match dr::repo::Repository::open(&cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let h = catalog_fixture::History::new("main", segments, backups);
    let t0 = std::time::Instant::now();
    catalog_fixture::write(&repo, &h, 64).await;
    let mid = h.time_of(h.backup_start(backups / 2) + 7);
    println!(
        "{}",
        serde_json::json!({
            "segments": segments, "backups": backups,
            "seconds": t0.elapsed().as_secs_f64(),
            "mid_target": mid.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "mid_backup": catalog_fixture::manifest(&h, backups / 2).id,
            "newest_backup": catalog_fixture::manifest(&h, backups - 1).id,
        })
    );
    ExitCode::SUCCESS
}
