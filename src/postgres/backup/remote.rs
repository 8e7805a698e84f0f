//! Remote mode: `BASE_BACKUP` over a replication connection, so `dr` can run
//! away from the database host. The server's tar archives are parsed as they
//! arrive and their files fed into the same block/pack pipeline as local
//! mode, giving the same repository format and restore path.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;

use super::super::manifest::{BLOCK_SIZE, DirEntry, FileEntry, Tablespace, safe_relative_path};
use super::super::replication::{BaseBackupMessage, ReplicationConn};
use super::super::{PgError, wal};
use super::pack::{self, Packer, Stopped};
use super::tar::{TarEntry, TarParser, TarSink};
use super::{SKIP_FILES, ServerFacts, Taken};
use crate::config::PgConfig;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::BackupId;

/// What the reader hands the parsing thread.
enum Chunk {
    Archive(String),
    Data(Bytes),
    Manifest(Bytes),
}

/// Adds what to do to errors that mean the user lacks replication rights.
pub(crate) fn replication_hint(e: PgError, cfg: &PgConfig) -> PgError {
    // A lost connection keeps its variant so that it is retried.
    if e.is_transient() {
        return e;
    }
    let msg = e.to_string();
    let user = cfg
        .conninfo
        .parse::<tokio_postgres::Config>()
        .ok()
        .and_then(|c| c.get_user().map(str::to_string))
        .unwrap_or_else(|| "<user>".into());
    if msg.contains("replication") || msg.contains("pg_hba") || msg.contains("42501") {
        PgError::Other(format!(
            "{msg}\nmode = \"remote\" needs a replication connection: give the user the \
             REPLICATION attribute (ALTER ROLE {user} REPLICATION), allow it in pg_hba.conf \
             (host replication {user} <dr host address>/32 scram-sha-256) and keep \
             max_wal_senders above the senders in use"
        ))
    } else {
        e
    }
}

/// `SHOW wal_segment_size` answers with a unit ("16MB").
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let mult = match s[digits..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Tablespace names need SQL, which a replication connection cannot run; a
/// plain connection is tried, and the OID stands in for the name without it.
async fn tablespace_names(cfg: &PgConfig) -> HashMap<u32, String> {
    let res = async {
        let client = super::super::connect(cfg).await?;
        let rows = client
            .query("SELECT oid::int8, spcname::text FROM pg_tablespace", &[])
            .await
            .map_err(|source| PgError::Sql {
                what: "listing tablespaces".into(),
                source,
            })?;
        let mut out = HashMap::new();
        for r in rows {
            if let (Ok(oid), Ok(name)) = (r.try_get::<_, i64>(0), r.try_get::<_, String>(1))
                && let Ok(oid) = u32::try_from(oid)
            {
                out.insert(oid, name);
            }
        }
        Ok::<_, PgError>(out)
    }
    .await;
    res.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read tablespace names; recording them by OID");
        HashMap::new()
    })
}

