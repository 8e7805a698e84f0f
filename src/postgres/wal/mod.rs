//! `wal-push` (archive_command) and `wal-fetch` (restore_command).
//!
//! Object names carry the plaintext BLAKE3, so pushing the same file twice is
//! recognised without decrypting anything (backup hosts hold no private key),
//! and a different file under an archived name is refused, never overwritten.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;

use super::PgError;
use crate::codec::Expect;
use crate::repo::Repository;
use crate::repo::layout::{ObjectKey, TimelineId, WalSegmentName, WalSuffix};

/// A file PostgreSQL archives, parsed from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFile {
    /// A segment, `.partial` segment or `.backup` history file.
    Segment(WalSegmentName, WalSuffix),
    /// `TTTTTTTT.history`.
    History(TimelineId),
}

impl WalFile {
    /// Parses a file name as PostgreSQL writes it in `pg_wal/`.
    pub fn parse(name: &str) -> Option<WalFile> {
        if let Some(t) = name.strip_suffix(".history") {
            return t.parse().ok().map(WalFile::History);
        }
        if name.len() < 24 || !name.is_char_boundary(24) {
            return None;
        }
        let seg: WalSegmentName = name[..24].parse().ok()?;
        match WalSuffix::parse(&name[24..])? {
            // Streamed pieces and journals are dr's own objects, never
            // PostgreSQL file names.
            WalSuffix::Stream { .. } | WalSuffix::Journal { .. } => None,
            suffix => Some(WalFile::Segment(seg, suffix)),
        }
    }

    /// The object key for this file with content hash `hash`.
    pub fn key(&self, cluster: &str, system_id: u64, hash: &str) -> ObjectKey {
        match *self {
            WalFile::Segment(segment, suffix) => ObjectKey::Wal {
                cluster: cluster.to_string(),
                system_id,
                segment,
                suffix,
                hash: hash.to_string(),
            },
            WalFile::History(timeline) => ObjectKey::TimelineHistory {
                cluster: cluster.to_string(),
                system_id,
                timeline,
                hash: hash.to_string(),
            },
        }
    }

    /// Key prefix under which every version of this file would be stored
    /// (`<name>-`), used to find it without knowing its hash.
    pub fn key_prefix(&self, cluster: &str, system_id: u64) -> String {
        let k = self.key(cluster, system_id, &"0".repeat(64)).to_string();
        k[..k.len() - 64].to_string()
    }
}

/// What `wal-push` did.
#[derive(Debug, serde::Serialize)]
pub struct PushReport {
    /// File name.
    pub file: String,
    /// Object key.
    pub key: String,
    /// Plaintext bytes.
    pub size: u64,
    /// True when the identical file was already archived.
    pub already_archived: bool,
    /// Regions that took the write.
    pub regions: Vec<String>,
    /// Archived copies under this name that were not this segment and were
    /// deleted first (`--replace-invalid`), as `(region, key, why invalid)`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<(String, String, String)>,
}

/// Archives one WAL file. `path` is as given by PostgreSQL (`%p`, relative to
/// PGDATA, which is the working directory of archive_command). A segment must
/// be the segment its name says, of this cluster; with `replace_invalid`, an
/// archived copy under the same name that is provably not valid WAL of this
/// cluster is deleted and replaced (the only way out of a bad first push, since
/// archived objects are never overwritten).
pub async fn push(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    path: &Path,
    replace_invalid: bool,
) -> Result<PushReport, PgError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| PgError::Other(format!("{}: not a file path", path.display())))?;
    let file = WalFile::parse(name).ok_or_else(|| {
        PgError::Other(format!(
            "{name} is not a WAL segment, .partial, .backup or .history file name; \
             archive_command must pass %p"
        ))
    })?;
    let data = tokio::fs::read(path)
        .await
        .map_err(|e| PgError::io(path, e))?;
    if let Err(why) = check_content(file, system_id, &data) {
        return Err(PgError::Other(format!(
            "{}: refusing to archive: the file {why}; it is not the WAL file its name says, \
             so archiving it would block the real one (check archive_command passes %p)",
            path.display()
        )));
    }
    push_checked(repo, cluster, system_id, file, name, data, replace_invalid).await
}

