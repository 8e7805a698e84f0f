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

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| proto("IDENTIFY_SYSTEM", "no row"))?;
        let system_id = text(row, 0)?
            .parse()
            .map_err(|e| proto("IDENTIFY_SYSTEM systemid", e))?;
        let timeline = text(row, 1)?
            .parse()
            .map_err(|e| proto("IDENTIFY_SYSTEM timeline", e))?;
        let xlogpos = text(row, 2)?
            .parse()
            .map_err(|e| proto("IDENTIFY_SYSTEM xlogpos", e))?;
        Ok(SystemInfo {
            system_id,
            timeline,
            xlogpos,
        })
    }

    /// `SHOW name`, e.g. `wal_segment_size`.
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        let rows = self.query(&format!("SHOW {name}")).await?;
        let row = rows.first().ok_or_else(|| proto("SHOW", "no row"))?;
        text(row, 0)
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<(String, Bytes), PgError> {
        let rows = self.query(&format!("TIMELINE_HISTORY {timeline}")).await?;
        let row = rows
            .first()
            .ok_or_else(|| proto("TIMELINE_HISTORY", "no row"))?;
        let content = row
            .get(1)
            .cloned()
            .flatten()
            .ok_or_else(|| proto("TIMELINE_HISTORY", "no content"))?;
        Ok((text(row, 0)?, content))
    }

    /// `READ_REPLICATION_SLOT name`: the slot's restart LSN and timeline, or
    /// `None` when the slot does not exist.
    pub async fn read_slot(&mut self, slot: &str) -> Result<Option<(Lsn, u32)>, PgError> {
        let rows = self
            .query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        if row.first().cloned().flatten().is_none() {
            return Ok(None);
        }
        let lsn = row.get(1).cloned().flatten();
        let tli = row.get(2).cloned().flatten();
        match (lsn, tli) {
            (Some(l), Some(t)) => {
                let l = std::str::from_utf8(&l).map_err(|e| proto("READ_REPLICATION_SLOT", e))?;
                let t = std::str::from_utf8(&t).map_err(|e| proto("READ_REPLICATION_SLOT", e))?;
                Ok(Some((
                    l.parse().map_err(|e| proto("READ_REPLICATION_SLOT", e))?,
                    t.parse().map_err(|e| proto("READ_REPLICATION_SLOT", e))?,
                )))
            }
            // A slot that has not reserved WAL yet.
            _ => Ok(Some((Lsn(0), 0))),
        }
    }

    /// `CREATE_REPLICATION_SLOT name PHYSICAL RESERVE_WAL`.
    pub async fn create_slot(&mut self, slot: &str) -> Result<(), PgError> {
        self.query(&format!(
            "CREATE_REPLICATION_SLOT {} PHYSICAL (RESERVE_WAL)",
            quote_ident(slot)
        ))
        .await
        .map(|_| ())
    }

    /// `START_REPLICATION SLOT s PHYSICAL lsn TIMELINE tli`; then read with
    /// [`ReplicationConn::next_message`].
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        timeline: u32,
    ) -> Result<(), PgError> {
        let sql = format!(
            "START_REPLICATION SLOT {} PHYSICAL {start} TIMELINE {timeline}",
            quote_ident(slot)
        );
        frontend::query(&sql, &mut self.wbuf).map_err(|e| proto("query", e))?;
        self.flush().await?;
        loop {
            match self.recv_frame().await? {
                Frame::CopyBoth => return Ok(()),
                Frame::Msg(backend::Message::ErrorResponse(e)) => {
                    let err = server_error(&self.describe, &sql, &e);
                    // The error is followed by ReadyForQuery.
                    let _ = self.collect_rows(&sql).await;
                    return Err(err);
                }
                Frame::Msg(backend::Message::NoticeResponse(_)) => {}
                Frame::Msg(_) => return Err(proto(&sql, "unexpected reply")),
            }
        }
    }

    /// The next message of the replication stream. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage, PgError> {
        loop {
            match self.recv().await? {
                backend::Message::CopyData(body) => {
                    if let Some(m) = stream_message(body.into_bytes())? {
                        return Ok(m);
                    }
                }
                backend::Message::CopyDone => return Ok(ReplicationMessage::End),
                backend::Message::ErrorResponse(e) => {
                    return Err(server_error(&self.describe, "replication stream", &e));
                }
                _ => {}
            }
        }
    }

    /// Sends a standby status update: `written`/`flushed` positions (what
    /// a synchronous primary waits for) and whether a reply is wanted.
    pub async fn send_status(&mut self, written: Lsn, flushed: Lsn) -> Result<(), PgError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(written.0);
        msg.put_u64(flushed.0);
        // Nothing is applied: dr is an archive, not a server.
        msg.put_u64(flushed.0);
        msg.put_i64(pg_now());
        msg.put_u8(0);
        frontend::CopyData::new(&msg[..])
            .map_err(|e| proto("status update", e))?
            .write(&mut self.wbuf);
        self.flush().await
    }

    /// After [`ReplicationMessage::End`]: ends the copy and returns the next
    /// timeline and where it starts, when the server reports them.
    pub async fn finish_copy(&mut self) -> Result<Option<(u32, Lsn)>, PgError> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let rows = self.collect_rows("end of streaming").await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let tli = text(row, 0)?
            .parse()
            .map_err(|e| proto("next timeline", e))?;
        let lsn = text(row, 1)?
            .parse()
            .map_err(|e| proto("next timeline", e))?;
        Ok(Some((tli, lsn)))
    }

    /// Starts `BASE_BACKUP` with the PostgreSQL 15 CopyData framing
    /// (`TARGET 'client'`). Reads the start position and the tablespace list;
    /// then read the archives with [`ReplicationConn::base_backup_next`] and
    /// the end position with [`ReplicationConn::base_backup_end`].
    pub async fn base_backup(&mut self, label: &str) -> Result<BaseBackupStart, PgError> {
        // Page checksums are checked by dr, which records bad pages as local
        // mode does; the server would fail the whole backup instead. WAL
        // comes through the archive or the streamer, never the tar, and dr
        // waits for it itself (the server's own wait polls once a second).
        let sql = format!(
            "BASE_BACKUP (LABEL {}, TARGET 'client', PROGRESS, CHECKPOINT 'fast', WAL false, WAIT false, \
             MANIFEST 'yes', MANIFEST_CHECKSUMS 'none', TABLESPACE_MAP, VERIFY_CHECKSUMS false)",
            quote_literal(label)
        );
        frontend::query(&sql, &mut self.wbuf).map_err(|e| proto("query", e))?;
        self.flush().await?;
        let mut sets: Vec<Vec<Vec<Option<Bytes>>>> = vec![Vec::new()];
        loop {
            match self.recv().await? {
                backend::Message::DataRow(row) => {
                    if let Some(set) = sets.last_mut() {
                        set.push(row_values(&row)?);
                    }
                }
                backend::Message::CommandComplete(_) => sets.push(Vec::new()),
                backend::Message::CopyOutResponse(_) => break,
                backend::Message::ErrorResponse(e) => {
                    let err = server_error(&self.describe, "BASE_BACKUP", &e);
                    let _ = self.collect_rows(&sql).await;
                    return Err(err);
                }
                backend::Message::NoticeResponse(n) => log_notice(&self.describe, &n),
                _ => {}
            }
        }
        let start = sets
            .first()
            .and_then(|s| s.first())
            .ok_or_else(|| proto("BASE_BACKUP", "no start position"))?;
        let start_lsn = column(start, 0, "BASE_BACKUP start position")?;
        let timeline = column(start, 1, "BASE_BACKUP timeline")?;
        let mut tablespaces = Vec::new();
        for row in sets.get(1).map(Vec::as_slice).unwrap_or_default() {
            let opt = |i: usize| -> Result<Option<String>, PgError> {
                row.get(i)
                    .cloned()
                    .flatten()
                    .map(|_| text(row, i))
                    .transpose()
            };
            let oid = opt(0)?
                .map(|s| {
                    s.parse::<u32>()
                        .map_err(|e| proto("BASE_BACKUP tablespace oid", e))
                })
                .transpose()?;
            let size_kb = opt(2)?
                .map(|s| {
                    s.parse::<u64>()
                        .map_err(|e| proto("BASE_BACKUP tablespace size", e))
                })
                .transpose()?;
            tablespaces.push(BackupTablespace {
                oid,
                location: opt(1)?,
                size_kb,
            });
        }
        self.in_manifest = false;
        Ok(BaseBackupStart {
            start_lsn,
            timeline,
            tablespaces,
        })
    }

    /// The next message of a running `BASE_BACKUP`, or `None` once the
    /// server has sent everything (CopyDone). Cancel-safe.
    pub async fn base_backup_next(&mut self) -> Result<Option<BaseBackupMessage>, PgError> {
        loop {
            match self.recv().await? {
                backend::Message::CopyData(body) => {
                    let mut data = body.into_bytes();
                    if data.is_empty() {
                        continue;
                    }
                    return match data.get_u8() {
                        b'n' => {
                            let name = cstring(&mut data)?;
                            let location = cstring(&mut data)?;
                            Ok(Some(BaseBackupMessage::NewArchive {
                                name,
                                location: (!location.is_empty()).then_some(location),
                            }))
                        }
                        b'd' if self.in_manifest => Ok(Some(BaseBackupMessage::ManifestData(data))),
                        b'd' => Ok(Some(BaseBackupMessage::ArchiveData(data))),
                        b'p' if data.len() >= 8 => Ok(Some(BaseBackupMessage::Progress(
                            u64::try_from(data.get_i64()).unwrap_or(0),
                        ))),
                        b'm' => {
                            self.in_manifest = true;
                            continue;
                        }
                        other => Err(proto(
                            "BASE_BACKUP stream",
                            format!("unknown message {other:#x}"),
                        )),
                    };
                }
                backend::Message::CopyDone => return Ok(None),
                backend::Message::ErrorResponse(e) => {
                    return Err(server_error(&self.describe, "BASE_BACKUP", &e));
                }
                backend::Message::NoticeResponse(n) => log_notice(&self.describe, &n),
                _ => {}
            }
        }
    }

    /// After [`ReplicationConn::base_backup_next`] returned `None`: the end
    /// position and timeline. The server sends them only once the backup has
    /// ended, which with archiving on includes waiting for the WAL it needs.
    pub async fn base_backup_end(&mut self) -> Result<(Lsn, u32), PgError> {
        let rows = self.collect_rows("BASE_BACKUP end").await?;
        let row = rows
            .first()
            .ok_or_else(|| proto("BASE_BACKUP", "no end position"))?;
        Ok((
            column(row, 0, "BASE_BACKUP end position")?,
            column(row, 1, "BASE_BACKUP end timeline")?,
        ))
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
    }
}