/// Takes the backup over the replication protocol; the caller records it.
pub(super) async fn take(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    full: bool,
    progress: Arc<Progress>,
) -> Result<Taken, PgError> {
    let mut conn = ReplicationConn::connect(&cfg.conninfo, "dr_backup")
        .await
        .map_err(|e| replication_hint(e, cfg))?;
    let version: u32 = conn.show("server_version_num").await?.parse().unwrap_or(0);
    let facts = ServerFacts {
        version,
        archive_mode: conn.show("archive_mode").await?,
        wal_segment_size: parse_size(&conn.show("wal_segment_size").await?).unwrap_or(0),
    };
    super::check_server(&facts, cfg)?;
    let data_checksums = conn.show("data_checksums").await?;
    let system = conn.identify_system().await?;
    let names = tablespace_names(cfg).await;

    let id = BackupId::new(Utc::now());
    super::mark_started(repo, cluster, system.system_id, &id).await?;
    let start_time = Utc::now();
    let start = conn
        .base_backup(&format!("dr {id}"))
        .await
        .map_err(|e| replication_hint(e, cfg))?;
    tracing::info!(backup = %id, start_lsn = %start.start_lsn, "backup started");
    let total_kb: u64 = start.tablespaces.iter().filter_map(|t| t.size_kb).sum();
    progress.add_total(total_kb * 1024);
    let tablespaces: Vec<Tablespace> = start
        .tablespaces
        .iter()
        .filter_map(|t| {
            let oid = t.oid?;
            Some(Tablespace {
                oid,
                name: names.get(&oid).cloned().unwrap_or_else(|| oid.to_string()),
                location: t.location.clone().unwrap_or_default(),
            })
        })
        .collect();
    let (prev, checks) = super::prepare(
        repo,
        cluster,
        system.system_id,
        cfg,
        full,
        start.start_lsn,
        &data_checksums,
    )
    .await;
    let target = pack::Target {
        repo,
        cluster,
        system_id: system.system_id,
        id: &id,
        parallel: cfg.parallel,
    };

    let (ctx, crx) = tokio::sync::mpsc::channel::<Chunk>(64);
    let (ptx, prx) = tokio::sync::mpsc::channel(cfg.parallel);
    let packer = Packer::new(
        Arc::new(pack::prev_blocks(prev.as_ref())),
        ptx,
        progress,
        checks.clone(),
    );
    let parser = tokio::task::spawn_blocking(move || parse_stream(crx, packer));
    let read = async {
        while let Some(m) = conn.base_backup_next().await? {
            let chunk = match m {
                BaseBackupMessage::NewArchive { name, .. } => Chunk::Archive(name),
                BaseBackupMessage::ArchiveData(d) => Chunk::Data(d),
                BaseBackupMessage::ManifestData(d) => Chunk::Manifest(d),
                BaseBackupMessage::Progress(_) => continue,
            };
            if ctx.send(chunk).await.is_err() {
                // The parser stopped; its error is the one to report.
                return Ok(None);
            }
        }
        drop(ctx);
        conn.base_backup_end().await.map(Some)
    };
    let (end, done) = tokio::join!(read, pack::upload(&target, prx));
    let parsed = parser
        .await
        .map_err(|e| PgError::Other(format!("archive parser: {e}")))?;
    // A server error comes first: it also truncates what the parser saw.
    let (stop_lsn, stop_timeline) = match end? {
        Some(end) => end,
        None => {
            parsed?;
            return Err(PgError::Other("the archive parser stopped early".into()));
        }
    };
    let mut parsed = parsed?;
    parsed.dirs.sort_by(|a, b| a.path.cmp(&b.path));
    conn.close().await;
    let stop_time = Utc::now();

    let mut file_list = parsed.files;
    let has_manifest = !parsed.server_manifest.is_empty();
    if has_manifest {
        file_list.push(("backup_manifest".into(), 0o600));
    }
    let (mut files, objects) = pack::assemble(&file_list, done, prev.as_ref())?;
    let server_manifest = if has_manifest { files.pop() } else { None };
    if has_manifest {
        check_against_server_manifest(&parsed.server_manifest, &files, &parsed.set_aside)?;
    }
    let backup_label = parsed.backup_label.ok_or_else(|| {
        PgError::Other("BASE_BACKUP sent no backup_label; the backup cannot be restored".into())
    })?;
    Ok(Taken {
        id,
        system_id: system.system_id,
        server_version: version,
        start_time,
        stop_time,
        start_lsn: start.start_lsn,
        stop_lsn,
        timeline: start.timeline,
        start_segment: wal::walfile_name(start.timeline, start.start_lsn).to_string(),
        stop_segment: wal::walfile_name(stop_timeline, stop_lsn).to_string(),
        backup_label,
        tablespace_map: parsed.tablespace_map.unwrap_or_default(),
        tablespaces,
        dirs: parsed.dirs,
        files,
        objects,
        checks,
        prev,
        server_manifest,
    })
}

/// Compares what was parsed with the server's `backup_manifest`: the same
/// files with the same sizes. A mismatch means the stream was misread.
fn check_against_server_manifest(
    manifest: &[u8],
    files: &[FileEntry],
    set_aside: &[(String, u64)],
) -> Result<(), PgError> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "Files")]
        files: Vec<F>,
    }
    #[derive(serde::Deserialize)]
    struct F {
        #[serde(rename = "Path")]
        path: Option<String>,
        #[serde(rename = "Size")]
        size: u64,
    }
    let m: M = serde_json::from_slice(manifest)
        .map_err(|e| PgError::Other(format!("the server's backup_manifest is unreadable: {e}")))?;
    let mut ours: HashMap<&str, u64> = files.iter().map(|f| (f.path.as_str(), f.size)).collect();
    for (p, s) in set_aside {
        ours.insert(p, *s);
    }
    let mut listed = 0usize;
    for f in &m.files {
        // Paths that are not UTF-8 come as "Encoded-Path"; dr keeps only
        // UTF-8 paths, as in local mode.
        let Some(path) = &f.path else { continue };
        listed += 1;
        match ours.get(path.as_str()) {
            Some(&size) if size == f.size => {}
            Some(&size) => {
                return Err(PgError::Other(format!(
                    "{path}: {size} bytes parsed but the server's backup_manifest says {}; \
                     the backup was not recorded",
                    f.size
                )));
            }
            None => {
                return Err(PgError::Other(format!(
                    "{path} is in the server's backup_manifest but not in the archives parsed; \
                     the backup was not recorded"
                )));
            }
        }
    }
    if listed != ours.len() {
        return Err(PgError::Other(format!(
            "the archives held {} files but the server's backup_manifest lists {listed}; \
             the backup was not recorded",
            ours.len()
        )));
    }
    Ok(())
}

