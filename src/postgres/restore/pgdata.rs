//! Rebuilding PGDATA from a backup's objects, fetched and written in parallel,
//! and the tablespace links.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::*;

/// Bytes written to one file before they are flushed while the restore
/// goes on: the disk writes behind the decoding instead of all at the end,
/// when each file's last piece is in.
const FLUSH_BEHIND: u64 = 32 << 20;

/// Where one extent of a file comes from: (file index, offset in the file,
/// offset in the object, length).
type Piece = (usize, u64, u64, u64);

/// The target prepared for writing: per manifest object, the pieces still to
/// write; what `--delta` found already right, resized or removed.
struct Prepared {
    by_object: Vec<Vec<Piece>>,
    unchanged: u64,
    resized: Vec<PathBuf>,
    removed: usize,
}

/// Runs blocking file-system work on the blocking pool, not the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PgError> + Send + 'static,
) -> Result<T, PgError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PgError::Other(format!("file-system task failed: {e}")))?
}

/// Recreates directories and files, objects fetched and decoded in parallel.
/// Returns (bytes written, bytes left unchanged, entries removed).
pub(super) async fn rebuild(
    repo: &Repository,
    m: &PgManifest,
    dir: &Path,
    parallel: usize,
    progress: &crate::progress::Progress,
    delta: bool,
) -> Result<(u64, u64, usize), PgError> {
    let prepared = {
        let (m, dir) = (m.clone(), dir.to_path_buf());
        blocking(move || prepare(&m, &dir, delta)).await?
    };
    progress.add(prepared.unchanged);
    let total = write_objects(repo, m, dir, prepared.by_object, parallel, progress).await?;
    // Files are durable; make their directory entries (and files only
    // truncated or extended by --delta) durable too.
    let mut dirs: Vec<PathBuf> = m.dirs.iter().map(|d| dir.join(&d.path)).collect();
    dirs.push(dir.to_path_buf());
    dirs.extend(prepared.resized);
    blocking(move || {
        for d in dirs {
            std::fs::File::open(&d)
                .and_then(|f| f.sync_all())
                .map_err(|e| PgError::io(&d, e))?;
        }
        Ok(())
    })
    .await?;
    Ok((total, prepared.unchanged, prepared.removed))
}

/// Creates the directories, prunes (`--delta`), marks the restore
/// incomplete, and sizes every file, noting which extents need writing.
fn prepare(m: &PgManifest, dir: &Path, delta: bool) -> Result<Prepared, PgError> {
    make_dirs(m, dir, delta)?;
    let removed = if delta { prune(dir, m)? } else { 0 };
    let marker = dir.join(INCOMPLETE);
    std::fs::write(&marker, m.system_id.to_string())
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| PgError::io(&marker, e))?;
    let mut prepared = Prepared {
        by_object: vec![Vec::new(); m.objects.len()],
        unchanged: 0,
        resized: Vec::new(),
        removed,
    };
    let owner_of = |b: &Option<String>| b.clone().unwrap_or_else(|| m.id.clone());
    let index: std::collections::HashMap<(String, u32), usize> = m
        .objects
        .iter()
        .enumerate()
        .map(|(i, o)| ((owner_of(&o.backup), o.n), i))
        .collect();
    for (fi, f) in m.files.iter().enumerate() {
        if !safe_relative_path(&f.path) {
            return Err(PgError::Other(format!(
                "manifest of backup {} names file {:?}, which escapes the target; refusing to restore",
                m.id, f.path
            )));
        }
        let p = dir.join(&f.path);
        let existing = delta && std::fs::symlink_metadata(&p).is_ok_and(|md| md.is_file());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(!existing)
            .open(&p)
            .map_err(|e| PgError::io(&p, e))?;
        let old_len = if existing {
            file.metadata().map(|md| md.len()).unwrap_or(0)
        } else {
            0
        };
        file.set_len(f.size).map_err(|e| PgError::io(&p, e))?;
        if existing && old_len != f.size {
            prepared.resized.push(p.clone());
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode & 0o600 | 0o600))
            .map_err(|e| PgError::io(&p, e))?;
        let mut file_off = 0u64;
        let mut buf = Vec::new();
        for ext in &f.extents {
            let Some(&oi) = index.get(&(owner_of(&ext.backup), ext.object)) else {
                return Err(PgError::Other(format!(
                    "manifest of backup {} references data object {} that it does not list",
                    m.id, ext.object
                )));
            };
            // --delta: a block already holding the right bytes stays as it is.
            let same = existing && file_off + ext.len <= old_len && {
                buf.resize(ext.len as usize, 0);
                file.read_exact_at(&mut buf, file_off).is_ok()
                    && crate::codec::piece_hash(&buf) == ext.hash
            };
            if same {
                prepared.unchanged += ext.len;
            } else {
                prepared.by_object[oi].push((fi, file_off, ext.offset, ext.len));
            }
            file_off += ext.len;
        }
    }
    Ok(prepared)
}

