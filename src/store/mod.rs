//! Object storage: one small interface, one module per backend.
//!
//! Objects are immutable: `put` creates an object; nothing in `dr` rewrites one in
//! place. A put whose body stream fails never leaves an object under its final key.

mod faults;
mod fs;
mod regions;
mod s3;
mod stall;

use std::io;
use std::ops::Range;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

pub use faults::{FAULTS_ENV, FaultPlan, FaultyStore};
pub use fs::{FsStore, JournalFile};
pub use regions::{DEFAULT_STALL_TIMEOUT, PutReport, Region, Regions, RegionsError};
pub use s3::S3Store;

/// A stream of bytes, as produced by the codec and consumed by stores.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Wraps one buffer as a [`ByteStream`].
pub fn once(bytes: Bytes) -> ByteStream {
    Box::pin(futures::stream::once(async move { Ok(bytes) }))
}

/// Adapts the receiving end of a bounded channel into a [`ByteStream`].
pub fn channel_stream(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> ByteStream {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Deterministic test data of `size` bytes, alternating 1 MiB of pseudo-random
/// bytes and 1 MiB of compressible text (for self-tests and benchmarks).
pub fn generated(size: u64) -> ByteStream {
    const BLOCK: u64 = 1 << 20;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    Box::pin(futures::stream::iter((0..size.div_ceil(BLOCK)).map(
        move |i| {
            let n = BLOCK.min(size - i * BLOCK) as usize;
            let mut v = Vec::with_capacity(n);
            if i % 2 == 0 {
                while v.len() < n {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    v.extend_from_slice(&state.to_le_bytes());
                }
                v.truncate(n);
            } else {
                let line =
                    format!("{i:08} INSERT INTO accounts VALUES (42, 'compressible text');\n");
                while v.len() < n {
                    v.extend_from_slice(line.as_bytes());
                }
                v.truncate(n);
            }
            Ok(Bytes::from(v))
        },
    )))
}

/// Collects a stream into memory (for small objects only).
pub async fn collect(mut s: ByteStream) -> io::Result<Bytes> {
    let mut out = BytesMut::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out.freeze())
}

/// Name and size of a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Repository-relative key.
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// When the object was written, if the backend says.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// One level of a listing: the objects directly under a prefix and the
/// "directories" (next `/`-ended components) below it, so a caller can walk
/// a tree without listing every key in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Prefixes one level down, each ending in `/`, sorted.
    pub dirs: Vec<String>,
    /// Objects directly under the prefix, sorted by key.
    pub objects: Vec<ObjectInfo>,
}

impl Listing {
    /// Folds a full listing of `prefix` into one level.
    pub fn fold(prefix: &str, all: Vec<ObjectInfo>) -> Listing {
        let mut out = Listing::default();
        for o in all {
            match o.key.get(prefix.len()..).and_then(|rest| rest.find('/')) {
                Some(i) => {
                    let dir = &o.key[..prefix.len() + i + 1];
                    if out.dirs.last().map(String::as_str) != Some(dir) {
                        out.dirs.push(dir.to_string());
                    }
                }
                None => out.objects.push(o),
            }
        }
        out.dirs.dedup();
        out
    }
}

/// HTTP requests sent to S3 by this process (retries included): what a
/// command cost, read by `dr` at exit and by tests that bound it.
pub fn s3_requests() -> u64 {
    s3::REQUESTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A storage failure, with whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{store}: object {key} not found")]
    NotFound {
        /// Store name.
        store: String,
        /// Object key.
        key: String,
    },
    /// A create-only put found the object already there.
    #[error("{store}: object {key} already exists (objects are never overwritten)")]
    AlreadyExists {
        /// Store name.
        store: String,
        /// Object key.
        key: String,
    },
    /// Deletion refused: the object's S3 Object Lock retention has not expired.
    #[error("{store}: {key} is locked until {until} (S3 Object Lock); kept")]
    Locked {
        /// Store name.
        store: String,
        /// Object key.
        key: String,
        /// Retention end (UTC).
        until: String,
    },
    /// The key is not a valid repository key.
    #[error("invalid object key {key:?}: {why}")]
    InvalidKey {
        /// Offending key.
        key: String,
        /// Why it is invalid.
        why: &'static str,
    },
    /// The data being written failed at its source; nothing was stored.
    #[error("{store}: writing {key} aborted, nothing stored: {source}")]
    Source {
        /// Store name.
        store: String,
        /// Object key.
        key: String,
        /// The error from the body stream.
        source: io::Error,
    },
    /// Any other backend failure.
    #[error("{store}: {op} {key}: {message}")]
    Backend {
        /// Store name.
        store: String,
        /// Operation (put, get, head, list, delete).
        op: &'static str,
        /// Object key or prefix.
        key: String,
        /// Backend message, including guidance where known.
        message: String,
        /// Whether the same call may succeed later.
        transient: bool,
    },
}

