//! PostgreSQL commands: backup, restore, list, wal-push, wal-fetch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dr::postgres::catalog::Catalog;
use dr::postgres::quote::wal_fetch_command;
use dr::postgres::restore::{ExtraTarget, RestoreOptions, Target};
use dr::postgres::{backup, restore, stream, wal};
use dr::repo::Repository;

use super::output::{bytes, table, with_progress};
use super::{Out, audited_open, load_config, parse_to, report_degraded};

/// `dr restore pg` arguments.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Cluster name (default: the only [postgres.*] in the config).
    name: Option<String>,
    /// Target: a time (RFC 3339, or 'YYYY-MM-DD HH:MM:SS[+TZ]' local) or 'latest'.
    #[arg(long)]
    to: String,
    /// Directory to restore into: absent or empty (with --delta, also a
    /// stopped data directory of the same cluster).
    #[arg(long, required_unless_present = "dry_run")]
    target: Option<PathBuf>,
    /// Plan only: print the backup, timeline and window the restore would
    /// use, reading only the WAL prefixes it needs, and write nothing.
    #[arg(long, conflicts_with_all = ["start", "delta"])]
    dry_run: bool,
    /// Stop at this LSN instead of the time (the time still picks the backup).
    #[arg(long, conflicts_with_all = ["xid", "restore_point"])]
    lsn: Option<String>,
    /// Stop at this transaction id.
    #[arg(long, conflicts_with = "restore_point")]
    xid: Option<String>,
    /// Stop at this named restore point.
    #[arg(long = "name", id = "restore_point")]
    restore_point: Option<String>,
    /// Start the server, wait until it reaches the target and accepts writes.
    #[arg(long)]
    start: bool,
    /// Port for --start (listens on 127.0.0.1 only).
    #[arg(long, default_value_t = 5433, requires = "start")]
    port: u16,
    /// With --start: run with archive_mode=off (for scratch copies that must not archive).
    #[arg(long, requires = "start")]
    no_archive: bool,
    /// Restore over an existing, stopped data directory of the same cluster
    /// (same system identifier): rewrite only blocks that differ and remove
    /// files the backup does not have. Anything else is refused untouched.
    #[arg(long)]
    delta: bool,
    /// Put tablespace NAME (or OID) in the absolute directory DIR, linked from
    /// pg_tblspc (repeatable). Unmapped tablespaces are restored inside the
    /// target (dr_tablespaces/OID); nothing is written to their original
    /// locations.
    #[arg(long = "tablespace-map", value_name = "NAME=DIR")]
    tablespace_map: Vec<String>,
    /// With --to latest: when a WAL segment is missing and later WAL is
    /// archived beyond it, restore up to the gap anyway (refused otherwise).
    #[arg(long)]
    accept_gap: bool,
    /// Timeline to follow: a timeline id, `current` (the backup's) or
    /// `latest` (the highest). Default: the one whose WAL holds the target;
    /// refused when two diverged timelines both do.
    #[arg(long, default_value = "auto")]
    timeline: dr::postgres::timeline::TimelineChoice,
}

