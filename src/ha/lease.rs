//! The member's lease and the fence behind it. The keeper renews the lease
//! every `loop_wait` and publishes the fencing deadline, `ttl − loop_wait`
//! after the last renewal sent; the watchdog fences the server (each engine
//! its own way) when that deadline passes while the member leads. Both run apart from the member's
//! main loop, so a slow promotion or hook never delays a renewal or a fence.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::dcs::Dcs;
use super::stats::Report;
use crate::audit::{Audit, AuditLog};
use crate::config::{EnvConfig, PgTarget};
use crate::playbook::Targets;
use crate::playbook::actions::{self, ActionContext};
use crate::playbook::model::{Action, FenceMode};

/// Grants and renews the lease; publishes it and the fencing deadline, and
/// counts renewals in `report` (a member's; the fleet has none). The time
/// recorded is when the renewal was sent, so the deadline is never later
/// than the lease's real expiry in etcd.
pub(super) async fn keep_lease(
    dcs: Dcs,
    ttl: Duration,
    loop_wait: Duration,
    lease_tx: watch::Sender<Option<i64>>,
    deadline_tx: watch::Sender<Option<Instant>>,
    report: Option<Report>,
    stop: CancellationToken,
) {
    let mut lease: Option<i64> = None;
    loop {
        let sent = Instant::now();
        let ok = match lease {
            None => match dcs.grant(ttl).await {
                Ok(id) => {
                    lease = Some(id);
                    true
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    false
                }
            },
            Some(id) => match dcs.renew(id).await {
                Ok(true) => true,
                Ok(false) => {
                    tracing::warn!("lease {id:x} expired; taking a new one");
                    if let Some(r) = &report {
                        r.set(|s| {
                            s.renewals_expired += 1;
                            s.lease_expires = None;
                        });
                    }
                    lease = None;
                    lease_tx.send_replace(None);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    false
                }
            },
        };
        if let Some(r) = &report {
            r.renewal(ok, Some(sent + ttl));
        }
        if ok {
            deadline_tx.send_replace(Some(sent + ttl - loop_wait));
            lease_tx.send_if_modified(|l| {
                let changed = *l != lease;
                *l = lease;
                changed
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until((sent + loop_wait).into()) => {}
        }
    }
}

/// Runs `fence` when the deadline passes while this member leads: its
/// lease may be about to expire, and a standby to promote.
pub(super) async fn watchdog(
    mut deadline: watch::Receiver<Option<Instant>>,
    leader: Arc<AtomicBool>,
    fence: Fence,
    report: Option<Report>,
    stop: CancellationToken,
) {
    loop {
        let d = *deadline.borrow_and_update();
        let expired = async {
            match d {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = deadline.changed() => if r.is_err() { return },
            _ = expired => {
                if leader.swap(false, Ordering::SeqCst) {
                    if let Some(r) = &report {
                        r.fence();
                    }
                    fence().await;
                }
                // Wait for a new renewal before arming again.
                if deadline.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// What the watchdog runs: a fence of the member's own server, which
/// audits itself and never fails (it logs what went wrong).
pub(super) type Fence = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// PostgreSQL's fence for the watchdog: stop the server, audited.
pub(super) fn pg_fence(me: PgTarget, audit: AuditLog, who: String) -> Fence {
    Box::new(move || {
        let (me, audit, who) = (me.clone(), audit.clone(), who.clone());
        Box::pin(async move { fence_now(&me, &audit, &who).await })
    })
}

/// Stops the server now and records why.
async fn fence_now(me: &PgTarget, audit: &AuditLog, who: &str) {
    tracing::error!(
        member = who,
        "cannot renew the leader lease before its deadline; stopping PostgreSQL so that it \
         cannot accept writes while another member may be promoted"
    );
    let t = Instant::now();
    let r = stop_server(me).await;
    let details = json!({ "member": who, "reason": "leader lease not renewed in time", "seconds": t.elapsed().as_secs_f64() });
    match Audit::begin(audit.clone(), "ha.fence", who, details.clone()) {
        Ok(a) => {
            a.finish(None, r.map(|_| details)).await;
        }
        Err(e) => tracing::error!("{e}"),
    }
}

/// `pg_ctl stop -m fast` on the member's own server, as `pg.fence` does.
pub(super) async fn stop_server(me: &PgTarget) -> Result<String, String> {
    let env = EnvConfig {
        state_dir: None,
        allow_overwrite: false,
        postgres: [("self".to_string(), toml::Spanned::new(0..0, me.clone()))].into(),
        redis: Default::default(),
        rabbitmq: Default::default(),
    };
    let t = Targets::new("ha", &env);
    let a = Action::PgFence {
        target: "self".into(),
        mode: FenceMode::Stop,
    };
    actions::run(&a, &t, &ctx("fence")).await.map_err(|e| e.0)
}

/// The context playbook actions run under, named after the step.
pub(super) fn ctx(step: &str) -> ActionContext {
    ActionContext {
        playbook: "ha".into(),
        step: step.into(),
    }
}
