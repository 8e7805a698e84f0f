//! One member's loop for one cluster: it observes the server, publishes
//! its state and acts (lead, follow, elect) every `loop_wait`, and at once
//! when the leader, switchover or pause key changes. The lease keeper and
//! the fencing watchdog ([`super::lease`]) run beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::HaError;
use super::dcs::{ClusterView, Dcs, MemberState, Optime, Switchover};
use super::driver::{Background, HURRY, Tick, reclaim, run_hooks, step_down};
use super::lease::{ctx, pg_fence, stop_server};
use super::pg::{self, Observed, Role};
use super::stats::Report;
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, EnvConfig, HaConfig, HaPgCluster, PgTarget};
use crate::playbook::Targets;
use crate::playbook::actions;
use crate::playbook::model::{Action, FenceMode};

/// A member's view of one cluster and what it needs to act.
struct Member {
    name: String,
    cluster: String,
    ha: HaConfig,
    spec: HaPgCluster,
    targets: Targets,
    me: PgTarget,
    dcs: Dcs,
    audit: AuditLog,
    hooks: Vec<Action>,
    lease: watch::Receiver<Option<i64>>,
    deadline: watch::Receiver<Option<Instant>>,
    leader: Arc<AtomicBool>,
    report: Report,
    down_since: Option<Instant>,
    /// Look again after [`HURRY`] instead of `loop_wait`.
    hurry: bool,
}