/// Creates the backup's directories (a `--delta` target's symlink in the
/// way is removed first), refusing paths that escape the target.
fn make_dirs(m: &PgManifest, dir: &Path, delta: bool) -> Result<(), PgError> {
    for d in &m.dirs {
        if !safe_relative_path(&d.path) {
            return Err(PgError::Other(format!(
                "manifest of backup {} names directory {:?}, which escapes the target; refusing to restore",
                m.id, d.path
            )));
        }
        let p = dir.join(&d.path);
        if delta && p.is_symlink() {
            std::fs::remove_file(&p).map_err(|e| PgError::io(&p, e))?;
        }
        std::fs::create_dir_all(&p).map_err(|e| PgError::io(&p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(d.mode & 0o700 | 0o700))
            .map_err(|e| PgError::io(&p, e))?;
    }
    Ok(())
}

/// Fetches, verifies and writes every object that has pieces to write,
/// `parallel` at a time. A file is fsynced by whichever job writes its last
/// piece, so syncing overlaps with decoding instead of trailing it.
async fn write_objects(
    repo: &Repository,
    m: &PgManifest,
    dir: &Path,
    by_object: Vec<Vec<Piece>>,
    parallel: usize,
    progress: &crate::progress::Progress,
) -> Result<u64, PgError> {
    let mut needed = vec![0usize; m.files.len()];
    for pieces in &by_object {
        for p in pieces {
            needed[p.0] += 1;
        }
    }
    let files = Arc::new(FileProgress {
        dirty: needed.iter().map(|_| AtomicU64::new(0)).collect(),
        remaining: needed.into_iter().map(AtomicUsize::new).collect(),
    });
    let index = m.piece_index();
    let index = &index;
    // Items carry indices, not references: a stream of borrowing items is
    // not provably `Send` to a spawned task (the daemon runs restores).
    let jobs = (0..m.objects.len())
        .zip(by_object)
        .filter(|(_, pieces)| !pieces.is_empty())
        .map(|(oi, pieces)| {
            let o = &m.objects[oi];
            let files = files.clone();
            let key = m.owner(&o.backup).map(|backup| {
                ObjectKey::PgData {
                    cluster: m.cluster.clone(),
                    system_id: m.system_id,
                    backup,
                    n: o.n,
                }
                .to_string()
            });
            async move {
                let key = key.ok_or_else(|| {
                    PgError::Other(format!(
                        "manifest of backup {} names an invalid owner backup id",
                        m.id
                    ))
                })?;
                let expect = m.expect_object(&key, o, index).map_err(PgError::Other)?;
                let (_, data) = repo.get_verified(&key, expect).await?;
                let paths: Vec<PathBuf> = pieces
                    .iter()
                    .map(|p| dir.join(&m.files[p.0].path))
                    .collect();
                let n = blocking(move || write_pieces(&key, &data, &pieces, paths, &files)).await?;
                progress.add(n);
                Ok(n)
            }
        });
    let results: Vec<Result<u64, PgError>> = futures::stream::iter(jobs)
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

/// Per file of the manifest: pieces still to write, and bytes written
/// since it was last flushed.
struct FileProgress {
    remaining: Vec<AtomicUsize>,
    dirty: Vec<AtomicU64>,
}

/// Writes one object's pieces into their files (grouped by file, each
/// opened once), flushing a file every [`FLUSH_BEHIND`] bytes and fsyncing
/// it once its last piece is in.
fn write_pieces(
    key: &str,
    data: &[u8],
    pieces: &[Piece],
    paths: Vec<PathBuf>,
    files: &FileProgress,
) -> Result<u64, PgError> {
    let mut n = 0;
    let mut open: Option<(usize, std::fs::File)> = None;
    for ((fi, file_off, obj_off, len), path) in pieces.iter().zip(paths) {
        let start = *obj_off as usize;
        let end = start + *len as usize;
        let Some(slice) = data.get(start..end) else {
            return Err(PgError::Other(format!(
                "{key}: extent beyond the object's end"
            )));
        };
        if open.as_ref().is_none_or(|(i, _)| i != fi) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| PgError::io(&path, e))?;
            open = Some((*fi, f));
        }
        if let Some((_, f)) = &open {
            f.write_all_at(slice, *file_off)
                .map_err(|e| PgError::io(&path, e))?;
            let dirty = files.dirty[*fi].fetch_add(*len, Ordering::AcqRel) + *len;
            if files.remaining[*fi].fetch_sub(1, Ordering::AcqRel) == 1 {
                f.sync_all().map_err(|e| PgError::io(&path, e))?;
            } else if dirty >= FLUSH_BEHIND
                // One writer of a file flushes it; counts lost to a race
                // only delay the next flush.
                && files.dirty[*fi].swap(0, Ordering::AcqRel) >= FLUSH_BEHIND
            {
                f.sync_data().map_err(|e| PgError::io(&path, e))?;
            }
        }
        n += *len;
    }
    Ok(n)
}

