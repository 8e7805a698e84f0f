//! What every member loop runs the same way, whatever its engine: the etcd
//! connection (retried until it answers), the lease keeper, the fencing
//! watchdog and the watch on the leader, switchover and pause keys beside
//! it, and the rhythm of its ticks (every `loop_wait`, at once on a watched
//! change, sooner when the member hurries).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::HaError;
use super::dcs::Dcs;
use super::lease::{Fence, ctx, keep_lease, watchdog};
use super::stats::Report;
use crate::config::HaConfig;
use crate::playbook::Targets;
use crate::playbook::actions;
use crate::playbook::model::Action;

/// How soon a member looks again while it waits for something quick (a
/// switchover target replaying the old primary's last WAL).
pub(super) const HURRY: Duration = Duration::from_millis(50);

/// One member's etcd connection and the tasks that run beside its loop;
/// they stop when this is dropped.
pub(super) struct Background {
    /// etcd, scoped to the cluster's or group's keys.
    pub dcs: Dcs,
    /// The member's lease, once granted.
    pub lease: watch::Receiver<Option<i64>>,
    /// When the watchdog fences, unless the lease is renewed first.
    pub deadline: watch::Receiver<Option<Instant>>,
    /// This member holds the leader key (the watchdog fences only then).
    pub leader: Arc<AtomicBool>,
    wake: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

/// A member loop's step, run by [`Background::run`].
pub(super) trait Tick {
    /// Observe, publish, act.
    async fn tick(&mut self) -> Result<(), HaError>;
    /// Look again after [`HURRY`] rather than `loop_wait` (reset per tick).
    fn hurry(&mut self) -> bool;
    /// `<cluster>/<member>`, for logs.
    fn who(&self) -> String;
}

impl Background {
    /// Connects to etcd for the keys under `<prefix>/<scope>/` (etcd may be
    /// down when the daemon starts: it keeps trying, never gives up), then
    /// starts the keeper, the watchdog with `fence` and the watch, counting
    /// renewals and fences in `report`. `None` when `stop` came first.
    pub async fn start(
        ha: &HaConfig,
        scope: &str,
        who: &str,
        fence: Fence,
        report: Report,
        stop: &CancellationToken,
    ) -> Option<Background> {
        let dcs = Dcs::connect_retrying(ha, scope, who, stop).await?;
        let (lease_tx, lease) = watch::channel(None);
        let (deadline_tx, deadline) = watch::channel(None);
        let leader = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let tasks = vec![
            tokio::spawn(keep_lease(
                dcs.clone(),
                ha.ttl,
                ha.loop_wait,
                lease_tx,
                deadline_tx,
                Some(report.clone()),
                stop.clone(),
            )),
            tokio::spawn(watchdog(
                deadline.clone(),
                leader.clone(),
                fence,
                Some(report),
                stop.clone(),
            )),
            tokio::spawn({
                let (d, w, s, retry) = (dcs.clone(), wake.clone(), stop.clone(), ha.loop_wait);
                async move { d.watch_changes(w, retry, s).await }
            }),
        ];
        tracing::info!(member = who, "automatic failover: member loop started");
        Some(Background {
            dcs,
            lease,
            deadline,
            leader,
            wake,
            tasks,
        })
    }

    /// Runs `m`'s ticks until `stop` is cancelled; a failed tick is logged
    /// and the next one tried.
    pub async fn run(&self, m: &mut impl Tick, loop_wait: Duration, stop: &CancellationToken) {
        loop {
            if let Err(e) = m.tick().await {
                tracing::warn!(member = m.who(), "{e}");
            }
            let pause = if m.hurry() { HURRY } else { loop_wait };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Our own name on the leader key under an old lease (the daemon
/// restarted): free it, and take it again under `lease` when the server
/// still takes writes.
pub(super) async fn reclaim(
    dcs: &Dcs,
    name: &str,
    lease: i64,
    serving: bool,
) -> Result<(), HaError> {
    dcs.release(name).await?;
    if serving {
        dcs.try_acquire(name, lease).await?;
    }
    Ok(())
}

/// Runs the hooks after a promotion, in order; one JSON outcome each (a
/// failed hook does not stop the next).
pub(super) async fn run_hooks(
    hooks: &[Action],
    targets: &Targets,
    step: &str,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for (i, h) in hooks.iter().enumerate() {
        let r = actions::run(h, targets, &ctx(step)).await;
        out.push(serde_json::json!({ "hook": i + 1, "ok": r.is_ok(), "detail": r.unwrap_or_else(|e| e.0) }));
    }
    out
}

/// On daemon shutdown: a leader (when not paused) runs `fence` and frees
/// the key, so another member takes over at once instead of after the
/// lease; every member revokes its lease.
pub(super) async fn step_down(
    dcs: &Dcs,
    name: &str,
    lease: Option<i64>,
    leading: bool,
    paused: bool,
    fence: impl std::future::Future<Output = ()>,
) {
    if leading && !paused {
        fence.await;
        let _ = dcs.release(name).await;
    }
    if let Some(l) = lease {
        let _ = dcs.revoke(l).await;
    }
}