/// Runs member `name` of `cluster` until `stop` is cancelled.
pub(super) async fn run_member(
    cfg: Arc<Config>,
    cluster: String,
    name: String,
    report: Report,
    stop: CancellationToken,
) -> Result<(), HaError> {
    let ha = super::settings(&cfg)?.clone();
    let spec = ha
        .postgres
        .get(&cluster)
        .map(|c| c.get_ref().clone())
        .ok_or_else(|| HaError::Config(format!("no [ha.postgres.{cluster}]")))?;
    let me = spec
        .member
        .get(&name)
        .map(|m| m.get_ref().clone())
        .ok_or_else(|| {
            HaError::Config(format!(
                "{name:?} is not a member of [ha.postgres.{cluster}]; configured: {}",
                spec.member.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
    let hooks = super::hooks(&cfg, &cluster).map_err(|e| HaError::Config(e.to_string()))?;
    let env = EnvConfig {
        state_dir: None,
        allow_overwrite: false,
        postgres: spec.member.clone(),
        redis: Default::default(),
        rabbitmq: Default::default(),
    };
    let who = format!("{cluster}/{name}");
    let fence = pg_fence(me.clone(), AuditLog::from_config(&cfg), who.clone());
    let Some(bg) = Background::start(&ha, &cluster, &who, fence, report.clone(), &stop).await
    else {
        return Ok(());
    };
    let mut m = Member {
        targets: Targets::new(&format!("ha.{cluster}"), &env),
        name,
        cluster,
        me,
        dcs: bg.dcs.clone(),
        audit: AuditLog::from_config(&cfg),
        hooks,
        lease: bg.lease.clone(),
        deadline: bg.deadline.clone(),
        leader: bg.leader.clone(),
        report,
        down_since: None,
        hurry: false,
        spec,
        ha,
    };
    let loop_wait = m.ha.loop_wait;
    bg.run(&mut m, loop_wait, &stop).await;
    m.shutdown().await;
    Ok(())
}

fn state(name: &str, o: &Observed) -> MemberState {
    MemberState {
        name: name.into(),
        role: o.role.label().into(),
        timeline: o.timeline,
        received_lsn: o.received,
        replayed_lsn: o.replayed,
        healthy: o.role != Role::Down,
        sync_standbys: o.sync_standbys.clone(),
    }
}

impl Tick for Member {
    async fn tick(&mut self) -> Result<(), HaError> {
        Member::tick(self).await
    }

    fn hurry(&mut self) -> bool {
        std::mem::take(&mut self.hurry)
    }

    fn who(&self) -> String {
        format!("{}/{}", self.cluster, self.name)
    }
}

impl Member {
    fn lease_fresh(&self) -> bool {
        self.deadline.borrow().is_some_and(|d| d > Instant::now())
    }

    async fn run(&self, a: Action, step: &str) -> Result<String, HaError> {
        actions::run(&a, &self.targets, &ctx(step))
            .await
            .map_err(|e| HaError::Pg(e.0))
    }

    async fn publish_optime(&self, obs: &Observed) -> Result<(), HaError> {
        let Some(lsn) = obs.received else {
            return Ok(());
        };
        let o = Optime {
            leader: self.name.clone(),
            lsn,
            sync_standbys: obs.sync_standbys.clone(),
        };
        self.dcs.put_optime(&o).await
    }

    async fn tick(&mut self) -> Result<(), HaError> {
        let obs = pg::observe(&self.me, self.ha.loop_wait).await;
        let Some(lease) = *self.lease.borrow() else {
            return Ok(());
        };
        self.dcs.put_member(lease, &state(&self.name, &obs)).await?;
        let view = self.dcs.view().await?;
        let mine = view
            .leader
            .as_ref()
            .is_some_and(|l| l.name == self.name && l.lease == lease);
        self.leader.store(mine, Ordering::SeqCst);
        self.report.set(|s| {
            s.role = obs.role.label().into();
            s.leader = mine;
            s.leader_name = view.leader.as_ref().map(|l| l.name.clone());
            s.paused = view.paused;
            s.timeline = obs.timeline;
            s.lag_bytes = view.lag_bytes(obs.received);
            s.max_lag_bytes = self.spec.max_lag_bytes;
        });
        tracing::debug!(
            member = self.name,
            role = obs.role.label(),
            leader = ?view.leader,
            lease,
            paused = view.paused,
            optime = ?view.optime,
            "tick"
        );
        if mine {
            self.lead(&obs, &view).await
        } else {
            self.follow(&obs, &view, lease).await
        }
    }

    async fn lead(&mut self, obs: &Observed, view: &ClusterView) -> Result<(), HaError> {
        if !self.lease_fresh() {
            return Ok(());
        }
        match obs.role {
            Role::Primary => {
                self.down_since = None;
                self.publish_optime(obs).await?;
                if let Some(s) = &view.switchover
                    && s.from == self.name
                    && s.to != self.name
                    && s.final_lsn.is_none()
                    && !self.stale(s)
                {
                    self.hand_over(s, view).await?;
                }
                Ok(())
            }
            _ if view.paused => Ok(()),
            // The key is ours but the promotion did not finish (a crash in
            // between): finish it.
            Role::Standby => {
                self.promote(obs, view, "holds the leader key; finishing the promotion")
                    .await
            }
            Role::Down => self.restart_or_resign().await,
        }
    }

    /// The leader's server is down: start it, and give up the key when it
    /// does not come back within `restart_timeout`.
    async fn restart_or_resign(&mut self) -> Result<(), HaError> {
        let since = *self.down_since.get_or_insert_with(Instant::now);
        let bound = self.spec.restart_timeout(&self.ha);
        let start = Action::PgUnfence {
            target: self.name.clone(),
            mode: FenceMode::Stop,
        };
        let err = match self.run(start, "restart").await {
            Ok(s) => {
                tracing::info!(member = self.name, "leader's server was down: {s}");
                return Ok(());
            }
            Err(e) => e,
        };
        if since.elapsed() < bound {
            return Err(err);
        }
        self.dcs.release(&self.name).await?;
        self.leader.store(false, Ordering::SeqCst);
        let details = json!({ "member": self.name, "reason": format!("server down for {:?} and could not be restarted: {err}", since.elapsed()) });
        let a = Audit::begin(
            self.audit.clone(),
            "ha.resign",
            &self.cluster,
            details.clone(),
        )?;
        a.finish(None, Ok(details)).await;
        Ok(())
    }

    fn stale(&self, s: &Switchover) -> bool {
        let age = chrono::Utc::now().timestamp() - s.requested_at;
        age > i64::try_from((self.ha.ttl * 3).as_secs()).unwrap_or(i64::MAX)
    }

    /// Planned switchover, old leader's half: stop the server (its WAL
    /// senders ship everything first), publish its final position, and
    /// release the key for the named target.
    async fn hand_over(&mut self, s: &Switchover, view: &ClusterView) -> Result<(), HaError> {
        let target_ok = view
            .member(&s.to)
            .is_some_and(|m| m.role == "standby" && m.healthy);
        if !target_ok {
            self.dcs.set_switchover(None).await?;
            return Err(HaError::Refused(format!(
                "switchover to {} dropped: it is not a live, healthy standby",
                s.to
            )));
        }
        let details = json!({ "from": self.name, "to": s.to });
        let a = Audit::begin(self.audit.clone(), "ha.handover", &self.cluster, details)?;
        let r = async {
            let fence = Action::PgFence {
                target: self.name.clone(),
                mode: FenceMode::Stop,
            };
            self.run(fence, "switchover").await?;
            let lsn = pg::final_lsn(&self.me).await?;
            let mut s = s.clone();
            s.final_lsn = Some(lsn);
            self.dcs.set_switchover(Some(&s)).await?;
            self.dcs.release(&self.name).await?;
            self.leader.store(false, Ordering::SeqCst);
            Ok::<_, HaError>(json!({ "from": self.name, "to": s.to, "final_lsn": lsn }))
        }
        .await;
        a.finish(
            None,
            r.as_ref().map(|d| d.clone()).map_err(|e| e.to_string()),
        )
        .await;
        r.map(|_| ())
    }

    async fn follow(
        &mut self,
        obs: &Observed,
        view: &ClusterView,
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
            let serving = obs.role == Role::Primary;
            return reclaim(&self.dcs, &self.name, lease, serving).await;
        }
        let leads = view
            .member(&leader.name)
            .is_some_and(|m| m.role == "primary" && m.healthy);
        match obs.role {
            Role::Primary => {
                self.fence(&format!("{} holds the leader key", leader.name))
                    .await
            }
            Role::Down if leads => self.rejoin(&leader.name).await,
            Role::Standby if leads => {
                let want = self
                    .targets
                    .pg(&leader.name)
                    .map_err(|e| HaError::Pg(e.0))?;
                if obs.primary_conninfo == want.replication_conninfo() {
                    return Ok(());
                }
                let a = Action::PgRepoint {
                    target: self.name.clone(),
                    primary: leader.name.clone(),
                    timeout: self.ha.ttl,
                };
                let s = self.run(a, "follow").await?;
                tracing::info!(member = self.name, "{s}");
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Nobody leads: finish a switchover, take the key back as the last
    /// leader, or run as the best candidate.
    async fn elect(
        &mut self,
        obs: &Observed,
        view: &ClusterView,
        lease: i64,
    ) -> Result<(), HaError> {
        if let Some(s) = &view.switchover
            && !self.stale(s)
        {
            let caught_up = match s.final_lsn {
                Some(f) => obs.replayed.is_some_and(|r| r > f),
                None => false,
            };
            if s.to == self.name && obs.role == Role::Standby && caught_up {
                return self.take_over(obs, view, lease, "switchover").await;
            }
            // The target replays the old primary's last WAL within moments.
            self.hurry = s.to == self.name && s.final_lsn.is_some();
            return Ok(());
        }
        match obs.role {
            Role::Primary => {
                let last = view.optime.as_ref().is_none_or(|o| o.leader == self.name);
                if !last {
                    return self
                        .fence(&format!(
                            "a primary, but {} led last; this server may have diverged",
                            view.optime.as_ref().map_or("?", |o| o.leader.as_str())
                        ))
                        .await;
                }
                // With its position, in the same transaction: standbys run
                // for leader only once a leader has published one, and this
                // one may die right after taking the key.
                let taken = match obs.received {
                    Some(lsn) => {
                        let o = Optime {
                            leader: self.name.clone(),
                            lsn,
                            sync_standbys: obs.sync_standbys.clone(),
                        };
                        self.dcs
                            .try_acquire_with_optime(&self.name, lease, &o)
                            .await?
                    }
                    None => self.dcs.try_acquire(&self.name, lease).await?,
                };
                if taken {
                    self.leader.store(true, Ordering::SeqCst);
                    tracing::info!(
                        cluster = self.cluster,
                        member = self.name,
                        "leader key taken"
                    );
                }
                Ok(())
            }
            Role::Standby => {
                let best = view.best_candidate(self.spec.max_lag_bytes);
                tracing::debug!(
                    member = self.name,
                    "no leader; best candidate {:?} (optime {:?}, members {:?})",
                    best.map(|b| &b.name),
                    view.optime,
                    view.members
                );
                if best.is_some_and(|b| b.name == self.name) {
                    let why = format!(
                        "leader key gone (last leader {})",
                        view.optime.as_ref().map_or("?", |o| o.leader.as_str())
                    );
                    return self.take_over(obs, view, lease, &why).await;
                }
                Ok(())
            }
            Role::Down => Ok(()),
        }
    }

    async fn take_over(
        &mut self,
        obs: &Observed,
        view: &ClusterView,
        lease: i64,
        why: &str,
    ) -> Result<(), HaError> {
        if !self.dcs.try_acquire(&self.name, lease).await? {
            return Ok(());
        }
        self.leader.store(true, Ordering::SeqCst);
        self.promote(obs, view, why).await
    }

    /// Promotes this member's standby (it holds the key), then repoints the
    /// other standbys, runs the hooks and writes the audit record.
    async fn promote(
        &mut self,
        obs: &Observed,
        view: &ClusterView,
        why: &str,
    ) -> Result<(), HaError> {
        let t0 = Instant::now();
        let switchover = view.switchover.as_ref().filter(|s| s.to == self.name);
        let action = if switchover.is_some() {
            "ha.switchover"
        } else {
            "ha.failover"
        };
        let mut details = json!({
            "member": self.name,
            "reason": why,
            "previous_leader": view.optime.as_ref().map(|o| &o.leader),
            "previous_leader_lsn": view.optime.as_ref().map(|o| o.lsn),
            "received_lsn": obs.received,
            "replayed_lsn": obs.replayed,
        });
        let mut audit =
            match Audit::begin(self.audit.clone(), action, &self.cluster, details.clone()) {
                Ok(a) => a,
                Err(e) => {
                    self.dcs.release(&self.name).await?;
                    return Err(e.into());
                }
            };
        let promote = Action::PgPromote {
            target: self.name.clone(),
            timeout: Duration::from_secs(60),
        };
        let cut = match switchover {
            // A switchover's old primary has stopped: nothing to cut off.
            Some(_) => Ok(Vec::new()),
            None => self.detach_others(view).await,
        };
        if let Ok(d) = &cut {
            details["detached"] = json!(d);
        }
        let r = match cut {
            Ok(_) => self.run(promote, "promote").await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            self.report.promotion(switchover.is_some(), false);
            let _ = self.dcs.release(&self.name).await;
            self.leader.store(false, Ordering::SeqCst);
            audit.finish(None, Err(e.to_string())).await;
            return Err(e);
        }
        let promoted = t0.elapsed().as_secs_f64();
        self.report.promotion(switchover.is_some(), true);
        tracing::warn!(
            cluster = self.cluster,
            member = self.name,
            "promoted in {promoted:.2}s: {why}"
        );
        let now = pg::observe(&self.me, self.ha.loop_wait).await;
        self.publish_optime(&now).await?;
        if switchover.is_some() {
            self.dcs.set_switchover(None).await?;
        }
        let repointed = self.repoint_others(view).await;
        let hooks = run_hooks(&self.hooks, &self.targets, &self.name).await;
        details["promote_seconds"] = json!(promoted);
        details["total_seconds"] = json!(t0.elapsed().as_secs_f64());
        details["new_timeline"] = json!(now.timeline);
        details["repointed"] = json!(repointed);
        details["hooks"] = json!(hooks);
        audit.set_details(details.clone());
        audit.finish(None, Ok(details)).await;
        Ok(())
    }

    /// Before a failover promotion: stops every other member's standby from
    /// streaming, so none acknowledges another commit of the old primary
    /// (whose server may still run, its daemon frozen or cut off), then
    /// waits until this member has received everything any of them had: a
    /// commit acknowledged by any one synchronous standby is kept. Members
    /// that do not answer are skipped; their servers are down or unreachable.
    async fn detach_others(&self, view: &ClusterView) -> Result<Vec<serde_json::Value>, HaError> {
        // The last leader was a primary: nothing to detach, and its host
        // may be gone, which would only cost a connect timeout.
        let last = view.optime.as_ref().map(|o| o.leader.as_str());
        let others: Vec<(&String, &PgTarget)> = self
            .spec
            .member
            .iter()
            .filter(|(n, _)| **n != self.name && Some(n.as_str()) != last)
            .map(|(n, t)| (n, t.get_ref()))
            .collect();
        let runs = others.iter().map(|(_, t)| pg::detach(t, self.ha.loop_wait));
        let got = futures::future::join_all(runs).await;
        let mut need = None;
        let mut out = Vec::new();
        for ((n, _), r) in others.iter().zip(got) {
            if let Ok(Some(lsn)) = &r {
                need = need.max(Some(*lsn));
            }
            out.push(match r {
                Ok(lsn) => json!({ "member": n, "received_lsn": lsn }),
                Err(e) => json!({ "member": n, "error": e }),
            });
        }
        let Some(need) = need else { return Ok(out) };
        let start = Instant::now();
        loop {
            let o = pg::observe(&self.me, self.ha.loop_wait).await;
            if o.received.is_some_and(|r| r >= need) {
                return Ok(out);
            }
            if start.elapsed() > self.ha.ttl {
                return Err(HaError::Refused(format!(
                    "not promoted: another standby received up to {need}, this one only {:?}; \
                     the best standby takes over instead",
                    o.received
                )));
            }
            tokio::time::sleep(HURRY).await;
        }
    }

    /// Points the other live standbys at this member; each daemon would
    /// also do it on its own, this is for members whose daemon is down.
    async fn repoint_others(&self, view: &ClusterView) -> Vec<serde_json::Value> {
        let others: Vec<String> = self
            .spec
            .member
            .keys()
            .filter(|n| **n != self.name)
            .filter(|n| view.member(n).is_some_and(|m| m.role == "standby"))
            .cloned()
            .collect();
        let runs = others.iter().map(|n| async move {
            let a = Action::PgRepoint {
                target: n.clone(),
                primary: self.name.clone(),
                timeout: self.ha.ttl,
            };
            let r = self.run(a, "repoint").await;
            json!({ "member": n, "ok": r.is_ok(), "detail": r.unwrap_or_else(|e| e.to_string()) })
        });
        futures::future::join_all(runs).await
    }

    /// Stops this member's server: another member leads.
    async fn fence(&mut self, why: &str) -> Result<(), HaError> {
        let details = json!({ "member": self.name, "reason": why });
        let a = Audit::begin(
            self.audit.clone(),
            "ha.fence",
            &self.cluster,
            details.clone(),
        )?;
        self.report.fence();
        let r = stop_server(&self.me).await;
        tracing::warn!(member = self.name, "fenced: {why}");
        a.finish(None, r.as_ref().map(|_| details).map_err(|e| e.clone()))
            .await;
        r.map(|_| ()).map_err(HaError::Pg)
    }

    /// Turns the stopped server into a standby of `leader` and starts it.
    async fn rejoin(&mut self, leader: &str) -> Result<(), HaError> {
        let lt = self
            .targets
            .pg(leader)
            .map_err(|e| HaError::Pg(e.0))?
            .clone();
        let details = json!({ "member": self.name, "leader": leader });
        let a = Audit::begin(self.audit.clone(), "ha.rejoin", &self.cluster, details)?;
        let r = async {
            let start = Action::PgUnfence {
                target: self.name.clone(),
                mode: FenceMode::Stop,
            };
            pg::write_standby_conf(&self.me, &lt)?;
            // A crashed server is recovered as a standby, which writes no
            // WAL of its own, and stopped cleanly: pg_rewind would otherwise
            // recover it as a primary and write a checkpoint past the point
            // where the leader's timeline forked.
            let crashed = !pg::shut_down_cleanly(&self.me).await?;
            if crashed {
                self.run(start.clone(), "recover").await?;
                let stop = Action::PgFence {
                    target: self.name.clone(),
                    mode: FenceMode::Stop,
                };
                self.run(stop, "recover").await?;
            }
            let rewind = pg::rewind(&self.me, &lt).await?;
            self.run(start, "rejoin").await?;
            Ok::<_, HaError>(
                json!({ "member": self.name, "leader": leader, "recovered_crash": crashed, "pg_rewind": rewind }),
            )
        }
        .await;
        tracing::info!(member = self.name, "rejoin as a standby of {leader}: {r:?}");
        self.report.rejoin(r.is_ok());
        a.finish(
            None,
            r.as_ref().map(|d| d.clone()).map_err(|e| e.to_string()),
        )
        .await;
        r.map(|_| ())
    }

    /// On daemon shutdown: a leader (when not paused) stops its server and
    /// frees the key, so a standby takes over at once instead of after the
    /// lease; every member revokes its lease.
    async fn shutdown(&mut self) {
        let lease = *self.lease.borrow();
        let paused = self.dcs.view().await.map(|v| v.paused).unwrap_or(false);
        let fence = async {
            if let Err(e) = stop_server(&self.me).await {
                tracing::error!(member = self.name, "stopping the server on shutdown: {e}");
            }
        };
        let leading = self.leader.load(Ordering::SeqCst);
        step_down(&self.dcs, &self.name, lease, leading, paused, fence).await;
    }
}
