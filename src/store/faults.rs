//! Fault injection around a real store, for tests of crash consistency,
//! degraded regions and read fallback. The wrapped store is real; only the
//! failure is simulated.
//!
//! Tests of the library build a [`FaultyStore`] directly. Tests of the
//! binary (and `scripts/chaos.sh`) set `DR_FAULTS` instead, which
//! [`super::Regions::from_config`] reads: `REGION:KEY=VALUE,…` per region,
//! regions separated by `;`, for example
//! `DR_FAULTS="b:error_rate=0.3,slow_ms=50;c:stall_put_after=65536"`.
//! Keys: `unavailable`, `error_rate` (0 to 1, each call), `slow_ms` (each
//! call, and each chunk of a put), `stall_put_after` (a put's body stops
//! being read after this many bytes and the call never returns),
//! `fail_put_after`, `short_write_after` (the region keeps only this many
//! bytes of a put and reports success, as a backend that loses the end of
//! an upload would), `flip_read_byte_at`, `seed`.

use std::io;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{ByteStream, ObjectInfo, Store, StoreError};

crate::message_error!(
    /// A fault-injection spec (`DR_FAULTS`) that does not parse; names the item.
    FaultSpecError
);

/// The environment variable that injects faults into configured regions.
pub const FAULTS_ENV: &str = "DR_FAULTS";

/// Which faults to inject. Can be changed while the store is in use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Every call fails as if the region were unreachable.
    pub unavailable: bool,
    /// A put's body fails after this many bytes (a crash or dropped connection).
    pub fail_put_after: Option<u64>,
    /// Reads flip one bit of the first byte past this offset.
    pub flip_read_byte_at: Option<u64>,
    /// Each call fails (transiently) with this probability.
    pub error_rate: f64,
    /// Each call, and each chunk of a put's body, is delayed this long.
    pub slow: Option<Duration>,
    /// A put stops reading its body after this many bytes and never returns
    /// (a stalled connection).
    pub stall_put_after: Option<u64>,
    /// A put stores only this many bytes and reports success anyway (a
    /// backend that silently loses the end of an upload).
    pub short_write_after: Option<u64>,
    /// Seed of the error draws (0: from the clock).
    pub seed: u64,
}

impl FaultPlan {
    /// Parses one region's `KEY=VALUE,…` list.
    pub fn parse(spec: &str) -> Result<FaultPlan, FaultSpecError> {
        let mut p = FaultPlan::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "true"));
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}={v}: not a whole number"))
            };
            match k {
                "unavailable" => p.unavailable = v == "true" || v == "1",
                "fail_put_after" => p.fail_put_after = Some(num(v)?),
                "flip_read_byte_at" => p.flip_read_byte_at = Some(num(v)?),
                "stall_put_after" => p.stall_put_after = Some(num(v)?),
                "short_write_after" => p.short_write_after = Some(num(v)?),
                "slow_ms" => p.slow = Some(Duration::from_millis(num(v)?)),
                "seed" => p.seed = num(v)?,
                "error_rate" => {
                    p.error_rate = v
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("error_rate={v}: not a number from 0 to 1"))?
                }
                _ => return Err(format!("unknown fault {k:?}").into()),
            }
        }
        Ok(p)
    }

    /// Parses a whole `DR_FAULTS` value: region name to plan.
    pub fn parse_env(value: &str) -> Result<Vec<(String, FaultPlan)>, FaultSpecError> {
        value
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|part| {
                let (region, spec) = part
                    .split_once(':')
                    .ok_or_else(|| format!("{part:?}: expected REGION:KEY=VALUE,…"))?;
                Ok((region.trim().to_string(), FaultPlan::parse(spec)?))
            })
            .collect()
    }
}

/// A store that injects the faults of its [`FaultPlan`].
pub struct FaultyStore {
    inner: Store,
    plan: Mutex<FaultPlan>,
    rng: Mutex<u64>,
}

impl FaultyStore {
    /// Wraps `inner` with an initial plan.
    pub fn new(inner: Store, plan: FaultPlan) -> FaultyStore {
        let seed = if plan.seed != 0 {
            plan.seed
        } else {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                ^ u64::from(std::process::id())
        };
        FaultyStore {
            inner,
            plan: Mutex::new(plan),
            rng: Mutex::new(seed),
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

    /// A draw in [0, 1) (splitmix64).
    fn draw(&self) -> f64 {
        let Ok(mut s) = self.rng.lock() else {
            return 1.0;
        };
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn down(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        let plan = self.plan();
        if let Some(d) = plan.slow {
            tokio::time::sleep(d).await;
        }
        let message = if plan.unavailable {
            "injected fault: region unreachable"
        } else if plan.error_rate > 0.0 && self.draw() < plan.error_rate {
            "injected fault: request failed (503 Slow Down)"
        } else {
            return Ok(());
        };
        Err(StoreError::Backend {
            store: self.inner.describe(),
            op,
            key: key.to_string(),
            message: message.into(),
            transient: true,
        })
    }

    pub(super) async fn put(&self, key: &str, body: ByteStream) -> Result<u64, StoreError> {
        self.down("put", key).await?;
        let plan = self.plan();
        let mut body = body;
        if let Some(limit) = plan.fail_put_after {
            let mut seen = 0u64;
            body = Box::pin(body.map(move |chunk| {
                let chunk = chunk?;
                seen += chunk.len() as u64;
                if seen > limit {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "injected fault: writer died mid-put",
                    ));
                }
                Ok(chunk)
            }));
        }
        if let Some(d) = plan.slow {
            body = Box::pin(body.then(move |chunk| async move {
                tokio::time::sleep(d).await;
                chunk
            }));
        }
        if let Some(limit) = plan.stall_put_after {
            let mut seen = 0u64;
            body = Box::pin(body.then(move |chunk| {
                let stall = match &chunk {
                    Ok(c) => {
                        seen += c.len() as u64;
                        seen > limit
                    }
                    Err(_) => false,
                };
                async move {
                    if stall {
                        // Never reads on and never returns, like a peer that
                        // stopped answering with the connection still open.
                        futures::future::pending::<()>().await;
                    }
                    chunk
                }
            }));
        }
        if let Some(limit) = plan.short_write_after {
            // The whole body is consumed (the writer sees success), but only
            // its first `limit` bytes reach the store.
            let mut all = 0u64;
            let mut kept = BytesMut::new();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|source| StoreError::Source {
                    store: self.inner.describe(),
                    key: key.to_string(),
                    source,
                })?;
                all += chunk.len() as u64;
                let room = limit.saturating_sub(kept.len() as u64) as usize;
                kept.extend_from_slice(&chunk[..room.min(chunk.len())]);
            }
            self.inner.put(key, super::once(kept.freeze())).await?;
            return Ok(all);
        }
        self.inner.put(key, body).await
    }

    pub(super) async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, StoreError> {
        self.down("get", key).await?;
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
        self.down("head", key).await?;
        self.inner.head(key).await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        self.down("list", prefix).await?;
        self.inner.list(prefix).await
    }

    pub(super) async fn list_dirs(&self, prefix: &str) -> Result<super::Listing, StoreError> {
        self.down("list", prefix).await?;
        self.inner.list_dirs(prefix).await
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.down("delete", key).await?;
        self.inner.delete(key).await
    }

    pub(super) async fn hide(&self, key: &str) -> Result<(), StoreError> {
        self.down("delete", key).await?;
        self.inner.hide(key).await
    }
}
