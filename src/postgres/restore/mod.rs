//! Point-in-time restore: pick the backup, rebuild PGDATA from its objects in
//! parallel, write the recovery settings, optionally start the server and wait
//! until it reaches the target.

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use super::PgError;
use super::catalog::Catalog;
use super::manifest::{PgManifest, safe_relative_path};
use crate::config::PgConfig;
use crate::repo::Repository;
use crate::repo::layout::ObjectKey;

mod pgdata;
mod recovery;
mod start;
mod target_dir;
#[cfg(test)]
mod tests;

pub use pgdata::IN_TARGET;
use pgdata::*;
use recovery::*;
use start::*;
pub use start::{SOCKET_DIR, default_connect_user, stop_command};
use target_dir::*;

/// Where recovery should stop.
#[derive(Debug, Clone)]
pub enum Target {
    /// Replay all archived WAL.
    Latest,
    /// `recovery_target_time`.
    Time(DateTime<Utc>),
}

/// Extra stop conditions (mutually exclusive with each other).
#[derive(Debug, Clone, Default)]
pub struct ExtraTarget {
    /// `recovery_target_lsn`.
    pub lsn: Option<String>,
    /// `recovery_target_xid`.
    pub xid: Option<String>,
    /// `recovery_target_name`.
    pub name: Option<String>,
}

impl ExtraTarget {
    /// Checks each stop condition as PostgreSQL 15 would, so a typo fails
    /// before anything is written rather than after the restore.
    pub fn validate(&self) -> Result<(), PgError> {
        if let Some(l) = &self.lsn {
            let part =
                |p: &str| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_hexdigit());
            if !l
                .split_once('/')
                .is_some_and(|(hi, lo)| part(hi) && part(lo))
            {
                return Err(PgError::Other(format!(
                    "--lsn {l:?} is not an LSN: expected two hexadecimal numbers of up to \
                     8 digits separated by '/', e.g. 0/16B3748 (as pg_current_wal_lsn() shows)"
                )));
            }
        }
        if let Some(x) = &self.xid {
            // A 32-bit xid, or one qualified with its epoch (64-bit, as
            // pg_current_xact_id() shows); 0–2 are never assigned.
            let ok = !x.is_empty()
                && x.chars().all(|c| c.is_ascii_digit())
                && x.parse::<u64>().is_ok_and(|n| n >= 3);
            if !ok {
                return Err(PgError::Other(format!(
                    "--xid {x:?} is not a transaction id: expected a decimal number of at \
                     least 3 (e.g. 7431, or 64-bit as pg_current_xact_id() shows)"
                )));
            }
        }
        if let Some(n) = &self.name {
            if n.contains(['\n', '\r', '\0']) {
                return Err(PgError::Other(format!(
                    "--name {n:?} contains a line break or NUL, which PostgreSQL's \
                     configuration cannot hold; name restore points without them"
                )));
            }
            // PostgreSQL's limit (MAXFNAMELEN - 1), as pg_create_restore_point enforces.
            if n.is_empty() || n.len() > 63 {
                return Err(PgError::Other(format!(
                    "--name {n:?}: a restore point name has 1 to 63 bytes \
                     (as pg_create_restore_point() accepts)"
                )));
            }
        }
        Ok(())
    }
}