/// What can be checked of a file's content from its name alone: segments and
/// `.partial` segments carry a page header; other files are left alone.
fn check_content(
    file: WalFile,
    system_id: u64,
    data: &[u8],
) -> Result<(), super::wal_header::InvalidSegment> {
    match file {
        WalFile::Segment(seg, WalSuffix::None | WalSuffix::Partial) => {
            super::wal_header::check_segment(&seg, system_id, data)
        }
        _ => Ok(()),
    }
}

/// Archives the content of one WAL file (named `name`, parsed as `file`):
/// what `wal-push` does after reading it, and what the streamer does with a
/// completed segment.
pub async fn push_bytes(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    file: WalFile,
    name: &str,
    data: Vec<u8>,
) -> Result<PushReport, PgError> {
    push_checked(repo, cluster, system_id, file, name, data, false).await
}

async fn push_checked(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    file: WalFile,
    name: &str,
    data: Vec<u8>,
    replace_invalid: bool,
) -> Result<PushReport, PgError> {
    let hash = blake3::hash(&data).to_hex().to_string();
    let key = file.key(cluster, system_id, &hash);
    let prefix = file.key_prefix(cluster, system_id);
    // An archived copy of this name, in any region: same hash → done; other → refuse.
    let mut present_in = Vec::new();
    let mut conflicts: Vec<(String, String, u64)> = Vec::new();
    for r in repo.regions.iter() {
        match r.store.list(&prefix).await {
            Ok(objs) => {
                for o in objs {
                    let Some(other) = o.key.strip_prefix(&prefix) else {
                        continue;
                    };
                    if other == hash {
                        present_in.push(r.name.clone());
                    } else if other.len() == 64 {
                        conflicts.push((r.name.clone(), o.key.clone(), o.size));
                    }
                }
            }
            Err(e) => tracing::warn!(region = %r.name, error = %e, "cannot list WAL prefix"),
        }
    }
    let mut replaced = Vec::new();
    if let Some((region, other, _)) = conflicts.first() {
        if !replace_invalid {
            let other_hash = other.rsplit('-').next().unwrap_or_default();
            return Err(PgError::Other(format!(
                "{name} is already archived with different content (region {region}, blake3 {other_hash} vs {hash}); \
                 refusing to overwrite. Two clusters may be archiving to the same [postgres.{cluster}] \
                 repository path, or the file was modified after archiving. If the archived copy is \
                 not valid WAL (e.g. a bad manual push), `dr wal-push --replace-invalid <file>` \
                 (on a host with the identity) checks it and replaces it"
            )));
        }
        if let WalFile::Segment(seg, _) = file {
            // The replacement changes a key a prefix summary may name.
            prefix::forget_prefix(repo, cluster, system_id, seg.timeline.0, seg.log).await?;
        }
        replaced = remove_invalid(repo, system_id, file, name, &conflicts).await?;
    }
    if present_in.len() >= repo.regions.min_regions() {
        summarise_if_last(repo, cluster, system_id, file).await;
        return Ok(PushReport {
            file: name.to_string(),
            key: key.to_string(),
            size: data.len() as u64,
            already_archived: true,
            regions: present_in,
            replaced,
        });
    }
    let size = data.len() as u64;
    let regions = match repo.put_buffer(&key, Bytes::from(data), Some(hash)).await {
        Ok((_, report)) => report.ok,
        Err(e) => match concurrent_duplicate(&e, repo.regions.min_regions()) {
            Some(regions) => regions,
            None => return Err(e.into()),
        },
    };
    summarise_if_last(repo, cluster, system_id, file).await;
    Ok(PushReport {
        file: name.to_string(),
        key: key.to_string(),
        size,
        already_archived: false,
        regions,
        replaced,
    })
}

