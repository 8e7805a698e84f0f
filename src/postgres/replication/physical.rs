//! Physical replication: system identity, slots, timeline history and the
//! CopyBoth stream of `START_REPLICATION`.

use super::*;

impl ReplicationConn {
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
}
