//! `dr backup redis`: connect as a replica, ask for a full resync, and stream
//! the RDB payload through the RDB checker and the codec into the regions.
//! Nothing touches local disk, memory stays bounded, and a snapshot becomes
//! visible only when its manifest is written after the RDB is durable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::manifest::{
    DbKeys, MANIFEST_KIND, MANIFEST_VERSION, RedisManifest, info_field, parse_keyspace,
};
use super::rdb::{RdbCheck, RdbSummary};
use super::{Conn, Endpoint, RedisError};
use crate::config::{RedisConfig, RedisSyncMode};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};
use crate::store::channel_stream;

/// Read size from the replication socket.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between socket, checker and codec.
const DEPTH: usize = 16;
/// Length of the diskless end-of-payload mark.
const EOF_MARK_LEN: usize = 40;

/// Result of one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotReport {
    /// Snapshot id.
    pub id: String,
    /// Instance name.
    pub instance: String,
    /// Point in time the snapshot represents.
    pub time: chrono::DateTime<Utc>,
    /// `redis_version`.
    pub server_version: String,
    /// `psync` or `sync`.
    pub sync: String,
    /// Whether the server streamed the RDB diskless.
    pub diskless: bool,
    /// Keys over all databases.
    pub keys: u64,
    /// Keys per database.
    pub keyspace: std::collections::BTreeMap<u32, DbKeys>,
    /// RDB bytes.
    pub size: u64,
    /// Bytes stored (compressed and encrypted).
    pub stored_size: u64,
    /// Seconds from connect to durable manifest.
    pub seconds: f64,
    /// Seconds the server took to start sending (fork + save for disk-based).
    pub wait_seconds: f64,
    /// RDB bytes per second over the transfer.
    pub throughput: f64,
    /// Regions that hold the snapshot.
    pub regions: Vec<String>,
}

/// What `dr check` learns of a Redis source.
#[derive(Debug)]
pub struct Probe {
    /// host:port.
    pub addr: String,
    /// `redis_version` from INFO.
    pub version: String,
    /// `role` from INFO replication (master / slave).
    pub role: String,
    /// Whether the user may run PSYNC, by `ACL DRYRUN` (None: the server
    /// or the user's rights do not allow asking).
    pub psync: Option<bool>,
}

/// Connects and authenticates as a snapshot does, reads INFO and sends the
/// first replication step (`REPLCONF capa eof`), which a user without
/// replication rights is refused. Starts no sync: the server does not fork.
pub async fn probe(cfg: &RedisConfig, timeout: Duration) -> Result<Probe, RedisError> {
    let ep = Endpoint::from_config(cfg)?;
    let (mut s, version) =
        replication_session(&ep, timeout, 8 * 1024, RedisSyncMode::Diskless).await?;
    let repl = s.info("replication").await?;
    let role = info_field(&repl, "role").unwrap_or("unknown").to_string();
    // PSYNC itself would make the server fork and send a full RDB; ask the
    // ACL instead (Redis 7+, and only if this user may run ACL DRYRUN).
    let user = ep.username.as_deref().unwrap_or("default");
    s.send_many(&[&["ACL", "DRYRUN", user, "PSYNC", "?", "-1"]])
        .await?;
    let psync = match s.reply().await? {
        Reply::Simple(ok) if ok == "OK" => Some(true),
        Reply::Bulk(denied) => {
            return Err(s.refused(
                String::from_utf8_lossy(&denied).into_owned(),
                "snapshots need PSYNC (or SYNC): `ACL SETUSER <user> +psync +sync +replconf +ping +info`",
            ));
        }
        _ => None,
    };
    Ok(Probe {
        addr: s.addr,
        version,
        role,
        psync,
    })
}

/// Connects, authenticates, reads the server version and announces the
/// replica capabilities (`REPLCONF`, refused to a user without replication
/// rights): the start of a snapshot, and all a check may do. Whether it
/// announces diskless support (`capa eof`) follows `sync`.
async fn replication_session(
    ep: &Endpoint,
    timeout: Duration,
    buffer: usize,
    sync: RedisSyncMode,
) -> Result<(Session, String), RedisError> {
    let conn = ep.connect(timeout).await?;
    let mut s = Session {
        io: BufReader::with_capacity(buffer, conn),
        addr: ep.addr(),
        timeout,
    };
    s.handshake(ep).await?;
    let info = s.info("server").await?;
    let version = info_field(&info, "redis_version")
        .unwrap_or("unknown")
        .to_string();
    let capa: &[&str] = if s.wants_eof(sync).await {
        &["capa", "eof", "capa", "psync2"]
    } else {
        &["capa", "psync2"]
    };
    s.replconf(capa, true).await?;
    Ok((s, version))
}