impl StoreError {
    /// True when retrying the same call cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            StoreError::Backend {
                transient: true,
                ..
            }
        )
    }

    /// True for a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Checks that a key is a clean relative path: no empty, `.` or `..` components,
/// no leading `/`, and only characters that are safe on every backend.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |why| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            why,
        })
    };
    if key.is_empty() || key.len() > 900 {
        return bad("empty or longer than 900 bytes");
    }
    if key
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with(".tmp"))
    {
        return bad("empty, '.', '..' or reserved '.tmp' path component");
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    {
        return bad("only ASCII letters, digits and . _ - / are allowed");
    }
    Ok(())
}

/// A storage backend. An enum rather than a trait object keeps async calls
/// simple and dispatch static; decorators (fault injection) wrap another store.
pub enum Store {
    /// Local filesystem (the embedded default).
    Fs(FsStore),
    /// S3-compatible object storage.
    S3(S3Store),
    /// Fault-injecting wrapper, for tests.
    Faulty(Box<FaultyStore>),
}

impl Store {
    /// Human-readable description (backend and location).
    pub fn describe(&self) -> String {
        match self {
            Store::Fs(s) => s.describe(),
            Store::S3(s) => s.describe(),
            Store::Faulty(s) => format!("faulty({})", s.inner().describe()),
        }
    }

    /// Creates `key` from a stream. Returns the number of bytes stored. If the
    /// stream yields an error, the put is abandoned and no object becomes visible.
    pub async fn put(&self, key: &str, body: ByteStream) -> Result<u64, StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.put(key, body).await,
            Store::S3(s) => s.put(key, body).await,
            Store::Faulty(s) => Box::pin(s.put(key, body)).await,
        }
    }

    /// Creates `key` from a buffer.
    pub async fn put_bytes(&self, key: &str, body: Bytes) -> Result<u64, StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.put_bytes(key, body).await,
            Store::S3(s) => s.put(key, once(body)).await,
            Store::Faulty(s) => Box::pin(s.put(key, once(body))).await,
        }
    }

    /// Streams an object, or the byte `range` of it.
    pub async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.get(key, range).await,
            Store::S3(s) => s.get(key, range).await,
            Store::Faulty(s) => Box::pin(s.get(key, range)).await,
        }
    }

    /// Reads a whole (small) object into memory.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let s = self.get(key, None).await?;
        collect(s).await.map_err(|e| StoreError::Backend {
            store: self.describe(),
            op: "get",
            key: key.to_string(),
            message: e.to_string(),
            transient: true,
        })
    }

    /// Size of an object, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.head(key).await,
            Store::S3(s) => s.head(key).await,
            Store::Faulty(s) => Box::pin(s.head(key)).await,
        }
    }

    /// Every object whose key starts with `prefix`, sorted by key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        match self {
            Store::Fs(s) => s.list(prefix).await,
            Store::S3(s) => s.list(prefix).await,
            Store::Faulty(s) => Box::pin(s.list(prefix)).await,
        }
    }

    /// One level of `prefix` (which should end in `/`): one request per
    /// thousand entries on S3 however many keys lie deeper.
    pub async fn list_dirs(&self, prefix: &str) -> Result<Listing, StoreError> {
        match self {
            Store::Fs(s) => Ok(Listing::fold(prefix, s.list(prefix).await?)),
            Store::S3(s) => s.list_dirs(prefix).await,
            Store::Faulty(s) => Box::pin(s.list_dirs(prefix)).await,
        }
    }

    /// Deletes an object; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.delete(key).await,
            Store::S3(s) => s.delete(key).await,
            Store::Faulty(s) => Box::pin(s.delete(key)).await,
        }
    }

    /// Takes an object out of view so its key can be written again (a bad
    /// copy `dr repo sync` replaces; puts are create-only). In a versioned
    /// (Object Lock) bucket this adds a delete marker and locked versions
    /// stay; elsewhere the object is deleted.
    pub async fn hide(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        match self {
            Store::Fs(s) => s.delete(key).await,
            Store::S3(s) => s.hide(key).await,
            Store::Faulty(s) => Box::pin(s.hide(key)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert!(validate_key("pg/main/1/backups/x/manifest").is_ok());
        for bad in [
            "", "/abs", "a//b", "a/../b", "a/./b", "a b", "a/.tmp/x", "ü",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}
