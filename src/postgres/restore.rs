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
    /// Last WAL segment reachable from the backup without a gap.
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
    let catalog = Catalog::load(repo, cluster).await?;
    let when = match opts.target {
        Target::Latest => None,
        Target::Time(t) => Some(t),
    };
    let plan = catalog.plan(when, opts.accept_gap, opts.timeline)?;
    let (m, gave_up, timeline) = (plan.backup.clone(), plan.gave_up, plan.timeline);
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

/// Starts the restored server, waits until recovery reaches the target and
/// promotes it, and records in `report` where it runs.
async fn start_and_wait(
    cfg: &PgConfig,
    opts: &RestoreOptions,
    port: u16,
    m: &PgManifest,
    report: &mut RestoreReport,
) -> Result<(), PgError> {
    let mut extra = Vec::new();
    if opts.no_archive {
        extra.push("archive_mode=off".to_string());
    }
    // Unless the caller says how to connect, dr reaches the server through a
    // socket in a directory only the OS user can open, so no password is
    // needed whatever the restored pg_hba.conf asks of TCP clients.
    let own_socket = if opts.conninfo.is_none() && opts.connect_host.is_none() {
        let dir = private_socket(&opts.dir, port, &cfg.os_user).await?;
        extra.push(format!(
            "unix_socket_directories={}",
            super::quote::list_element(&dir)
        ));
        extra.push("unix_socket_permissions=0700".into());
        extra.push(format!("hba_file={}", dir.join("pg_hba.conf").display()));
        Some(dir)
    } else {
        None
    };
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
    let host = match (&own_socket, &opts.connect_host) {
        (Some(d), _) => d.display().to_string(),
        (None, Some(h)) => h.clone(),
        (None, None) => "127.0.0.1".into(),
    };
    match wait_promoted(opts, port, &host, &log, report).await {
        Ok(()) => {}
        // Callers that pass their own way in also stop the server themselves.
        Err(e) if own_socket.is_some() => {
            return Err(PgError::Other(format!(
                "{e}\nthe restored server is still running on {} (port {port}); stop it with: {}",
                opts.dir.display(),
                stop_command(cfg, &opts.dir)
            )));
        }
        Err(e) => return Err(e),
    }
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
    report.socket_dir = own_socket.map(|d| d.display().to_string());
    Ok(())
}

