//! Redis commands: backup (snapshot), list, restore.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dr::redis::restore::{RedisCatalog, RestoreOptions};
use dr::redis::{restore, snapshot};
use dr::repo::Repository;

use super::output::{bytes, table, with_progress};
use super::{Out, audited_open, load_config, parse_to, report_degraded};

/// `dr restore redis` arguments.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Instance name (default: the only [redis.*] in the config).
    name: Option<String>,
    /// Restore the newest snapshot at or before this time (RFC 3339, or
    /// 'YYYY-MM-DD HH:MM:SS[+TZ]' local), or 'latest'.
    #[arg(long)]
    to: String,
    /// Directory to write dump.rdb into (created if absent; must not hold a dump.rdb).
    #[arg(long)]
    target: PathBuf,
    /// Start redis-server on the restored file and check its key count.
    #[arg(long)]
    start: bool,
    /// Port for --start (listens on 127.0.0.1 only).
    #[arg(long, default_value_t = 6380, requires = "start")]
    port: u16,
}

pub async fn backup(
    name: Option<String>,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (instance, rc) = cfg.redis(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    if !out.json {
        eprintln!("snapshotting [redis.{instance}]…");
    }
    let progress = dr::progress::Progress::new();
    let r = with_progress(
        out,
        "snapshot",
        progress.clone(),
        snapshot::snapshot(&repo, &instance, rc, progress),
    )
    .await?;
    let degraded = report_degraded(&repo, out);
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "snapshot": r, "degraded": degraded }));
    } else {
        println!(
            "snapshot {} of [redis.{instance}] (Redis {}, {}{}): {} keys, {} → {} stored in {:.1}s ({:.0} MB/s; server took {:.1}s to start sending)",
            r.id,
            r.server_version,
            r.sync,
            if r.diskless { ", diskless" } else { "" },
            r.keys,
            bytes(r.size),
            bytes(r.stored_size),
            r.seconds,
            r.throughput / 1e6,
            r.wait_seconds,
        );
        println!("regions: {}", r.regions.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    name: Option<String>,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (instance, _) = cfg.redis(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    if !repo.codec.can_decrypt() {
        use dr::maintenance::inventory::{self, NEEDS_IDENTITY};
        let inv = inventory::redis(&repo, &instance).await?;
        let note = format!("{NEEDS_IDENTITY}; {}", repo.codec.cannot_decrypt_because());
        if out.json {
            out.json(&serde_json::json!({
                "ok": true, "instance": instance, "keys_only": true, "note": note,
                "snapshots": inv.snapshots,
            }));
        } else {
            println!("[redis.{instance}]");
            println!(
                "{}",
                super::output::stored_table("SNAPSHOT", &inv.snapshots)
            );
            println!("note: {note}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cat = RedisCatalog::load(&repo, &instance).await?;
    if out.json {
        let snaps: Vec<_> = cat
            .snapshots
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id, "time": m.time, "server_version": m.server_version,
                    "keys": m.total_keys(), "keyspace": m.keyspace, "size": m.rdb.plain_size,
                    "stored_size": m.rdb.stored_size, "sync": m.sync, "diskless": m.diskless,
                    "rdb_version": m.rdb_version,
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
                m.total_keys().to_string(),
                bytes(m.rdb.plain_size),
                bytes(m.rdb.stored_size),
                format!("{}{}", m.sync, if m.diskless { ", diskless" } else { "" }),
            ]
        })
        .collect();
    println!("[redis.{instance}]");
    println!(
        "{}",
        table(
            &[
                "SNAPSHOT", "TIME", "REDIS", "KEYS", "SIZE", "STORED", "SYNC"
            ],
            &rows
        )
    );
    if cat.snapshots.is_empty() {
        println!("no snapshots yet; take one with `dr backup redis {instance}`");
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
    let (instance, rc) = cfg.redis(args.name.as_deref())?;
    let target = parse_to(&args.to, out)?;
    let (audit, repo) = audited_open(
        &cfg,
        "restore.redis",
        &instance,
        serde_json::json!({ "to": args.to, "target_dir": args.target }),
    )
    .await?;
    let opts = RestoreOptions {
        target,
        dir: args.target,
        start: args.start.then_some(args.port),
    };
    let progress = dr::progress::Progress::new();
    let r = with_progress(
        out,
        "restore",
        progress.clone(),
        restore::restore(&repo, &instance, rc, &opts, progress),
    )
    .await;
    let details = match &r {
        Ok(r) if r.keys_match == Some(false) => Err(r.key_check.clone().unwrap_or_default()),
        Ok(r) => serde_json::to_value(r).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    audit.finish(Some(&repo), details).await;
    let r = r?;
    let ok = r.keys_match != Some(false);
    if out.json {
        out.json(&serde_json::json!({ "ok": ok, "restore": r }));
    } else {
        println!(
            "restored snapshot {} ({}) of [redis.{instance}] into {} ({} from region {}, {:.1}s)",
            r.snapshot,
            r.snapshot_time.format("%Y-%m-%d %H:%M:%SZ"),
            r.file,
            bytes(r.size),
            r.region,
            r.restore_seconds
        );
        if r.started {
            println!(
                "redis-server running on 127.0.0.1:{} (pid {}), loaded in {:.1}s; {}",
                r.port.unwrap_or_default(),
                r.pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                r.load_seconds.unwrap_or_default(),
                r.key_check.as_deref().unwrap_or("")
            );
        }
    }
    if !ok {
        eprintln!(
            "error: {} (the server is left running for inspection)",
            r.key_check.as_deref().unwrap_or("key count mismatch")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
