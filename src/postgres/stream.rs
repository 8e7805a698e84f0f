//! `dr wal-stream`: WAL archiving over the replication protocol.
//!
//! The streamer holds a physical replication slot, so the server keeps WAL
//! while `dr` is down, and reports a flush position only once the bytes
//! before it are durable in `min_regions` regions. Run as a synchronous
//! standby, a commit therefore returns only when its WAL is in object
//! storage.
//!
//! Bytes of the segment being filled are written as `.stream.S.E` pieces
//! (offsets `[S, E)` of that segment) at most `stream_flush_interval` apart,
//! or as soon as they arrive in synchronous mode. In synchronous mode on
//! filesystem regions they are appended to the segment's `.journal.S`
//! instead: one `fdatasync` per commit group, as `pg_receivewal` does,
//! where a new object costs a file, two fsyncs and an age header. A
//! completed segment is
//! stored exactly as `wal-push` stores it, so nothing downstream needs to
//! know how it arrived. `wal-fetch` assembles pieces only for a segment
//! that was never completed: the last one before the primary was lost.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::replication::{ReplicationConn, ReplicationMessage};
use super::wal::{WalFile, concurrent_duplicate, push_bytes};
use super::{Lsn, PgError, WAL_SEGMENT_SIZE};
use crate::config::PgConfig;
use crate::repo::layout::{ObjectKey, TimelineId, WalSegmentName, WalSuffix};
use crate::repo::{JournalWorker, Repository};

/// A piece never starts more than this far before the bytes it adds, so a
/// segment is assembled from at most 16 MiB / this pieces (256) while a
/// synchronous flush, one per commit group, re-sends little: the pieces of
/// the segment being written take about 32 KiB each until it is stored whole.
const PIECE_REBASE: usize = 64 << 10;
/// Synchronous mode: pieces uploading at once. A second one starts while the
/// first waits for its fsync or PUT, so a commit waits for about one upload
/// rather than one and a half. More were measured (4): on a machine whose
/// cores are busy, the extra pieces' CPU cost more commit latency than the
/// shorter wait saved (BENCHMARKS.md).
const SYNC_INFLIGHT: usize = 2;
/// Synchronous mode on filesystem regions: journal appends queued at once.
/// The journal thread writes whatever queued during one `fdatasync` with
/// the next, so a second one waiting saves a round trip, and more only
/// wait longer.
const JOURNAL_INFLIGHT: usize = 2;
/// Messages already received that are taken together before a piece is
/// queued (bounded so a fast stream still gets its pieces started).
const READY_BATCH: usize = 64;
/// Asynchronous mode writes early once this much is waiting.
const EARLY_FLUSH: usize = 4 << 20;
/// Status updates go out at least this often (wal_sender_timeout is 60 s).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);

/// Where the streamer stands; written to `<state_dir>/stream-<cluster>.json`
/// for `dr list`, `dr check` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamStatus {
    /// Cluster name.
    pub cluster: String,
    /// Replication slot.
    pub slot: String,
    /// Timeline being streamed.
    pub timeline: u32,
    /// The server's end of WAL, as last reported.
    pub server_lsn: Lsn,
    /// Received from the server.
    pub received_lsn: Lsn,
    /// Durable in `min_regions` regions (the flush position reported).
    pub durable_lsn: Lsn,
    /// `server_lsn - durable_lsn`.
    pub lag_bytes: u64,
    /// When `durable_lsn` last caught up with everything received.
    pub caught_up_at: DateTime<Utc>,
    /// When this was written.
    pub updated: DateTime<Utc>,
    /// Whether streaming runs in synchronous mode.
    pub synchronous: bool,
}

impl StreamStatus {
    /// Seconds since the archive last held everything the server had sent.
    pub fn lag_seconds(&self, now: DateTime<Utc>) -> f64 {
        if self.durable_lsn >= self.server_lsn {
            0.0
        } else {
            (now - self.caught_up_at).num_milliseconds().max(0) as f64 / 1000.0
        }
    }

    /// The status file of `cluster`.
    pub fn path(cfg: &PgConfig, cluster: &str) -> PathBuf {
        cfg.state_dir().join(format!("stream-{cluster}.json"))
    }

    /// Reads the last status written, if any.
    pub fn load(cfg: &PgConfig, cluster: &str) -> Option<StreamStatus> {
        let text = std::fs::read(Self::path(cfg, cluster)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn save(&self, path: &std::path::Path) {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(self).unwrap_or_default())?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot write streaming status");
        }
    }
}

