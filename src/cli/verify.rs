//! `dr verify` and `dr repo sync`: integrity of every copy in every region.

use std::path::Path;
use std::process::ExitCode;

use dr::config::Config;
use dr::repo::Repository;
use dr::repo::verify::{Level, Scope, VerifyReport, expected_objects, verify};

use super::output::{bytes, table};
use super::{Out, load_config};

/// What to verify.
#[derive(clap::ValueEnum, Clone, Copy)]
pub enum Kind {
    /// PostgreSQL backups and WAL.
    Pg,
    /// Redis snapshots.
    Redis,
}

/// `dr verify` arguments.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("level").required(true).args(["list", "read_data"])))]
pub struct Args {
    /// pg or redis (default: everything configured).
    kind: Option<Kind>,
    /// Cluster or instance name (default: all of that kind).
    name: Option<String>,
    /// Check that every object exists with the right size in every region.
    #[arg(long)]
    list: bool,
    /// Decode every copy in every region and check its hash.
    #[arg(long)]
    read_data: bool,
    /// Only this region.
    #[arg(long)]
    region: Option<String>,
}

fn scope(cfg: &Config, kind: Option<Kind>, name: Option<String>) -> anyhow::Result<Scope> {
    Ok(match (kind, name) {
        (None, _) => Scope::All,
        (Some(Kind::Pg), Some(n)) => Scope::Pg(vec![cfg.pg(Some(&n))?.0]),
        (Some(Kind::Pg), None) => Scope::Pg(cfg.postgres.keys().cloned().collect()),
        (Some(Kind::Redis), Some(n)) => Scope::Redis(vec![cfg.redis(Some(&n))?.0]),
        (Some(Kind::Redis), None) => Scope::Redis(cfg.redis.keys().cloned().collect()),
    })
}

fn sources(cfg: &Config) -> (Vec<String>, Vec<String>) {
    (
        cfg.postgres.keys().cloned().collect(),
        cfg.redis.keys().cloned().collect(),
    )
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let scope = scope(&cfg, args.kind, args.name)?;
    let level = if args.read_data {
        Level::ReadData
    } else {
        Level::List
    };
    let repo = Repository::open(&cfg).await?;
    let (pg, redis) = sources(&cfg);
    let (expected, unreadable) = expected_objects(&repo, &scope, &pg, &redis).await?;
    let rep = verify(&repo, &expected, level, args.region.as_deref(), unreadable).await?;
    print_report(&rep, out);
    Ok(if rep.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(rep: &VerifyReport, out: &Out) {
    if out.json {
        out.json(&serde_json::json!({ "ok": rep.clean(), "verify": rep }));
        return;
    }
    let rows: Vec<Vec<String>> = rep
        .regions
        .iter()
        .map(|r| {
            vec![
                r.region.clone(),
                r.ok.to_string(),
                r.missing.to_string(),
                r.corrupt.to_string(),
                bytes(r.bytes),
                r.unreachable.clone().unwrap_or_default(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &["REGION", "OK", "MISSING", "CORRUPT", "BYTES", "ERROR"],
            &rows
        )
    );
    for p in &rep.problems {
        println!(
            "{} in {}: {} ({})",
            p.kind.to_uppercase(),
            p.region,
            p.key,
            p.detail
        );
    }
    for (k, e) in &rep.unreadable_manifests {
        println!("UNREADABLE MANIFEST {k}: {e}");
    }
    if rep.clean() {
        println!(
            "{} objects verified ({}) in every region: clean",
            rep.objects,
            match rep.level {
                Level::List => "existence and size",
                Level::ReadData => "decoded and hashed",
            }
        );
    } else {
        println!("problems found; `dr repo sync` copies good copies over missing or bad ones");
    }
}

/// `dr repo sync`.
pub async fn sync(
    cfg: &Config,
    region: Option<&str>,
    read_data: bool,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let repo = Repository::open(cfg).await?;
    // Manifests give authoritative sizes when the identity is here; without
    // it, sizes are compared across regions.
    let expected = if repo.codec.can_decrypt() {
        let (pg, redis) = sources(cfg);
        Some(expected_objects(&repo, &Scope::All, &pg, &redis).await?.0)
    } else {
        None
    };
    let rep = dr::repo::sync::sync(&repo, region, expected.as_deref(), read_data).await?;
    if out.json {
        out.json(&serde_json::json!({ "ok": rep.complete(), "sync": rep }));
    } else {
        let rows: Vec<Vec<String>> = rep
            .regions
            .iter()
            .map(|r| {
                vec![
                    r.region.clone(),
                    r.missing.to_string(),
                    r.bad.to_string(),
                    r.copied.to_string(),
                    r.replaced.to_string(),
                    bytes(r.bytes),
                    (r.failed.len() as u64 + r.manifests_held_back).to_string(),
                    r.unreachable.clone().unwrap_or_default(),
                ]
            })
            .collect();
        println!(
            "{}",
            table(
                &[
                    "REGION", "MISSING", "BAD", "COPIED", "REPLACED", "BYTES", "FAILED", "ERROR"
                ],
                &rows
            )
        );
        for r in &rep.regions {
            for f in &r.failed {
                println!("FAILED in {}: {f}", r.region);
            }
            if r.manifests_held_back > 0 {
                println!(
                    "{}: {} manifest(s) held back until their objects copy; run sync again",
                    r.region, r.manifests_held_back
                );
            }
        }
        println!(
            "{} objects over all regions; {}",
            rep.objects,
            if rep.complete() {
                "every region is complete"
            } else {
                "some regions are still incomplete"
            }
        );
    }
    Ok(if rep.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
