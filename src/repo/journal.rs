//! Segment journals across regions: what the synchronous streamer appends
//! to when every region is a filesystem (see `codec::journal` for the
//! format). An append returns once it is durable in `min_regions` regions.

use std::sync::Arc;

use crate::codec::{Codec, JournalRead, JournalWriter, RECORD_OVERHEAD};
use crate::store::{JournalFile, Store};

use super::layout::{ObjectKey, WalSuffix};
use super::{RepoError, Repository};

/// Room reserved (zero-filled) for a journal: a whole segment's WAL, its
/// record framing at one record per 512 bytes (a lone small commit's WAL),
/// and the header. A journal that outgrows it still works; its appends then
/// also flush the file's size.
const RESERVE: u64 = (16 << 20) + (16 << 20) / 512 * RECORD_OVERHEAD as u64 + (64 << 10);

/// One segment's journal, open in every region.
pub struct WalJournal {
    key: String,
    writer: JournalWriter,
    /// Per region: its name and its file, `None` once an append failed
    /// there (the file may end in a torn record; nothing more goes after it).
    files: Vec<(String, Option<JournalFile>)>,
    min_regions: usize,
}

/// What creating journals needs: every region's filesystem store, the WAL
/// codec and `min_regions`. Owned, so a thread of its own can use it.
#[derive(Clone)]
pub struct Journals {
    stores: Vec<(String, Arc<Store>)>,
    codec: Codec,
    min_regions: usize,
}

impl Repository {
    /// Journals for this repository, or `None` when a region is not a
    /// filesystem: object stores cannot append, so the streamer writes
    /// pieces there.
    pub fn journals(&self) -> Option<Journals> {
        let all_fs = self
            .regions
            .iter()
            .all(|r| matches!(r.store.as_ref(), Store::Fs(_)));
        all_fs.then(|| Journals {
            stores: self
                .regions
                .iter()
                .map(|r| (r.name.clone(), r.store.clone()))
                .collect(),
            codec: self.wal_codec.clone(),
            min_regions: self.regions.min_regions(),
        })
    }
}

impl Journals {
    /// Creates the journal `key` (a [`WalSuffix::Journal`] WAL key) in every
    /// region. Blocking.
    pub fn create(&self, key: &ObjectKey) -> Result<WalJournal, RepoError> {
        let ObjectKey::Wal {
            segment,
            suffix: WalSuffix::Journal { start },
            ..
        } = key
        else {
            return Err(RepoError::Other(format!("{key} is not a WAL journal key")));
        };
        let (header, writer) = self.codec.new_journal(&segment.to_string(), *start)?;
        let k = key.to_string();
        let mut files = Vec::with_capacity(self.stores.len());
        let mut failed = Vec::new();
        for (name, store) in &self.stores {
            let created = match store.as_ref() {
                Store::Fs(fs) => fs.create_journal(&k, &header, RESERVE),
                _ => Err(crate::store::StoreError::Backend {
                    store: store.describe(),
                    op: "journal",
                    key: k.clone(),
                    message: "only filesystem regions hold journals".into(),
                    transient: false,
                }),
            };
            match created {
                Ok(f) => files.push((name.clone(), Some(f))),
                Err(e) => {
                    failed.push(format!("{name}: {e}"));
                    files.push((name.clone(), None));
                }
            }
        }
        let journal = WalJournal {
            key: k,
            writer,
            files,
            min_regions: self.min_regions,
        };
        journal.enough(&failed)?;
        Ok(journal)
    }
}

impl Repository {
    /// Reads the journal `key` from every region holding it. The copy
    /// reaching furthest wins: a region whose append failed holds less.
    /// Fails only when no region has a readable copy.
    pub async fn read_journal(&self, key: &str) -> Result<JournalRead, RepoError> {
        let Ok(ObjectKey::Wal {
            segment,
            suffix: WalSuffix::Journal { start },
            ..
        }) = key.parse::<ObjectKey>()
        else {
            return Err(RepoError::Other(format!("{key} is not a WAL journal key")));
        };
        let segment = segment.to_string();
        let mut best: Option<JournalRead> = None;
        let mut errors = Vec::new();
        for r in self.regions.iter() {
            let read = match r.store.get_bytes(key).await {
                Ok(bytes) => self
                    .wal_codec
                    .read_journal(key, &bytes, &segment, start)
                    .map_err(RepoError::from),
                Err(e) if e.is_not_found() => continue,
                Err(e) => Err(e.into()),
            };
            match read {
                Ok(j) if best.as_ref().is_none_or(|b| j.end() > b.end()) => best = Some(j),
                Ok(_) => {}
                Err(e) => errors.push(format!("{}: {e}", r.name)),
            }
        }
        match best {
            Some(j) => {
                for e in &errors {
                    tracing::warn!(key, error = %e, "a region's copy of a WAL journal is unreadable");
                }
                if j.torn_tail {
                    tracing::warn!(
                        key,
                        end = j.end(),
                        "WAL journal ends in a record cut short by a crash (never acknowledged); \
                         using the bytes before it"
                    );
                }
                Ok(j)
            }
            None => Err(RepoError::Unreadable {
                key: key.to_string(),
                details: if errors.is_empty() {
                    "no region holds it".into()
                } else {
                    errors.join("; ")
                },
            }),
        }
    }
}

