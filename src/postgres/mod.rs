//! PostgreSQL: base backups, WAL archiving, catalog and point-in-time restore.

pub mod backup;
pub mod catalog;
pub mod checksum;
pub mod manifest;
pub mod pieces;
pub mod quote;
pub mod replication;
pub mod restore;
pub mod server;
pub mod stream;
pub mod timeline;
pub mod tls;
pub mod wal;
pub mod wal_header;
pub mod wal_records;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::config::{Config, ConfigError, PgConfig};

/// Errors talking to or reading PostgreSQL, with guidance.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Could not connect or a query failed.
    #[error("PostgreSQL {what}: {}", sql_cause(source))]
    Sql {
        /// What was being done.
        what: String,
        /// Cause.
        source: tokio_postgres::Error,
    },
    /// Could not connect: names the address tried and the likely fix.
    #[error(
        "cannot connect to PostgreSQL at {addr}: {}{}",
        sql_cause(source),
        connect_hint(source, addr)
    )]
    Connect {
        /// Host and port, or the socket file.
        addr: String,
        /// Cause.
        source: tokio_postgres::Error,
    },
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The replication connection could not be opened or was lost (I/O
    /// error, timeout, closed by the server); a later attempt may succeed.
    #[error(
        "{server}: replication connection failed during {what}: {source}; check that the server \
         is running and reachable (scheduled runs retry it)"
    )]
    Connection {
        /// The server (`host:port` or socket path).
        server: String,
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server refused a replication command or the connection
    /// (`ErrorResponse`), with its SQLSTATE.
    #[error("{server}: {what}: {severity} {code}: {message}")]
    Server {
        /// The server (`host:port` or socket path).
        server: String,
        /// What was being done.
        what: String,
        /// ERROR, FATAL or PANIC.
        severity: String,
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server's bytes do not follow the replication protocol as dr
    /// speaks it; the same server would answer the same way again.
    #[error(
        "replication connection: {what}: {message}; the server's answer does not follow the \
         PostgreSQL 15+ replication protocol dr expects"
    )]
    Protocol {
        /// What was being read.
        what: String,
        /// What was wrong.
        message: String,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
    /// Repository failure.
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
}

/// The server's own message for a [`PgError`], without the driver's
/// "db error:" wrapping.
pub fn pg_cause(e: &PgError) -> String {
    match e {
        PgError::Sql { source, .. } => sql_cause(source),
        other => other.to_string(),
    }
}

/// The server's own words for a PostgreSQL error (message, detail, hint),
/// or the connection failure with its causes, instead of the driver's bare
/// "db error" / "error connecting to server".
pub fn sql_cause(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" ({d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                let t = c.to_string();
                if !s.contains(&t) {
                    s = format!("{s}: {t}");
                }
                src = c.source();
            }
            s
        }
    }
}

/// What usually fixes a failed connection, from its cause ("" when there
/// is nothing better to say than the cause itself).
fn connect_hint(e: &tokio_postgres::Error, addr: &str) -> String {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return match code {
            "28P01" | "28000" => "; check the user and password (password= in conninfo, \
                                  PGPASSWORD or ~/.pgpass) and the pg_hba.conf line for this client"
                .into(),
            "3D000" => "; set dbname= in conninfo to a database that exists".into(),
            _ => String::new(),
        };
    }
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            let socket = addr.starts_with('/');
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused if socket => {
                    "; the socket exists but nothing accepts on it: is the server running?".into()
                }
                std::io::ErrorKind::ConnectionRefused => "; nothing listens there: is the server \
                     running, and do host and port in conninfo match its listen_addresses and port?"
                    .into(),
                std::io::ErrorKind::NotFound if socket => "; no such socket: is the server \
                     running, with this directory in unix_socket_directories and this port?"
                    .into(),
                std::io::ErrorKind::PermissionDenied => {
                    "; this OS user may not open it: run dr as the user the server expects".into()
                }
                _ => String::new(),
            };
        }
        src = c.source();
    }
    if e.to_string().contains("timeout") {
        return "; no answer in time: check the host, any firewall, or raise connect_timeout in conninfo"
            .into();
    }
    String::new()
}

