//! RabbitMQ commands: backup (definitions snapshot), list, restore.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use dr::rabbitmq::api::{self, Api};
use dr::rabbitmq::restore::{Destination, RabbitCatalog};
use dr::rabbitmq::{restore, snapshot};
use dr::repo::Repository;

use super::output::{bytes, table};
use super::{Out, audited_open, load_config, parse_to, report_degraded};

/// `dr restore rabbitmq` arguments.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Broker name (default: the only [rabbitmq.*] in the config).
    name: Option<String>,
    /// Restore the newest snapshot at or before this time (RFC 3339, or
    /// 'YYYY-MM-DD HH:MM:SS[+TZ]' local), or 'latest'.
    #[arg(long)]
    to: String,
    /// Management API of the broker to restore to (default: the url of the
    /// config); the configured user, password and ca_file are used.
    #[arg(long, value_name = "URL", conflicts_with = "file")]
    target: Option<String>,
    /// Print what a restore would add and change on the broker (and what
    /// only the broker has), touching nothing.
    #[arg(long, conflicts_with = "file")]
    dry_run: bool,
    /// Write the definitions to this new file (mode 0600: it holds password
    /// hashes) for RabbitMQ's `load_definitions`, instead of a broker.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

pub async fn backup(
    name: Option<String>,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (instance, rc) = cfg.rabbitmq(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    if !out.json {
        eprintln!("exporting the definitions of [rabbitmq.{instance}]…");
    }
    let r = snapshot::snapshot(&repo, &instance, rc).await?;
    let degraded = report_degraded(&repo, out);
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "snapshot": r, "degraded": degraded }));
    } else {
        let scope = match &r.vhosts {
            Some(v) => format!("vhosts {}", v.join(", ")),
            None => "all vhosts".into(),
        };
        println!(
            "snapshot {} of [rabbitmq.{instance}] (RabbitMQ {}, cluster {}, {scope}): {} → {} stored in {:.1}s",
            r.id,
            r.server_version,
            r.cluster_name,
            bytes(r.size),
            bytes(r.stored_size),
            r.seconds,
        );
        println!("items: {}", counts_line(&r.counts));
        println!("regions: {}", r.regions.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn counts_line(c: &std::collections::BTreeMap<String, u64>) -> String {
    dr::rabbitmq::definitions::KINDS
        .iter()
        .map(|k| format!("{} {k}", c.get(*k).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn list(
    name: Option<String>,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (instance, _) = cfg.rabbitmq(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    let cat = RabbitCatalog::load(&repo, &instance).await?;
    if out.json {
        let snaps: Vec<_> = cat
            .snapshots
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "time": m.time, "server_version": m.server_version,
                    "cluster_name": m.cluster_name, "vhosts": m.vhosts, "counts": m.counts,
                    "size": m.definitions.plain_size, "stored_size": m.definitions.stored_size,
                })
            })
            .collect();
        out.json(&serde_json::json!({
            "ok": true, "instance": instance, "snapshots": snaps, "unreadable": cat.unreadable,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = cat
        .snapshots
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.time.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                m.server_version.clone(),
                m.cluster_name.clone(),
                m.count("vhosts").to_string(),
                m.count("users").to_string(),
                m.count("exchanges").to_string(),
                m.count("queues").to_string(),
                m.count("bindings").to_string(),
                m.count("policies").to_string(),
                bytes(m.definitions.stored_size),
            ]
        })
        .collect();
    println!("[rabbitmq.{instance}]");
    println!(
        "{}",
        table(
            &[
                "SNAPSHOT",
                "TIME",
                "RABBITMQ",
                "CLUSTER",
                "VHOSTS",
                "USERS",
                "EXCHANGES",
                "QUEUES",
                "BINDINGS",
                "POLICIES",
                "STORED"
            ],
            &rows
        )
    );
    if cat.snapshots.is_empty() {
        println!("no snapshots yet; take one with `dr backup rabbitmq {instance}`");
    }
    for (k, e) in &cat.unreadable {
        println!("warning: {k}: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn restore(
    args: RestoreArgs,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (instance, rc) = cfg.rabbitmq(args.name.as_deref())?;
    let target = parse_to(&args.to, out)?;
    let dest = match (&args.file, args.dry_run) {
        (Some(p), _) => Destination::File(p.clone()),
        (None, true) => Destination::DryRun,
        (None, false) => Destination::Broker,
    };
    let api = match dest {
        Destination::File(_) => None,
        _ => {
            let url = args.target.as_deref().unwrap_or(&rc.url);
            Some(Api::new(
                url,
                &rc.user,
                api::password(rc)?,
                rc.ca_file.as_deref(),
                Duration::from_secs(rc.timeout_seconds),
            )?)
        }
    };
    let (audit, repo) = audited_open(
        &cfg,
        "restore.rabbitmq",
        &instance,
        serde_json::json!({
            "to": args.to, "target": api.as_ref().map(Api::url), "dry_run": args.dry_run,
            "file": args.file,
        }),
    )
    .await?;
    let r = async {
        let cat = RabbitCatalog::load(&repo, &instance).await?;
        let m = cat.pick(target)?.clone();
        restore::restore(&repo, &m, api.as_ref(), &dest).await
    }
    .await;
    let details = match &r {
        Ok(r) => serde_json::to_value(r).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    audit.finish(Some(&repo), details).await;
    let r = r?;
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "restore": r }));
        return Ok(ExitCode::SUCCESS);
    }
    let what = format!(
        "snapshot {} ({}) of [rabbitmq.{instance}]",
        r.snapshot,
        r.snapshot_time.format("%Y-%m-%d %H:%M:%SZ")
    );
    match &dest {
        Destination::File(p) => {
            println!(
                "wrote {what} to {} (mode 0600: it holds password hashes; delete it once loaded)",
                p.display()
            );
            println!(
                "load it with `load_definitions = {}` in rabbitmq.conf, or `rabbitmqctl import_definitions`",
                p.display()
            );
        }
        Destination::DryRun => {
            println!(
                "dry run: {what} against {} (nothing was changed)",
                r.target.as_deref().unwrap_or("?")
            );
            if r.diff.is_empty() {
                println!(
                    "no differences: the broker holds every item of the snapshot as it is there"
                );
            }
            for (kind, d) in &r.diff {
                println!(
                    "{kind}: {} to add, {} to change, {} only on the broker",
                    d.added.len(),
                    d.changed.len(),
                    d.removed.len()
                );
                for i in &d.added {
                    println!("  + {i}");
                }
                for c in &d.changed {
                    println!("  ~ {} ({})", c.item, c.fields.join(", "));
                }
                for i in &d.removed {
                    println!("  - {i} (left as is: a restore never deletes)");
                }
            }
        }
        Destination::Broker => {
            println!(
                "restored {what} to {} ({}; from region {}, {:.1}s); every item is on the broker",
                r.target.as_deref().unwrap_or("?"),
                counts_line(&r.counts),
                r.region,
                r.seconds
            );
            let extra: usize = r.diff.values().map(|d| d.removed.len()).sum();
            if extra > 0 {
                println!(
                    "note: the broker also has {extra} item(s) the snapshot does not (a restore never deletes); see --dry-run"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