/// The server's view of the streamer: its slot and its replication
/// connection.
#[derive(Debug, Clone, Serialize)]
pub struct ServerView {
    /// The slot exists.
    pub slot_exists: bool,
    /// A streamer is connected to the slot.
    pub slot_active: bool,
    /// WAL the slot holds back on the server (bytes).
    pub retained_bytes: Option<i64>,
    /// `pg_stat_replication.sync_state` of the streamer (`sync`, `async`…).
    pub sync_state: Option<String>,
    /// Bytes between the server's WAL position and the streamer's reported
    /// flush (= durable) position.
    pub lag_bytes: Option<i64>,
    /// `pg_stat_replication.flush_lag` in seconds.
    pub flush_lag_seconds: Option<f64>,
}

/// Asks the server (over a normal connection) about the streamer of `cluster`.
pub async fn server_view(cfg: &PgConfig, cluster: &str) -> Result<ServerView, PgError> {
    let client = super::connect_to(&cfg.conninfo, Some(Duration::from_secs(10))).await?;
    let slot = cfg.slot_name(cluster);
    let app = cfg.stream_application_name(cluster);
    let sql = |what: &str| {
        let what = what.to_string();
        move |source| PgError::Sql { what, source }
    };
    let pos = "CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END";
    let row = client
        .query_opt(
            &format!(
                "SELECT active, ({pos} - restart_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&slot],
        )
        .await
        .map_err(sql("reading pg_replication_slots"))?;
    let (slot_exists, slot_active, retained_bytes) = match row {
        Some(r) => (
            true,
            r.try_get(0).map_err(sql("pg_replication_slots.active"))?,
            r.try_get(1).map_err(sql("restart_lsn"))?,
        ),
        None => (false, false, None),
    };
    let row = client
        .query_opt(
            &format!(
                "SELECT sync_state, ({pos} - flush_lsn)::int8, extract(epoch FROM flush_lag)::float8 \
                 FROM pg_stat_replication WHERE application_name = $1 LIMIT 1"
            ),
            &[&app],
        )
        .await
        .map_err(sql("reading pg_stat_replication"))?;
    let (sync_state, lag_bytes, flush_lag_seconds) = match row {
        Some(r) => (
            r.try_get(0).map_err(sql("sync_state"))?,
            r.try_get(1).map_err(sql("flush_lsn"))?,
            r.try_get(2).map_err(sql("flush_lag"))?,
        ),
        None => (None, None, None),
    };
    Ok(ServerView {
        slot_exists,
        slot_active,
        retained_bytes,
        sync_state,
        lag_bytes,
        flush_lag_seconds,
    })
}

/// What one upload made durable: `[start, end)` in LSN terms, and whether
/// it was a piece (rather than a completed segment).
type Durable = Result<(u64, u64, bool), PgError>;

/// Streams WAL of `cluster` into `repo` until `cancel` fires or the
/// connection fails (the caller reconnects). Returns normally only on
/// cancellation.
pub async fn run(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    cancel: &CancellationToken,
) -> Result<(), PgError> {
    let app = cfg.stream_application_name(cluster);
    let slot = cfg.slot_name(cluster);
    let mut conn = ReplicationConn::connect(&cfg.conninfo, &app).await?;
    let sys = conn.identify_system().await?;
    let seg_size = conn.show("wal_segment_size").await?;
    if seg_size != "16MB" {
        return Err(PgError::Other(format!(
            "wal_segment_size is {seg_size}; dr supports the default 16MB"
        )));
    }
    let (restart, mut timeline) = match conn.read_slot(&slot).await? {
        Some((lsn, tli)) if lsn.0 != 0 => (lsn, if tli == 0 { sys.timeline } else { tli }),
        found => {
            if found.is_none() {
                conn.create_slot(&slot).await?;
                tracing::info!(%cluster, %slot, "created physical replication slot");
            }
            match conn.read_slot(&slot).await? {
                Some((lsn, tli)) if lsn.0 != 0 => (lsn, if tli == 0 { sys.timeline } else { tli }),
                _ => (sys.xlogpos, sys.timeline),
            }
        }
    };
    let mut start = Lsn(restart.0 - restart.0 % WAL_SEGMENT_SIZE);
    tracing::info!(%cluster, %slot, timeline, %start, system_id = sys.system_id, "streaming WAL");
    let mut floor = restart;
    loop {
        if timeline > 1 {
            store_history(repo, cluster, sys.system_id, &mut conn, timeline).await?;
        }
        conn.start_replication(&slot, start, timeline).await?;
        let mut s = Streamer::new(repo, cluster, cfg, sys.system_id, timeline, start, floor);
        let next = s.stream(&mut conn, cancel).await?;
        let Some((next_tli, switch)) = next else {
            conn.close().await;
            return Ok(());
        };
        tracing::info!(%cluster, from = timeline, to = next_tli, at = %switch, "timeline switch");
        timeline = next_tli;
        start = Lsn(switch.0 - switch.0 % WAL_SEGMENT_SIZE);
        floor = start;
    }
}

/// Runs [`run`] until `cancel` fires, reconnecting after failures with
/// backoff (1 s doubling to 30 s). `on_error` sees every failure (logging,
/// metrics). The slot keeps the server's WAL meanwhile, so a failure costs
/// latency, never WAL.
pub async fn supervise(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    cancel: &CancellationToken,
    mut on_error: impl FnMut(&PgError),
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        match run(repo, cluster, cfg, cancel).await {
            Ok(()) => return,
            Err(e) => {
                on_error(&e);
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn store_history(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    conn: &mut ReplicationConn,
    timeline: u32,
) -> Result<(), PgError> {
    let (name, content) = conn.timeline_history(timeline).await?;
    let file = WalFile::History(TimelineId(timeline));
    push_bytes(repo, cluster, system_id, file, &name, content.to_vec()).await?;
    Ok(())
}

/// One timeline's stream.
struct Streamer<'a> {
    repo: &'a Repository,
    cluster: &'a str,
    system_id: u64,
    timeline: u32,
    synchronous: bool,
    flush_interval: Duration,
    status_path: PathBuf,
    status: StreamStatus,
    /// LSN of the first byte of `buf`.
    seg_start: u64,
    /// The current segment, from its start to what was received.
    buf: Vec<u8>,
    /// Offset in `buf` up to which pieces were queued.
    queued: usize,
    /// Where the next piece starts (at most `PIECE_REBASE` before `queued`).
    piece_base: usize,
    /// When the oldest unqueued byte arrived.
    waiting_since: Option<Instant>,
    /// Durable ranges not yet contiguous with `durable`.
    done: Vec<(u64, u64)>,
    durable: u64,
    /// Never report a flush position below the slot's (it would move back).
    floor: u64,
    inflight: FuturesUnordered<BoxFuture<'a, Durable>>,
    /// Per segment (by its start LSN): pieces still uploading.
    seg_pieces_inflight: HashMap<u64, usize>,
    /// Segments stored whole whose pieces are deleted once none of them is
    /// still uploading.
    superseded: HashMap<u64, WalSegmentName>,
    /// Deletions of superseded pieces.
    cleanup: FuturesUnordered<BoxFuture<'a, ()>>,
    /// Synchronous mode on filesystem regions: appends to segment journals.
    journal: Option<JournalWorker>,
    /// The current segment's journal, once its first append is queued.
    journal_key: Option<ObjectKey>,
    last_status: Instant,
    last_saved: Instant,
}

impl<'a> Streamer<'a> {
    fn new(
        repo: &'a Repository,
        cluster: &'a str,
        cfg: &PgConfig,
        system_id: u64,
        timeline: u32,
        start: Lsn,
        floor: Lsn,
    ) -> Self {
        let now = Utc::now();
        Streamer {
            repo,
            cluster,
            system_id,
            timeline,
            synchronous: cfg.synchronous,
            flush_interval: cfg.stream_flush_interval,
            status_path: StreamStatus::path(cfg, cluster),
            status: StreamStatus {
                cluster: cluster.to_string(),
                slot: cfg.slot_name(cluster),
                timeline,
                server_lsn: start,
                received_lsn: start,
                durable_lsn: start,
                lag_bytes: 0,
                caught_up_at: now,
                updated: now,
                synchronous: cfg.synchronous,
            },
            seg_start: start.0,
            buf: Vec::with_capacity(WAL_SEGMENT_SIZE as usize),
            queued: 0,
            piece_base: 0,
            waiting_since: None,
            done: Vec::new(),
            durable: start.0,
            floor: floor.0,
            inflight: FuturesUnordered::new(),
            seg_pieces_inflight: HashMap::new(),
            superseded: HashMap::new(),
            cleanup: FuturesUnordered::new(),
            journal: journal_worker(repo, cfg, cluster),
            journal_key: None,
            last_status: Instant::now(),
            // The first report saves: a new timeline shows at once.
            last_saved: Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(Instant::now),
        }
    }

    /// Streams until the timeline ends (returns the next one), the
    /// server stops (error) or `cancel` fires (`None`, after the queued
    /// uploads finished).
    async fn stream(
        &mut self,
        conn: &mut ReplicationConn,
        cancel: &CancellationToken,
    ) -> Result<Option<(u32, Lsn)>, PgError> {
        let mut tick = tokio::time::interval(Duration::from_millis(50).min(self.flush_interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = conn.next_message() => {
                    let mut msg = Some(msg?);
                    let mut taken = 0;
                    // What the server has already sent joins the same piece:
                    // one upload per commit group, not one per message.
                    while let Some(m) = msg.take() {
                        if let Some(next) = self.handle(conn, m).await? {
                            return Ok(next);
                        }
                        taken += 1;
                        if taken < READY_BATCH {
                            msg = conn.next_message().now_or_never().transpose()?;
                        }
                    }
                    self.maybe_flush(false);
                }
                Some(()) = self.cleanup.next(), if !self.cleanup.is_empty() => {}
                Some(res) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.completed(res?);
                    while let Some(Some(res)) = self.inflight.next().now_or_never() {
                        self.completed(res?);
                    }
                    // Reported at once: a synchronous primary's commits
                    // wait for exactly this message.
                    self.report(conn).await?;
                    self.maybe_flush(false);
                }
                _ = tick.tick() => {
                    self.maybe_flush(false);
                    if self.last_status.elapsed() >= STATUS_INTERVAL {
                        self.report(conn).await?;
                    }
                }
                _ = cancel.cancelled() => {
                    self.maybe_flush(true);
                    self.drain(conn).await?;
                    return Ok(None);
                }
            }
        }
    }

    /// Takes one message of the stream; `Some` once the timeline ended
    /// (with the next one, if the server names it).
    async fn handle(
        &mut self,
        conn: &mut ReplicationConn,
        msg: ReplicationMessage,
    ) -> Result<Option<Option<(u32, Lsn)>>, PgError> {
        match msg {
            ReplicationMessage::XLogData {
                start,
                server_end,
                data,
            } => {
                self.status.server_lsn = self.status.server_lsn.max(server_end);
                self.receive(start.0, data)?;
            }
            ReplicationMessage::Keepalive { server_end, reply } => {
                self.status.server_lsn = self.status.server_lsn.max(server_end);
                if reply {
                    self.report(conn).await?;
                }
            }
            ReplicationMessage::End => {
                self.maybe_flush(true);
                self.drain(conn).await?;
                return Ok(Some(conn.finish_copy().await?));
            }
        }
        Ok(None)
    }

    /// Appends WAL received at `start`.
    fn receive(&mut self, start: u64, mut data: Bytes) -> Result<(), PgError> {
        let expected = self.seg_start + self.buf.len() as u64;
        if start > expected {
            return Err(PgError::Other(format!(
                "replication stream skipped from {} to {}",
                Lsn(expected),
                Lsn(start)
            )));
        }
        // Bytes sent again after a reconnect.
        let skip = (expected - start) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        let _ = data.split_to(skip);
        while !data.is_empty() {
            let room = WAL_SEGMENT_SIZE as usize - self.buf.len();
            let part = data.split_to(room.min(data.len()));
            if self.waiting_since.is_none() {
                self.waiting_since = Some(Instant::now());
            }
            self.buf.extend_from_slice(&part);
            if self.buf.len() == WAL_SEGMENT_SIZE as usize {
                self.complete_segment();
            }
        }
        self.status.received_lsn = Lsn(self.seg_start + self.buf.len() as u64);
        Ok(())
    }

    fn segment_name(&self) -> WalSegmentName {
        self.segment_name_at(self.seg_start)
    }

    fn segment_name_at(&self, lsn: u64) -> WalSegmentName {
        let segno = lsn / WAL_SEGMENT_SIZE;
        let per_log = 0x1_0000_0000 / WAL_SEGMENT_SIZE;
        WalSegmentName {
            timeline: TimelineId(self.timeline),
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// Queues the completed segment as `wal-push` would store it. A segment
    /// with a journal gets its last bytes journaled too, so commits in them
    /// wait for one append rather than for the whole segment's upload.
    fn complete_segment(&mut self) {
        if self.journal_key.is_some() && self.queued < self.buf.len() {
            self.journal_append();
        }
        if let (Some(w), Some(key)) = (&self.journal, self.journal_key.take()) {
            w.close(&key);
        }
        let name = self.segment_name();
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(WAL_SEGMENT_SIZE as usize));
        let range = (self.seg_start, self.seg_start + WAL_SEGMENT_SIZE);
        let (repo, cluster, sid) = (self.repo, self.cluster, self.system_id);
        self.inflight.push(Box::pin(async move {
            let file = WalFile::Segment(name, WalSuffix::None);
            push_bytes(repo, cluster, sid, file, &name.to_string(), data).await?;
            Ok((range.0, range.1, false))
        }));
        self.seg_start += WAL_SEGMENT_SIZE;
        self.queued = 0;
        self.piece_base = 0;
        self.waiting_since = None;
    }

    /// Queues a piece of the current segment when it is due: always when
    /// `now`, as soon as possible in synchronous mode, else after the flush
    /// interval or once `EARLY_FLUSH` bytes wait.
    fn maybe_flush(&mut self, now: bool) {
        let waiting = self.buf.len() - self.queued;
        if waiting == 0 {
            return;
        }
        let limit = if self.journal.is_some() {
            JOURNAL_INFLIGHT
        } else {
            SYNC_INFLIGHT
        };
        let due = now
            || (self.synchronous && self.pieces_inflight() < limit)
            || (!self.synchronous
                && self.pieces_inflight() < 2
                && (waiting >= EARLY_FLUSH
                    || self
                        .waiting_since
                        .is_some_and(|t| t.elapsed() >= self.flush_interval)));
        if !due {
            return;
        }
        if self.journal.is_some() {
            self.journal_append();
            return;
        }
        if self.queued - self.piece_base >= PIECE_REBASE {
            self.piece_base = self.queued;
        }
        let (from, to) = (self.piece_base, self.buf.len());
        let data = Bytes::copy_from_slice(&self.buf[from..to]);
        let key = ObjectKey::Wal {
            cluster: self.cluster.to_string(),
            system_id: self.system_id,
            segment: self.segment_name(),
            suffix: WalSuffix::Stream {
                start: from as u32,
                end: to as u32,
            },
            hash: blake3::hash(&data).to_hex().to_string(),
        };
        let range = (self.seg_start + from as u64, self.seg_start + to as u64);
        *self
            .seg_pieces_inflight
            .entry(segment_of(self.seg_start))
            .or_default() += 1;
        let repo = self.repo;
        self.inflight.push(Box::pin(async move {
            let hash = key.to_string().rsplit('-').next().map(str::to_string);
            if let Err(e) = repo.put_buffer(&key, data, hash).await
                && concurrent_duplicate(&e, repo.regions.min_regions()).is_none()
            {
                return Err(e.into());
            }
            Ok((range.0, range.1, true))
        }));
        self.queued = to;
        self.waiting_since = None;
    }

    /// Queues the bytes not yet queued to the current segment's journal
    /// (created with its first append, from where that append starts).
    fn journal_append(&mut self) {
        let Some(w) = &self.journal else {
            return;
        };
        let (from, to) = (self.queued, self.buf.len());
        let segment = self.segment_name_at(self.seg_start);
        let key = self.journal_key.get_or_insert_with(|| ObjectKey::Wal {
            cluster: self.cluster.to_string(),
            system_id: self.system_id,
            segment,
            suffix: WalSuffix::Journal { start: from as u32 },
            hash: hex::encode(rand::random::<[u8; 32]>()),
        });
        let durable = w.append(
            key,
            from as u32,
            Bytes::copy_from_slice(&self.buf[from..to]),
        );
        let range = (self.seg_start + from as u64, self.seg_start + to as u64);
        *self
            .seg_pieces_inflight
            .entry(segment_of(self.seg_start))
            .or_default() += 1;
        self.inflight.push(Box::pin(async move {
            durable.await?;
            Ok((range.0, range.1, true))
        }));
        self.queued = to;
        self.waiting_since = None;
    }

    fn pieces_inflight(&self) -> usize {
        self.seg_pieces_inflight.values().sum()
    }

    /// Records a durable range and advances the durable position over every
    /// range now contiguous with it.
    fn completed(&mut self, (start, end, piece): (u64, u64, bool)) {
        let seg = segment_of(start);
        if piece {
            if let Some(n) = self.seg_pieces_inflight.get_mut(&seg) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.seg_pieces_inflight.remove(&seg);
                }
            }
        } else {
            self.superseded.insert(seg, self.segment_name_at(seg));
        }
        self.delete_superseded();
        self.done.push((start, end));
        loop {
            let reach = self
                .done
                .iter()
                .filter(|(a, _)| *a <= self.durable)
                .map(|(_, b)| *b)
                .max();
            match reach {
                Some(b) if b > self.durable => self.durable = b,
                _ => break,
            }
        }
        let d = self.durable;
        self.done.retain(|(_, b)| *b > d);
        self.status.durable_lsn = Lsn(d);
        if Lsn(d) >= self.status.received_lsn {
            self.status.caught_up_at = Utc::now();
        }
    }

    /// Sends the durable position as both write and flush position: a
    /// primary with `synchronous_commit = remote_write` must not be told
    /// WAL is safe before it is.
    async fn report(&mut self, conn: &mut ReplicationConn) -> Result<(), PgError> {
        let pos = Lsn(self.durable.max(self.floor));
        conn.send_status(pos, pos).await?;
        self.last_status = Instant::now();
        // Not per piece: a synchronous streamer reports after every upload.
        if self.last_saved.elapsed() >= Duration::from_secs(1) {
            self.save_status();
        }
        Ok(())
    }

    fn save_status(&mut self) {
        self.status.lag_bytes = self.status.server_lsn.0.saturating_sub(self.durable);
        self.status.updated = Utc::now();
        self.status.timeline = self.timeline;
        self.status.save(&self.status_path);
        self.last_saved = Instant::now();
    }

    /// Deletes the pieces of segments now stored whole: they are
    /// redundant, and in synchronous mode they add up to several times the
    /// WAL. Best effort: what is left (a region down, Object Lock) goes with
    /// the segment at retention.
    fn delete_superseded(&mut self) {
        let ready: Vec<u64> = self
            .superseded
            .keys()
            .filter(|seg| !self.seg_pieces_inflight.contains_key(*seg))
            .copied()
            .collect();
        for seg in ready {
            let Some(name) = self.superseded.remove(&seg) else {
                continue;
            };
            // Listed rather than remembered: pieces an earlier, interrupted
            // streamer left go too.
            let whole =
                WalFile::Segment(name, WalSuffix::None).key_prefix(self.cluster, self.system_id);
            let prefix = format!("{}.", whole.trim_end_matches('-'));
            let repo = self.repo;
            self.cleanup.push(Box::pin(async move {
                for r in repo.regions.iter() {
                    let pieces = match r.store.list(&prefix).await {
                        Ok(p) => p,
                        Err(e) => {
                            tracing::debug!(region = %r.name, error = %e, "cannot list superseded WAL pieces");
                            continue;
                        }
                    };
                    let streamed = pieces.into_iter().filter(|o| {
                        matches!(
                            o.key.parse::<ObjectKey>(),
                            Ok(ObjectKey::Wal {
                                suffix: WalSuffix::Stream { .. } | WalSuffix::Journal { .. },
                                ..
                            })
                        )
                    });
                    for o in streamed {
                        if let Err(e) = r.store.delete(&o.key).await {
                            tracing::debug!(region = %r.name, key = o.key, error = %e, "superseded WAL piece not deleted");
                        }
                    }
                }
            }));
        }
    }

    /// Waits for every queued upload and reports the final position.
    async fn drain(&mut self, conn: &mut ReplicationConn) -> Result<(), PgError> {
        loop {
            self.maybe_flush(true);
            match self.inflight.next().await {
                Some(res) => self.completed(res?),
                None => break,
            }
        }
        while self.cleanup.next().await.is_some() {}
        self.report(conn).await?;
        self.save_status();
        Ok(())
    }
}

/// The journal thread, in synchronous mode when every region is a
/// filesystem; `None` (pieces) otherwise.
fn journal_worker(repo: &Repository, cfg: &PgConfig, cluster: &str) -> Option<JournalWorker> {
    if !cfg.synchronous {
        return None;
    }
    let journals = repo.journals()?;
    match JournalWorker::start(journals) {
        Ok(w) => {
            tracing::info!(%cluster, "synchronous flushes go to segment journals (every region is a filesystem)");
            Some(w)
        }
        Err(e) => {
            tracing::warn!(%cluster, error = %e, "cannot start the journal thread; storing pieces");
            None
        }
    }
}

/// The start LSN of the segment holding `lsn`.
fn segment_of(lsn: u64) -> u64 {
    lsn - lsn % WAL_SEGMENT_SIZE
}