/// The address a connection tries first: `host:port`, or the socket file.
fn first_address(pc: &tokio_postgres::Config) -> String {
    let port = pc.get_ports().first().copied().unwrap_or(5432);
    match pc.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => format!("{h}:{port}"),
        Some(tokio_postgres::config::Host::Unix(dir)) => {
            format!("{}/.s.PGSQL.{port}", dir.display())
        }
        None => format!("(no host in conninfo):{port}"),
    }
}

impl PgError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> PgError {
        PgError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

impl PgError {
    /// True when retrying later may help: the server was unreachable, shut
    /// down, or out of resources, or storage failed transiently. SQL errors
    /// that would fail the same way again (permissions, configuration) are
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Sql { source, .. } | PgError::Connect { source, .. } => match source.code() {
                // No SQLSTATE: the connection failed or was closed.
                None => true,
                Some(code) => transient_sqlstate(code.code()),
            },
            PgError::Server { code, .. } => transient_sqlstate(code),
            PgError::Io { .. } | PgError::Connection { .. } => true,
            PgError::Protocol { .. } => false,
            PgError::Repo(e) => e.is_transient(),
            PgError::Other(_) => false,
        }
    }
}

/// SQLSTATEs after which the same request may succeed later: 08 connection
/// exception, 53 insufficient resources, 57P0x shutdown / cannot connect
/// now, 40 rollback (serialization failure, deadlock).
fn transient_sqlstate(c: &str) -> bool {
    c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") || c.starts_with("40")
}

impl From<crate::store::RegionsError> for PgError {
    fn from(e: crate::store::RegionsError) -> Self {
        PgError::Repo(e.into())
    }
}

impl From<crate::codec::CodecError> for PgError {
    fn from(e: crate::codec::CodecError) -> Self {
        PgError::Repo(e.into())
    }
}