/// After the last segment of a 4 GiB prefix is stored, writes the prefix's
/// summary if the prefix is complete (one listing per 256 segments). A
/// summary only saves catalog requests, so failing to write one is logged,
/// never a failed push.
async fn summarise_if_last(repo: &Repository, cluster: &str, system_id: u64, file: WalFile) {
    let WalFile::Segment(seg, WalSuffix::None) = file else {
        return;
    };
    if seg.seg != crate::repo::layout::MAX_SEG {
        return;
    }
    match prefix::summarise_prefix(repo, cluster, system_id, seg.timeline.0, seg.log).await {
        Ok(Some(key)) => tracing::debug!(key, "WAL prefix summarised"),
        Ok(None) => tracing::debug!(segment = %seg, "WAL prefix not complete; not summarised"),
        Err(e) => tracing::warn!(segment = %seg, error = %e,
            "WAL prefix summary not written; catalogs list the prefix instead"),
    }
}

/// Deletes archived copies in `conflicts` (`(region, key, stored size)`)
/// once each is shown not to be this file's valid content: undecodable
/// (corrupt, truncated, not a dr object) or failing the content check. A
/// copy that is valid, or that this host cannot judge (no identity, wrong
/// key, unreachable), stops the repair.
async fn remove_invalid(
    repo: &Repository,
    system_id: u64,
    file: WalFile,
    name: &str,
    conflicts: &[(String, String, u64)],
) -> Result<Vec<(String, String, String)>, PgError> {
    use crate::codec::CodecError;
    if !repo.wal_codec.can_decrypt() {
        return Err(PgError::Other(format!(
            "{name}: --replace-invalid must decrypt the archived copy to prove it invalid, \
             and no usable identity is configured here; run it where the identity is"
        )));
    }
    let mut out = Vec::new();
    for (region, key, stored) in conflicts {
        let expect = Expect {
            key: key.clone(),
            stored_size: Some(*stored),
            plain_hash: key.rsplit('-').next().map(str::to_string),
            plain_size: None,
            pieces: None,
        };
        let stream = repo
            .regions
            .get_region(region)
            .ok_or_else(|| PgError::Other(format!("region {region} vanished from the config")))?
            .store
            .get(key, None)
            .await
            .map_err(|e| PgError::Other(format!("{key} in region {region}: {e}")))?;
        let why = match repo.wal_codec.decode_bytes(stream, expect).await {
            Ok(plain) => match check_content(file, system_id, &plain) {
                Ok(()) => {
                    return Err(PgError::Other(format!(
                        "{name}: the archived copy {key} (region {region}) is valid WAL of this \
                         cluster; it is not replaced. Two servers of one system may have written \
                         different histories under one timeline: find out which is right first"
                    )));
                }
                Err(why) => format!("the archived file {why}"),
            },
            Err(
                e @ (CodecError::Corrupt { .. }
                | CodecError::Truncated { .. }
                | CodecError::Foreign { .. }),
            ) => e.to_string(),
            Err(e) => {
                return Err(PgError::Other(format!(
                    "{name}: cannot judge the archived copy {key} (region {region}): {e}"
                )));
            }
        };
        match repo.regions.get_region(region) {
            Some(r) => r.store.delete(key).await.map_err(|e| {
                PgError::Other(format!(
                    "{name}: the archived copy {key} (region {region}) is invalid ({why}) but \
                     cannot be deleted: {e}"
                ))
            })?,
            None => continue,
        }
        tracing::warn!(%region, %key, %why, "deleted an invalid archived copy");
        out.push((region.clone(), key.clone(), why));
    }
    Ok(out)
}

/// A create-only region that rejects the put already holds this exact key —
/// same name and same content hash, e.g. from a concurrent push — so it counts.
pub(crate) fn concurrent_duplicate(e: &crate::repo::RepoError, min: usize) -> Option<Vec<String>> {
    let crate::repo::RepoError::Regions(crate::store::RegionsError::NotEnoughRegions {
        failures,
        ok,
        ..
    }) = e
    else {
        return None;
    };
    let dup: Vec<String> = failures
        .iter()
        .filter(|(_, f)| matches!(f, crate::store::StoreError::AlreadyExists { .. }))
        .map(|(n, _)| n.clone())
        .collect();
    (!dup.is_empty() && ok + dup.len() >= min).then_some(dup)
}

