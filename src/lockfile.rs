//! Exclusive OS file locks (flock) that say who holds them. An OS lock dies
//! with its process, so a crash never leaves a stale lock behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct HeldLock {
    _file: std::fs::File,
    /// The lock file.
    pub path: PathBuf,
}

/// Why a lock was not taken.
#[derive(Debug)]
pub enum LockFailure {
    /// Someone holds it; what they wrote about themselves.
    Busy(String),
    /// The file could not be created or locked.
    Io(std::io::Error),
}

/// Takes the lock on `path` without waiting (creating the file and its
/// directory), then writes `holder` into it for the message the next
/// contender prints.
pub fn try_lock(path: &Path, holder: &str) -> Result<HeldLock, LockFailure> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(LockFailure::Io)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(LockFailure::Io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let who = std::fs::read_to_string(path)
                .ok()
                .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "holder unknown".into());
            return Err(LockFailure::Busy(who));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(LockFailure::Io(e)),
    }
    file.set_len(0)
        .and_then(|()| file.write_all(holder.as_bytes()))
        .map_err(LockFailure::Io)?;
    Ok(HeldLock {
        _file: file,
        path: path.to_path_buf(),
    })
}
