//! Local filesystem store, the embedded default.
//!
//! A put writes a temp file under `<root>/.tmp/`, fsyncs it, hard-links it to its
//! final name (which fails if the name exists, so objects are create-only), and
//! fsyncs the directories. A crash at any point leaves at most a temp file, which
//! is never listed. A put of a buffer does all of it in one blocking call: a
//! synchronous WAL stream waits for one such put per commit group, and every
//! hand-off between threads is latency on a busy machine.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use std::io::Write;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ByteStream, ObjectInfo, StoreError};

const TMP_DIR: &str = ".tmp";

/// A repository region in a local directory.
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> FsStore {
        FsStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn describe(&self) -> String {
        format!("fs:{}", self.root.display())
    }

    fn err(&self, op: &'static str, key: &str, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::NotFound && op != "put" {
            return StoreError::NotFound {
                store: self.describe(),
                key: key.to_string(),
            };
        }
        let hint = match e.kind() {
            io::ErrorKind::PermissionDenied => {
                "; check that the user running dr owns the repository directory"
            }
            io::ErrorKind::StorageFull => "; the filesystem is full",
            _ => "",
        };
        StoreError::Backend {
            store: self.describe(),
            op,
            key: key.to_string(),
            message: format!("{e}{hint}"),
            transient: false,
        }
    }

    pub(super) async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, StoreError> {
        let tmp_dir = self.root.join(TMP_DIR);
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|e| self.err("put", key, e))?;
        let tmp = tmp_dir.join(format!("{:016x}", rand::random::<u64>()));
        let result = async {
            // Writes go through one blocking thread with a std::fs::File: fewer
            // copies and task hand-offs than tokio::fs for large objects.
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
            let path = tmp.clone();
            let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                let mut n = 0u64;
                while let Some(chunk) = rx.blocking_recv() {
                    f.write_all(&chunk)?;
                    n += chunk.len() as u64;
                }
                f.sync_all()?;
                Ok(n)
            });
            let mut source_err = None;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        if tx.send(c).await.is_err() {
                            break; // the writer failed; its error is reported below
                        }
                    }
                    Err(e) => {
                        source_err = Some(e);
                        break;
                    }
                }
            }
            drop(tx);
            let written = writer
                .await
                .map_err(|e| self.err("put", key, io::Error::other(e)))?;
            if let Some(source) = source_err {
                return Err(StoreError::Source {
                    store: self.describe(),
                    key: key.to_string(),
                    source,
                });
            }
            let n = written.map_err(|e| self.err("put", key, e))?;
            let dest = self.root.join(key);
            let (root, dest2, tmp2) = (self.root.clone(), dest.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || publish(&root, &tmp2, &dest2))
                .await
                .map_err(|e| self.err("put", key, io::Error::other(e)))?
                .map_err(|e| self.put_err(key, e))?;
            Ok(n)
        }
        .await;
        // The temp file is garbage whether the put succeeded (it was linked) or not.
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }

    /// Creates `key` from a buffer: the same protocol as [`FsStore::put`]
    /// (temp file, fsync, hard link, directory fsync) in one blocking call.
    pub(super) async fn put_bytes(&self, key: &str, body: Bytes) -> Result<u64, StoreError> {
        let (root, k) = (self.root.clone(), key.to_string());
        tokio::task::spawn_blocking(move || write_object(&root, &k, &body))
            .await
            .map_err(|e| self.err("put", key, io::Error::other(e)))?
            .map_err(|e| self.put_err(key, e))
    }

    /// A failed put's error: an existing name is [`StoreError::AlreadyExists`].
    fn put_err(&self, key: &str, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::AlreadyExists {
            StoreError::AlreadyExists {
                store: self.describe(),
                key: key.to_string(),
            }
        } else {
            self.err("put", key, e)
        }
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        let path = self.root.join(key);
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.err("get", key, e))?;
        let stream: ByteStream = match range {
            None => Box::pin(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)),
            Some(r) => {
                f.seek(io::SeekFrom::Start(r.start))
                    .await
                    .map_err(|e| self.err("get", key, e))?;
                let len = r.end.saturating_sub(r.start);
                Box::pin(tokio_util::io::ReaderStream::with_capacity(
                    f.take(len),
                    1 << 20,
                ))
            }
        };
        Ok(stream)
    }

    pub(super) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match tokio::fs::metadata(self.root.join(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let root = self.root.clone();
        let p = prefix.to_string();
        let res = tokio::task::spawn_blocking(move || list_blocking(&root, &p))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        res.map_err(|e| self.err("list", prefix, e))
    }

    /// Temp files under `.tmp/` with their last write: a put removes its own,
    /// so any found belong to a put still running or to a killed writer.
    pub async fn temp_files(
        &self,
    ) -> Result<Vec<(String, Option<chrono::DateTime<chrono::Utc>>)>, StoreError> {
        let dir = self.root.join(TMP_DIR);
        let res = tokio::task::spawn_blocking(move || -> io::Result<Vec<_>> {
            let mut out = Vec::new();
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            for entry in rd {
                let entry = entry?;
                let meta = entry.metadata()?;
                if let (true, Some(name)) = (meta.is_file(), entry.file_name().to_str()) {
                    let modified = meta.modified().ok().map(chrono::DateTime::from);
                    out.push((name.to_string(), modified));
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        res.map_err(|e| self.err("list", TMP_DIR, e))
    }

    /// Removes the temp file `name` (as [`FsStore::temp_files`] lists it).
    pub async fn remove_temp(&self, name: &str) -> Result<(), StoreError> {
        let key = format!("{TMP_DIR}/{name}");
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(StoreError::InvalidKey {
                key,
                why: "not a temp file name",
            });
        }
        match tokio::fs::remove_file(self.root.join(&key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", &key, e)),
        }
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.root.join(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}

/// An append-only journal in a filesystem region: the one kind of object
/// written to after it is published (the streamer's segment journal).
/// Its space is filled with zeros before it is published, so an append's
/// `fdatasync` flushes data, not the file's size: PostgreSQL's own WAL
/// files work the same way, and `pg_receivewal` writes them so.
pub struct JournalFile {
    file: std::fs::File,
    /// Where the next append writes.
    pos: u64,
}

impl FsStore {
    /// Publishes `key` holding `header` followed by zeros up to `reserve`
    /// bytes, durable like any put (temp file, fsync, hard link, directory
    /// fsync), and keeps it open for appends. Blocking.
    pub fn create_journal(
        &self,
        key: &str,
        header: &[u8],
        reserve: u64,
    ) -> Result<JournalFile, StoreError> {
        super::validate_key(key)?;
        let zeros = vec![0u8; 1 << 20];
        let create = || -> io::Result<JournalFile> {
            let tmp = temp_path(&self.root)?;
            let res = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .and_then(|mut f| {
                    f.write_all(header)?;
                    let mut left = reserve.saturating_sub(header.len() as u64);
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        f.write_all(&zeros[..n])?;
                        left -= n as u64;
                    }
                    f.sync_all()?;
                    publish(&self.root, &tmp, &self.root.join(key))?;
                    Ok(JournalFile {
                        file: f,
                        pos: header.len() as u64,
                    })
                });
            let _ = std::fs::remove_file(&tmp);
            res
        };
        create().map_err(|e| self.put_err(key, e))
    }
}

impl JournalFile {
    /// Writes `bytes` after what the journal holds and waits until they are
    /// durable. Blocking.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(bytes, self.pos)?;
        self.file.sync_data()?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

/// Writes `body` to a synced temp file, publishes it as `key` and removes
/// the temp file (whether or not the put succeeded: once linked it is a
/// second name of the object, otherwise garbage).
fn write_object(root: &Path, key: &str, body: &[u8]) -> io::Result<u64> {
    let tmp = temp_path(root)?;
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(body)?;
            f.sync_all()
        })
        .and_then(|()| publish(root, &tmp, &root.join(key)));
    let _ = std::fs::remove_file(&tmp);
    res.map(|()| body.len() as u64)
}

/// A fresh name under `<root>/.tmp/` (created if missing), never listed.
fn temp_path(root: &Path) -> io::Result<PathBuf> {
    let tmp_dir = root.join(TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)?;
    Ok(tmp_dir.join(format!("{:016x}", rand::random::<u64>())))
}

/// Links the synced temp file to its final name and makes the new directory
/// entries durable.
fn publish(root: &Path, tmp: &Path, dest: &Path) -> io::Result<()> {
    let parent = dest.parent().unwrap_or(root);
    create_dirs_durable(root, parent)?;
    std::fs::hard_link(tmp, dest)?;
    fsync_dir(parent)
}

/// `mkdir -p` that fsyncs the parent of every directory it creates.
fn create_dirs_durable(root: &Path, dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.is_dir() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) if p.starts_with(root) || p == root => cur = p,
            _ => break,
        }
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(p) = d.parent() {
            fsync_dir(p)?;
        }
    }
    Ok(())
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn list_blocking(root: &Path, prefix: &str) -> io::Result<Vec<ObjectInfo>> {
    // Walk only the deepest directory the prefix names.
    let dir_part = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let start = if dir_part.is_empty() {
        root.to_path_buf()
    } else {
        root.join(dir_part)
    };
    let mut out = Vec::new();
    let mut stack = vec![start];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            if rel == TMP_DIR || rel.starts_with(".tmp/") {
                continue;
            }
            let ft = entry.file_type()?;
            if ft.is_dir() {
                let with_slash = format!("{rel}/");
                if with_slash.starts_with(prefix) || prefix.starts_with(&with_slash) {
                    stack.push(path);
                }
            } else if ft.is_file() && rel.starts_with(prefix) {
                let meta = entry.metadata()?;
                out.push(ObjectInfo {
                    key: rel.to_string(),
                    size: meta.len(),
                    modified: meta
                        .modified()
                        .ok()
                        .map(chrono::DateTime::<chrono::Utc>::from),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
