//! A client for PostgreSQL's streaming replication protocol.
//!
//! tokio-postgres cannot open a `replication=true` connection, so this speaks
//! the wire protocol itself with `postgres-protocol`'s message types: startup,
//! trust/password/md5/SCRAM-SHA-256 authentication, TLS (the same rustls
//! settings as every other PostgreSQL connection), simple queries, and the
//! CopyBoth/CopyOut sub-protocols used by `START_REPLICATION` and
//! `BASE_BACKUP`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Lsn, PgError};

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// What `IDENTIFY_SYSTEM` returns.
#[derive(Debug, Clone, Copy)]
pub struct SystemInfo {
    /// Database system identifier.
    pub system_id: u64,
    /// The server's current timeline.
    pub timeline: u32,
    /// Current WAL flush location.
    pub xlogpos: Lsn,
}

/// One message of a `START_REPLICATION` stream.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// WAL bytes starting at `start`.
    XLogData {
        /// Location of the first byte.
        start: Lsn,
        /// The server's current end of WAL.
        server_end: Lsn,
        /// The WAL itself.
        data: Bytes,
    },
    /// A keep-alive; `reply` asks for a status update now.
    Keepalive {
        /// The server's current end of WAL.
        server_end: Lsn,
        /// Whether the server wants an immediate reply.
        reply: bool,
    },
    /// The server ended the stream: the timeline ended (it was promoted
    /// past, or the server is shutting down). Call
    /// [`ReplicationConn::finish_copy`] next.
    End,
}

/// What `BASE_BACKUP` reports before the archives.
#[derive(Debug, Clone)]
pub struct BaseBackupStart {
    /// Where WAL replay starts (the backup's checkpoint redo position).
    pub start_lsn: Lsn,
    /// Timeline at start.
    pub timeline: u32,
    /// Tablespaces, the main data directory last (oid and location `None`).
    pub tablespaces: Vec<BackupTablespace>,
}

/// A tablespace `BASE_BACKUP` will send.
#[derive(Debug, Clone)]
pub struct BackupTablespace {
    /// Its OID; `None` for the main data directory.
    pub oid: Option<u32>,
    /// Its directory on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Approximate size in KiB (with `PROGRESS`).
    pub size_kb: Option<u64>,
}

/// One message of a `BASE_BACKUP` stream.
#[derive(Debug)]
pub enum BaseBackupMessage {
    /// A new tar archive starts: `base.tar` or `<oid>.tar`.
    NewArchive {
        /// Archive name.
        name: String,
        /// The tablespace's directory on the server (`None` for PGDATA).
        location: Option<String>,
    },
    /// Bytes of the current archive.
    ArchiveData(Bytes),
    /// Bytes of the server's `backup_manifest`.
    ManifestData(Bytes),
    /// Bytes the server has sent so far.
    Progress(u64),
}