/// Restore options.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Recovery target.
    pub target: Target,
    /// Other recovery targets.
    pub extra: ExtraTarget,
    /// Directory to restore into (must be absent or empty).
    pub dir: PathBuf,
    /// Start the server and wait for the target.
    pub start: Option<u16>,
    /// Start with `archive_mode=off` (scratch restores must not archive).
    pub no_archive: bool,
    /// The `dr` command line PostgreSQL runs as restore_command (`%f %p` appended).
    pub restore_command: String,
    /// Restore over an existing (stopped) data directory, rewriting only
    /// blocks that differ and removing files the backup does not have.
    pub delta: bool,
    /// With `delta`, also accept the data directory of another cluster
    /// (another system identifier): a staging server its owner allowed dr
    /// to overwrite. Without it, such a directory is refused.
    pub replace_other_cluster: bool,
    /// Tablespaces (by name or OID) to restore into these absolute
    /// directories, linked from `pg_tblspc`; the others are restored inside
    /// the target, under `dr_tablespaces/<oid>`.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// Extra `name=value` server settings for `start`; they override the
    /// restored configuration (and the loopback defaults of `server::start`).
    pub settings: Vec<String>,
    /// Where to connect while waiting for promotion: 127.0.0.1 when `None`,
    /// else a socket directory the settings put the server's socket in.
    pub connect_host: Option<String>,
    /// Database user to connect as while waiting for promotion.
    pub connect_user: String,
    /// Which timeline recovery follows.
    pub timeline: crate::postgres::timeline::TimelineChoice,
    /// For `latest`: restore up to the newest reachable point even when
    /// archived WAL lies beyond a missing segment (the report says what was
    /// given up). Without it such a restore is refused.
    pub accept_gap: bool,
    /// Files of a `delta` target (relative paths) kept as they are instead
    /// of the backup's: a server's own configuration.
    pub keep_files: Vec<String>,
    /// Start the server with its own listen settings (no loopback defaults;
    /// `start`'s port is then only reported) and wait for promotion through
    /// this conninfo: a server that stays in service, e.g. in staging.
    pub conninfo: Option<String>,
}

impl RestoreOptions {
    /// Options with every default: restore `target` into the empty or absent
    /// `dir` with PostgreSQL fetching WAL through `restore_command`; no
    /// start, no delta, tablespaces inside the target, timeline chosen by
    /// the target, no gap accepted. Callers change what differs with struct
    /// update syntax (`RestoreOptions { start: Some(port), ..new(…) }`).
    pub fn new(target: Target, dir: PathBuf, restore_command: String) -> RestoreOptions {
        RestoreOptions {
            target,
            extra: ExtraTarget::default(),
            dir,
            start: None,
            no_archive: false,
            restore_command,
            delta: false,
            replace_other_cluster: false,
            tablespace_map: Vec::new(),
            settings: Vec::new(),
            connect_host: None,
            connect_user: String::new(),
            timeline: crate::postgres::timeline::TimelineChoice::Auto,
            accept_gap: false,
            keep_files: Vec::new(),
            conninfo: None,
        }
    }
}

/// What a restore did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// Backup restored.
    pub backup: String,
    /// Target dir.
    pub dir: String,
    /// Requested target.
    pub target: String,
    /// Bytes written.
    pub bytes: u64,
    /// Bytes already correct in the target and left alone (`--delta`).
    pub bytes_unchanged: u64,
    /// Files and directories removed from the target (`--delta`).
    pub removed: usize,
    /// Files written.
    pub files: usize,
    /// Seconds to rebuild PGDATA.
    pub restore_seconds: f64,
    /// Whether the server was started.
    pub started: bool,
    /// Port, if started.
    pub port: Option<u16>,
    /// Timestamp of the last replayed transaction, if started.
    pub last_replayed: Option<String>,
    /// Seconds from start until the server accepted writes, if started.
    pub recovery_seconds: Option<f64>,
    /// The timeline the started server writes (and archives, unless
    /// `archive_mode` is off) after promotion.
    pub timeline: Option<u32>,
    /// The started server's `archive_mode`.
    pub archive_mode: Option<String>,
    /// The private socket directory of a started server (trusted for the
    /// OS user), when dr chose how to connect.
    pub socket_dir: Option<String>,
    /// When the restored backup ended (the earliest restorable point).
    pub backup_stop_time: DateTime<Utc>,
    /// Last WAL segment reachable from the backup without a gap, as far as
    /// planning read: for `latest` the end of the archive, for a past time
    /// at least the segment that reaches it.
    pub wal_last_contiguous: Option<String>,
    /// Newest WAL segment archived on the backup's timeline, and when.
    pub wal_newest: Option<(String, DateTime<Utc>)>,
    /// The timeline recovery followed (`recovery_target_timeline`).
    pub recovery_timeline: u32,
    /// What `latest` left behind under `--accept-gap`: the missing segment
    /// and the archived WAL beyond it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gave_up: Option<String>,
}

