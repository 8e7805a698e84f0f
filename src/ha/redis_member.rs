//! One member's loop for one Redis group: the PostgreSQL member's lease
//! logic ([`super::driver`]) with Redis's actions. The master's daemon holds
//! the leader key and publishes its offset; when the key is gone the
//! replica with the highest offset takes it, fences the old master if it
//! still answers, runs `REPLICAOF NO ONE`, repoints the others and runs the
//! hooks. A master that is not the leader is made a replica of the leader,
//! or fenced while there is none.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::HaError;
use super::dcs::Dcs;
use super::driver::{Background, Tick, reclaim, run_hooks, step_down};
use super::lease::{Fence, ctx};
use super::redis::{self as r, GroupView, Observed, RedisOptime, Role};
use super::stats::Report;
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, EnvConfig, HaConfig, HaRedisGroup};
use crate::playbook::Targets;
use crate::playbook::actions;
use crate::playbook::model::Action;

/// Member `name` of Redis group `group` and what it needs to act.
struct Member {
    name: String,
    group: String,
    ha: HaConfig,
    spec: HaRedisGroup,
    targets: Targets,
    dcs: Dcs,
    audit: AuditLog,
    hooks: Vec<Action>,
    lease: watch::Receiver<Option<i64>>,
    deadline: watch::Receiver<Option<Instant>>,
    leader: Arc<AtomicBool>,
    report: Report,
    down_since: Option<Instant>,
}

/// The group's servers as playbook targets.
fn targets(group: &str, spec: &HaRedisGroup) -> Targets {
    let env = EnvConfig {
        state_dir: None,
        allow_overwrite: false,
        postgres: Default::default(),
        redis: spec.member.clone(),
        rabbitmq: Default::default(),
    };
    Targets::new(&format!("ha.redis.{group}"), &env)
}

/// The watchdog's fence for a Redis member, audited as `ha.fence`.
fn watchdog_fence(
    t: Targets,
    name: String,
    audit: AuditLog,
    group: String,
    bound: std::time::Duration,
) -> Fence {
    Box::new(move || {
        let (t, name, audit, group) = (t.clone(), name.clone(), audit.clone(), group.clone());
        Box::pin(async move {
            tracing::error!(
                member = name,
                "cannot renew the leader lease before its deadline; fencing Redis so that it \
                 cannot accept writes while a replica may be promoted"
            );
            let reason = "leader lease not renewed in time";
            if let Err(e) = fence_audited(&t, &name, &audit, &group, reason, bound).await {
                tracing::error!(member = name, "{e}");
            }
        })
    })
}

/// Fences `name` and writes an `ha.fence` record (with the time it took).
async fn fence_audited(
    t: &Targets,
    name: &str,
    audit: &AuditLog,
    group: &str,
    why: &str,
    bound: std::time::Duration,
) -> Result<String, HaError> {
    let t0 = Instant::now();
    let details = json!({ "member": name, "reason": why });
    let a = Audit::begin(
        audit.clone(),
        "ha.fence",
        &format!("redis/{group}"),
        details,
    )?;
    let res = r::fence(t, name, bound).await;
    let done = json!({ "member": name, "reason": why, "seconds": t0.elapsed().as_secs_f64() });
    a.finish(None, res.as_ref().map(|_| done).map_err(|e| e.clone()))
        .await;
    tracing::warn!(member = name, "fence: {why}: {res:?}");
    res.map_err(HaError::Redis)
}

