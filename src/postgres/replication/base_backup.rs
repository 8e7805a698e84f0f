//! `BASE_BACKUP` over the replication connection: its result sets and the
//! CopyOut stream of archives, progress and the backup manifest.

use super::*;

impl ReplicationConn {
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
}