enum Frame {
    Msg(backend::Message),
    CopyBoth,
}

/// Takes the next whole message off `rbuf`, or `None` until one has
/// arrived; the bytes come from the network, so any framing is an `Err`
/// at worst.
fn next_frame(rbuf: &mut BytesMut) -> Result<Option<Frame>, PgError> {
    if rbuf.len() >= 5 && rbuf[0] == b'W' {
        let len = u32::from_be_bytes([rbuf[1], rbuf[2], rbuf[3], rbuf[4]]) as usize;
        // The length counts itself: less than 4 cannot be a message.
        if len < 4 {
            return Err(proto("read", format!("message length {len} is too short")));
        }
        if rbuf.len() > len {
            rbuf.advance(len + 1);
            return Ok(Some(Frame::CopyBoth));
        }
        return Ok(None);
    }
    // The parser reserves room for the length a message announces: a
    // broken or hostile server must not make dr reserve gigabytes.
    if rbuf.len() >= 5 {
        let len = u32::from_be_bytes([rbuf[1], rbuf[2], rbuf[3], rbuf[4]]);
        if len > MAX_MESSAGE {
            return Err(proto(
                "read",
                format!("message length {len} is beyond any message the server sends"),
            ));
        }
    }
    Ok(backend::Message::parse(rbuf)
        .map_err(|e| proto("read", e))?
        .map(Frame::Msg))
}