/// Runs member `name` of Redis group `group` until `stop` is cancelled.
pub(super) async fn run_member(
    cfg: Arc<Config>,
    group: String,
    name: String,
    report: Report,
    stop: CancellationToken,
) -> Result<(), HaError> {
    let ha = super::settings(&cfg)?.clone();
    let spec = ha
        .redis
        .get(&group)
        .map(|g| g.get_ref().clone())
        .ok_or_else(|| HaError::Config(format!("no [ha.redis.{group}]")))?;
    let hooks = super::redis_hooks(&cfg, &group).map_err(|e| HaError::Config(e.to_string()))?;
    let targets = targets(&group, &spec);
    let audit = AuditLog::from_config(&cfg);
    let fence = watchdog_fence(
        targets.clone(),
        name.clone(),
        audit.clone(),
        group.clone(),
        ha.loop_wait,
    );
    let scope = format!("{}/{group}", crate::config::HA_REDIS_SCOPE);
    let who = format!("redis/{group}/{name}");
    let Some(bg) = Background::start(&ha, &scope, &who, fence, report.clone(), &stop).await else {
        return Ok(());
    };
    let mut m = Member {
        name,
        group,
        targets,
        dcs: bg.dcs.clone(),
        audit,
        hooks,
        lease: bg.lease.clone(),
        deadline: bg.deadline.clone(),
        leader: bg.leader.clone(),
        report,
        down_since: None,
        spec,
        ha,
    };
    let loop_wait = m.ha.loop_wait;
    bg.run(&mut m, loop_wait, &stop).await;
    m.shutdown().await;
    Ok(())
}

impl Tick for Member {
    async fn tick(&mut self) -> Result<(), HaError> {
        let obs = r::observe(&self.targets, &self.name, self.ha.loop_wait).await;
        let Some(lease) = *self.lease.borrow() else {
            return Ok(());
        };
        self.dcs.put_member(lease, &obs.state(&self.name)).await?;
        let view: GroupView = self.dcs.view_as().await?;
        let mine = view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == self.name && l.lease == lease);
        self.leader.store(mine, Ordering::SeqCst);
        let top = view
            .leader
            .as_ref()
            .and_then(|l| view.member(&l.name))
            .and_then(|m| m.offset)
            .or(view.optime.as_ref().map(|o| o.offset));
        self.report.set(|s| {
            s.role = obs.state(&self.name).role;
            s.leader = mine;
            s.leader_name = view.leader.as_ref().map(|l| l.name.clone());
            s.paused = view.paused;
            s.lag_bytes = top.zip(obs.offset).map(|(t, o)| t.saturating_sub(o));
            s.max_lag_bytes = self.spec.max_lag_bytes;
        });
        tracing::debug!(member = self.name, role = ?obs.role, offset = ?obs.offset, leader = ?view.leader, "tick");
        if mine {
            self.lead(&obs, &view).await
        } else {
            self.follow(&obs, &view, lease).await
        }
    }

    fn hurry(&mut self) -> bool {
        false
    }

    fn who(&self) -> String {
        format!("redis/{}/{}", self.group, self.name)
    }
}

impl Member {
    fn lease_fresh(&self) -> bool {
        self.deadline.borrow().is_some_and(|d| d > Instant::now())
    }

    fn target(&self) -> String {
        format!("redis/{}", self.group)
    }

    async fn publish_optime(&self, obs: &Observed) -> Result<(), HaError> {
        let Some(offset) = obs.offset else {
            return Ok(());
        };
        let o = RedisOptime {
            leader: self.name.clone(),
            offset,
        };
        self.dcs.put_optime(&o).await
    }

    async fn lead(&mut self, obs: &Observed, view: &GroupView) -> Result<(), HaError> {
        if !self.lease_fresh() {
            return Ok(());
        }
        match obs.role {
            Role::Master => {
                self.down_since = None;
                self.publish_optime(obs).await
            }
            _ if view.paused => Ok(()),
            // Ours, but a replica: its own fence after an etcd outage that
            // the lease outlived, or a promotion cut short by a crash.
            Role::Replica => {
                let why = if obs.fenced() {
                    "holds the leader key again; lifting its own fence"
                } else {
                    "holds the leader key; finishing the promotion"
                };
                self.promote(obs, view, why).await
            }
            Role::Down => self.resign_if_down(obs).await,
        }
    }

    /// The leader's server does not answer: give up the key once it has
    /// not answered for `down_timeout`, so a replica takes over.
    async fn resign_if_down(&mut self, obs: &Observed) -> Result<(), HaError> {
        let since = *self.down_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.spec.down_timeout(&self.ha) {
            return Ok(());
        }
        self.dcs.release(&self.name).await?;
        self.leader.store(false, Ordering::SeqCst);
        let details = json!({ "member": self.name, "reason": format!(
            "server down for {:?}: {}", since.elapsed(), obs.error.as_deref().unwrap_or("?")) });
        let a = Audit::begin(
            self.audit.clone(),
            "ha.resign",
            &self.target(),
            details.clone(),
        )?;
        a.finish(None, Ok(details)).await;
        Ok(())
    }