/// A WAL location.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN (expected e.g. 0/16B3748)"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        if hi > 0xffff_ffff || lo > 0xffff_ffff {
            return Err(format!("{s:?} is not an LSN"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

impl From<Lsn> for String {
    fn from(l: Lsn) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Lsn {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Default WAL segment size.
pub const WAL_SEGMENT_SIZE: u64 = 16 << 20;

/// Reads the database system identifier from `global/pg_control` (its first
/// eight bytes, native-endian). No connection needed, so `wal-push` stays cheap.
pub fn system_id(data_dir: &Path) -> Result<u64, PgError> {
    let p = data_dir.join("global/pg_control");
    let bytes = std::fs::read(&p).map_err(|e| {
        PgError::Other(format!(
            "cannot read {}: {e}; is {} a PostgreSQL data directory?",
            p.display(),
            data_dir.display()
        ))
    })?;
    let Some(first) = bytes.get(..8) else {
        return Err(PgError::Other(format!(
            "{} is too short to be pg_control",
            p.display()
        )));
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(first);
    Ok(u64::from_ne_bytes(b))
}

/// The data directory `wal-push` / `wal-fetch` work for. PostgreSQL runs
/// archive_command and restore_command in PGDATA, so the working directory
/// wins when it holds `global/pg_control` (a restored copy then reports its own
/// system id); otherwise the configured `data_dir`.
pub fn archive_data_dir(cfg: &PgConfig) -> std::path::PathBuf {
    if Path::new("global/pg_control").exists() {
        std::path::PathBuf::from(".")
    } else {
        cfg.data_dir.clone()
    }
}

/// Connects with the configured conninfo. With any sslmode but `disable`, TLS
/// is negotiated and the server certificate verified; `require` and stricter
/// fail rather than fall back to plain text.
pub async fn connect(cfg: &PgConfig) -> Result<tokio_postgres::Client, PgError> {
    connect_to(&cfg.conninfo, None).await
}

/// Connects with `conninfo` as [`connect`] does. `connect_timeout` applies
/// when the conninfo sets none, so a probe of a dead host ends in time.
pub async fn connect_to(
    conninfo: &str,
    connect_timeout: Option<std::time::Duration>,
) -> Result<tokio_postgres::Client, PgError> {
    connect_db(conninfo, None, connect_timeout).await
}

/// Like [`connect_to`], to database `dbname` instead of the conninfo's.
pub async fn connect_db(
    conninfo: &str,
    dbname: Option<&str>,
    connect_timeout: Option<std::time::Duration>,
) -> Result<tokio_postgres::Client, PgError> {
    let split = tls::split(conninfo)?;
    let mut pc: tokio_postgres::Config = split
        .conninfo
        .parse()
        .map_err(|e| PgError::Other(format!("invalid conninfo: {e}")))?;
    if let Some(db) = dbname {
        pc.dbname(db);
    }
    if let (None, Some(t)) = (pc.get_connect_timeout(), connect_timeout) {
        pc.connect_timeout(t);
    }
    let addr = first_address(&pc);
    let sql_err = |source| PgError::Connect {
        addr: addr.clone(),
        source,
    };
    let client = if split.sslmode == "disable" {
        let (client, conn) = pc.connect(tokio_postgres::NoTls).await.map_err(sql_err)?;
        spawn_connection(conn);
        client
    } else {
        let tls = tls::connector(&split)?;
        let (client, conn) = pc.connect(tls).await.map_err(sql_err)?;
        spawn_connection(conn);
        client
    };
    Ok(client)
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
}

/// Checks every conninfo in the config (sources and `[env.*]` servers)
/// with the parser that connects, so a bad one is refused with its line
/// when the config is loaded rather than at the first connection.
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    for (name, pg) in &cfg.postgres {
        check_conninfo(&pg.get_ref().conninfo)
            .map_err(|e| cfg.error_at(pg.span(), format!("[postgres.{name}]: {e}")))?;
    }
    for (env, e) in &cfg.env {
        for (server, t) in &e.get_ref().postgres {
            let section = format!("[env.{env}.postgres.{server}]");
            let p = t.get_ref();
            check_conninfo(&p.conninfo)
                .map_err(|m| cfg.error_at(t.span(), format!("{section}: {m}")))?;
            if let Some(r) = &p.replication_conninfo {
                check_conninfo(r).map_err(|m| {
                    cfg.error_at(t.span(), format!("{section}: replication_conninfo: {m}"))
                })?;
            }
        }
    }
    Ok(())
}

/// Checks that `conninfo` is one `dr` can use; the error says what to write.
fn check_conninfo(conninfo: &str) -> Result<(), String> {
    let split = tls::split(conninfo).map_err(|e| e.to_string())?;
    if split.conninfo.parse::<tokio_postgres::Config>().is_err() {
        return Err("conninfo is not a valid libpq connection string (e.g. \"host=127.0.0.1 port=5432 user=postgres dbname=postgres\")".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        let l: Lsn = "1/2A000028".parse().expect("lsn");
        assert_eq!(l.0, 0x1_2A00_0028);
        assert_eq!(l.to_string(), "1/2A000028");
        assert!("zz".parse::<Lsn>().is_err());
    }

    proptest::proptest! {
        #[test]
        fn lsns_round_trip_in_postgresql_spelling(lsn in proptest::prelude::any::<u64>()) {
            let l = Lsn(lsn);
            proptest::prop_assert_eq!(l.to_string().parse::<Lsn>(), Ok(l));
            // PostgreSQL's own spelling: upper-case hex, no leading zeros.
            proptest::prop_assert_eq!(l.to_string(), format!("{:X}/{:X}", lsn >> 32, lsn as u32));
        }
    }
}
