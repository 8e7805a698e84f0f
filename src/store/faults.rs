//! Fault injection around a real store, for tests of crash consistency,
//! degraded regions and read fallback. The wrapped store is real; only the
//! failure is simulated.

use std::io;
use std::ops::Range;
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{ByteStream, ObjectInfo, Store, StoreError};

/// Which faults to inject. Can be changed while the store is in use.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Every call fails as if the region were unreachable.
    pub unavailable: bool,
    /// A put's body fails after this many bytes (a crash or dropped connection).
    pub fail_put_after: Option<u64>,
    /// Reads flip one bit of the first byte past this offset.
    pub flip_read_byte_at: Option<u64>,
}

/// A store that injects the faults of its [`FaultPlan`].
pub struct FaultyStore {
    inner: Store,
    plan: Mutex<FaultPlan>,
}

impl FaultyStore {
    /// Wraps `inner` with an initial plan.
    pub fn new(inner: Store, plan: FaultPlan) -> FaultyStore {
        FaultyStore {
            inner,
            plan: Mutex::new(plan),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Store {
        &self.inner
    }

    /// Replaces the plan.
    pub fn set_plan(&self, plan: FaultPlan) {
        if let Ok(mut p) = self.plan.lock() {
            *p = plan;
        }
    }

    fn plan(&self) -> FaultPlan {
        self.plan.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn down(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        if self.plan().unavailable {
            return Err(StoreError::Backend {
                store: self.inner.describe(),
                op,
                key: key.to_string(),
                message: "injected fault: region unreachable".into(),
                transient: true,
            });
        }
        Ok(())
    }

    pub(super) async fn put(&self, key: &str, body: ByteStream) -> Result<u64, StoreError> {
        self.down("put", key)?;
        let body = match self.plan().fail_put_after {
            None => body,
            Some(limit) => {
                let mut seen = 0u64;
                Box::pin(body.map(move |chunk| {
                    let chunk = chunk?;
                    seen += chunk.len() as u64;
                    if seen > limit {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "injected fault: writer died mid-put",
                        ));
                    }
                    Ok(chunk)
                })) as ByteStream
            }
        };
        self.inner.put(key, body).await
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        self.down("get", key)?;
        let s = self.inner.get(key, range).await?;
        match self.plan().flip_read_byte_at {
            None => Ok(s),
            Some(at) => {
                let mut pos = 0u64;
                Ok(Box::pin(s.map(move |chunk| {
                    let chunk = chunk?;
                    let start = pos;
                    pos += chunk.len() as u64;
                    if (start..pos).contains(&at) {
                        let mut b = BytesMut::from(&chunk[..]);
                        b[(at - start) as usize] ^= 0x01;
                        return Ok::<Bytes, io::Error>(b.freeze());
                    }
                    Ok(chunk)
                })))
            }
        }
    }

    pub(super) async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        self.down("head", key)?;
        self.inner.head(key).await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.down("list", prefix)?;
        self.inner.list(prefix).await
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.down("delete", key)?;
        self.inner.delete(key).await
    }

    pub(super) async fn hide(&self, key: &str) -> Result<(), StoreError> {
        self.down("delete", key)?;
        self.inner.hide(key).await
    }
}