/// Restores `cluster` as described by `opts`.
pub async fn restore(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    opts: &RestoreOptions,
    progress: std::sync::Arc<crate::progress::Progress>,
) -> Result<RestoreReport, PgError> {
    let t0 = Instant::now();
    if !repo.codec.can_decrypt() {
        return Err(PgError::Other(format!(
            "restore needs the private key: {}",
            repo.codec.cannot_decrypt_because()
        )));
    }
    // Everything that can be refused is refused before anything is written.
    opts.extra.validate()?;
    let found = inspect_target(&opts.dir)?;
    let when = match opts.target {
        Target::Latest => None,
        Target::Time(t) => Some(t),
    };
    // Reads what this target needs, not the whole history.
    let plan = Catalog::plan_restore(repo, cluster, when, opts.accept_gap, opts.timeline).await?;
    let (m, gave_up, timeline) = (plan.backup.clone(), plan.gave_up.clone(), plan.timeline);
    if let Some(g) = &gave_up {
        tracing::warn!(shortfall = %g, "restoring short of the archived WAL (--accept-gap)");
    }
    let stop = if plan.stop_at_backup_end {
        Stop::Immediate
    } else if let Some(lsn) = plan.stop_after_lsn {
        Stop::AfterLsn(lsn)
    } else {
        Stop::AsAsked
    };
    let settings = recovery_settings(opts, timeline, stop)?;
    accept_target(&opts.dir, &found, m.system_id, opts)?;
    let wal_last_contiguous = Some(plan.window.last_segment.clone());
    let wal_newest = plan.wal_newest(repo).await?;
    tracing::info!(backup = %m.id, "restoring");
    let links = tablespace_links(&m, opts)?;
    if matches!(found, Found::Absent) {
        std::fs::create_dir_all(&opts.dir).map_err(|e| PgError::io(&opts.dir, e))?;
    }
    progress.add_total(m.size);
    if let Err(e) = make_links(&opts.dir, &links) {
        remove_links(&links);
        return Err(e);
    }
    let kept = if opts.delta {
        read_kept(&opts.dir, &opts.keep_files)?
    } else {
        Vec::new()
    };
    let rebuilt = match rebuild(repo, &m, &opts.dir, cfg.parallel, &progress, opts.delta).await {
        Ok(n) => put_back(&opts.dir, &kept)
            .and_then(|()| write_recovery(&m, &opts.dir, &settings))
            .and_then(|()| complete(&opts.dir))
            .map(|_| n)
            .map_err(|e| PgError::io(&opts.dir, e)),
        Err(e) => Err(e),
    };
    let bytes = match rebuilt {
        Ok(n) => n,
        Err(e) if opts.delta => {
            return Err(PgError::Other(format!(
                "{e}; the delta restore stopped part-way, so {} is partly updated — \
                 fix the cause and run the same --delta restore again",
                opts.dir.display()
            )));
        }
        Err(e) => {
            // The directory was empty or new: leave nothing half-restored behind.
            let target = opts.dir.clone();
            let _ = tokio::task::spawn_blocking(move || clear_dir(&target)).await;
            remove_links(&links);
            return Err(e);
        }
    };
    let (bytes, bytes_unchanged, removed) = bytes;
    std::fs::set_permissions(&opts.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| PgError::io(&opts.dir, e))?;
    super::server::chown_to(&opts.dir, &cfg.os_user).await?;
    // chown -R does not follow the pg_tblspc links.
    for (_, dir) in links.iter().filter(|(_, d)| !d.starts_with(&opts.dir)) {
        super::server::chown_to(dir, &cfg.os_user).await?;
    }
    let restore_seconds = t0.elapsed().as_secs_f64();
    let mut report = RestoreReport {
        backup: m.id.clone(),
        dir: opts.dir.display().to_string(),
        target: match &opts.target {
            Target::Latest => "latest".into(),
            Target::Time(t) => t.to_rfc3339(),
        },
        bytes,
        bytes_unchanged,
        removed,
        files: m.files.len(),
        restore_seconds,
        started: false,
        port: None,
        last_replayed: None,
        recovery_seconds: None,
        timeline: None,
        archive_mode: None,
        socket_dir: None,
        backup_stop_time: m.stop_time,
        wal_last_contiguous,
        wal_newest,
        recovery_timeline: timeline,
        gave_up,
    };
    if let Some(port) = opts.start {
        start_and_wait(cfg, opts, port, &m, &mut report).await?;
        report.recovery_seconds = Some(t0.elapsed().as_secs_f64() - restore_seconds);
    }
    Ok(report)
}