/// Connects to the started server, waits until it leaves recovery, and
/// records what it replayed and which timeline it now writes.
async fn wait_promoted(
    opts: &RestoreOptions,
    port: u16,
    host: &str,
    log: &Path,
    report: &mut RestoreReport,
) -> Result<(), PgError> {
    let client = match &opts.conninfo {
        Some(c) => connect_retrying(c, Duration::from_secs(60)).await?,
        None => {
            super::server::connect_local_at(
                host,
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
                    super::server::log_tail(log)
                ),
                source,
            })?;
        let in_recovery: bool = row.try_get(0).unwrap_or(true);
        if !in_recovery {
            break;
        }
        if Instant::now() > deadline {
            return Err(PgError::Other(format!(
                "recovery did not finish within an hour{}",
                super::server::log_tail(log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = client
        .query_one(
            "SELECT pg_last_xact_replay_timestamp()::text, \
                    substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
                    current_setting('archive_mode')",
            &[],
        )
        .await
        .map_err(|source| PgError::Sql {
            what: "reading the promoted server's state".into(),
            source,
        })?;
    report.last_replayed = row.try_get::<_, Option<String>>(0).ok().flatten();
    report.timeline = row
        .try_get::<_, String>(1)
        .ok()
        .and_then(|t| u32::from_str_radix(&t, 16).ok());
    report.archive_mode = row.try_get::<_, String>(2).ok();
    Ok(())
}

/// The directory, inside the target, of the socket dr reaches a started
/// server through.
pub const SOCKET_DIR: &str = "dr-socket";

/// Longest Unix socket path the kernel accepts (`sun_path` less its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Creates the private socket directory (mode 0700, owned by the OS user)
/// and its pg_hba.conf: trust on that socket, which only the OS user and
/// root can open, then the restored cluster's own rules for TCP. Inside the
/// target unless the socket path would be too long, else in the temp
/// directory.
async fn private_socket(data: &Path, port: u16, os_user: &str) -> Result<PathBuf, PgError> {
    let inside = data.join(SOCKET_DIR);
    let lock = inside.join(format!(".s.PGSQL.{port}.lock"));
    let dir = if lock.as_os_str().len() <= SOCKET_PATH_MAX {
        match std::fs::create_dir(&inside) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(PgError::io(&inside, e));
            }
            _ => inside,
        }
    } else {
        let d = std::env::temp_dir().join(format!(
            "dr-restore-{}",
            crate::repo::layout::BackupId::new(Utc::now())
        ));
        std::fs::create_dir(&d).map_err(|e| PgError::io(&d, e))?;
        d
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| PgError::io(&dir, e))?;
    let own = std::fs::read_to_string(data.join("pg_hba.conf"))
        .unwrap_or_else(|_| "host all all 127.0.0.1/32 md5\n".into());
    let hba = dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        format!(
            "# dr restore --start: the OS user connects without a password through\n\
             # this 0700 socket directory; TCP follows the cluster's own rules below.\n\
             local all all trust\n{own}"
        ),
    )
    .map_err(|e| PgError::io(&hba, e))?;
    super::server::chown_to(&dir, os_user).await?;
    Ok(dir)
}

/// The command that stops the server on `dir`, as the user would type it.
pub fn stop_command(cfg: &PgConfig, dir: &Path) -> String {
    use super::quote::shell_quote;
    let pg_ctl = cfg.bin_dir.join("pg_ctl");
    let cmd = format!(
        "{} -D {} -m fast stop",
        shell_quote(&pg_ctl.to_string_lossy()),
        shell_quote(&dir.to_string_lossy())
    );
    if super::server::is_root() {
        format!("runuser -u {} -- {cmd}", shell_quote(&cfg.os_user))
    } else {
        cmd
    }
}

/// The database user a restore waits for promotion as: the cluster's
/// conninfo user (a role the restored cluster has), else the verify user.
pub fn default_connect_user(cfg: &PgConfig) -> String {
    super::tls::split(&cfg.conninfo)
        .ok()
        .and_then(|s| s.conninfo.parse::<tokio_postgres::Config>().ok())
        .and_then(|c| c.get_user().map(str::to_string))
        .unwrap_or_else(|| cfg.verify.user.clone())
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

/// A `--tablespace-map` directory must be empty or absent (then created).
fn check_target_dir(dir: &Path) -> Result<(), PgError> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(PgError::Other(format!(
                    "--tablespace-map directory {} is not empty; map the tablespace to an \
                     empty or new directory (dr never overwrites an existing one)",
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

/// What a restore target holds, read before anything is written.
#[derive(Debug)]
enum Found {
    /// Nothing there: the restore creates it.
    Absent,
    /// An empty directory.
    Empty,
    /// A data directory (`PG_VERSION` and `global/pg_control`), or what an
    /// interrupted restore left (its marker names the system).
    DataDir {
        /// The system identifier it belongs to.
        system_id: u64,
        /// Left by a restore that did not finish.
        interrupted: bool,
    },
    /// Anything else, described for the user.
    Other(String),
}

/// Marks a target a restore is writing, with the backup's system identifier,
/// so a restore that was killed is recognised (its `pg_control` may still be
/// zeros) and can be finished with `--delta`. Removed once the restore is
/// complete.
const INCOMPLETE: &str = "dr-restore-incomplete";

/// Reads what `dir` holds, without changing anything.
fn inspect_target(dir: &Path) -> Result<Found, PgError> {
    if !dir.is_absolute() {
        return Err(PgError::Other(format!(
            "--target {} must be an absolute path",
            dir.display()
        )));
    }
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
        Err(e) => return Err(PgError::io(dir, e)),
    };
    if names.is_empty() {
        return Ok(Found::Empty);
    }
    if let Some(id) = std::fs::read_to_string(dir.join(INCOMPLETE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
    {
        return Ok(Found::DataDir {
            system_id: id,
            interrupted: true,
        });
    }
    if dir.join("PG_VERSION").is_file() {
        return Ok(match super::system_id(dir) {
            Ok(id) => Found::DataDir {
                system_id: id,
                interrupted: false,
            },
            Err(e) => Found::Other(format!("PG_VERSION but no usable global/pg_control: {e}")),
        });
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    Ok(Found::Other(format!(
        "{} entries such as {}, and no PG_VERSION",
        names.len(),
        shown.join(", ")
    )))
}

/// Refuses a target the restore must not write into: a non-empty one
/// without `--delta`, and with `--delta` anything but a stopped data
/// directory of the backup's cluster (`backup_system`).
fn accept_target(
    dir: &Path,
    found: &Found,
    backup_system: u64,
    opts: &RestoreOptions,
) -> Result<(), PgError> {
    let d = dir.display();
    let err = |m: String| Err(PgError::Other(m));
    match (found, opts.delta) {
        (Found::Absent | Found::Empty, _) => Ok(()),
        (
            Found::DataDir {
                system_id,
                interrupted,
            },
            false,
        ) => {
            let what = if *interrupted {
                "the partial data directory of an interrupted restore"
            } else {
                "a data directory"
            };
            if *system_id == backup_system {
                err(format!(
                    "--target {d} is not empty: it holds {what} of this cluster (system \
                     identifier {system_id}); add --delta to bring it to the backup (only \
                     blocks that differ are rewritten), or remove it (rm -rf {d}) and restore again"
                ))
            } else {
                err(format!(
                    "--target {d} is not empty: it holds {what} of another cluster (system \
                     identifier {system_id}; the backup's is {backup_system}); remove it or \
                     restore into an empty or new directory"
                ))
            }
        }
        (Found::Other(what), false) => err(format!(
            "--target {d} is not empty ({what}); restore into an empty or new directory, \
             or remove what is there (dr never overwrites an existing directory)"
        )),
        (Found::Other(what), true) => err(format!(
            "--delta --target {d}: not a PostgreSQL data directory ({what}); --delta removes \
             every file the backup lacks, so it only updates a data directory of the same \
             cluster. Nothing was changed: restore into an empty or new directory instead, \
             or point --target at the data directory"
        )),
        (Found::DataDir { system_id, .. }, true)
            if *system_id != backup_system && !opts.replace_other_cluster =>
        {
            err(format!(
                "--delta --target {d} holds the data directory of another cluster (system \
                 identifier {system_id}; the backup's is {backup_system}); --delta would \
                 replace it entirely, so nothing was changed: remove it (rm -rf {d}) or \
                 restore into an empty or new directory"
            ))
        }
        (Found::DataDir { .. }, true) => refuse_running(dir),
    }
}

/// `--delta` needs a data directory that no server is using.
fn refuse_running(dir: &Path) -> Result<(), PgError> {
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

/// Removes the [`INCOMPLETE`] marker of a finished restore, durably.
fn complete(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(INCOMPLETE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(dir)?.sync_all()
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
            if child.as_os_str() == INCOMPLETE {
                continue;
            }
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
    let marker = dir.join(INCOMPLETE);
    std::fs::write(&marker, m.system_id.to_string())
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| PgError::io(&marker, e))?;
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

/// The recovery settings of `opts`, quoted for postgresql.auto.conf; built
/// before anything is written so a value that cannot be written is refused
/// first.
/// How recovery stops for a time target.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// `recovery_target_time` (or the extra target asked for).
    AsAsked,
    /// At consistency: nothing committed between the backup's end and the
    /// target.
    Immediate,
    /// Right after the last commit, which is the target.
    AfterLsn(super::Lsn),
}

fn recovery_settings(
    opts: &RestoreOptions,
    timeline: u32,
    stop: Stop,
) -> Result<Vec<String>, PgError> {
    use super::quote::conf_line;
    let mut lines = vec![
        conf_line(
            "restore_command",
            &format!("{} %f %p", opts.restore_command),
        )?,
        // Never 'latest': a stray branch (a restored copy that archived)
        // must not be followed away from the target's own history.
        format!("recovery_target_timeline = '{timeline}'"),
        "recovery_target_action = 'promote'".to_string(),
    ];
    let extra = &opts.extra;
    let has_extra = extra.lsn.is_some() || extra.xid.is_some() || extra.name.is_some();
    match (stop, has_extra) {
        (Stop::Immediate, false) => lines.push("recovery_target = 'immediate'".to_string()),
        (Stop::AfterLsn(lsn), false) => {
            lines.push(conf_line("recovery_target_lsn", &lsn.to_string())?);
        }
        _ => {}
    }
    if let (Target::Time(t), false, Stop::AsAsked) = (&opts.target, has_extra, stop) {
        let t = t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        lines.push(conf_line("recovery_target_time", &t)?);
    }
    if let Some(l) = &extra.lsn {
        lines.push(conf_line("recovery_target_lsn", l)?);
    }
    if let Some(x) = &extra.xid {
        lines.push(conf_line("recovery_target_xid", x)?);
    }
    if let Some(n) = &extra.name {
        lines.push(conf_line("recovery_target_name", n)?);
    }
    Ok(lines)
}

fn write_recovery(m: &PgManifest, dir: &Path, settings: &[String]) -> std::io::Result<()> {
    std::fs::write(dir.join("backup_label"), &m.backup_label)?;
    // No tablespace_map: it would make PostgreSQL relink pg_tblspc to the
    // original locations. dr has already placed each tablespace (in place,
    // or linked to its --tablespace-map directory).
    std::fs::write(dir.join("recovery.signal"), b"")?;
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("postgresql.auto.conf"))?;
    writeln!(
        conf,
        "\n# Added by dr restore of backup {}\n{}",
        m.id,
        settings.join("\n")
    )?;
    conf.sync_all()
}

pub use crate::time::parse_time;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_targets_are_checked_as_postgresql_reads_them() {
        let lsn = |l: &str| ExtraTarget {
            lsn: Some(l.into()),
            ..Default::default()
        };
        let xid = |x: &str| ExtraTarget {
            xid: Some(x.into()),
            ..Default::default()
        };
        let name = |n: &str| ExtraTarget {
            name: Some(n.into()),
            ..Default::default()
        };
        for ok in ["0/16B3748", "FFFFFFFF/ffffffff", "1/0"] {
            assert!(lsn(ok).validate().is_ok(), "{ok}");
        }
        for bad in ["zz", "0/", "/1", "0/1/2", "123456789/0", "+1/0", "0/1 "] {
            assert!(lsn(bad).validate().is_err(), "{bad}");
        }
        for ok in ["3", "7431", "18446744073709551615"] {
            assert!(xid(ok).validate().is_ok(), "{ok}");
        }
        for bad in [
            "abc",
            "",
            "0",
            "2",
            "-5",
            "+7",
            "0x10",
            "18446744073709551616",
        ] {
            assert!(xid(bad).validate().is_err(), "{bad}");
        }
        assert!(name("a'b\\c").validate().is_ok());
        for bad in ["", "a\nb", "a\0b", &"x".repeat(64)] {
            assert!(name(bad).validate().is_err(), "{bad:?}");
        }
    }

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
