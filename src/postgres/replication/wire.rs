//! Bytes on the wire: framing, CopyData messages, rows, errors and quoting.

use super::*;

pub(super) enum Frame {
    Msg(backend::Message),
    CopyBoth,
}

/// Takes the next whole message off `rbuf`, or `None` until one has
/// arrived; the bytes come from the network, so any framing is an `Err`
/// at worst.
pub(super) fn next_frame(rbuf: &mut BytesMut) -> Result<Option<Frame>, PgError> {
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
pub(super) fn stream_message(mut data: Bytes) -> Result<Option<ReplicationMessage>, PgError> {
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

pub(super) fn fallible_next<I>(it: &mut I) -> Result<Option<I::Item>, PgError>
where
    I: fallible_iterator::FallibleIterator<Error = std::io::Error>,
{
    it.next().map_err(|e| proto("read", e))
}

pub(super) fn row_values(row: &backend::DataRowBody) -> Result<Vec<Option<Bytes>>, PgError> {
    let buf = row.buffer_bytes();
    let mut out = Vec::new();
    let mut ranges = row.ranges();
    while let Some(r) = fallible_next(&mut ranges)? {
        out.push(r.map(|r| buf.slice(r)));
    }
    Ok(out)
}

pub(super) fn text(row: &[Option<Bytes>], i: usize) -> Result<String, PgError> {
    let v = row
        .get(i)
        .cloned()
        .flatten()
        .ok_or_else(|| proto("reply", format!("column {i} is missing")))?;
    String::from_utf8(v.to_vec()).map_err(|e| proto("reply", e))
}

/// Column `i` parsed from its text form.
pub(super) fn column<T>(row: &[Option<Bytes>], i: usize, what: &str) -> Result<T, PgError>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text(row, i)?.parse().map_err(|e| proto(what, e))
}

/// An `ErrorResponse` as an error that keeps its SQLSTATE, so that "the
/// server is shutting down" is retried and "permission denied" is not.
pub(super) fn server_error(server: &str, what: &str, e: &backend::ErrorResponseBody) -> PgError {
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
pub(super) fn cstring(data: &mut Bytes) -> Result<String, PgError> {
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
pub(super) fn log_notice(server: &str, n: &backend::NoticeResponseBody) {
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
pub(super) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes a slot name as an identifier.
pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
