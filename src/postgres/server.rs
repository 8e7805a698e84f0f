//! Starting and stopping PostgreSQL servers that `dr` restored, as the
//! configured unprivileged OS user (PostgreSQL refuses to run as root).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::PgError;

pub use crate::os::{as_user, is_root};

/// Gives `dir` (recursively) to `os_user` when running as root.
pub async fn chown_to(dir: &Path, os_user: &str) -> Result<(), PgError> {
    crate::os::chown_to(dir, os_user)
        .await
        .map_err(|e| PgError::Other(e.to_string()))
}

/// Starts PostgreSQL on `data_dir`, listening only on 127.0.0.1:`port`, and
/// waits until it accepts connections. `extra` are `name=value` settings
/// passed as `-c`; one naming `port`, `listen_addresses` or
/// `unix_socket_directories` replaces that default.
pub async fn start(
    bin_dir: &Path,
    os_user: &str,
    data_dir: &Path,
    port: u16,
    extra: &[String],
    log: &Path,
) -> Result<(), PgError> {
    start_with(bin_dir, os_user, data_dir, Some(port), extra, log).await
}

/// Like [`start`]; with `loopback_port` `None` the server listens as its own
/// configuration says (a staging server that stays in service).
pub async fn start_with(
    bin_dir: &Path,
    os_user: &str,
    data_dir: &Path,
    loopback_port: Option<u16>,
    extra: &[String],
    log: &Path,
) -> Result<(), PgError> {
    let port = loopback_port.map(|p| p.to_string());
    let defaults: Vec<(&str, &str)> = match &port {
        Some(p) => vec![
            ("port", p.as_str()),
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", ""),
        ],
        None => Vec::new(),
    };
    let overridden = |k: &str| {
        extra
            .iter()
            .any(|e| e.split_once('=').is_some_and(|(n, _)| n.trim() == k))
    };
    let mut settings: Vec<String> = defaults
        .iter()
        .filter(|(k, _)| !overridden(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    settings.extend(extra.iter().cloned());
    let opts = settings
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            // pg_ctl hands -o to /bin/sh.
            format!(
                "-c {}",
                super::quote::shell_quote(&format!("{}={v}", k.trim()))
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let out = as_user(os_user, &bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(data_dir)
        .arg("-l")
        .arg(log)
        .arg("-o")
        .arg(&opts)
        .arg("-w")
        .arg("-t")
        .arg("3600")
        .arg("start")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            PgError::Other(format!(
                "cannot run {}/pg_ctl: {e}; set bin_dir",
                bin_dir.display()
            ))
        })?;
    if !out.status.success() {
        return Err(PgError::Other(format!(
            "PostgreSQL did not start on {}: {}{}",
            data_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            log_tail(log)
        )));
    }
    Ok(())
}

/// The last lines of a server log, indented, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = lines.into_iter().rev().collect();
    format!(
        "\n  server log {}:\n  {}",
        log.display(),
        lines.join("\n  ")
    )
}

/// Stops the server on `data_dir` (fast mode).
pub async fn stop(bin_dir: &Path, os_user: &str, data_dir: &Path) -> Result<(), PgError> {
    let st = as_user(os_user, &bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(data_dir)
        .args(["-m", "fast", "-w", "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| PgError::io(data_dir, e))?;
    if !st.success() {
        return Err(PgError::Other(format!(
            "pg_ctl stop failed for {}",
            data_dir.display()
        )));
    }
    Ok(())
}

/// Connects to a server `dr` started on loopback, retrying while it starts.
pub async fn connect_local(
    port: u16,
    user: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, PgError> {
    connect_local_at("127.0.0.1", port, user, "postgres", timeout).await
}

/// Connects to a server `dr` started, on `host` (127.0.0.1 or a socket
/// directory), retrying while it starts.
pub async fn connect_local_at(
    host: &str,
    port: u16,
    user: &str,
    dbname: &str,
    timeout: Duration,
) -> Result<tokio_postgres::Client, PgError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(host).port(port).user(user).dbname(dbname);
        match cfg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return Ok(client);
            }
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(PgError::Sql {
                    what: format!("connect to {host}:{port}"),
                    source: e,
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
