//! A region that stops taking data of a fan-out write (a hung connection or
//! mount) is abandoned after a timeout rather than holding up the write the
//! other regions can take.

use std::io;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Store, StoreError};

/// Which regions of one fan-out write stalled, and after how long.
pub(super) struct Stalled {
    pub(super) timeout: std::time::Duration,
    pub(super) regions: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    pub(super) idx: usize,
}

impl Stalled {
    fn mark(&self) {
        if let Ok(mut s) = self.regions.lock() {
            s.push(self.idx);
        }
    }

    fn marked(&self) -> bool {
        self.regions.lock().is_ok_and(|s| s.contains(&self.idx))
    }
}

/// The write of one region from `rx`, on a task of its own (request signing
/// and checksums are CPU work that would otherwise run region after region
/// on one thread). The task is aborted when the region has not finished
/// `stalled.timeout` after `done` closes (every byte handed over); the
/// abort handle lets the fan-out abandon it earlier, when the region stops
/// taking data.
pub(super) fn region_put(
    store: std::sync::Arc<Store>,
    name: String,
    key: &str,
    rx: mpsc::Receiver<io::Result<Bytes>>,
    mut done: tokio::sync::watch::Receiver<()>,
    stalled: Stalled,
) -> (
    tokio::task::AbortHandle,
    impl std::future::Future<Output = Result<u64, StoreError>> + use<>,
) {
    let k = key.to_string();
    let mut task = tokio::spawn(async move { store.put(&k, super::channel_stream(rx)).await });
    let abort = task.abort_handle();
    let (key, handle) = (key.to_string(), abort.clone());
    let put = async move {
        let res = tokio::select! {
            r = &mut task => r,
            _ = async {
                let _ = done.changed().await;
                tokio::time::sleep(stalled.timeout).await;
            } => {
                stalled.mark();
                handle.abort();
                (&mut task).await
            }
        };
        res.unwrap_or_else(|e| {
            let message = if e.is_cancelled() && stalled.marked() {
                stalled_message(stalled.timeout)
            } else {
                format!("upload task failed: {e}")
            };
            Err(StoreError::Backend {
                store: name,
                op: "put",
                key,
                message,
                transient: true,
            })
        })
    };
    (abort, put)
}

/// Why a region's write was abandoned after `timeout` without progress.
pub(super) fn stalled_message(timeout: std::time::Duration) -> String {
    format!(
        "stalled: made no progress for {}; write abandoned",
        humantime::format_duration(timeout)
    )
}