    async fn follow(
        &mut self,
        obs: &Observed,
        view: &GroupView,
        lease: i64,
    ) -> Result<(), HaError> {
        self.down_since = None;
        if view.paused {
            return Ok(());
        }
        let Some(leader) = &view.leader else {
            return self.elect(obs, view, lease).await;
        };
        if leader.name == self.name {
            let serving = obs.role == Role::Master;
            return reclaim(&self.dcs, &self.name, lease, serving).await;
        }
        let leads = view
            .member(&leader.name)
            .is_some_and(|m| m.role == "master" && m.healthy);
        let want = self
            .targets
            .redis_addr(&leader.name)
            .map_err(|e| HaError::Redis(e.0))?;
        match obs.role {
            Role::Master if !leads => {
                let why = format!("{} holds the leader key", leader.name);
                self.fence(&why).await
            }
            Role::Master | Role::Replica if leads && obs.master.as_ref() != Some(&want) => {
                self.rejoin(&leader.name, obs).await
            }
            _ => Ok(()),
        }
    }

    /// Nobody leads: take the key back as the last master, or run as the
    /// best replica.
    async fn elect(&mut self, obs: &Observed, view: &GroupView, lease: i64) -> Result<(), HaError> {
        match obs.role {
            Role::Master => {
                let last = view.optime.as_ref().is_none_or(|o| o.leader == self.name);
                if !last {
                    let why = format!(
                        "a master, but {} led last; this server may have diverged",
                        view.optime.as_ref().map_or("?", |o| o.leader.as_str())
                    );
                    return self.fence(&why).await;
                }
                // With its offset: replicas run only once a master published.
                let o = RedisOptime {
                    leader: self.name.clone(),
                    offset: obs.offset.unwrap_or(0),
                };
                if self
                    .dcs
                    .try_acquire_with_optime(&self.name, lease, &o)
                    .await?
                {
                    self.leader.store(true, Ordering::SeqCst);
                    tracing::info!(member = self.who(), "leader key taken");
                }
                Ok(())
            }
            Role::Replica => {
                let best = view.best_replica(self.spec.max_lag_bytes);
                if best.is_none_or(|b| b.name != self.name) {
                    return Ok(());
                }
                if !self.dcs.try_acquire(&self.name, lease).await? {
                    return Ok(());
                }
                self.leader.store(true, Ordering::SeqCst);
                let why = format!(
                    "leader key gone (last leader {})",
                    view.optime.as_ref().map_or("?", |o| o.leader.as_str())
                );
                self.promote(obs, view, &why).await
            }
            Role::Down => Ok(()),
        }
    }

    /// Promotes this member's server (it holds the key): fences the last
    /// master where it still answers, `REPLICAOF NO ONE`, then repoints the
    /// other members, runs the hooks and writes the audit record.
    async fn promote(
        &mut self,
        obs: &Observed,
        view: &GroupView,
        why: &str,
    ) -> Result<(), HaError> {
        let t0 = Instant::now();
        let previous = view.optime.as_ref().map(|o| o.leader.clone());
        let mut details = json!({
            "member": self.name,
            "reason": why,
            "previous_leader": previous,
            "previous_leader_offset": view.optime.as_ref().map(|o| o.offset),
            "offset": obs.offset,
            "was_fenced": obs.fenced(),
        });
        let mut audit = match Audit::begin(
            self.audit.clone(),
            "ha.failover",
            &self.target(),
            details.clone(),
        ) {
            Ok(a) => a,
            Err(e) => {
                self.dcs.release(&self.name).await?;
                return Err(e.into());
            }
        };
        // A master whose daemon died still takes writes: fence it first
        // when it answers (bounded, so a vanished host costs loop_wait).
        let fenced_previous = match previous.as_deref().filter(|p| *p != self.name) {
            Some(p) => Some(r::fence(&self.targets, p, self.ha.loop_wait).await),
            None => None,
        };
        let promote = Action::RedisPromote {
            target: self.name.clone(),
        };
        if let Err(e) = actions::run(&promote, &self.targets, &ctx("promote")).await {
            let _ = self.dcs.release(&self.name).await;
            self.leader.store(false, Ordering::SeqCst);
            self.report.promotion(false, false);
            audit.finish(None, Err(e.0.clone())).await;
            return Err(HaError::Redis(e.0));
        }
        self.report.promotion(false, true);
        let promoted = t0.elapsed().as_secs_f64();
        tracing::warn!(member = self.who(), "promoted in {promoted:.2}s: {why}");
        let now = r::observe(&self.targets, &self.name, self.ha.loop_wait).await;
        self.publish_optime(&now).await?;
        let repointed = self.repoint_others().await;
        let hooks = run_hooks(&self.hooks, &self.targets, &self.name).await;
        details["fenced_previous"] = json!(fenced_previous.map(|f| f.unwrap_or_else(|e| e)));
        details["promote_seconds"] = json!(promoted);
        details["total_seconds"] = json!(t0.elapsed().as_secs_f64());
        details["new_offset"] = json!(now.offset);
        details["repointed"] = json!(repointed);
        details["hooks"] = json!(hooks);
        audit.set_details(details.clone());
        audit.finish(None, Ok(details)).await;
        Ok(())
    }

