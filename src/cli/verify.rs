//! `dr verify` and `dr repo sync`: integrity of every copy in every region,
//! and scratch restores that prove backups restore and answer queries.

use std::path::Path;
use std::process::ExitCode;

use dr::config::Config;
use dr::maintenance::coverage::wal_coverage;
use dr::maintenance::verify::{Level, Scope, Sources, VerifyReport, expected_objects, verify};
use dr::repo::Repository;
use dr::verify::report::{secs, time};
use dr::verify::{Source, SourceReport};

use super::output::{bytes, table};
use super::{Out, cancel_on_signal, load_config, parse_to};

/// What to verify.
#[derive(clap::ValueEnum, Clone, Copy)]
pub enum Kind {
    /// PostgreSQL backups and WAL.
    Pg,
    /// Redis snapshots.
    Redis,
    /// RabbitMQ definitions snapshots.
    Rabbitmq,
}

/// `dr verify` arguments.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("level").required(true).args(["list", "read_data", "restore"])))]
pub struct Args {
    /// pg, redis or rabbitmq (default: everything configured).
    kind: Option<Kind>,
    /// Cluster or instance name (default: all of that kind).
    name: Option<String>,
    /// Check that every object exists with the right size in every region.
    #[arg(long)]
    list: bool,
    /// Decode every copy in every region and check its hash.
    #[arg(long)]
    read_data: bool,
    /// Restore into a scratch directory, start an isolated server on a
    /// loopback port, run the checks, report RTO/RPO, then remove it all.
    #[arg(long)]
    restore: bool,
    /// With --restore: a time (RFC 3339, or 'YYYY-MM-DD HH:MM:SS[+TZ]' local) or 'latest'.
    #[arg(long, requires = "restore", default_value = "latest")]
    to: String,
    /// Only this region (--list, --read-data).
    #[arg(long, conflicts_with = "restore")]
    region: Option<String>,
}

fn scope(cfg: &Config, kind: Option<Kind>, name: Option<String>) -> anyhow::Result<Scope> {
    Ok(match (kind, name) {
        (None, _) => Scope::All,
        (Some(Kind::Pg), Some(n)) => Scope::Pg(vec![cfg.pg(Some(&n))?.0]),
        (Some(Kind::Pg), None) => Scope::Pg(cfg.postgres.keys().cloned().collect()),
        (Some(Kind::Redis), Some(n)) => Scope::Redis(vec![cfg.redis(Some(&n))?.0]),
        (Some(Kind::Redis), None) => Scope::Redis(cfg.redis.keys().cloned().collect()),
        (Some(Kind::Rabbitmq), Some(n)) => Scope::Rabbitmq(vec![cfg.rabbitmq(Some(&n))?.0]),
        (Some(Kind::Rabbitmq), None) => Scope::Rabbitmq(cfg.rabbitmq.keys().cloned().collect()),
    })
}

