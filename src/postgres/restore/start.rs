//! Starting a restored server on a private socket and waiting until it
//! reaches the target and is promoted.

use super::*;

/// Starts the restored server, waits until recovery reaches the target and
/// promotes it, and records in `report` where it runs.
pub(super) async fn start_and_wait(
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
            crate::postgres::quote::list_element(&dir)
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
    crate::postgres::server::chown_to(&opts.dir.join("log"), &cfg.os_user).await?;
    let loopback = opts.conninfo.is_none().then_some(port);
    crate::postgres::server::start_with(
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
    let spool = crate::postgres::wal::spool_dir(cfg, &opts.dir);
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
pub(super) async fn wait_promoted(
    opts: &RestoreOptions,
    port: u16,
    host: &str,
    log: &Path,
    report: &mut RestoreReport,
) -> Result<(), PgError> {
    let client = match &opts.conninfo {
        Some(c) => connect_retrying(c, Duration::from_secs(60)).await?,
        None => {
            crate::postgres::server::connect_local_at(
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
                    crate::postgres::server::log_tail(log)
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
                crate::postgres::server::log_tail(log)
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
pub(super) const SOCKET_PATH_MAX: usize = 107;

/// Creates the private socket directory (mode 0700, owned by the OS user)
/// and its pg_hba.conf: trust on that socket, which only the OS user and
/// root can open, then the restored cluster's own rules for TCP. Inside the
/// target unless the socket path would be too long, else in the temp
/// directory.
pub(super) async fn private_socket(
    data: &Path,
    port: u16,
    os_user: &str,
) -> Result<PathBuf, PgError> {
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
    crate::postgres::server::chown_to(&dir, os_user).await?;
    Ok(dir)
}

/// The command that stops the server on `dir`, as the user would type it.
pub fn stop_command(cfg: &PgConfig, dir: &Path) -> String {
    use crate::postgres::quote::shell_quote;
    let pg_ctl = cfg.bin_dir.join("pg_ctl");
    let cmd = format!(
        "{} -D {} -m fast stop",
        shell_quote(&pg_ctl.to_string_lossy()),
        shell_quote(&dir.to_string_lossy())
    );
    if crate::postgres::server::is_root() {
        format!("runuser -u {} -- {cmd}", shell_quote(&cfg.os_user))
    } else {
        cmd
    }
}

/// The database user a restore waits for promotion as: the cluster's
/// conninfo user (a role the restored cluster has), else the verify user.
pub fn default_connect_user(cfg: &PgConfig) -> String {
    crate::postgres::tls::split(&cfg.conninfo)
        .ok()
        .and_then(|s| s.conninfo.parse::<tokio_postgres::Config>().ok())
        .and_then(|c| c.get_user().map(str::to_string))
        .unwrap_or_else(|| cfg.verify.user.clone())
}

/// Connects with `conninfo`, retrying while the server starts up.
pub(super) async fn connect_retrying(
    conninfo: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, PgError> {
    let deadline = Instant::now() + timeout;
    loop {
        match crate::postgres::connect_to(conninfo, Some(Duration::from_secs(5))).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