/// Exit status of `wal-fetch` when a file is in the archive but cannot be
/// served (corrupt in every region, wrong key, regions unreachable, bad
/// config). PostgreSQL reads exit status 1 as "not in the archive" and ends
/// recovery there, promoting a server that silently lacks the rest; a status
/// above 125 makes it abort recovery instead.
pub const FETCH_FAILED_STATUS: u8 = 200;

/// Outcome of `wal-fetch`.
#[derive(Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Written to the destination; from the spool or a region.
    Fetched {
        /// Region that served it, or `"spool"`.
        source: String,
    },
    /// Not in the repository (PostgreSQL treats this as the end of the archive).
    NotFound,
}

/// Where `wal-fetch` keeps prefetched segments for the cluster whose data
/// directory is `data_dir`: `spool_dir` when configured, else
/// `<data_dir>/pg_wal/dr-spool`.
pub fn spool_dir(cfg: &crate::config::PgConfig, data_dir: &Path) -> PathBuf {
    cfg.spool_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("pg_wal").join("dr-spool"))
}

/// The exit status `wal-fetch` gives PostgreSQL for a result of [`fetch`]:
/// 0 when fetched, 1 when not archived (the end of the archive: recovery
/// ends and the server promotes), [`FETCH_FAILED_STATUS`] for any error, so
/// that recovery aborts instead of ending early with WAL missing.
pub fn fetch_status(r: &Result<FetchOutcome, PgError>) -> u8 {
    match r {
        Ok(FetchOutcome::Fetched { .. }) => 0,
        Ok(FetchOutcome::NotFound) => 1,
        Err(_) => FETCH_FAILED_STATUS,
    }
}