impl WalJournal {
    /// The journal's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Segment offset the next append must start at.
    pub fn next_offset(&self) -> u32 {
        self.writer.next_offset()
    }

    /// Appends `parts` (the segment's bytes from each offset, in order) and
    /// returns once they are durable in `min_regions` regions: one write and
    /// one `fdatasync` per region, the regions in parallel. Blocking.
    pub fn append(&mut self, parts: &[(u32, &[u8])]) -> Result<(), RepoError> {
        let mut records = Vec::new();
        for (offset, plain) in parts {
            records.extend(self.writer.seal(*offset, plain)?);
        }
        let failed: Vec<String> = if self.files.len() == 1 {
            self.files
                .iter_mut()
                .filter_map(|(name, f)| append_one(name, f, &records))
                .collect()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .files
                    .iter_mut()
                    .map(|(name, f)| s.spawn(|| append_one(name, f, &records)))
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap_or_else(|_| Some("append panicked".into())))
                    .collect()
            })
        };
        self.enough(&failed)
    }

    /// Fails unless `min_regions` regions still hold the whole journal.
    fn enough(&self, failed: &[String]) -> Result<(), RepoError> {
        let live = self.files.iter().filter(|(_, f)| f.is_some()).count();
        if live >= self.min_regions {
            for why in failed {
                tracing::warn!(key = %self.key, error = %why, "journal append failed in a region");
            }
            return Ok(());
        }
        Err(RepoError::Other(format!(
            "{}: durable in {live} of the {} regions required ({})",
            self.key,
            self.min_regions,
            failed.join("; ")
        )))
    }
}

/// Appends to one region's file; on failure closes it for good and says why.
fn append_one(name: &str, file: &mut Option<JournalFile>, records: &[u8]) -> Option<String> {
    let f = file.as_mut()?;
    match f.append(records) {
        Ok(()) => None,
        Err(e) => {
            *file = None;
            Some(format!("{name}: {e}"))
        }
    }
}

/// One request to the journal thread.
enum Job {
    Append {
        key: ObjectKey,
        offset: u32,
        data: bytes::Bytes,
        done: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Close {
        key: String,
    },
}

/// Appends to one stream's journals on a thread of its own: in the order
/// asked, creating each journal on its first append, and writing whatever
/// queued during one `fdatasync` with the next (group commit).
pub struct JournalWorker {
    tx: std::sync::mpsc::Sender<Job>,
}

impl JournalWorker {
    /// Starts the thread; it ends when the worker is dropped.
    pub fn start(journals: Journals) -> std::io::Result<JournalWorker> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("dr-journal".into())
            .spawn(move || serve(&journals, &rx))?;
        Ok(JournalWorker { tx })
    }

    /// Appends `data`, the segment's bytes from `offset`, to journal `key`
    /// (created on its first append); resolves once they are durable.
    pub fn append(
        &self,
        key: &ObjectKey,
        offset: u32,
        data: bytes::Bytes,
    ) -> impl Future<Output = Result<(), RepoError>> + Send + 'static {
        let (done, rx) = tokio::sync::oneshot::channel();
        let sent = self.tx.send(Job::Append {
            key: key.clone(),
            offset,
            data,
            done,
        });
        async move {
            if sent.is_err() {
                return Err(RepoError::Other("the journal thread is gone".into()));
            }
            match rx.await {
                Ok(res) => res.map_err(RepoError::Other),
                Err(_) => Err(RepoError::Other("the journal thread is gone".into())),
            }
        }
    }

    /// Closes journal `key` after the appends already asked for.
    pub fn close(&self, key: &ObjectKey) {
        let _ = self.tx.send(Job::Close {
            key: key.to_string(),
        });
    }
}

type Waiting = Vec<(
    u32,
    bytes::Bytes,
    tokio::sync::oneshot::Sender<Result<(), String>>,
)>;

fn serve(journals: &Journals, rx: &std::sync::mpsc::Receiver<Job>) {
    let mut open: std::collections::HashMap<String, WalJournal> = Default::default();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        // Appends per journal in the order asked; closes after them (no
        // append to a journal follows its close).
        let mut appends: Vec<(ObjectKey, Waiting)> = Vec::new();
        let mut closes = Vec::new();
        for job in batch {
            match job {
                Job::Append {
                    key,
                    offset,
                    data,
                    done,
                } => match appends.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, w)) => w.push((offset, data, done)),
                    None => appends.push((key, vec![(offset, data, done)])),
                },
                Job::Close { key } => closes.push(key),
            }
        }
        for (key, waiting) in appends {
            let k = key.to_string();
            let res = match open.entry(k) {
                std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
                std::collections::hash_map::Entry::Vacant(e) => {
                    journals.create(&key).map(|j| e.insert(j))
                }
            }
            .and_then(|j| {
                let parts: Vec<(u32, &[u8])> =
                    waiting.iter().map(|(o, d, _)| (*o, &d[..])).collect();
                j.append(&parts)
            })
            .map_err(|e| e.to_string());
            if res.is_err() {
                // Nothing more goes after a failed append.
                open.remove(&key.to_string());
            }
            for (_, _, done) in waiting {
                let _ = done.send(res.clone());
            }
        }
        for key in closes {
            open.remove(&key);
        }
    }
}