/// What the archives held besides file contents.
struct Parsed {
    dirs: Vec<DirEntry>,
    files: Vec<(String, u32)>,
    backup_label: Option<String>,
    tablespace_map: Option<String>,
    server_manifest: Vec<u8>,
    /// Files read but not stored as files (backup_label, …), with sizes.
    set_aside: Vec<(String, u64)>,
}

/// The file being read.
struct Current {
    /// Index in `files`; `None` for a file set aside.
    idx: Option<usize>,
    rel: String,
    off: u64,
    /// Contents of a file set aside, when kept (backup_label, tablespace_map).
    keep: Option<Vec<u8>>,
}

struct Sink {
    packer: Packer,
    /// Path prefix of the current archive: "" for PGDATA,
    /// `pg_tblspc/<oid>/` for a tablespace.
    prefix: String,
    parsed: Parsed,
    cur: Option<Current>,
    block: Vec<u8>,
}

fn stopped(_: Stopped) -> PgError {
    PgError::Other("uploading stopped".into())
}

impl Sink {
    fn flush_block(&mut self) -> Result<(), PgError> {
        let Some(cur) = &mut self.cur else {
            return Ok(());
        };
        if self.block.is_empty() {
            return Ok(());
        }
        if let Some(idx) = cur.idx {
            self.packer
                .block(idx, &cur.rel, cur.off, &self.block)
                .map_err(stopped)?;
        }
        cur.off += self.block.len() as u64;
        self.block.clear();
        Ok(())
    }
}

impl TarSink for Sink {
    fn entry(&mut self, e: TarEntry) -> Result<(), PgError> {
        let rel = |p: &str| format!("{}{p}", self.prefix);
        let checked = |p: String| {
            if safe_relative_path(&p) {
                Ok(p)
            } else {
                Err(PgError::Other(format!(
                    "BASE_BACKUP sent the unsafe path {p:?}; refusing it"
                )))
            }
        };
        match e {
            TarEntry::Dir { path, mode } => {
                let path = checked(rel(&path))?;
                self.parsed.dirs.push(DirEntry { path, mode });
            }
            TarEntry::File { path, mode, .. } => {
                let at_root = self.prefix.is_empty() && !path.contains('/');
                let full = checked(rel(&path))?;
                let set_aside = at_root && SKIP_FILES.contains(&path.as_str());
                let keep = matches!(path.as_str(), "backup_label" | "tablespace_map") && at_root;
                let idx = (!set_aside).then(|| {
                    self.parsed.files.push((full.clone(), mode));
                    self.parsed.files.len() - 1
                });
                self.cur = Some(Current {
                    idx,
                    rel: full,
                    off: 0,
                    keep: keep.then(Vec::new),
                });
            }
            TarEntry::Symlink { path, target } => {
                // With TABLESPACE_MAP the server sends no pg_tblspc links;
                // PostgreSQL skips other links too.
                tracing::warn!(path = %rel(&path), %target, "skipping a symbolic link in the base backup");
            }
        }
        Ok(())
    }