/// Fetches `name` into `dest`, verifying it, and prefetches up to `prefetch`
/// following segments of the same timeline into `spool` in parallel.
/// Segments after `until` count as not archived. Storage failures are tried
/// three times (0.5 s, then 1 s apart): a region that blinks must not abort
/// a recovery, and any error returned must stop it.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    name: &str,
    dest: &Path,
    spool: &Path,
    prefetch: usize,
    until: Option<WalSegmentName>,
) -> Result<FetchOutcome, PgError> {
    let mut delay = std::time::Duration::from_millis(500);
    let mut attempt = 1;
    loop {
        let res = fetch_once(repo, cluster, system_id, name, dest, spool, prefetch, until).await;
        match res {
            Err(e @ PgError::Repo(_)) if attempt < 3 => {
                tracing::warn!(file = name, attempt, error = %e, "fetch failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn fetch_once(
    repo: &Repository,
    cluster: &str,
    system_id: u64,
    name: &str,
    dest: &Path,
    spool: &Path,
    prefetch: usize,
    until: Option<WalSegmentName>,
) -> Result<FetchOutcome, PgError> {
    let file = WalFile::parse(name).ok_or_else(|| {
        PgError::Other(format!(
            "{name} is not a WAL file name; restore_command must pass %f"
        ))
    })?;
    let beyond = |s: WalSegmentName| until.is_some_and(|u| s > u);
    if let WalFile::Segment(seg, _) = file
        && beyond(seg)
    {
        return Ok(FetchOutcome::NotFound);
    }
    // Spool names carry the system id: a shared spool never serves another
    // cluster's segment of the same name.
    let spool_name = |n: &str| spool.join(format!("{system_id}-{n}"));
    let spooled = spool_name(name);
    if tokio::fs::metadata(&spooled).await.is_ok() {
        if tokio::fs::rename(&spooled, dest).await.is_err() {
            // Another file system (a spool_dir elsewhere): copy instead.
            tokio::fs::copy(&spooled, dest)
                .await
                .map_err(|e| PgError::io(dest, e))?;
        }
        return Ok(FetchOutcome::Fetched {
            source: "spool".into(),
        });
    }
    // One listing of this segment's 4 GiB group finds it and its successors.
    let (list_prefix, want) = match file {
        WalFile::Segment(seg, _) => {
            let k = file.key_prefix(cluster, system_id);
            let dir = k[..k.rfind('/').map(|i| i + 1).unwrap_or(0)].to_string();
            (dir, Some(seg))
        }
        WalFile::History(_) => (file.key_prefix(cluster, system_id), None),
    };
    let listed = list_certain(repo, &list_prefix).await?;
    let find = |fname: &str| -> Option<(String, u64)> {
        let wanted = WalFile::parse(fname)?;
        find_object(&listed, &wanted.key_prefix(cluster, system_id))
            .map(|o| (o.key.clone(), o.size))
    };
    let Some((key, size)) = find(name) else {
        if let (Some(seg), WalFile::Segment(_, WalSuffix::None)) = (want, file) {
            return match fetch_streamed(repo, &list_prefix, seg, &listed, dest).await {
                Err(e) => {
                    // The streamer deletes a segment's pieces once the whole
                    // segment is stored: it may have landed since the listing.
                    let listed = list_certain(repo, &list_prefix).await?;
                    match find_object(&listed, &file.key_prefix(cluster, system_id)) {
                        Some(o) => Ok(FetchOutcome::Fetched {
                            source: download(repo, &o.key, o.size, dest).await?,
                        }),
                        None => {
                            tracing::debug!(error = %e, "streamed pieces changed while fetching; listing again");
                            fetch_streamed(repo, &list_prefix, seg, &listed, dest).await
                        }
                    }
                }
                ok => ok,
            };
        }
        return Ok(FetchOutcome::NotFound);
    };
    let mut jobs = vec![(key, size, dest.to_path_buf())];
    if let Some(seg) = want {
        if prefetch > 0 {
            let _ = crate::os::create_private_dir_all(spool);
        }
        let mut next = seg;
        for _ in 0..prefetch {
            next = next_segment(next);
            if beyond(next) {
                break;
            }
            let n = next.to_string();
            if tokio::fs::metadata(spool_name(&n)).await.is_ok() {
                continue;
            }
            match find(&n) {
                Some((k, s)) => jobs.push((k, s, spool_name(&n))),
                None => break,
            }
        }
    }
    let results: Vec<Result<String, PgError>> = futures::stream::iter(jobs)
        .map(|(key, size, path)| async move { download(repo, &key, size, &path).await })
        .buffered(4)
        .collect()
        .await;
    let mut results = results.into_iter();
    let first = results
        .next()
        .unwrap_or_else(|| Err(PgError::Other("nothing fetched".into())))?;
    for r in results {
        if let Err(e) = r {
            tracing::debug!(error = %e, "prefetch failed; the segment is fetched on demand");
        }
    }
    Ok(FetchOutcome::Fetched { source: first })
}

/// Lists `prefix` in every region for `wal-fetch`, failing when the answer
/// could be wrong. A segment is acknowledged once `min_regions` hold it, so
/// while fewer regions than that fail to list, every archived segment is in
/// some answering region and "absent" is certain. With more failing, absent
/// may only mean unreachable, and reporting it as the end of the archive would
/// end recovery early.
async fn list_certain(
    repo: &Repository,
    prefix: &str,
) -> Result<Vec<crate::store::ObjectInfo>, PgError> {
    let mut union = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    for (name, res) in repo.regions.list_each(prefix).await {
        match res {
            Ok(v) => union.extend(v.into_iter().map(|o| (o.key.clone(), o))),
            Err(e) => failed.push(format!("[{name}] {e}")),
        }
    }
    if failed.len() >= repo.regions.min_regions() {
        return Err(PgError::Other(format!(
            "cannot tell whether {prefix}… is archived: {} of {} regions failed to list \
             (min_regions = {}): {}; if a region is gone for good, restore with a config \
             that leaves it out",
            failed.len(),
            repo.regions.len(),
            repo.regions.min_regions(),
            failed.join("; ")
        )));
    }
    Ok(union.into_values().collect())
}

/// The object named `prefix` + a 64-digit hash in a listing.
fn find_object<'a>(
    listed: &'a [crate::store::ObjectInfo],
    prefix: &str,
) -> Option<&'a crate::store::ObjectInfo> {
    listed
        .iter()
        .find(|o| o.key.strip_prefix(prefix).is_some_and(|h| h.len() == 64))
}

/// Serves a segment that was streamed but never completed (the last one
/// before the primary was lost) from its pieces, zero-padded to a whole
/// segment: recovery replays up to the last streamed record and then ends.
async fn fetch_streamed(
    repo: &Repository,
    dir: &str,
    seg: WalSegmentName,
    listed: &[crate::store::ObjectInfo],
    dest: &Path,
) -> Result<FetchOutcome, PgError> {
    let prefix = format!("{dir}{seg}");
    let Some((data, streamed)) = super::pieces::streamed_segment(repo, &prefix, listed).await?
    else {
        return Ok(FetchOutcome::NotFound);
    };
    save(dest, data).await?;
    tracing::info!(segment = %seg, bytes = streamed, "served a streamed, incomplete segment");
    Ok(FetchOutcome::Fetched {
        source: format!("streamed pieces ({streamed} bytes)"),
    })
}

/// Downloads and verifies one object into `path` (temp file + fsync + rename),
/// falling back to the next region on a missing, unreachable or corrupt copy.
async fn download(
    repo: &Repository,
    key: &str,
    stored: u64,
    path: &Path,
) -> Result<String, PgError> {
    let hash = key.rsplit('-').next().unwrap_or_default().to_string();
    let expect = Expect {
        key: key.to_string(),
        stored_size: Some(stored),
        plain_hash: Some(hash),
        plain_size: None,
        pieces: None,
    };
    let (region, data) = repo.get_verified(key, expect).await?;
    save(path, data).await?;
    Ok(region)
}

/// Writes `data` to `path` through a temp file, fsync and rename, so
/// PostgreSQL never sees a half-written segment.
async fn save(path: &Path, data: impl AsRef<[u8]> + Send + 'static) -> Result<(), PgError> {
    let tmp = tmp_path(path);
    let dest = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let res = write_durable(&tmp, &dest, data.as_ref());
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    })
    .await
    .map_err(|e| PgError::Other(e.to_string()))?
    .map_err(|e| PgError::io(path, e))
}

