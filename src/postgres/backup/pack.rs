//! The part of a base backup both modes share: file contents cut into
//! page-aligned blocks, blocks unchanged since the previous backup referenced,
//! the rest packed into data objects uploaded in parallel, and the pieces
//! assembled into the manifest's file list.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::super::manifest::{
    BLOCK_SIZE, DataObject, Extent, FileEntry, PIECES_HASHED, PgManifest,
};
use super::super::{PgError, checksum};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

/// Target plaintext size of one data object.
const PACK_SIZE: usize = 8 << 20;

/// A piece of a file: either bytes placed in the current pack, or a block
/// unchanged since the previous backup, referenced where it already is.
pub(super) struct Piece {
    file: usize,
    file_off: u64,
    extent: Extent,
}

/// A data object's plaintext and the file pieces in it.
pub(super) struct Pack {
    n: u32,
    data: Bytes,
    pieces: Vec<Piece>,
}

/// Page-checksum verification while files are read.
pub(crate) struct PageChecks {
    start_lsn: u64,
    bad: std::sync::Mutex<Vec<(String, u64)>>,
}

impl PageChecks {
    /// Checks pages against `start_lsn` (pages newer than it are being
    /// rewritten and are checked by WAL replay instead).
    pub(super) fn new(start_lsn: u64) -> PageChecks {
        PageChecks {
            start_lsn,
            bad: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn check(&self, rel: &str, file_off: u64, data: &[u8]) {
        let Some(seg) = checksum::relation_segment(rel) else {
            return;
        };
        for (i, page) in data.chunks(checksum::PAGE_SIZE).enumerate() {
            let blk = seg * checksum::PAGES_PER_SEGMENT
                + file_off / checksum::PAGE_SIZE as u64
                + i as u64;
            if checksum::check_page(page, blk as u32, self.start_lsn) == checksum::PageCheck::Bad {
                tracing::warn!(file = rel, block = blk, "page checksum mismatch");
                if let Ok(mut b) = self.bad.lock() {
                    b.push((rel.to_string(), blk));
                }
            }
        }
    }

    /// The failures found so far.
    pub(super) fn failures(&self) -> Vec<(String, u64)> {
        self.bad.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// Blocks of the previous backup, by (path, block index).
pub(super) type PrevBlocks = HashMap<(String, u64), Extent>;

/// Builds the lookup of the previous backup's blocks, with owners made explicit.
pub(super) fn prev_blocks(prev: Option<&PgManifest>) -> PrevBlocks {
    let mut out = HashMap::new();
    let Some(m) = prev else { return out };
    for f in &m.files {
        let mut off = 0u64;
        for e in &f.extents {
            let mut e = e.clone();
            e.backup = Some(e.backup.clone().unwrap_or_else(|| m.id.clone()));
            out.insert((f.path.clone(), off / BLOCK_SIZE as u64), e.clone());
            off += e.len;
        }
    }
    out
}

/// The receiving end of the packs went away (an upload failed).
#[derive(Debug)]
pub(super) struct Stopped;

/// Cuts blocks into packs of about `PACK_SIZE`, referencing blocks identical
/// to the same block of the previous backup. Runs on a blocking thread: the
/// hashing and page checks are CPU work.
pub(super) struct Packer {
    n: u32,
    buf: BytesMut,
    pieces: Vec<Piece>,
    prev: Arc<PrevBlocks>,
    tx: tokio::sync::mpsc::Sender<Result<Pack, PgError>>,
    progress: Arc<Progress>,
    checks: Option<Arc<PageChecks>>,
}

impl Packer {
    /// A packer sending to `tx`.
    pub(super) fn new(
        prev: Arc<PrevBlocks>,
        tx: tokio::sync::mpsc::Sender<Result<Pack, PgError>>,
        progress: Arc<Progress>,
        checks: Option<Arc<PageChecks>>,
    ) -> Packer {
        Packer {
            n: 0,
            buf: BytesMut::with_capacity(PACK_SIZE),
            pieces: Vec::new(),
            prev,
            tx,
            progress,
            checks,
        }
    }

    /// Adds block `file_off / BLOCK_SIZE` (at most `BLOCK_SIZE` bytes) of
    /// file number `file`, whose path is `rel`.
    pub(super) fn block(
        &mut self,
        file: usize,
        rel: &str,
        file_off: u64,
        data: &[u8],
    ) -> Result<(), Stopped> {
        self.progress.add(data.len() as u64);
        if let Some(c) = &self.checks {
            c.check(rel, file_off, data);
        }
        let hash = crate::codec::piece_hash(data);
        let reused = self
            .prev
            .get(&(rel.to_string(), file_off / BLOCK_SIZE as u64))
            .filter(|e| e.hash == hash && e.len == data.len() as u64);
        let extent = match reused {
            Some(e) => e.clone(),
            None => {
                let off = self.buf.len() as u64;
                self.buf.extend_from_slice(data);
                Extent {
                    backup: None,
                    object: self.n,
                    offset: off,
                    len: data.len() as u64,
                    hash,
                }
            }
        };
        self.pieces.push(Piece {
            file,
            file_off,
            extent,
        });
        if self.buf.len() >= PACK_SIZE {
            let pack = Pack {
                n: self.n,
                data: std::mem::replace(&mut self.buf, BytesMut::with_capacity(PACK_SIZE)).freeze(),
                pieces: std::mem::take(&mut self.pieces),
            };
            self.n += 1;
            self.tx.blocking_send(Ok(pack)).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    /// Records an empty file: a zero-length piece marks it.
    pub(super) fn empty(&mut self, file: usize) {
        self.pieces.push(Piece {
            file,
            file_off: 0,
            extent: Extent {
                backup: None,
                object: self.n,
                offset: 0,
                len: 0,
                hash: String::new(),
            },
        });
    }

    /// Reports a failure to the uploading side.
    pub(super) fn fail(&self, e: PgError) {
        let _ = self.tx.blocking_send(Err(e));
    }

    /// Sends the last, partly filled pack.
    pub(super) fn finish(mut self) {
        if !self.buf.is_empty() || !self.pieces.is_empty() {
            let _ = self.tx.blocking_send(Ok(Pack {
                n: self.n,
                data: std::mem::take(&mut self.buf).freeze(),
                pieces: std::mem::take(&mut self.pieces),
            }));
        }
    }
}

/// Where the backup's packs go.
pub(super) struct Target<'a> {
    pub repo: &'a Repository,
    pub cluster: &'a str,
    pub system_id: u64,
    pub id: &'a BackupId,
    pub parallel: usize,
}

/// What the uploads produced: each pack's pieces and its data object.
pub(super) type Uploaded = Vec<Result<(Vec<Piece>, Option<DataObject>), PgError>>;

/// Uploads packs from `rx`, `parallel` at a time, until the producer is done.
pub(super) async fn upload(
    t: &Target<'_>,
    rx: tokio::sync::mpsc::Receiver<Result<Pack, PgError>>,
) -> Uploaded {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
        .map(|pack: Result<Pack, PgError>| async move {
            let pack = pack?;
            if pack.data.is_empty() {
                return Ok::<_, PgError>((pack.pieces, None));
            }
            let key = ObjectKey::PgData {
                cluster: t.cluster.to_string(),
                system_id: t.system_id,
                backup: t.id.clone(),
                n: pack.n,
            };
            // Every byte of a pack is in a block whose hash the manifest
            // records: that is what readers check, so the pack is not
            // hashed a second time.
            let (enc, _) = t
                .repo
                .put_buffer(&key, pack.data, Some(PIECES_HASHED.to_string()))
                .await?;
            Ok((
                pack.pieces,
                Some(DataObject {
                    backup: None,
                    n: pack.n,
                    encoded: enc,
                }),
            ))
        })
        .buffer_unordered(t.parallel)
        .collect()
        .await
}

/// Turns uploaded pieces into file entries (in `files` order; files that
/// vanished while the backup ran are left out) and the list of data objects
/// the backup uses, its own and earlier backups'.
pub(super) fn assemble(
    files: &[(String, u32)],
    done: Uploaded,
    prev: Option<&PgManifest>,
) -> Result<(Vec<FileEntry>, Vec<DataObject>), PgError> {
    let mut out: Vec<FileEntry> = files
        .iter()
        .map(|(path, mode)| FileEntry {
            path: path.clone(),
            size: 0,
            mode: *mode,
            extents: Vec::new(),
        })
        .collect();
    let mut present = vec![false; out.len()];
    let mut objects = Vec::new();
    let mut pieces_all = Vec::new();
    for r in done {
        let (pieces, obj) = r?;
        objects.extend(obj);
        pieces_all.extend(pieces);
    }
    // Objects of earlier backups that reused blocks live in.
    let mut referenced: HashMap<(String, u32), DataObject> = HashMap::new();
    if let Some(p) = prev {
        for o in &p.objects {
            let owner = o.backup.clone().unwrap_or_else(|| p.id.clone());
            referenced.insert(
                (owner.clone(), o.n),
                DataObject {
                    backup: Some(owner),
                    ..o.clone()
                },
            );
        }
    }
    let mut used = std::collections::BTreeMap::new();
    pieces_all.sort_by_key(|p| (p.file, p.file_off));
    for piece in pieces_all {
        let Some(entry) = out.get_mut(piece.file) else {
            return Err(PgError::Other(format!(
                "internal: a piece names file {} of {}",
                piece.file,
                files.len()
            )));
        };
        present[piece.file] = true;
        if piece.extent.len == 0 {
            continue;
        }
        if let Some(owner) = &piece.extent.backup {
            let k = (owner.clone(), piece.extent.object);
            let Some(o) = referenced.get(&k) else {
                return Err(PgError::Other(format!(
                    "previous backup {owner} does not list data object {}; taking a full backup is safe: \
                     remove the state file and retry",
                    piece.extent.object
                )));
            };
            used.insert(k, o.clone());
        }
        entry.size += piece.extent.len;
        entry.extents.push(piece.extent);
    }
    objects.sort_by_key(|o| o.n);
    objects.extend(used.into_values());
    let out = out
        .into_iter()
        .zip(present)
        .filter_map(|(f, p)| p.then_some(f))
        .collect();
    Ok((out, objects))
}
