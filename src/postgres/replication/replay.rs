//! A server made of recorded bytes, cut into pieces: the entry points of the
//! `replication` fuzz target and of the property tests, which drive the real
//! connection code with any input.

use super::*;

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