/// Checks `--tablespace-map` against the backup's tablespaces and returns
/// (oid, directory) for each mapped one.
pub(super) fn tablespace_links(
    m: &PgManifest,
    opts: &RestoreOptions,
) -> Result<Vec<(u32, PathBuf)>, PgError> {
    if opts.delta && !m.tablespaces.is_empty() {
        return Err(PgError::Other(format!(
            "backup {} has tablespaces ({}); --delta does not support them yet — restore into an empty directory",
            m.id,
            m.tablespaces
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut out = Vec::new();
    for (key, dir) in &opts.tablespace_map {
        let Some(ts) = m
            .tablespaces
            .iter()
            .find(|t| &t.name == key || t.oid.to_string() == *key)
        else {
            let have: Vec<String> = m
                .tablespaces
                .iter()
                .map(|t| format!("{} (oid {}, was {})", t.name, t.oid, t.location))
                .collect();
            return Err(PgError::Other(format!(
                "--tablespace-map {key}=…: backup {} has no tablespace {key:?}; it has: {}",
                m.id,
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            )));
        };
        if !dir.is_absolute() {
            return Err(PgError::Other(format!(
                "--tablespace-map {key}={}: the directory must be absolute",
                dir.display()
            )));
        }
        if dir.starts_with(&opts.dir) {
            return Err(PgError::Other(format!(
                "--tablespace-map {key}={}: inside the target directory; leave it out to restore the tablespace in place",
                dir.display()
            )));
        }
        check_target_dir(dir)?;
        out.push((ts.oid, dir.clone()));
    }
    // PostgreSQL accepts only links in pg_tblspc; unmapped tablespaces get a
    // directory inside the target, so nothing is written outside it.
    for ts in &m.tablespaces {
        if !out.iter().any(|(oid, _)| *oid == ts.oid) {
            out.push((ts.oid, opts.dir.join(IN_TARGET).join(ts.oid.to_string())));
        }
    }
    Ok(out)
}

/// Where unmapped tablespaces are restored, inside the target.
pub const IN_TARGET: &str = "dr_tablespaces";

/// Creates each mapped tablespace directory and its `pg_tblspc` link.
pub(super) fn make_links(target: &Path, links: &[(u32, PathBuf)]) -> Result<(), PgError> {
    if links.is_empty() {
        return Ok(());
    }
    let tblspc = target.join("pg_tblspc");
    std::fs::create_dir_all(&tblspc).map_err(|e| PgError::io(&tblspc, e))?;
    for (oid, dir) in links {
        std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| PgError::io(dir, e))?;
        let link = tblspc.join(oid.to_string());
        std::os::unix::fs::symlink(dir, &link).map_err(|e| PgError::io(&link, e))?;
    }
    Ok(())
}

/// Removes the tablespace directories [`make_links`] created, after a failure.
pub(super) fn remove_links(links: &[(u32, PathBuf)]) {
    for (_, dir) in links {
        let _ = std::fs::remove_dir_all(dir);
    }
}