/// An open replication connection.
pub struct ReplicationConn {
    sock: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Server parameters reported at startup (`server_version`, …).
    pub params: HashMap<String, String>,
    describe: String,
    /// Inside a `BASE_BACKUP` stream, after the 'm' (manifest) message.
    in_manifest: bool,
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

fn pg_now() -> i64 {
    let us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    us - PG_EPOCH_OFFSET_US
}

/// The server's bytes broke the protocol: permanent.
fn proto(what: &str, e: impl std::fmt::Display) -> PgError {
    PgError::Protocol {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// The connection failed or dropped: transient.
fn lost(server: &str, what: &str, source: std::io::Error) -> PgError {
    PgError::Connection {
        server: server.to_string(),
        what: what.to_string(),
        source,
    }
}

mod base_backup;
mod physical;
#[cfg(test)]
mod props;
mod replay;
#[cfg(test)]
mod tests;
mod wire;

pub use replay::{BaseBackupRead, replay_base_backup, replay_stream};
use wire::*;

impl ReplicationConn {
    /// Opens a physical replication connection (`replication=true`) with
    /// the server named by `conninfo`, as `application_name` — the name
    /// `synchronous_standby_names` refers to.
    pub async fn connect(conninfo: &str, application_name: &str) -> Result<Self, PgError> {
        let split = super::tls::split(conninfo)?;
        let cfg: tokio_postgres::Config = split
            .conninfo
            .parse()
            .map_err(|e| PgError::Other(format!("conninfo: {e}")))?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .ok_or_else(|| PgError::Other("conninfo has no user".into()))?;
        let host =
            cfg.get_hosts().first().cloned().unwrap_or_else(|| {
                tokio_postgres::config::Host::Unix("/var/run/postgresql".into())
            });
        let connect_timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(30));
        let (sock, describe, tls_name): (Box<dyn Socket>, String, Option<String>) = match &host {
            tokio_postgres::config::Host::Tcp(h) => {
                let s = tokio::time::timeout(
                    connect_timeout,
                    tokio::net::TcpStream::connect((h.as_str(), port)),
                )
                .await
                .map_err(|_| {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {connect_timeout:?} (connect_timeout)"),
                    );
                    lost(&format!("{h}:{port}"), "connect", e)
                })?
                .map_err(|e| lost(&format!("{h}:{port}"), "connect", e))?;
                let _ = s.set_nodelay(true);
                (Box::new(s), format!("{h}:{port}"), Some(h.clone()))
            }
            tokio_postgres::config::Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| lost(&path.display().to_string(), "connect", e))?;
                (Box::new(s), path.display().to_string(), None)
            }
        };
        let mut conn = ReplicationConn {
            sock,
            rbuf: BytesMut::with_capacity(64 << 10),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            describe,
            in_manifest: false,
        };
        if split.sslmode != "disable" {
            conn = conn.start_tls(&split, tls_name).await?;
        }
        let dbname = cfg.get_dbname().unwrap_or("postgres").to_string();
        conn.startup(&user, &dbname, application_name, cfg.get_password())
            .await?;
        Ok(conn)
    }

    async fn start_tls(
        mut self,
        split: &super::tls::SplitConninfo,
        host: Option<String>,
    ) -> Result<Self, PgError> {
        frontend::ssl_request(&mut self.wbuf);
        self.flush().await?;
        let mut answer = [0u8; 1];
        self.sock
            .read_exact(&mut answer)
            .await
            .map_err(|e| lost(&self.describe, "TLS negotiation", e))?;
        let required = !matches!(split.sslmode.as_str(), "allow" | "prefer");
        match answer[0] {
            b'S' => {}
            b'N' if !required => return Ok(self),
            b'N' => {
                return Err(PgError::Other(format!(
                    "{}: the server does not accept TLS but sslmode={} requires it",
                    self.describe, split.sslmode
                )));
            }
            other => {
                return Err(proto(
                    "TLS negotiation",
                    format!("unexpected reply {other:#x}"),
                ));
            }
        }
        let Some(host) = host else {
            // Over a Unix socket there is no host name to verify.
            return Err(PgError::Other(
                "TLS over a Unix socket is not supported; use host=<name> or sslmode=disable"
                    .into(),
            ));
        };
        let client = split.sslcert.as_deref().zip(split.sslkey.as_deref());
        let config = crate::tls::client_config(split.sslrootcert.as_deref(), client)
            .map_err(|e| PgError::Other(format!("TLS settings in conninfo: {e}")))?;
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| PgError::Other(format!("TLS server name {host:?}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let tls = connector
            .connect(name, self.sock)
            .await
            .map_err(|e| PgError::Other(format!("TLS handshake with {host}: {e}")))?;
        self.sock = Box::new(tls);
        Ok(self)
    }

    async fn startup(
        &mut self,
        user: &str,
        dbname: &str,
        application_name: &str,
        password: Option<&[u8]>,
    ) -> Result<(), PgError> {
        let params = [
            ("user", user),
            ("database", dbname),
            ("replication", "true"),
            ("application_name", application_name),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| proto("startup", e))?;
        self.flush().await?;
        let describe = self.describe.clone();
        let need_password = || {
            password.ok_or_else(|| {
                PgError::Other(format!(
                    "{describe}: the server asks user {user} for a password and the conninfo has none"
                ))
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.recv().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = need_password()?;
                    frontend::password_message(pw, &mut self.wbuf)
                        .map_err(|e| proto("password", e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = need_password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| proto("password", e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = need_password()?;
                    let mut offered = Vec::new();
                    let mut it = body.mechanisms();
                    while let Some(m) = fallible_next(&mut it)? {
                        offered.push(m.to_string());
                    }
                    if !offered.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(PgError::Other(format!(
                            "{}: the server offers SASL mechanisms {offered:?}; dr supports {SCRAM_SHA_256}",
                            self.describe
                        )));
                    }
                    let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)
                        .map_err(|e| proto("SCRAM", e))?;
                    self.flush().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| proto("SCRAM", "continue before start"))?;
                    s.update(body.data()).map_err(|e| proto("SCRAM", e))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)
                        .map_err(|e| proto("SCRAM", e))?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| proto("SCRAM", "final before start"))?;
                    s.finish(body.data())
                        .map_err(|e| proto("SCRAM server signature", e))?;
                }
                backend::Message::ParameterStatus(p) => {
                    let name = p.name().map_err(|e| proto("startup", e))?;
                    let value = p.value().map_err(|e| proto("startup", e))?;
                    self.params.insert(name.to_string(), value.to_string());
                }
                backend::Message::BackendKeyData(_) | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(e) => {
                    return Err(server_error(
                        &self.describe,
                        &format!("replication connection as {user}"),
                        &e,
                    ));
                }
                _ => {
                    return Err(proto(
                        "startup",
                        "unsupported authentication method (use trust, password, md5, scram-sha-256 or cert)",
                    ));
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<(), PgError> {
        let buf = self.wbuf.split();
        self.sock
            .write_all(&buf)
            .await
            .map_err(|e| lost(&self.describe, "write", e))?;
        self.sock
            .flush()
            .await
            .map_err(|e| lost(&self.describe, "write", e))
    }

    /// Reads the next message. Cancel-safe: a message is consumed only
    /// once whole. `W` (CopyBothResponse), which postgres-protocol does not
    /// know, comes back as a `CopyOutResponse`-like marker via [`Frame`].
    async fn recv_frame(&mut self) -> Result<Frame, PgError> {
        loop {
            if let Some(f) = next_frame(&mut self.rbuf)? {
                return Ok(f);
            }
            let n = self
                .sock
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| lost(&self.describe, "read", e))?;
            if n == 0 {
                return Err(lost(
                    &self.describe,
                    "read",
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                ));
            }
        }
    }

    async fn recv(&mut self) -> Result<backend::Message, PgError> {
        match self.recv_frame().await? {
            Frame::Msg(m) => Ok(m),
            Frame::CopyBoth => Err(proto("read", "unexpected CopyBothResponse")),
        }
    }

    /// Runs a replication command and returns its rows (raw column values).
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<Bytes>>>, PgError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| proto("query", e))?;
        self.flush().await?;
        self.collect_rows(sql).await
    }

    async fn collect_rows(&mut self, what: &str) -> Result<Vec<Vec<Option<Bytes>>>, PgError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                backend::Message::DataRow(row) => rows.push(row_values(&row)?),
                backend::Message::ErrorResponse(e) => {
                    error = Some(server_error(&self.describe, what, &e));
                }
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}