/// The longest message accepted from the server: far above the CopyData
/// messages of WAL and base backups (at most a few hundred KiB) and the rows
/// of replication commands.
const MAX_MESSAGE: u32 = 64 << 20;

/// One CopyData payload of `START_REPLICATION`: XLogData or a keepalive,
/// `None` for an empty payload.
fn stream_message(mut data: Bytes) -> Result<Option<ReplicationMessage>, PgError> {
    if data.is_empty() {
        return Ok(None);
    }
    match data.get_u8() {
        b'w' if data.len() >= 24 => {
            let start = Lsn(data.get_u64());
            let server_end = Lsn(data.get_u64());
            let _sent = data.get_i64();
            Ok(Some(ReplicationMessage::XLogData {
                start,
                server_end,
                data,
            }))
        }
        b'k' if data.len() >= 17 => {
            let server_end = Lsn(data.get_u64());
            let _sent = data.get_i64();
            let reply = data.get_u8() != 0;
            Ok(Some(ReplicationMessage::Keepalive { server_end, reply }))
        }
        other => Err(proto(
            "replication stream",
            format!("unknown or short message {other:#x}"),
        )),
    }
}

fn fallible_next<I>(it: &mut I) -> Result<Option<I::Item>, PgError>
where
    I: fallible_iterator::FallibleIterator<Error = std::io::Error>,
{
    it.next().map_err(|e| proto("read", e))
}