/// Takes one snapshot of `instance`.
pub async fn snapshot(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    progress: Arc<Progress>,
) -> Result<SnapshotReport, RedisError> {
    let t0 = Instant::now();
    let ep = Endpoint::from_config(cfg)?;
    let timeout = Duration::from_secs(cfg.timeout_seconds);
    let (mut s, server_version) = replication_session(&ep, timeout, CHUNK, cfg.sync).await?;
    // Redis 7+: no replication stream after the RDB; older servers refuse it.
    if let Err(e) = s.replconf(&["rdb-only", "1"], false).await {
        tracing::debug!("server does not support rdb-only: {e}");
    }
    // Key counts bracket the fork: one just before PSYNC, one from a second
    // connection once the payload header arrives (the fork has happened by
    // then, also for diskless syncs with a delay).
    let mut side = Session {
        io: BufReader::new(ep.connect(timeout).await?),
        addr: ep.addr(),
        timeout,
    };
    side.handshake(&ep).await?;
    let keyspace = parse_keyspace(&s.info("keyspace").await?);
    s.send_many(&[&["PSYNC", "?", "-1"]]).await?;
    let (sync, replid, offset) = s.psync_reply().await?;
    let time = Utc::now();
    let payload = s.payload_header().await?;
    let keyspace_after = parse_keyspace(&side.info("keyspace").await?);
    drop(side);
    let wait_seconds = t0.elapsed().as_secs_f64();
    let diskless = payload.mark.is_some();
    tracing::info!(instance, server = %s.addr, diskless, "receiving RDB");

    let id = BackupId::new(time);
    // Before the rdb: `dr expire` leaves a snapshot without a manifest alone
    // while this marker is young.
    repo.mark_started(&ObjectKey::RedisStarted {
        instance: instance.to_string(),
        snapshot: id.clone(),
    })
    .await?;
    let rdb_key = ObjectKey::RedisRdb {
        instance: instance.to_string(),
        snapshot: id.clone(),
    };
    if let Some(len) = payload.len {
        progress.add_total(len);
    }
    let (raw_tx, raw_rx) = mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let (checked_tx, checked_rx) = mpsc::channel::<std::io::Result<Bytes>>(DEPTH);
    let checker = tokio::task::spawn_blocking(move || check_stage(raw_rx, checked_tx));
    let put = repo.put_encoded(&rdb_key, channel_stream(checked_rx), payload.len);
    let transfer_start = Instant::now();
    let (received, put) = tokio::join!(s.stream_payload(&payload, raw_tx, &progress), put);
    // Stop the server from sending anything further.
    drop(s);
    let received = received?;
    let stream_err = |why: String| RedisError::Stream {
        addr: ep.addr(),
        received,
        why,
    };
    let summary = checker
        .await
        .map_err(|e| stream_err(format!("checker stopped: {e}")))?
        .map_err(|e| stream_err(e.to_string()))?;
    let (enc, report) = put.map_err(|e| stream_err(e.to_string()))?;
    let transfer = transfer_start.elapsed().as_secs_f64();

    let manifest = RedisManifest {
        kind: MANIFEST_KIND.into(),
        version: MANIFEST_VERSION,
        instance: instance.to_string(),
        id: id.to_string(),
        time,
        finished: Utc::now(),
        server_version: server_version.clone(),
        replid,
        offset,
        sync: sync.clone(),
        diskless,
        rdb_version: summary.version,
        rdb_checksummed: summary.checksummed,
        keyspace: keyspace.clone(),
        keyspace_after: Some(keyspace_after),
        rdb: enc.clone(),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let body = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| RedisError::Other(format!("manifest encoding: {e}")))?;
    let mkey = ObjectKey::RedisManifest {
        instance: instance.to_string(),
        snapshot: id.clone(),
    };
    repo.put_buffer(&mkey, Bytes::from(body), None).await?;
    Ok(SnapshotReport {
        id: id.to_string(),
        instance: instance.to_string(),
        time,
        server_version,
        sync,
        diskless: manifest.diskless,
        keys: manifest.total_keys(),
        keyspace,
        size: enc.plain_size,
        stored_size: enc.stored_size,
        seconds: t0.elapsed().as_secs_f64(),
        wait_seconds,
        throughput: enc.plain_size as f64 / transfer.max(1e-6),
        regions: report.ok,
    })
}