    fn data(&mut self, mut data: &[u8]) -> Result<(), PgError> {
        if let Some(keep) = self.cur.as_mut().and_then(|c| c.keep.as_mut()) {
            keep.extend_from_slice(data);
            return Ok(());
        }
        while !data.is_empty() {
            let take = (BLOCK_SIZE - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.block.len() == BLOCK_SIZE {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn file_end(&mut self) -> Result<(), PgError> {
        self.flush_block()?;
        let Some(cur) = self.cur.take() else {
            return Ok(());
        };
        match (cur.idx, cur.keep) {
            (Some(idx), _) => {
                if cur.off == 0 {
                    self.packer.empty(idx);
                }
            }
            (None, keep) => {
                let size = keep.as_ref().map_or(cur.off, |k| k.len() as u64);
                if let Some(k) = keep {
                    let text = String::from_utf8(k).map_err(|_| {
                        PgError::Other(format!("BASE_BACKUP sent a {} that is not text", cur.rel))
                    })?;
                    match cur.rel.as_str() {
                        "backup_label" => self.parsed.backup_label = Some(text),
                        _ => self.parsed.tablespace_map = Some(text),
                    }
                }
                self.parsed.set_aside.push((cur.rel, size));
            }
        }
        Ok(())
    }
}

/// The tablespace directory prefix for archive `name`: `base.tar` is PGDATA,
/// `<oid>.tar` a tablespace.
fn archive_prefix(name: &str) -> Result<(String, Option<u32>), PgError> {
    if name == "base.tar" {
        return Ok((String::new(), None));
    }
    match name
        .strip_suffix(".tar")
        .and_then(|o| o.parse::<u32>().ok())
    {
        Some(oid) => Ok((format!("pg_tblspc/{oid}/"), Some(oid))),
        None => Err(PgError::Other(format!(
            "BASE_BACKUP sent an archive named {name:?}; dr reads uncompressed tar archives \
             (base.tar, <oid>.tar)"
        ))),
    }
}

/// Runs on a blocking thread: parses each archive and feeds files to the
/// packer (hashing and page checks are CPU work).
fn parse_stream(
    mut rx: tokio::sync::mpsc::Receiver<Chunk>,
    packer: Packer,
) -> Result<Parsed, PgError> {
    let mut sink = Sink {
        packer,
        prefix: String::new(),
        parsed: Parsed {
            dirs: Vec::new(),
            files: Vec::new(),
            backup_label: None,
            tablespace_map: None,
            server_manifest: Vec::new(),
            set_aside: Vec::new(),
        },
        cur: None,
        block: Vec::with_capacity(BLOCK_SIZE),
    };
    let mut parser: Option<TarParser> = None;
    let res = (|| {
        while let Some(chunk) = rx.blocking_recv() {
            match chunk {
                Chunk::Archive(name) => {
                    if let Some(p) = parser.take() {
                        p.finish()?;
                    }
                    let (prefix, oid) = archive_prefix(&name)?;
                    if let Some(oid) = oid {
                        sink.parsed.dirs.push(DirEntry {
                            path: format!("pg_tblspc/{oid}"),
                            mode: 0o700,
                        });
                    }
                    sink.prefix = prefix;
                    parser = Some(TarParser::new(&name));
                }
                Chunk::Data(d) => match parser.as_mut() {
                    Some(p) => p.feed(&d, &mut sink)?,
                    None => {
                        return Err(PgError::Other(
                            "BASE_BACKUP sent archive data before naming the archive".into(),
                        ));
                    }
                },
                Chunk::Manifest(d) => {
                    if let Some(p) = parser.take() {
                        p.finish()?;
                    }
                    sink.parsed.server_manifest.extend_from_slice(&d);
                }
            }
        }
        if let Some(p) = parser.take() {
            p.finish()?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        sink.packer.fail(PgError::Other(e.to_string()));
        return Err(e);
    }
    // The server's manifest goes through the packer as the last file.
    let manifest = std::mem::take(&mut sink.parsed.server_manifest);
    let idx = sink.parsed.files.len();
    let mut off = 0u64;
    for block in manifest.chunks(BLOCK_SIZE) {
        sink.packer
            .block(idx, "backup_manifest", off, block)
            .map_err(stopped)?;
        off += block.len() as u64;
    }
    sink.packer.finish();
    sink.parsed.server_manifest = manifest;
    Ok(sink.parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("16777216"), Some(16 << 20));
        assert_eq!(parse_size("x"), None);
    }

    fn file(path: &str, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            size,
            mode: 0o600,
            extents: Vec::new(),
        }
    }

    #[test]
    fn parsed_files_must_match_the_server_manifest() {
        let m = br#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [
            {"Path": "backup_label", "Size": 10, "Last-Modified": "x"},
            {"Path": "base/1/1259", "Size": 8192, "Last-Modified": "x"}
        ]}"#;
        let aside = vec![("backup_label".to_string(), 10)];
        assert!(check_against_server_manifest(m, &[file("base/1/1259", 8192)], &aside).is_ok());
        let e = check_against_server_manifest(m, &[file("base/1/1259", 8000)], &aside)
            .expect_err("size");
        assert!(e.to_string().contains("8192"), "{e}");
        assert!(check_against_server_manifest(m, &[], &aside).is_err());
        let extra = [file("base/1/1259", 8192), file("base/1/2", 1)];
        assert!(check_against_server_manifest(m, &extra, &aside).is_err());
    }

    #[test]
    fn archive_names() {
        assert_eq!(archive_prefix("base.tar").ok(), Some((String::new(), None)));
        assert_eq!(
            archive_prefix("16384.tar").ok(),
            Some(("pg_tblspc/16384/".into(), Some(16384)))
        );
        assert!(archive_prefix("base.tar.gz").is_err());
    }
}