fn row_values(row: &backend::DataRowBody) -> Result<Vec<Option<Bytes>>, PgError> {
    let buf = row.buffer_bytes();
    let mut out = Vec::new();
    let mut ranges = row.ranges();
    while let Some(r) = fallible_next(&mut ranges)? {
        out.push(r.map(|r| buf.slice(r)));
    }
    Ok(out)
}

fn text(row: &[Option<Bytes>], i: usize) -> Result<String, PgError> {
    let v = row
        .get(i)
        .cloned()
        .flatten()
        .ok_or_else(|| proto("reply", format!("column {i} is missing")))?;
    String::from_utf8(v.to_vec()).map_err(|e| proto("reply", e))
}

/// Column `i` parsed from its text form.
fn column<T>(row: &[Option<Bytes>], i: usize, what: &str) -> Result<T, PgError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text(row, i)?.parse().map_err(|e| proto(what, e))
}

/// An `ErrorResponse` as an error that keeps its SQLSTATE, so that "the
/// server is shutting down" is retried and "permission denied" is not.
fn server_error(server: &str, what: &str, e: &backend::ErrorResponseBody) -> PgError {
    let mut severity = String::new();
    let mut message = String::new();
    let mut code = String::new();
    let mut fields = e.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'S' => severity = v,
            b'M' => message = v,
            b'C' => code = v,
            _ => {}
        }
    }
    PgError::Server {
        server: server.to_string(),
        what: what.to_string(),
        severity,
        code,
        message,
    }
}

/// A NUL-terminated string at the front of `data`.
fn cstring(data: &mut Bytes) -> Result<String, PgError> {
    let end = data
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| proto("BASE_BACKUP stream", "unterminated string"))?;
    let s = String::from_utf8(data.split_to(end).to_vec())
        .map_err(|e| proto("BASE_BACKUP stream", e))?;
    data.advance(1);
    Ok(s)
}

/// Logs a server notice: warnings as warnings, the rest (e.g. "all required
/// WAL segments have been archived") as information.
fn log_notice(server: &str, n: &backend::NoticeResponseBody) {
    let (mut severity, mut message) = (String::new(), String::new());
    let mut fields = n.fields();
    while let Ok(Some(f)) = fallible_iterator::FallibleIterator::next(&mut fields) {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => severity = v,
            b'M' => message = v,
            _ => {}
        }
    }
    if severity == "WARNING" {
        tracing::warn!(server, "BASE_BACKUP: {message}");
    } else {
        tracing::info!(server, "BASE_BACKUP: {message}");
    }
}