    /// Points every other member at this one, whether or not its daemon
    /// runs: a dead daemon's server (the old master among them) would
    /// otherwise keep its old role.
    async fn repoint_others(&self) -> Vec<serde_json::Value> {
        let runs = self
            .spec
            .member
            .keys()
            .filter(|n| **n != self.name)
            .map(|n| async move {
                let a = Action::RedisReplicaof {
                    target: n.clone(),
                    master: self.name.clone(),
                    timeout: self.ha.ttl,
                };
                let res = actions::run(&a, &self.targets, &ctx("repoint")).await;
                json!({ "member": n, "ok": res.is_ok(), "detail": res.unwrap_or_else(|e| e.0) })
            });
        futures::future::join_all(runs).await
    }

    /// Fences this member's server: it is a master but does not lead.
    async fn fence(&mut self, why: &str) -> Result<(), HaError> {
        self.report.fence();
        fence_audited(
            &self.targets,
            &self.name,
            &self.audit,
            &self.group,
            why,
            self.ha.loop_wait,
        )
        .await
        .map(|_| ())
    }

    /// Makes this member's server a replica of `leader` (an old master
    /// coming back, a fenced one, or a replica of an older master).
    async fn rejoin(&mut self, leader: &str, obs: &Observed) -> Result<(), HaError> {
        let details =
            json!({ "member": self.name, "leader": leader, "was": obs.state(&self.name) });
        let audited = obs.role == Role::Master || obs.fenced();
        let a = if audited {
            Some(Audit::begin(
                self.audit.clone(),
                "ha.rejoin",
                &self.target(),
                details.clone(),
            )?)
        } else {
            None
        };
        let act = Action::RedisReplicaof {
            target: self.name.clone(),
            master: leader.to_string(),
            timeout: self.ha.ttl,
        };
        let res = actions::run(&act, &self.targets, &ctx("follow")).await;
        if audited {
            self.report.rejoin(res.is_ok());
        }
        tracing::info!(member = self.who(), "follow {leader}: {res:?}");
        if let Some(a) = a {
            a.finish(None, res.as_ref().map(|_| details).map_err(|e| e.0.clone()))
                .await;
        }
        res.map(|_| ()).map_err(|e| HaError::Redis(e.0))
    }

    /// On daemon shutdown: a leader (when not paused) fences its server and
    /// frees the key, so a replica takes over at once instead of after the
    /// lease; every member revokes its lease.
    async fn shutdown(&mut self) {
        let lease = *self.lease.borrow();
        let paused = self
            .dcs
            .view_as::<r::RedisMemberState, RedisOptime>()
            .await
            .map(|v| v.paused)
            .unwrap_or(false);
        let leading = self.leader.load(Ordering::SeqCst);
        let (t, n, a, g, b) = (
            &self.targets,
            &self.name,
            &self.audit,
            &self.group,
            self.ha.loop_wait,
        );
        let fence = async move {
            let _ = fence_audited(t, n, a, g, "the daemon is shutting down", b).await;
        };
        step_down(&self.dcs, &self.name, lease, leading, paused, fence).await;
    }
}
