//! Progress counters for long operations. The library only counts; the CLI
//! decides whether and how to show them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes done out of a total (the total may grow while work is discovered).
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// A shared, zeroed counter.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Adds to the work done.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds to the total.
    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// (done, total).
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}