/// Quotes a string literal for a replication command.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes a slot name as an identifier.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A server whose replies are recorded bytes, handed out in the pieces
/// they were cut into; what the client writes is dropped.
struct Replay {
    pieces: std::collections::VecDeque<Bytes>,
}

impl Replay {
    /// `wire` cut at `cuts` (positions taken modulo the length).
    fn new(wire: &[u8], cuts: &[usize]) -> Replay {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        at.push(0);
        at.push(wire.len());
        at.sort_unstable();
        let pieces = at
            .windows(2)
            .filter(|w| w[0] < w[1])
            .map(|w| Bytes::copy_from_slice(&wire[w[0]..w[1]]))
            .collect();
        Replay { pieces }
    }

    fn conn(self) -> ReplicationConn {
        ReplicationConn {
            sock: Box::new(self),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            describe: "replay".into(),
            in_manifest: false,
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(p) = self.pieces.front_mut() {
            let n = p.len().min(buf.remaining());
            buf.put_slice(&p.split_to(n));
            if p.is_empty() {
                self.pieces.pop_front();
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// What a whole `BASE_BACKUP` reads as: the start, every message, the end.
pub type BaseBackupRead = (BaseBackupStart, Vec<BaseBackupMessage>, (Lsn, u32));

/// Runs [`ReplicationConn::base_backup`], then
/// [`ReplicationConn::base_backup_next`] until it returns `None`, then
/// [`ReplicationConn::base_backup_end`] against a server whose replies are
/// `wire`, arriving in pieces cut at `cuts` (positions taken modulo the
/// length). The entry point of the `replication` fuzz target and of the
/// property tests: the bytes come from the network, so any input is an `Err`
/// at worst, never a panic.
pub async fn replay_base_backup(wire: &[u8], cuts: &[usize]) -> Result<BaseBackupRead, PgError> {
    let mut conn = Replay::new(wire, cuts).conn();
    let start = conn.base_backup("replay").await?;
    let mut messages = Vec::new();
    while let Some(m) = conn.base_backup_next().await? {
        messages.push(m);
    }
    let end = conn.base_backup_end().await?;
    Ok((start, messages, end))
}

/// Reads a `START_REPLICATION` stream with [`ReplicationConn::next_message`]
/// from a server whose replies are `wire` in pieces cut at `cuts`, until
/// [`ReplicationMessage::End`] (included) or the first error. The entry point
/// of the `replication` fuzz target and of the property tests.
pub async fn replay_stream(
    wire: &[u8],
    cuts: &[usize],
) -> (Vec<ReplicationMessage>, Result<(), PgError>) {
    let mut conn = Replay::new(wire, cuts).conn();
    let mut out = Vec::new();
    loop {
        match conn.next_message().await {
            Ok(ReplicationMessage::End) => {
                out.push(ReplicationMessage::End);
                return (out, Ok(()));
            }
            Ok(m) => out.push(m),
            Err(e) => return (out, Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener on loopback that runs `answer` on the first connection.
    async fn server(answer: impl FnOnce(tokio::net::TcpStream) + Send + 'static) -> u16 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((s, _)) = l.accept().await {
                answer(s);
            }
        });
        port
    }

    /// The error of a replication connection to 127.0.0.1:`port`.
    async fn connect_error(port: u16) -> PgError {
        let conninfo = format!("host=127.0.0.1 port={port} user=dr sslmode=disable");
        match ReplicationConn::connect(&conninfo, "dr_test").await {
            Ok(_) => panic!("connected to something that is not PostgreSQL on port {port}"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn a_dropped_connection_is_transient() {
        let port = server(drop).await;
        let e = connect_error(port).await;
        assert!(matches!(e, PgError::Connection { .. }), "{e:?}");
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() {
        // A port just freed: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let e = connect_error(port).await;
        assert!(matches!(e, PgError::Connection { .. }), "{e:?}");
        assert!(e.is_transient(), "{e}");
    }

    #[tokio::test]
    async fn bytes_that_are_not_the_protocol_are_permanent() {
        let port = server(|s| {
            tokio::spawn(async move {
                let mut s = s;
                // 'Q' is a frontend message; no server sends it.
                let _ = s.write_all(b"Q\0\0\0\x04").await;
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        })
        .await;
        let e = connect_error(port).await;
        assert!(matches!(e, PgError::Protocol { .. }), "{e:?}");
        assert!(!e.is_transient(), "{e}");
    }

    /// Found by the `replication` fuzz target: a message announcing 4 GiB
    /// made the parser reserve 4 GiB.
    #[test]
    fn a_huge_announced_length_is_refused_before_any_allocation() {
        let mut rbuf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            next_frame(&mut rbuf),
            Err(PgError::Protocol { .. })
        ));
        let mut rbuf = BytesMut::from(&b"d\x10\x00\x00\x00"[..]);
        assert!(next_frame(&mut rbuf).is_err());
    }

    #[test]
    fn server_errors_are_retried_by_sqlstate() {
        let err = |code: &str| PgError::Server {
            server: "db:5432".into(),
            what: "BASE_BACKUP".into(),
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
        };
        // Shutdown, too many connections / senders, connection failure.
        for code in ["57P01", "53300", "08006"] {
            assert!(err(code).is_transient(), "{code}");
        }
        // No rights, bad password, no pg_hba entry, internal error.
        for code in ["42501", "28P01", "28000", "XX000"] {
            assert!(!err(code).is_transient(), "{code}");
        }
    }
}

/// Parsing of bytes from the network: never a panic, and what the server
/// would send reads back as sent in any split.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Sent {
        XLog(u64, u64, Vec<u8>),
        Keepalive(u64, bool),
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(a, b, d)| Sent::XLog(a, b, d)),
            (any::<u64>(), any::<bool>()).prop_map(|(e, r)| Sent::Keepalive(e, r)),
        ]
    }

    /// The CopyData message ('d') a server sends for `m`.
    fn encode(m: &Sent, out: &mut BytesMut) {
        let mut payload = BytesMut::new();
        match m {
            Sent::XLog(start, end, data) => {
                payload.put_u8(b'w');
                payload.put_u64(*start);
                payload.put_u64(*end);
                payload.put_i64(12345);
                payload.put_slice(data);
            }
            Sent::Keepalive(end, reply) => {
                payload.put_u8(b'k');
                payload.put_u64(*end);
                payload.put_i64(12345);
                payload.put_u8(u8::from(*reply));
            }
        }
        out.put_u8(b'd');
        out.put_u32(payload.len() as u32 + 4);
        out.put_slice(&payload);
    }

    fn matches(got: &ReplicationMessage, want: &Sent) -> bool {
        match (got, want) {
            (
                ReplicationMessage::XLogData {
                    start,
                    server_end,
                    data,
                },
                Sent::XLog(s, e, d),
            ) => start.0 == *s && server_end.0 == *e && data.as_ref() == d.as_slice(),
            (ReplicationMessage::Keepalive { server_end, reply }, Sent::Keepalive(e, r)) => {
                server_end.0 == *e && reply == r
            }
            _ => false,
        }
    }

    /// Feeds `wire` in pieces cut at `cuts` and parses every frame.
    fn read_all(wire: &[u8], cuts: &[usize]) -> Result<Vec<ReplicationMessage>, PgError> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        at.push(0);
        at.push(wire.len());
        at.sort_unstable();
        let mut rbuf = BytesMut::new();
        let mut out = Vec::new();
        for w in at.windows(2) {
            rbuf.extend_from_slice(&wire[w[0]..w[1]]);
            while let Some(f) = next_frame(&mut rbuf)? {
                if let Frame::Msg(backend::Message::CopyData(body)) = f
                    && let Some(m) = stream_message(body.into_bytes())?
                {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// A `BASE_BACKUP` as a server sends it, in our terms.
    #[derive(Debug, Clone)]
    struct BbSent {
        start: u64,
        tli: u32,
        /// (oid, location, size): `None` oid is the main directory.
        spaces: Vec<(Option<u32>, Option<String>, Option<u64>)>,
        /// Archives: name, location, data pieces.
        archives: Vec<(String, String, Vec<Vec<u8>>)>,
        progress: Vec<u64>,
        manifest: Vec<Vec<u8>>,
        end: u64,
    }

    fn base_backup_sent() -> impl Strategy<Value = BbSent> {
        let piece = prop::collection::vec(any::<u8>(), 0..300);
        (
            any::<u64>(),
            1u32..,
            prop::collection::vec(
                (
                    prop::option::of(any::<u32>()),
                    prop::option::of("[a-z/]{1,20}"),
                    prop::option::of(any::<u64>()),
                ),
                0..3,
            ),
            prop::collection::vec(
                (
                    "[a-z0-9.]{1,12}",
                    "[a-z/]{0,12}",
                    prop::collection::vec(piece.clone(), 0..4),
                ),
                1..3,
            ),
            prop::collection::vec(0u64..(1 << 62), 0..3),
            prop::collection::vec(piece, 0..3),
            any::<u64>(),
        )
            .prop_map(
                |(start, tli, spaces, archives, progress, manifest, end)| BbSent {
                    start,
                    tli,
                    spaces,
                    archives,
                    progress,
                    manifest,
                    end,
                },
            )
    }

    fn data_row(cols: &[Option<String>], out: &mut BytesMut) {
        let mut body = BytesMut::new();
        body.put_i16(cols.len() as i16);
        for c in cols {
            match c {
                Some(v) => {
                    body.put_i32(v.len() as i32);
                    body.put_slice(v.as_bytes());
                }
                None => body.put_i32(-1),
            }
        }
        message(b'D', &body, out);
    }

    fn message(tag: u8, body: &[u8], out: &mut BytesMut) {
        out.put_u8(tag);
        out.put_u32(body.len() as u32 + 4);
        out.put_slice(body);
    }

    fn base_backup_wire(b: &BbSent) -> BytesMut {
        let mut w = BytesMut::new();
        data_row(
            &[Some(Lsn(b.start).to_string()), Some(b.tli.to_string())],
            &mut w,
        );
        message(b'C', b"SELECT\0", &mut w);
        for (oid, loc, size) in &b.spaces {
            data_row(
                &[
                    oid.map(|o| o.to_string()),
                    loc.clone(),
                    size.map(|s| s.to_string()),
                ],
                &mut w,
            );
        }
        message(b'C', b"SELECT\0", &mut w);
        message(b'H', &[0, 0, 0], &mut w);
        let copy = |payload: Vec<u8>, w: &mut BytesMut| message(b'd', &payload, w);
        for (name, loc, pieces) in &b.archives {
            copy(
                [b"n", name.as_bytes(), b"\0", loc.as_bytes(), b"\0"].concat(),
                &mut w,
            );
            for p in pieces {
                copy([b"d".as_slice(), p].concat(), &mut w);
            }
        }
        for p in &b.progress {
            copy(
                [b"p".as_slice(), &(*p as i64).to_be_bytes()].concat(),
                &mut w,
            );
        }
        copy(b"m".to_vec(), &mut w);
        for p in &b.manifest {
            copy([b"d".as_slice(), p].concat(), &mut w);
        }
        message(b'c', b"", &mut w);
        data_row(
            &[Some(Lsn(b.end).to_string()), Some(b.tli.to_string())],
            &mut w,
        );
        message(b'C', b"SELECT\0", &mut w);
        message(b'Z', b"I", &mut w);
        w
    }

    /// What the reader should make of `b`, in the reader's terms.
    fn base_backup_expected(b: &BbSent) -> String {
        let start = BaseBackupStart {
            start_lsn: Lsn(b.start),
            timeline: b.tli,
            tablespaces: b
                .spaces
                .iter()
                .map(|(oid, location, size_kb)| BackupTablespace {
                    oid: *oid,
                    location: location.clone(),
                    size_kb: *size_kb,
                })
                .collect(),
        };
        let mut msgs = Vec::new();
        for (name, loc, pieces) in &b.archives {
            msgs.push(BaseBackupMessage::NewArchive {
                name: name.clone(),
                location: (!loc.is_empty()).then(|| loc.clone()),
            });
            msgs.extend(
                pieces
                    .iter()
                    .map(|p| BaseBackupMessage::ArchiveData(Bytes::from(p.clone()))),
            );
        }
        msgs.extend(b.progress.iter().map(|p| BaseBackupMessage::Progress(*p)));
        msgs.extend(
            b.manifest
                .iter()
                .map(|p| BaseBackupMessage::ManifestData(Bytes::from(p.clone()))),
        );
        format!("{:?}", (start, msgs, (Lsn(b.end), b.tli)))
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    proptest! {
        #[test]
        fn messages_read_back_as_sent_in_any_split(
            msgs in prop::collection::vec(sent(), 0..10),
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode(m, &mut wire);
            }
            let got = read_all(&wire, &cuts).expect("valid stream");
            prop_assert_eq!(got.len(), msgs.len());
            for (g, w) in got.iter().zip(&msgs) {
                prop_assert!(matches(g, w), "{:?} read as {:?}", w, g);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            wire in prop::collection::vec(any::<u8>(), 0..300),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let _ = read_all(&wire, &cuts);
            let _ = stream_message(Bytes::from(wire));
        }

        #[test]
        fn damaged_frames_never_panic(
            msgs in prop::collection::vec(sent(), 1..5),
            flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
            cut in any::<usize>(),
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode(m, &mut wire);
            }
            let mut wire = wire.to_vec();
            for (at, x) in &flips {
                let i = at % wire.len();
                wire[i] ^= x;
            }
            let _ = read_all(&wire, &[]);
            let len = cut % wire.len();
            let _ = read_all(&wire[..len], &[]);
        }

        /// A whole `BASE_BACKUP` response reads back as sent, whatever
        /// pieces it arrives in; any strict prefix of it is an error.
        #[test]
        fn base_backup_reads_back_in_any_split_and_cut_is_an_error(
            b in base_backup_sent(),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
            cut in any::<prop::sample::Index>(),
        ) {
            let wire = base_backup_wire(&b);
            let got = block_on(replay_base_backup(&wire, &cuts)).expect("valid response");
            prop_assert_eq!(format!("{got:?}"), base_backup_expected(&b));
            let short = &wire[..cut.index(wire.len())];
            prop_assert!(block_on(replay_base_backup(short, &cuts)).is_err());
        }

        /// A `START_REPLICATION` stream through the connection itself:
        /// messages as sent, then the server's CopyDone as the end.
        #[test]
        fn stream_reads_back_through_the_connection(
            msgs in prop::collection::vec(sent(), 0..8),
            cuts in prop::collection::vec(any::<usize>(), 0..16),
        ) {
            let mut wire = BytesMut::new();
            for m in &msgs {
                encode(m, &mut wire);
            }
            message(b'c', b"", &mut wire);
            let (got, end) = block_on(replay_stream(&wire, &cuts));
            prop_assert!(end.is_ok());
            prop_assert_eq!(got.len(), msgs.len() + 1);
            for (g, w) in got.iter().zip(&msgs) {
                prop_assert!(matches(g, w), "{:?} read as {:?}", w, g);
            }
            prop_assert!(matches!(got.last(), Some(ReplicationMessage::End)));
        }

        #[test]
        fn damaged_base_backups_never_panic(
            b in base_backup_sent(),
            flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        ) {
            let mut wire = base_backup_wire(&b).to_vec();
            for (at, x) in &flips {
                let i = at % wire.len();
                wire[i] ^= x;
            }
            let _ = block_on(replay_base_backup(&wire, &[]));
            let _ = block_on(replay_stream(&wire, &[]));
        }

        #[test]
        fn short_payloads_are_errors(tag in prop::sample::select(vec![b'w', b'k']), len in 0usize..17) {
            let mut p = vec![tag];
            p.extend(std::iter::repeat_n(7u8, len));
            prop_assert!(stream_message(Bytes::from(p)).is_err());
        }
    }
}