fn tmp_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".dr-tmp-{:08x}", rand::random::<u32>()));
    PathBuf::from(s)
}

fn write_durable(tmp: &Path, dest: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = crate::os::private_file()
        .write(true)
        .create_new(true)
        .open(tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(tmp, dest)
}

/// The segment holding the byte just before `lsn` on `timeline`, as
/// `pg_walfile_name(lsn)` names it (the segment a backup's stop position
/// needs, even when the position is a segment boundary).
pub fn walfile_name(timeline: u32, lsn: super::Lsn) -> WalSegmentName {
    let segno = lsn.0.saturating_sub(1) / super::WAL_SEGMENT_SIZE;
    let per_log = 0x1_0000_0000u64 / super::WAL_SEGMENT_SIZE;
    WalSegmentName {
        timeline: TimelineId(timeline),
        log: (segno / per_log) as u32,
        seg: (segno % per_log) as u32,
    }
}

/// The segment after `s` on the same timeline.
pub fn next_segment(s: WalSegmentName) -> WalSegmentName {
    let per_log = (0x1_0000_0000u64 / super::WAL_SEGMENT_SIZE) as u32;
    if s.seg + 1 >= per_log {
        WalSegmentName {
            timeline: s.timeline,
            log: s.log + 1,
            seg: 0,
        }
    } else {
        WalSegmentName {
            seg: s.seg + 1,
            ..s
        }
    }
}

pub mod prefix;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fetch_model;