/// Validates the RDB on a blocking thread and passes the bytes on. At the end
/// of the input, a failed check becomes an error in the codec's input, so the
/// object is never committed.
fn check_stage(
    mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<RdbSummary, super::rdb::RdbError> {
    let mut check = RdbCheck::new();
    let fail = |tx: &mpsc::Sender<std::io::Result<Bytes>>, e: &super::rdb::RdbError| {
        let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
    };
    while let Some(item) = rx.blocking_recv() {
        match item {
            Ok(b) => {
                if let Err(e) = check.update(&b) {
                    fail(&tx, &e);
                    return Err(e);
                }
                if tx.blocking_send(Ok(b)).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return check.finish();
            }
        }
    }
    match check.finish() {
        Ok(s) => Ok(s),
        Err(e) => {
            fail(&tx, &e);
            Err(e)
        }
    }
}

/// How the payload is framed.
struct Payload {
    /// `$<len>` framing.
    len: Option<u64>,
    /// `$EOF:<mark>` framing.
    mark: Option<Vec<u8>>,
}

struct Session {
    io: BufReader<Box<dyn Conn>>,
    addr: String,
    timeout: Duration,
}

enum Reply {
    Simple(String),
    Error(String),
    Bulk(Vec<u8>),
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Session {
    fn protocol(&self, why: String) -> RedisError {
        RedisError::Protocol {
            addr: self.addr.clone(),
            why,
        }
    }

    fn refused(&self, reply: String, hint: &str) -> RedisError {
        RedisError::Refused {
            addr: self.addr.clone(),
            reply,
            hint: hint.to_string(),
        }
    }

    async fn send_many(&mut self, cmds: &[&[&str]]) -> Result<(), RedisError> {
        let mut buf = Vec::new();
        for c in cmds {
            buf.extend_from_slice(&resp(c));
        }
        let w = self.io.get_mut();
        let r = tokio::time::timeout(self.timeout, async {
            w.write_all(&buf).await?;
            w.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.protocol(format!("write failed: {e}"))),
            Err(_) => Err(self.protocol("write timed out".into())),
        }
    }

    /// Reads one line, without its `\r\n`. Keep-alive newlines are empty lines.
    async fn line(&mut self) -> Result<String, RedisError> {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(self.timeout, async {
            let mut limited = (&mut self.io).take(64 << 10);
            limited.read_until(b'\n', &mut buf).await
        })
        .await;
        match r {
            Err(_) => Err(self.protocol(format!(
                "no data for {}s (raise timeout_seconds if the server needs longer to fork)",
                self.timeout.as_secs()
            ))),
            Ok(Err(e)) => Err(self.protocol(format!("connection failed: {e}"))),
            Ok(Ok(0)) => Err(self.protocol(format!(
                "the server closed the connection; is {} a Redis server (host and port in the url)?",
                self.addr
            ))),
            Ok(Ok(_)) if buf.last() != Some(&b'\n') => {
                Err(self.protocol("reply line too long or cut short".into()))
            }
            Ok(Ok(_)) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
        }
    }

    async fn reply(&mut self) -> Result<Reply, RedisError> {
        let l = loop {
            let l = self.line().await?;
            if !l.is_empty() {
                break l;
            }
        };
        let (tag, rest) = l.split_at(1);
        match tag {
            "+" => Ok(Reply::Simple(rest.to_string())),
            "-" => Ok(Reply::Error(rest.to_string())),
            "$" => {
                let n: i64 = rest
                    .parse()
                    .map_err(|_| self.protocol(format!("bad bulk length {rest:?}")))?;
                if n < 0 {
                    return Ok(Reply::Bulk(Vec::new()));
                }
                if n > 64 << 20 {
                    return Err(self.protocol(format!("reply of {n} bytes is too large")));
                }
                let mut b = vec![0u8; n as usize + 2];
                tokio::time::timeout(self.timeout, self.io.read_exact(&mut b))
                    .await
                    .map_err(|_| self.protocol("reply timed out".into()))?
                    .map_err(|e| self.protocol(format!("connection failed: {e}")))?;
                b.truncate(n as usize);
                Ok(Reply::Bulk(b))
            }
            _ => Err(self.protocol(format!(
                "{l:?} is not a Redis reply; is {} a Redis server (host and port in the url)?",
                self.addr
            ))),
        }
    }

    async fn handshake(&mut self, ep: &Endpoint) -> Result<(), RedisError> {
        let Some(pw) = ep.password.clone() else {
            return Ok(());
        };
        let mut args = vec!["AUTH"];
        if let Some(u) = &ep.username {
            args.push(u);
        }
        args.push(&pw);
        self.send_many(&[&args]).await?;
        match self.reply().await? {
            Reply::Simple(_) => Ok(()),
            Reply::Error(e) => Err(RedisError::Auth {
                addr: self.addr.clone(),
                user: ep
                    .username
                    .as_ref()
                    .map(|u| format!(" for user {u:?}"))
                    .unwrap_or_default(),
                reply: e,
            }),
            Reply::Bulk(_) => Err(self.protocol("bulk reply to AUTH".into())),
        }
    }

    fn acl_hint(&self, reply: &str) -> RedisError {
        if reply.starts_with("NOAUTH") {
            return self.refused(
                reply.into(),
                "the server requires a password: add it to the url, password_env or password_file",
            );
        }
        self.refused(
            reply.into(),
            "the user needs replication rights, e.g. `ACL SETUSER <user> +psync +sync +replconf +ping +info`",
        )
    }

    /// Whether to announce diskless support (see [`RedisSyncMode`]); `auto`
    /// asks this connection's server with `CONFIG GET`.
    async fn wants_eof(&mut self, mode: RedisSyncMode) -> bool {
        match mode {
            RedisSyncMode::Disk => false,
            RedisSyncMode::Diskless => true,
            RedisSyncMode::Auto => match self.config_get("repl-diskless-sync*").await {
                Ok(Some(c)) => {
                    let on = c.get("repl-diskless-sync").is_some_and(|v| v == "yes");
                    let delay = c
                        .get("repl-diskless-sync-delay")
                        .and_then(|d| d.parse::<u64>().ok())
                        .unwrap_or(0);
                    tracing::debug!(on, delay, "server's diskless sync settings");
                    !(on && delay > 0)
                }
                Ok(None) => true,
                Err(e) => {
                    tracing::debug!("CONFIG GET failed ({e}); the server chooses the sync");
                    true
                }
            },
        }
    }

    /// `CONFIG GET pattern` as name → value; `None` when the server or the
    /// user's rights refuse it.
    async fn config_get(
        &mut self,
        pattern: &str,
    ) -> Result<Option<BTreeMap<String, String>>, RedisError> {
        self.send_many(&[&["CONFIG", "GET", pattern]]).await?;
        let head = loop {
            let l = self.line().await?;
            if !l.is_empty() {
                break l;
            }
        };
        if head.starts_with('-') {
            tracing::debug!("CONFIG GET refused: {head}");
            return Ok(None);
        }
        let n: usize = head
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .filter(|n| *n <= 1024)
            .ok_or_else(|| self.protocol(format!("CONFIG GET answered {head:?}")))?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            match self.reply().await? {
                Reply::Bulk(b) => items.push(String::from_utf8_lossy(&b).into_owned()),
                _ => return Err(self.protocol("CONFIG GET: an item is not a string".into())),
            }
        }
        let mut it = items.into_iter();
        let mut out = BTreeMap::new();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            out.insert(k, v);
        }
        Ok(Some(out))
    }

    async fn info(&mut self, section: &str) -> Result<String, RedisError> {
        self.send_many(&[&["INFO", section]]).await?;
        self.bulk_reply(&format!("INFO {section}")).await
    }

    async fn bulk_reply(&mut self, what: &str) -> Result<String, RedisError> {
        match self.reply().await? {
            Reply::Bulk(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            Reply::Error(e) => Err(self.acl_hint(&e)),
            Reply::Simple(s) => Err(self.protocol(format!("{what} answered {s:?}"))),
        }
    }

    /// `REPLCONF args…`; with `required`, a refusal is an error.
    async fn replconf(&mut self, args: &[&str], required: bool) -> Result<(), RedisError> {
        let mut all = vec!["REPLCONF"];
        all.extend_from_slice(args);
        self.send_many(&[&all]).await?;
        match self.reply().await? {
            Reply::Simple(_) => Ok(()),
            Reply::Error(e) if required || e.starts_with("NOPERM") || e.starts_with("NOAUTH") => {
                Err(self.acl_hint(&e))
            }
            Reply::Error(e) => Err(self.protocol(e)),
            Reply::Bulk(_) => Err(self.protocol("bulk reply to REPLCONF".into())),
        }
    }

    /// Reads the answer to `PSYNC ? -1`; falls back to `SYNC` for servers
    /// that do not know PSYNC. Returns (sync kind, replid, offset).
    async fn psync_reply(&mut self) -> Result<(String, Option<String>, Option<u64>), RedisError> {
        match self.reply().await? {
            Reply::Simple(s) if s.starts_with("FULLRESYNC") => {
                let mut it = s.split_whitespace().skip(1);
                let replid = it.next().map(str::to_string);
                let offset = it.next().and_then(|o| o.parse().ok());
                Ok(("psync".into(), replid, offset))
            }
            Reply::Error(e) if e.to_ascii_lowercase().contains("unknown command") => {
                tracing::info!("server does not know PSYNC; using SYNC");
                self.send_many(&[&["SYNC"]]).await?;
                Ok(("sync".into(), None, None))
            }
            Reply::Error(e) if e.starts_with("NOPERM") || e.starts_with("NOAUTH") => {
                Err(self.acl_hint(&e))
            }
            Reply::Error(e) => Err(self.refused(
                e,
                "a replica without a link to its master cannot serve a sync; snapshot the master, or wait until the link is up",
            )),
            Reply::Simple(s) => Err(self.protocol(format!("PSYNC answered {s:?}"))),
            Reply::Bulk(_) => Err(self.protocol("bulk reply to PSYNC".into())),
        }
    }

    /// Skips keep-alive newlines and reads `$<len>` or `$EOF:<mark>`.
    async fn payload_header(&mut self) -> Result<Payload, RedisError> {
        let l = loop {
            let l = self.line().await?;
            if !l.is_empty() {
                break l;
            }
        };
        if let Some(e) = l.strip_prefix('-') {
            return Err(self.refused(
                e.into(),
                "the server could not produce a snapshot; see its log",
            ));
        }
        let Some(rest) = l.strip_prefix('$') else {
            return Err(self.protocol(format!("expected an RDB payload header, got {l:?}")));
        };
        if let Some(mark) = rest.strip_prefix("EOF:") {
            if mark.len() != EOF_MARK_LEN {
                return Err(self.protocol(format!("bad diskless EOF mark {mark:?}")));
            }
            return Ok(Payload {
                len: None,
                mark: Some(mark.as_bytes().to_vec()),
            });
        }
        let len = rest
            .parse()
            .map_err(|_| self.protocol(format!("bad RDB length {rest:?}")))?;
        Ok(Payload {
            len: Some(len),
            mark: None,
        })
    }

    /// Moves the payload into `tx` and returns its size; an error is also sent
    /// down `tx` so the object is abandoned.
    async fn stream_payload(
        &mut self,
        payload: &Payload,
        tx: mpsc::Sender<std::io::Result<Bytes>>,
        progress: &Progress,
    ) -> Result<u64, RedisError> {
        let mut got = 0u64;
        let r = self.pump(payload, &tx, progress, &mut got).await;
        if let Err(why) = &r {
            let _ = tx.send(Err(std::io::Error::other(why.clone()))).await;
        }
        r.map_err(|why| RedisError::Stream {
            addr: self.addr.clone(),
            received: got,
            why,
        })?;
        Ok(got)
    }

    async fn pump(
        &mut self,
        p: &Payload,
        tx: &mpsc::Sender<std::io::Result<Bytes>>,
        progress: &Progress,
        got: &mut u64,
    ) -> Result<(), String> {
        let mut held = BytesMut::new();
        loop {
            let want = match p.len {
                Some(len) if *got >= len => return Ok(()),
                Some(len) => CHUNK.min((len - *got) as usize),
                None => CHUNK,
            };
            let mut buf = BytesMut::zeroed(want);
            let n = match tokio::time::timeout(self.timeout, self.io.read(&mut buf)).await {
                Err(_) => {
                    return Err(format!("no data for {}s", self.timeout.as_secs()));
                }
                Ok(Err(e)) => return Err(format!("connection failed: {e}")),
                Ok(Ok(0)) => {
                    return Err(match p.len {
                        Some(len) => format!("connection closed after {got} of {len} bytes"),
                        None => "connection closed before the end-of-payload mark".into(),
                    });
                }
                Ok(Ok(n)) => n,
            };
            buf.truncate(n);
            let out = match &p.mark {
                None => buf.freeze(),
                Some(mark) => {
                    held.extend_from_slice(&buf);
                    if let Some(at) = find(&held, mark) {
                        // Anything after the mark is the replication stream.
                        let last = held.split_to(at).freeze();
                        *got += last.len() as u64;
                        progress.add(last.len() as u64);
                        if !last.is_empty() && tx.send(Ok(last)).await.is_err() {
                            return Err("the writer stopped".into());
                        }
                        return Ok(());
                    }
                    // Keep the tail: it may be the start of the mark.
                    let keep = held.len().min(EOF_MARK_LEN - 1);
                    held.split_to(held.len() - keep).freeze()
                }
            };
            *got += out.len() as u64;
            progress.add(out.len() as u64);
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return Err("the writer stopped".into());
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