/// `dr restore pg --dry-run`: the plan a restore would follow, nothing written.
async fn restore_plan_only(
    cfg: &dr::config::Config,
    cluster: &str,
    args: &RestoreArgs,
    target: Target,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let repo = Repository::open(cfg).await?;
    let when = match target {
        Target::Latest => None,
        Target::Time(t) => Some(t),
    };
    let p = Catalog::plan_restore(&repo, cluster, when, args.accept_gap, args.timeline).await?;
    let w = &p.window;
    if out.json {
        out.json(&serde_json::json!({
            "ok": true, "cluster": cluster, "to": args.to, "backup": p.backup.id,
            "backup_stop_time": p.backup.stop_time, "timeline": p.timeline,
            "window": w, "stop_after_lsn": p.stop_after_lsn,
            "stop_at_backup_end": p.stop_at_backup_end, "gave_up": p.gave_up,
            "whole_catalog_read": !p.scoped,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string();
    println!("restore of {cluster} to {} would use:", args.to);
    println!(
        "  backup    {} (ended {})",
        p.backup.id,
        fmt(&p.backup.stop_time)
    );
    println!("  timeline  {}", p.timeline);
    println!(
        "  window    {} .. {} ({}), replaying WAL through {}",
        fmt(&w.from),
        fmt(&w.to),
        serde_json::to_value(w.end_basis)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        w.last_segment
    );
    if let Some(g) = &p.gave_up {
        println!("  gives up  {g}");
    }
    println!("nothing was written (--dry-run)");
    Ok(ExitCode::SUCCESS)
}

pub async fn backup(
    name: Option<String>,
    full: bool,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    if !out.json {
        match pg.mode {
            dr::config::BackupMode::Local => {
                eprintln!(
                    "backing up [postgres.{cluster}] ({})…",
                    pg.data_dir.display()
                )
            }
            dr::config::BackupMode::Remote => {
                eprintln!("backing up [postgres.{cluster}] over the replication protocol…")
            }
        }
    }
    let progress = dr::progress::Progress::new();
    let r = with_progress(
        out,
        "backup",
        progress.clone(),
        backup::backup(&repo, &cluster, pg, full, progress),
    )
    .await?;
    let degraded = report_degraded(&repo, out);
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "backup": r, "degraded": degraded }));
    } else {
        println!(
            "backup {} of {}: {} in {} files → {} stored in {} objects, {:.1}s ({:.0} MB/s), WAL {}..{} timeline {}",
            r.id,
            r.cluster,
            bytes(r.size),
            r.files,
            bytes(r.stored_size),
            r.objects,
            r.duration_seconds,
            r.size as f64 / 1e6 / r.duration_seconds.max(1e-9),
            r.start_lsn,
            r.stop_lsn,
            r.timeline
        );
        if let Some(prev) = &r.incremental_of {
            println!(
                "block-incremental against {prev}: {} of {} unchanged and referenced ({:.0}%)",
                bytes(r.reused_bytes),
                bytes(r.size),
                r.reused_bytes as f64 * 100.0 / r.size.max(1) as f64
            );
        }
        if !r.checksums_verified {
            println!(
                "page checksums: not verified (the cluster has data_checksums off, or verify_checksums = false)"
            );
        } else if r.checksum_failures.is_empty() {
            println!("page checksums: verified, no failures");
        }
        for (path, blk) in &r.checksum_failures {
            println!(
                "CORRUPT PAGE: {path} block {blk} (checksum mismatch; the backup holds the page as read)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn restore(
    args: RestoreArgs,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(args.name.as_deref())?;
    let target = match parse_to(&args.to, out)? {
        None => Target::Latest,
        Some(t) => Target::Time(t),
    };
    let Some(target_dir) = args.target.clone().filter(|_| !args.dry_run) else {
        return restore_plan_only(&cfg, &cluster, &args, target, out).await;
    };
    // Bad input is refused before anything is audited or touched.
    let tablespace_map = args
        .tablespace_map
        .iter()
        .map(|m| match m.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), PathBuf::from(v))),
            _ => Err(anyhow::anyhow!(
                "--tablespace-map {m:?}: expected NAME=DIR, e.g. --tablespace-map fast=/srv/restore-fast"
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let restore_command = wal_fetch_command(
        &dr::postgres::quote::current_dr_command(&cfg.source)?,
        &cluster,
    );
    let (audit, repo) = audited_open(
        &cfg,
        "restore.pg",
        &cluster,
        serde_json::json!({ "to": args.to, "target_dir": args.target }),
    )
    .await?;
    let args_delta = args.delta;
    let opts = RestoreOptions {
        extra: ExtraTarget {
            lsn: args.lsn,
            xid: args.xid,
            name: args.restore_point,
        },
        start: args.start.then_some(args.port),
        no_archive: args.no_archive,
        delta: args.delta,
        tablespace_map,
        connect_user: restore::default_connect_user(pg),
        timeline: args.timeline,
        accept_gap: args.accept_gap,
        ..RestoreOptions::new(target, target_dir, restore_command)
    };
    let progress = dr::progress::Progress::new();
    let r = with_progress(
        out,
        "restore",
        progress.clone(),
        restore::restore(&repo, &cluster, pg, &opts, progress),
    )
    .await;
    let details = match &r {
        Ok(r) => serde_json::to_value(r).map_err(|e| e.to_string()),
        Err(e) => Err(format!("{e:#}")),
    };
    audit.finish(Some(&repo), details).await;
    let r = r?;
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "restore": r }));
    } else {
        println!(
            "restored backup {} into {} ({} in {} files, {:.1}s), target {}",
            r.backup,
            r.dir,
            bytes(r.bytes),
            r.files,
            r.restore_seconds,
            r.target
        );
        if let Some(g) = &r.gave_up {
            eprintln!("GAVE UP (--accept-gap): {g}");
        }
        if args_delta {
            println!(
                "delta: {} already correct and kept, {} entries removed",
                bytes(r.bytes_unchanged),
                r.removed
            );
        }
        println!("recovery follows timeline {}", r.recovery_timeline);
        if r.started {
            println!(
                "server running on 127.0.0.1:{}; recovery took {:.1}s; last replayed transaction: {}",
                r.port.unwrap_or_default(),
                r.recovery_seconds.unwrap_or_default(),
                r.last_replayed.as_deref().unwrap_or("none")
            );
            if let Some(s) = &r.socket_dir {
                println!(
                    "the OS user connects without a password through the socket in {s} \
                     (psql -h {s} -p {}); stop it with: {}",
                    r.port.unwrap_or_default(),
                    restore::stop_command(pg, Path::new(&r.dir))
                );
            }
            if let Some(tl) = r.timeline {
                if r.archive_mode.as_deref().is_some_and(|m| m != "off") {
                    println!(
                        "it writes timeline {tl} and archives it with its archive_command \
                         (restore with --no-archive for a copy that must not archive)"
                    );
                } else {
                    println!("it writes timeline {tl}; archiving is off");
                }
            }
        } else {
            println!("start it with: pg_ctl -D {} start", r.dir);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dr list pg` on a host without the identity: what the keys say.
async fn list_keys_only(repo: &Repository, cluster: &str, out: &Out) -> anyhow::Result<ExitCode> {
    use dr::maintenance::inventory::{self, NEEDS_IDENTITY};
    let inv = inventory::pg(repo, cluster).await?;
    let note = format!("{NEEDS_IDENTITY}; {}", repo.codec.cannot_decrypt_because());
    if out.json {
        out.json(&serde_json::json!({
            "ok": true, "cluster": cluster, "keys_only": true, "note": note,
            "backups": inv.backups, "wal_segments": inv.wal_segments, "wal_ranges": inv.wal,
            "timeline_histories": inv.histories,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!("[postgres.{cluster}]");
    println!("{}", super::output::stored_table("BACKUP", &inv.backups));
    println!("\n{} WAL segments archived", inv.wal_segments);
    let mut last_tl = None;
    for r in &inv.wal {
        let gap = if last_tl == Some(r.timeline) {
            " (after a gap)"
        } else {
            ""
        };
        println!(
            "timeline {}: {} .. {} ({} segments){gap}",
            r.timeline, r.first, r.last, r.segments
        );
        last_tl = Some(r.timeline);
    }
    println!("note: {note}");
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    name: Option<String>,
    whole_catalog: bool,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(name.as_deref())?;
    let repo = Repository::open(&cfg).await?;
    if !repo.codec.can_decrypt() {
        return list_keys_only(&repo, &cluster, out).await;
    }
    let listed = if whole_catalog {
        dr::postgres::catalog::Listed::whole(&repo, &cluster).await?
    } else {
        dr::postgres::catalog::Listed::load(&repo, &cluster).await?
    };
    tracing::debug!(from_summaries = listed.scoped, "catalog listed");
    let cat = &listed.catalog;
    let streaming = (pg.wal == dr::config::WalMode::Stream)
        .then(|| stream::StreamStatus::load(pg, &cluster))
        .flatten();
    if out.json {
        let mut v = listed.to_json();
        v["ok"] = true.into();
        v["cluster"] = cluster.clone().into();
        v["damaged_tails"] = cat
            .damaged_tails
            .iter()
            .map(|(seg, why)| serde_json::json!({ "segment": seg.to_string(), "error": why }))
            .collect::<Vec<_>>()
            .into();
        v["stream"] = serde_json::json!(streaming.as_ref().map(|s| serde_json::json!({
            "status": s, "lag_seconds": s.lag_seconds(chrono::Utc::now()),
        })));
        out.json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    let fmt = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let rows: Vec<Vec<String>> = cat
        .backups
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                fmt(&b.start_time),
                fmt(&b.stop_time),
                format!("{}..{}", b.start_lsn, b.stop_lsn),
                b.timeline.to_string(),
                bytes(listed.sizes.get(&b.id).map_or(b.size, |z| z.size)),
                bytes(
                    listed
                        .sizes
                        .get(&b.id)
                        .map_or(b.stored_size, |z| z.stored_size),
                ),
            ]
        })
        .collect();
    println!("[postgres.{cluster}]");
    println!(
        "{}",
        table(
            &["BACKUP", "START", "STOP", "LSN", "TL", "SIZE", "STORED"],
            &rows
        )
    );
    if rows.is_empty() {
        println!("no backups yet; take the first with `dr backup pg {cluster}`");
    }
    println!("\n{} WAL segments archived", cat.wal.len());
    if cat.windows.is_empty() {
        println!("recoverable window: none");
    }
    for w in &cat.windows {
        println!(
            "recoverable window: {} .. {} (from backup {}, timeline {})",
            fmt(&w.from),
            fmt(&w.to),
            w.backup,
            w.timeline
        );
    }
    if cat.timelines.len() > 1 {
        let rows: Vec<Vec<String>> = cat
            .timelines
            .values()
            .map(|t| {
                let windows: Vec<&dr::postgres::catalog::Window> =
                    cat.windows.iter().filter(|w| w.timeline == t.id).collect();
                let window = match (
                    windows.iter().map(|w| w.from).min(),
                    windows.iter().map(|w| w.to).max(),
                ) {
                    (Some(a), Some(b)) => format!("{} .. {}", fmt(&a), fmt(&b)),
                    _ => "not restorable".into(),
                };
                vec![
                    t.id.to_string(),
                    t.parent().map(|p| p.to_string()).unwrap_or("-".into()),
                    t.switch_lsn().map(|l| l.to_string()).unwrap_or("-".into()),
                    t.switch_time.as_ref().map(fmt).unwrap_or("-".into()),
                    match (&t.first_segment, &t.last_segment) {
                        (Some(a), Some(b)) => format!("{a}..{b} ({})", t.segments),
                        _ => "none".into(),
                    },
                    window,
                ]
            })
            .collect();
        println!(
            "\n{}",
            table(
                &[
                    "TIMELINE",
                    "PARENT",
                    "SWITCH LSN",
                    "SWITCHED",
                    "WAL",
                    "WINDOW"
                ],
                &rows
            )
        );
    }
    if let Some(s) = &streaming {
        println!(
            "streaming: timeline {}, durable up to {} (server at {}): {} bytes / {:.1} s behind, as of {}{}",
            s.timeline,
            s.durable_lsn,
            s.server_lsn,
            s.lag_bytes,
            s.lag_seconds(chrono::Utc::now()),
            fmt(&s.updated),
            if s.synchronous { ", synchronous" } else { "" }
        );
    }
    for (k, e) in &cat.unreadable {
        println!("warning: {k}: {e}");
    }
    for (seg, e) in &cat.damaged_tails {
        println!(
            "warning: the streamed WAL of unfinished segment {seg} cannot be read; windows end before it: {e}"
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn wal_push(
    cluster: Option<String>,
    path: PathBuf,
    replace_invalid: bool,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(cluster.as_deref())?;
    let system_id = dr::postgres::system_id(&dr::postgres::archive_data_dir(pg))?;
    if replace_invalid {
        // Deleting an archived object is destructive: audit it like a restore.
        let (audit, repo) = super::audited_open(
            &cfg,
            "wal-push.replace-invalid",
            &cluster,
            serde_json::json!({ "file": path.display().to_string() }),
        )
        .await?;
        let res = wal::push(&repo, &cluster, system_id, &path, true).await;
        let outcome = match &res {
            Ok(r) => Ok(serde_json::json!({ "key": r.key, "replaced": r.replaced })),
            Err(e) => Err(e.to_string()),
        };
        audit.finish(Some(&repo), outcome).await;
        let r = res?;
        if out.json {
            out.json(&serde_json::json!({ "ok": true, "wal_push": r }));
        } else {
            for (region, key, why) in &r.replaced {
                println!("deleted invalid {key} in region {region}: {why}");
            }
            println!("archived {} as {}", r.file, r.key);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut repo = Repository::open(&cfg).await?;
    // One process per segment: remember a dead region between them.
    repo.regions
        .remember_failures(pg.state_dir().join("region-health.json"));
    let r = wal::push(&repo, &cluster, system_id, &path, false).await?;
    let degraded = report_degraded(&repo, out);
    if out.json {
        out.json(&serde_json::json!({ "ok": true, "wal_push": r, "degraded": degraded }));
    } else {
        tracing::info!(file = %r.file, already = r.already_archived, regions = ?r.regions, "archived");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn wal_stream(
    name: Option<String>,
    no_loop: bool,
    config: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(name.as_deref())?;
    if pg.wal != dr::config::WalMode::Stream {
        anyhow::bail!(
            "[postgres.{cluster}] archives WAL with archive_command; set wal = \"stream\" \
             to stream it (and drop archive_command, or both would store the same segments)"
        );
    }
    let repo = Repository::open(&cfg).await?;
    let cancel = super::cancel_on_signal();
    if no_loop {
        stream::run(&repo, &cluster, pg, &cancel).await?;
    } else {
        // Like pg_receivewal: reconnect after failures; the slot keeps the WAL.
        stream::supervise(&repo, &cluster, pg, &cancel, |e| {
            tracing::error!(%cluster, error = %e, "WAL streaming failed; reconnecting");
        })
        .await;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn wal_fetch(
    cluster: Option<String>,
    file: String,
    dest: PathBuf,
    until: Option<String>,
    config: Option<&Path>,
    out: &Out,
) -> anyhow::Result<ExitCode> {
    let until = until
        .map(|u| {
            u.parse::<dr::repo::layout::WalSegmentName>()
                .map_err(|e| anyhow::anyhow!("--until {u:?}: {e}"))
        })
        .transpose()?;
    let cfg = load_config(config)?;
    let (cluster, pg) = cfg.pg(cluster.as_deref())?;
    let base = dr::postgres::archive_data_dir(pg);
    let system_id = dr::postgres::system_id(&base)?;
    let spool = wal::spool_dir(pg, &base);
    let repo = Repository::open(&cfg).await?;
    let result = wal::fetch(
        &repo,
        &cluster,
        system_id,
        &file,
        &dest,
        &spool,
        pg.prefetch,
        until,
    )
    .await;
    let code = wal::fetch_status(&result);
    let status = ExitCode::from(code);
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            out.error(&anyhow::Error::new(e).context(format!(
                "{file} cannot be fetched; stopping recovery here rather than ending it \
                 early (exit status {code})"
            )));
            return Ok(status);
        }
    };
    match outcome {
        wal::FetchOutcome::Fetched { source } => {
            tracing::info!(file, source, "fetched");
            if out.json {
                out.json(&serde_json::json!({ "ok": true, "file": file, "dest": dest, "source": source }));
            }
            Ok(status)
        }
        // PostgreSQL asks for files past the end of the archive; say nothing
        // (a JSON caller still gets its document).
        wal::FetchOutcome::NotFound => {
            if out.json {
                out.json(&serde_json::json!({ "ok": false, "file": file, "archived": false }));
            }
            Ok(status)
        }
    }
}
