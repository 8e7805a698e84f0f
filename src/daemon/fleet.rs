//! A scheduled run in a fleet (`[ha]` with `fleet = true`): claimed in etcd
//! before it starts, audited as `fleet.job` with the daemon that ran it, and
//! stopped if this daemon may have lost the lease that holds its claim.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::jobs::{JobOutcome, JobSpec};
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, HaConfig};
use crate::ha::fleet::{Claim, Fleet, RunGuard};

/// This daemon's name in the fleet: its `[ha]` member name when it has one,
/// else `<host>:<state_dir>` (one daemon per state directory, so unique).
pub fn node_name(cfg: &Config, member: Option<&str>) -> String {
    if let Some(m) = cfg.ha().and_then(|h| h.member_name(member)) {
        return m.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", cfg.daemon().state_dir.display())
}

/// Joins the fleet when `[ha]` asks for one.
pub fn join(cfg: &Config, member: Option<&str>, stop: CancellationToken) -> Option<Fleet> {
    let ha: &HaConfig = cfg.ha().filter(|h| h.fleet)?;
    let node = node_name(cfg, member);
    tracing::info!(
        node,
        "sharing scheduled jobs with the daemons of this config (fleet)"
    );
    Some(Fleet::join(ha, node, stop))
}

/// A run this daemon owns.
pub struct FleetRun {
    guard: Box<RunGuard>,
    audit: Option<Audit>,
    details: serde_json::Value,
}

/// Claims the run of `job` scheduled at `at`: `Ok(None)` when another
/// daemon has it; `Err` (the reason) when the claim could not be made,
/// which fails the run.
pub async fn claim(
    fleet: &Fleet,
    cfg: &Config,
    names: &[String],
    job: &JobSpec,
    at: DateTime<Utc>,
) -> Result<Option<FleetRun>, String> {
    let scheduled = at.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    match fleet.claim(&job.name, names, at).await {
        Ok(Claim::Mine(guard)) => {
            let details = json!({ "node": fleet.node(), "scheduled": scheduled });
            // The run is not refused when the audit log cannot be written:
            // a backup destroys nothing, and a missed backup costs more.
            let log = AuditLog::from_config(cfg);
            let audit = match Audit::begin(log, "fleet.job", &job.name, details.clone()) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::error!(job = %job.name, "{e}");
                    None
                }
            };
            Ok(Some(FleetRun {
                guard,
                audit,
                details,
            }))
        }
        Ok(Claim::Taken { node }) => {
            tracing::info!(job = %job.name, scheduled, node, "run taken by another daemon of the fleet");
            Ok(None)
        }
        Ok(Claim::Busy { node }) => {
            tracing::warn!(
                job = %job.name,
                scheduled,
                node,
                "skipped: the previous run is still going on another daemon of the fleet"
            );
            Ok(None)
        }
        Err(e) => Err(e.to_string()),
    }
}

impl FleetRun {
    /// Cancelled when the claim may be lost: the run must stop.
    pub fn lost(&self) -> CancellationToken {
        self.guard.lost()
    }

    /// Records the outcome and releases the claim.
    pub async fn finish(self, result: Result<&JobOutcome, String>) {
        if let Some(a) = self.audit {
            let mut details = self.details;
            let r = result.map(|o| {
                details["id"] = json!(o.id);
                details["bytes"] = json!(o.bytes);
                details
            });
            for w in a.finish(None, r).await.1 {
                tracing::warn!("{w}");
            }
        }
        self.guard.release().await;
    }
}

/// Cancels `run` when the claim of `fleet_run` is lost; returns whether it
/// was (checked after the run).
pub fn stop_on_loss(fleet_run: Option<&FleetRun>, run: &CancellationToken) -> Arc<LossFlag> {
    match fleet_run {
        Some(f) => cancel_on_loss(f.lost(), run),
        None => Arc::new(LossFlag::default()),
    }
}

/// Cancels `run` when `lost` fires, saying why; the watch ends with `run`.
pub fn cancel_on_loss(lost: CancellationToken, run: &CancellationToken) -> Arc<LossFlag> {
    let flag = Arc::new(LossFlag::default());
    let (run, flag2) = (run.clone(), flag.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = lost.cancelled() => {
                flag2.0.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::error!(
                    "this daemon could not renew its fleet lease in time; stopping its run so \
                     that it cannot overlap a run on another daemon"
                );
                run.cancel();
            }
            _ = run.cancelled() => {}
        }
    });
    flag
}

/// Runs `work` once this daemon holds the fleet's claim on the continuous
/// job `job` (a WAL streamer): one daemon of the fleet at a time. The others
/// wait, and one of them takes over within `ttl` of the holder's death.
/// Without a fleet, `work` simply runs until `stop`.
///
/// Unlike a scheduled run, `work` is not stopped when the lease may be lost:
/// a WAL streamer's replication slot already admits one streamer at a time,
/// so an etcd outage must not stop streaming (and, with synchronous
/// streaming, the primary's commits).
pub async fn singleton<F, Fut>(
    fleet: Option<&Fleet>,
    job: &str,
    retry: std::time::Duration,
    stop: &CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(fleet) = fleet else {
        return work(stop.clone()).await;
    };
    let mut said = String::new();
    while !stop.is_cancelled() {
        let now = match fleet.claim(job, &[], Utc::now()).await {
            Ok(Claim::Mine(guard)) => {
                tracing::info!(
                    job,
                    node = fleet.node(),
                    "this daemon of the fleet runs it now"
                );
                work(stop.clone()).await;
                guard.release().await;
                said.clear();
                continue;
            }
            Ok(Claim::Busy { node } | Claim::Taken { node }) => format!("runs on {node}"),
            Err(e) => e.to_string(),
        };
        if now != said {
            tracing::info!(job, "{now}; this daemon takes over if that ends");
            said = now;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// Set when a run was stopped because its claim may have been lost.
#[derive(Debug, Default)]
pub struct LossFlag(std::sync::atomic::AtomicBool);

impl LossFlag {
    /// Whether the run was stopped for that reason.
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