pub async fn run(args: Args, config: Option<&Path>, out: &Out) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    if args.restore {
        return restore(&cfg, args, out).await;
    }
    let scope = scope(&cfg, args.kind, args.name)?;
    let level = if args.read_data {
        Level::ReadData
    } else {
        Level::List
    };
    let repo = Repository::open(&cfg).await?;
    let all = Sources::of(&cfg);
    let expected = expected_objects(&repo, &scope, &all).await?;
    let mut rep = verify(
        &repo,
        &expected.objects,
        level,
        args.region.as_deref(),
        expected.unreadable,
    )
    .await?;
    let clusters = match &scope {
        Scope::All => all.pg,
        Scope::Pg(v) => v.clone(),
        Scope::Redis(_) | Scope::Rabbitmq(_) => Vec::new(),
    };
    let wal = wal_coverage(&repo, &clusters, &expected.wal, args.region.as_deref()).await?;
    rep.wal_gaps = wal.gaps;
    rep.unneeded_wal = wal.unneeded;
    rep.orphans = expected.orphans;
    print_report(&rep, out);
    Ok(if rep.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `dr verify --restore`.
async fn restore(cfg: &Config, args: Args, out: &Out) -> anyhow::Result<ExitCode> {
    let sources = match scope(cfg, args.kind, args.name)? {
        Scope::All => cfg
            .postgres
            .keys()
            .map(|n| Source::Pg(n.clone()))
            .chain(cfg.redis.keys().map(|n| Source::Redis(n.clone())))
            .chain(cfg.rabbitmq.keys().map(|n| Source::Rabbitmq(n.clone())))
            .collect(),
        Scope::Pg(names) => names.into_iter().map(Source::Pg).collect(),
        Scope::Redis(names) => names.into_iter().map(Source::Redis).collect::<Vec<_>>(),
        Scope::Rabbitmq(names) => names.into_iter().map(Source::Rabbitmq).collect(),
    };
    if sources.is_empty() {
        anyhow::bail!(
            "nothing to verify: no [postgres.*], [redis.*] or [rabbitmq.*] is configured"
        );
    }
    let target = parse_to(&args.to, out)?;
    let dr_command = dr::postgres::quote::current_dr_command(&cfg.source)?;
    let repo = Repository::open(cfg).await?;
    let cancel = cancel_on_signal();
    if !out.json {
        eprintln!(
            "verifying by restore ({} source(s), target {})…",
            sources.len(),
            args.to
        );
    }
    let (run, warnings) =
        dr::verify::run(&repo, cfg, &sources, target, &dr_command, &cancel).await?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if out.json {
        out.json(&serde_json::json!({ "ok": run.ok, "verify_restore": run }));
    } else {
        for s in &run.sources {
            print_source(s);
        }
        println!(
            "verification {}: {}",
            run.id,
            if run.ok {
                "every restore passed every check"
            } else {
                "FAILED"
            }
        );
    }
    Ok(if run.ok && !cancel.is_cancelled() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One restored source: its checks as a table, then the numbers.
pub(super) fn print_source(s: &SourceReport) {
    let rows: Vec<Vec<String>> = s
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                if c.ok { "ok" } else { "FAIL" }.into(),
                format!("{:.2}s", c.seconds),
                c.detail.clone(),
            ]
        })
        .collect();
    println!(
        "{} {}: {}",
        s.kind,
        s.name,
        if s.ok() { "ok" } else { "FAILED" }
    );
    println!("{}", table(&["CHECK", "RESULT", "TIME", "DETAIL"], &rows));
    // A Redis snapshot is one RDB, not files.
    let what = if s.kind == "redis" {
        "snapshot"
    } else {
        "backup"
    };
    let files = if s.files > 0 {
        format!(" ({} files)", s.files)
    } else {
        String::new()
    };
    println!(
        "  {what} {}  restored {}{files} in {}",
        s.backup.as_deref().unwrap_or("-"),
        bytes(s.bytes),
        secs(s.restore_seconds)
    );
    println!(
        "  target {} ({})
  recovered point {} ({})",
        time(s.target_time),
        s.target_basis,
        time(s.recovered_point),
        s.recovered_basis
    );
    println!(
        "  RPO {}  RTO {}  total {:.2}s
",
        secs(s.rpo_seconds),
        secs(s.rto_seconds),
        s.seconds
    );
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
    let gap_where = match rep.regions.as_slice() {
        [one] => format!("in region {}", one.region),
        _ => "in every region".to_string(),
    };
    for g in &rep.wal_gaps {
        println!("WAL GAP {g} {gap_where}: replay stops before it");
    }
    for u in &rep.unneeded_wal {
        println!("note: {u}");
    }
    for o in &rep.orphans {
        println!(
            "note: {o}; `dr expire` removes such objects once older than [retention] orphan_age"
        );
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
    let expected = dr::maintenance::sync::manifests(&repo, &Sources::of(cfg)).await?;
    let rep = dr::maintenance::sync::sync(&repo, region, expected.as_ref(), read_data).await?;
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
            if r.vanished > 0 {
                println!(
                    "{}: {} object(s) were deleted everywhere while the sync ran (an expire); \
                     nothing to copy",
                    r.region, r.vanished
                );
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
