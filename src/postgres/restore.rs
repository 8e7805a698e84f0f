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
use crate::codec::Expect;
use crate::config::PgConfig;
use crate::repo::Repository;
use crate::repo::layout::ObjectKey;

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
    /// When the restored backup ended (the earliest restorable point).
    pub backup_stop_time: DateTime<Utc>,
    /// Last WAL segment reachable from the backup without a gap.
    pub wal_last_contiguous: Option<String>,
    /// Newest WAL segment archived on the backup's timeline, and when.
    pub wal_newest: Option<(String, DateTime<Utc>)>,
    /// The timeline recovery followed.
    pub timeline: u32,
    /// The timeline a started server archives as once promoted (when it
    /// archives at all; a `--no-archive` copy stores nothing).
    pub archives_as: Option<u32>,
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
    if !opts.dir.is_absolute() {
        return Err(PgError::Other(format!(
            "--target {} must be an absolute path",
            opts.dir.display()
        )));
    }
    let catalog = Catalog::load(repo, cluster).await?;
    let when = match opts.target {
        Target::Latest => None,
        Target::Time(t) => Some(t),
    };
    let plan = catalog.plan(when, opts.accept_gap, opts.timeline)?;
    let (m, gave_up, timeline) = (plan.backup.clone(), plan.gave_up, plan.timeline);
    let immediate = plan.stop_at_backup_end;
    // A promoted server takes the next free timeline id it finds archived.
    let archives_as = catalog.timelines.keys().max().map(|t| t + 1);
    if let Some(g) = &gave_up {
        tracing::warn!(shortfall = %g, "restoring short of the archived WAL (--accept-gap)");
    }
    // Only once the plan holds: a refused restore leaves no directory behind.
    if opts.delta {
        check_delta_target(&opts.dir)?;
    } else {
        check_target_dir(&opts.dir)?;
    }
    let wal_last_contiguous = catalog
        .windows
        .iter()
        .find(|w| w.backup == m.id && w.timeline == timeline)
        .map(|w| w.last_segment.clone());
    let wal_newest = catalog
        .wal
        .iter()
        .rev()
        .find(|(seg, _)| seg.timeline.0 == timeline)
        .map(|(seg, e)| (seg.to_string(), e.archived.unwrap_or(m.stop_time)));
    tracing::info!(backup = %m.id, "restoring");
    let links = tablespace_links(&m, opts)?;
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
            .and_then(|()| write_recovery(&m, &opts.dir, opts, timeline, immediate))
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
            clear_dir(&opts.dir);
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
        backup_stop_time: m.stop_time,
        wal_last_contiguous,
        wal_newest,
        timeline,
        archives_as: archives_as.filter(|_| !opts.no_archive),
        gave_up,
    };
    if let Some(port) = opts.start {
        let mut extra = Vec::new();
        if opts.no_archive {
            extra.push("archive_mode=off".to_string());
        }
        extra.extend(opts.settings.iter().cloned());
        let log = opts.dir.join("log").join("dr-recovery.log");
        let _ = std::fs::create_dir_all(opts.dir.join("log"));
        super::server::chown_to(&opts.dir.join("log"), &cfg.os_user).await?;
        let loopback = opts.conninfo.is_none().then_some(port);
        super::server::start_with(
            &cfg.bin_dir,
            &cfg.os_user,
            &opts.dir,
            loopback,
            &extra,
            &log,
        )
        .await?;
        let client = match &opts.conninfo {
            Some(c) => connect_retrying(c, Duration::from_secs(60)).await?,
            None => {
                super::server::connect_local_at(
                    opts.connect_host.as_deref().unwrap_or("127.0.0.1"),
                    port,
                    &opts.connect_user,
                    "postgres",
                    Duration::from_secs(60),
                )
                .await?
            }
        };
        // Recovery promotes when it reaches the target; wait for that.
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|source| PgError::Sql {
                    what: format!(
                        "waiting for recovery (pg_is_in_recovery()){}",
                        super::server::log_tail(&log)
                    ),
                    source,
                })?;
            let in_recovery: bool = row.get(0);
            if !in_recovery {
                break;
            }
            if Instant::now() > deadline {
                return Err(PgError::Other(
                    "recovery did not finish within an hour".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let row = client
            .query_one("SELECT pg_last_xact_replay_timestamp()::text", &[])
            .await
            .map_err(|source| PgError::Sql {
                what: "pg_last_xact_replay_timestamp()".into(),
                source,
            })?;
        report.last_replayed = row.get::<_, Option<String>>(0);
        // Segments prefetched past the target are no longer needed.
        let spool = cfg
            .spool_dir
            .clone()
            .unwrap_or_else(|| opts.dir.join("pg_wal").join("dr-spool"));
        let prefix = format!("{}-", m.system_id);
        if let Ok(rd) = std::fs::read_dir(&spool) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        report.started = true;
        report.port = Some(port);
        report.recovery_seconds = Some(t0.elapsed().as_secs_f64() - restore_seconds);
    }
    Ok(report)
}

/// Connects with `conninfo`, retrying while the server starts up.
async fn connect_retrying(
    conninfo: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, PgError> {
    let deadline = Instant::now() + timeout;
    loop {
        match super::connect_to(conninfo, Some(Duration::from_secs(5))).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Reads the `keep` files of `dir` (those that exist), before a delta
/// restore replaces them.
fn read_kept(dir: &Path, keep: &[String]) -> Result<Vec<(PathBuf, Vec<u8>)>, PgError> {
    let mut out = Vec::new();
    for k in keep {
        if !safe_relative_path(k) {
            return Err(PgError::Other(format!(
                "kept file {k:?} must be a relative path inside the target"
            )));
        }
        let p = dir.join(k);
        match std::fs::read(&p) {
            Ok(b) => out.push((p, b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PgError::io(&p, e)),
        }
    }
    Ok(out)
}

/// Writes the kept files back over what the backup restored.
fn put_back(dir: &Path, kept: &[(PathBuf, Vec<u8>)]) -> std::io::Result<()> {
    for (p, body) in kept {
        std::fs::write(p, body)?;
        std::fs::File::open(p)?.sync_all()?;
    }
    if !kept.is_empty() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn check_target_dir(dir: &Path) -> Result<(), PgError> {
    if !dir.is_absolute() {
        return Err(PgError::Other(format!(
            "--target {} must be an absolute path",
            dir.display()
        )));
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(PgError::Other(format!(
                    "--target {} is not empty; restore into an empty or new directory \
                     (dr never overwrites an existing data directory)",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))
        }
        Err(e) => Err(PgError::io(dir, e)),
    }
}

/// `--delta` needs an existing data directory that no server is using.
fn check_delta_target(dir: &Path) -> Result<(), PgError> {
    if !dir.is_absolute() {
        return Err(PgError::Other(format!(
            "--target {} must be an absolute path",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return check_target_dir(dir);
    }
    if let Ok(pid) = std::fs::read_to_string(dir.join("postmaster.pid")) {
        let pid = pid.lines().next().unwrap_or("").trim().to_string();
        if !pid.is_empty() && Path::new("/proc").join(&pid).exists() {
            return Err(PgError::Other(format!(
                "a PostgreSQL server (pid {pid}) is running on {}; stop it before a --delta restore",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes everything under `dir` that the manifest does not list (never
/// following symlinks). Returns how many entries were removed.
fn prune(dir: &Path, m: &PgManifest) -> Result<usize, PgError> {
    let keep_files: std::collections::HashSet<&str> =
        m.files.iter().map(|f| f.path.as_str()).collect();
    let keep_dirs: std::collections::HashSet<&str> =
        m.dirs.iter().map(|d| d.path.as_str()).collect();
    let mut removed = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let rd = std::fs::read_dir(&abs).map_err(|e| PgError::io(&abs, e))?;
        for e in rd.flatten() {
            let child = rel.join(e.file_name());
            let key = child.to_string_lossy().into_owned();
            let path = e.path();
            let ft = e.file_type().map_err(|err| PgError::io(&path, err))?;
            if ft.is_dir() {
                if keep_dirs.contains(key.as_str()) {
                    stack.push(child);
                } else {
                    std::fs::remove_dir_all(&path).map_err(|err| PgError::io(&path, err))?;
                    removed += 1;
                }
            } else if !(ft.is_file() && keep_files.contains(key.as_str())) {
                std::fs::remove_file(&path).map_err(|err| PgError::io(&path, err))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn clear_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

/// Recreates directories and files, objects fetched and decoded in parallel.
async fn rebuild(
    repo: &Repository,
    m: &PgManifest,
    dir: &Path,
    parallel: usize,
    progress: &crate::progress::Progress,
    delta: bool,
) -> Result<(u64, u64, usize), PgError> {
    for d in &m.dirs {
        if !safe_relative_path(&d.path) {
            return Err(PgError::Other(format!(
                "manifest of backup {} names directory {:?}, which escapes the target; refusing to restore",
                m.id, d.path
            )));
        }
        let p = dir.join(&d.path);
        if delta && p.is_symlink() {
            std::fs::remove_file(&p).map_err(|e| PgError::io(&p, e))?;
        }
        std::fs::create_dir_all(&p).map_err(|e| PgError::io(&p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.mode & 0o700 | 0o700))
            .map_err(|e| PgError::io(&p, e))?;
    }
    let removed = if delta { prune(dir, m)? } else { 0 };
    let mut unchanged = 0u64;
    let mut resized: Vec<PathBuf> = Vec::new();
    // Which (file, offset in file) each object's bytes go to.
    let mut by_object: Vec<Vec<(usize, u64, u64, u64)>> = vec![Vec::new(); m.objects.len()];
    let owner_of = |b: &Option<String>| b.clone().unwrap_or_else(|| m.id.clone());
    let index: std::collections::HashMap<(String, u32), usize> = m
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| ((owner_of(&o.backup), o.n), i))
        .collect();
    for (fi, f) in m.files.iter().enumerate() {
        if !safe_relative_path(&f.path) {
            return Err(PgError::Other(format!(
                "manifest of backup {} names file {:?}, which escapes the target; refusing to restore",
                m.id, f.path
            )));
        }
        let p = dir.join(&f.path);
        let existing = delta && std::fs::symlink_metadata(&p).is_ok_and(|md| md.is_file());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!existing)
            .open(&p)
            .map_err(|e| PgError::io(&p, e))?;
        let old_len = if existing {
            file.metadata().map(|md| md.len()).unwrap_or(0)
        } else {
            0
        };
        file.set_len(f.size).map_err(|e| PgError::io(&p, e))?;
        if existing && old_len != f.size {
            resized.push(p.clone());
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode & 0o600 | 0o600))
            .map_err(|e| PgError::io(&p, e))?;
        let mut file_off = 0u64;
        let mut buf = Vec::new();
        for ext in &f.extents {
            let Some(&oi) = index.get(&(owner_of(&ext.backup), ext.object)) else {
                return Err(PgError::Other(format!(
                    "manifest of backup {} references data object {} that it does not list",
                    m.id, ext.object
                )));
            };
            // --delta: a block already holding the right bytes stays as it is.
            let same = existing && file_off + ext.len <= old_len && {
                buf.resize(ext.len as usize, 0);
                file.read_exact_at(&mut buf, file_off).is_ok()
                    && hex::encode(&blake3::hash(&buf).as_bytes()[..16]) == ext.hash
            };
            if same {
                unchanged += ext.len;
            } else {
                by_object[oi].push((fi, file_off, ext.offset, ext.len));
            }
            file_off += ext.len;
        }
    }
    // A file is fsynced by whichever job writes its last piece, so syncing
    // overlaps with decoding instead of trailing it.
    let mut needed = vec![0usize; m.files.len()];
    for pieces in &by_object {
        for p in pieces {
            needed[p.0] += 1;
        }
    }
    let remaining: std::sync::Arc<Vec<std::sync::atomic::AtomicUsize>> = std::sync::Arc::new(
        needed
            .into_iter()
            .map(std::sync::atomic::AtomicUsize::new)
            .collect(),
    );
    progress.add(unchanged);
    let system_id = m.system_id;
    let jobs = m
        .objects
        .iter()
        .zip(by_object)
        .filter(|(_, pieces)| !pieces.is_empty())
        .map(|(o, pieces)| {
            let remaining = remaining.clone();
            let key = m.owner(&o.backup).map(|backup| {
                ObjectKey::PgData {
                    cluster: m.cluster.clone(),
                    system_id,
                    backup,
                    n: o.n,
                }
                .to_string()
            });
            async move {
                let key = key.ok_or_else(|| {
                    PgError::Other(format!(
                        "manifest of backup {} names an invalid owner backup id",
                        m.id
                    ))
                })?;
                let expect = Expect::from_encoded(&key, &o.encoded);
                let (_, data) = repo.get_verified(&key, expect).await?;
                let paths: Vec<PathBuf> = pieces
                    .iter()
                    .map(|p| dir.join(&m.files[p.0].path))
                    .collect();
                let n = tokio::task::spawn_blocking(move || -> Result<u64, PgError> {
                    let mut n = 0;
                    // Pieces come grouped by file: open each file once.
                    let mut open: Option<(usize, std::fs::File)> = None;
                    for ((fi, file_off, obj_off, len), path) in pieces.iter().zip(paths) {
                        let start = *obj_off as usize;
                        let end = start + *len as usize;
                        let Some(slice) = data.get(start..end) else {
                            return Err(PgError::Other(format!(
                                "{key}: extent beyond the object's end"
                            )));
                        };
                        if open.as_ref().is_none_or(|(i, _)| i != fi) {
                            let f = std::fs::OpenOptions::new()
                                .write(true)
                                .open(&path)
                                .map_err(|e| PgError::io(&path, e))?;
                            open = Some((*fi, f));
                        }
                        if let Some((_, f)) = &open {
                            f.write_all_at(slice, *file_off)
                                .map_err(|e| PgError::io(&path, e))?;
                            if remaining[*fi].fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1
                            {
                                f.sync_all().map_err(|e| PgError::io(&path, e))?;
                            }
                        }
                        n += *len;
                    }
                    Ok(n)
                })
                .await
                .map_err(|e| PgError::Other(e.to_string()))??;
                progress.add(n);
                Ok(n)
            }
        });
    let results: Vec<Result<u64, PgError>> = futures::stream::iter(jobs)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut total = 0;
    for r in results {
        total += r?;
    }
    // Files are durable; make their directory entries (and files only
    // truncated or extended by --delta) durable too.
    let mut dirs: Vec<PathBuf> = m.dirs.iter().map(|d| dir.join(&d.path)).collect();
    dirs.push(dir.to_path_buf());
    dirs.extend(resized);
    tokio::task::spawn_blocking(move || -> Result<(), PgError> {
        for d in dirs {
            std::fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| PgError::io(&d, e))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| PgError::Other(e.to_string()))??;
    Ok((total, unchanged, removed))
}

/// Checks `--tablespace-map` against the backup's tablespaces and returns
/// (oid, directory) for each mapped one.
fn tablespace_links(m: &PgManifest, opts: &RestoreOptions) -> Result<Vec<(u32, PathBuf)>, PgError> {
    if opts.delta && !m.tablespaces.is_empty() {
        return Err(PgError::Other(format!(
            "backup {} has tablespaces ({}); --delta does not support them yet — restore into an empty directory",
            m.id,
            m.tablespaces
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut out = Vec::new();
    for (key, dir) in &opts.tablespace_map {
        let Some(ts) = m
            .tablespaces
            .iter()
            .find(|t| &t.name == key || t.oid.to_string() == *key)
        else {
            let have: Vec<String> = m
                .tablespaces
                .iter()
                .map(|t| format!("{} (oid {}, was {})", t.name, t.oid, t.location))
                .collect();
            return Err(PgError::Other(format!(
                "--tablespace-map {key}=…: backup {} has no tablespace {key:?}; it has: {}",
                m.id,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        };
        if !dir.is_absolute() {
            return Err(PgError::Other(format!(
                "--tablespace-map {key}={}: the directory must be absolute",
                dir.display()
            )));
        }
        if dir.starts_with(&opts.dir) {
            return Err(PgError::Other(format!(
                "--tablespace-map {key}={}: inside the target directory; leave it out to restore the tablespace in place",
                dir.display()
            )));
        }
        check_target_dir(dir)?;
        out.push((ts.oid, dir.clone()));
    }
    // PostgreSQL accepts only links in pg_tblspc; unmapped tablespaces get a
    // directory inside the target, so nothing is written outside it.
    for ts in &m.tablespaces {
        if !out.iter().any(|(oid, _)| *oid == ts.oid) {
            out.push((ts.oid, opts.dir.join(IN_TARGET).join(ts.oid.to_string())));
        }
    }
    Ok(out)
}

/// Where unmapped tablespaces are restored, inside the target.
pub const IN_TARGET: &str = "dr_tablespaces";

/// Creates each mapped tablespace directory and its `pg_tblspc` link.
fn make_links(target: &Path, links: &[(u32, PathBuf)]) -> Result<(), PgError> {
    if links.is_empty() {
        return Ok(());
    }
    let tblspc = target.join("pg_tblspc");
    std::fs::create_dir_all(&tblspc).map_err(|e| PgError::io(&tblspc, e))?;
    for (oid, dir) in links {
        std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| PgError::io(dir, e))?;
        let link = tblspc.join(oid.to_string());
        std::os::unix::fs::symlink(dir, &link).map_err(|e| PgError::io(&link, e))?;
    }
    Ok(())
}

/// Removes the tablespace directories [`make_links`] created, after a failure.
fn remove_links(links: &[(u32, PathBuf)]) {
    for (_, dir) in links {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn write_recovery(
    m: &PgManifest,
    dir: &Path,
    opts: &RestoreOptions,
    timeline: u32,
    immediate: bool,
) -> std::io::Result<()> {
    std::fs::write(dir.join("backup_label"), &m.backup_label)?;
    // No tablespace_map: it would make PostgreSQL relink pg_tblspc to the
    // original locations. dr has already placed each tablespace (in place,
    // or linked to its --tablespace-map directory).
    std::fs::write(dir.join("recovery.signal"), b"")?;
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("postgresql.auto.conf"))?;
    let mut lines = vec![
        format!("\n# Added by dr restore of backup {}", m.id),
        format!(
            "restore_command = {}",
            quote(&format!("{} %f %p", opts.restore_command))
        ),
        // Never 'latest': a stray branch (a restored copy that archived)
        // must not be followed past the target's own history.
        format!("recovery_target_timeline = '{timeline}'"),
        "recovery_target_action = 'promote'".to_string(),
    ];
    let extra = &opts.extra;
    let has_extra = extra.lsn.is_some() || extra.xid.is_some() || extra.name.is_some();
    if immediate && !has_extra {
        lines.push("recovery_target = 'immediate'".to_string());
    } else if let (Target::Time(t), false) = (&opts.target, has_extra) {
        lines.push(format!(
            "recovery_target_time = {}",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        ));
    }
    if let Some(l) = &opts.extra.lsn {
        lines.push(format!("recovery_target_lsn = {}", quote(l)));
    }
    if let Some(x) = &opts.extra.xid {
        lines.push(format!("recovery_target_xid = {}", quote(x)));
    }
    if let Some(n) = &opts.extra.name {
        lines.push(format!("recovery_target_name = {}", quote(n)));
    }
    writeln!(conf, "{}", lines.join("\n"))?;
    conf.sync_all()
}

pub use crate::time::parse_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_formats() {
        let utc = |s: &str| parse_time(s).map(|(t, _)| t.to_rfc3339());
        assert_eq!(
            utc("2026-11-25T18:44:12Z").as_deref(),
            Ok("2026-11-25T18:44:12+00:00")
        );
        assert_eq!(
            utc("2026-11-25T19:44:12+01:00").as_deref(),
            Ok("2026-11-25T18:44:12+00:00")
        );
        assert_eq!(
            utc("2026-11-25 19:44:12+01").as_deref(),
            Ok("2026-11-25T18:44:12+00:00")
        );
        assert_eq!(
            utc("2026-11-25 18:44:12.250Z").as_deref(),
            Ok("2026-11-25T18:44:12.250+00:00")
        );
        assert!(parse_time("2026-11-25 18:44:12").is_ok_and(|(_, local)| local));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01 00:00:00").is_err());
    }
}
