//! The scheduler loop: fires each job at its cron times, skips a time whose
//! previous run is still going, bounds how many run at once, and hands each
//! run the config it was started with (a reload never changes a running job).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fleet::{self, FleetRun};
use super::jobs::{self, JobSpec, RetryPolicy};
use super::metrics::Shared;
use crate::config::Config;
use crate::ha::fleet::Fleet;

/// A loaded config and the jobs it schedules.
#[derive(Debug)]
pub struct Plan {
    /// The config.
    pub cfg: Arc<Config>,
    /// Its jobs.
    pub jobs: Vec<JobSpec>,
}

/// What the loop and its runs share.
pub struct Ctx {
    /// Metrics and health.
    pub state: Arc<Shared>,
    /// Bounds concurrent runs (`max_concurrent_jobs`).
    pub slots: Arc<Semaphore>,
    /// Cancelled on SIGTERM: start nothing new.
    pub stop: CancellationToken,
    /// Cancelled when the grace period is over: drop running jobs.
    pub abort: CancellationToken,
    /// Running jobs, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// With `[ha]` fleet: each run is claimed in etcd first.
    pub fleet: Option<Fleet>,
}

/// The longest the loop sleeps, so its heartbeat (watched by `/healthz`)
/// stays fresh even when the next job is hours away.
const TICK: Duration = Duration::from_secs(1);

/// Runs until `ctx.stop` is cancelled.
pub async fn run(ctx: Arc<Ctx>, mut plans: watch::Receiver<Arc<Plan>>) {
    // Next time per job, with the expression it was computed from, so a
    // reload that changes a schedule recomputes it.
    let mut next: HashMap<String, (String, Option<DateTime<Utc>>)> = HashMap::new();
    loop {
        let plan = plans.borrow_and_update().clone();
        let now = Utc::now();
        next.retain(|name, _| plan.jobs.iter().any(|j| &j.name == name));
        for job in &plan.jobs {
            let entry = next
                .entry(job.name.clone())
                .or_insert_with(|| (String::new(), None));
            if entry.0 != job.cron.expr() {
                *entry = (job.cron.expr().to_string(), job.cron.next_after(now));
            }
            if let Some(t) = entry.1
                && t <= now
            {
                trigger(&ctx, &plan, job, t);
                entry.1 = job.cron.next_after(now);
            }
        }
        let wake = next.values().filter_map(|(_, t)| *t).min();
        ctx.state.with(|s| {
            s.heartbeat = now;
            for (name, (_, t)) in &next {
                if let Some(j) = s.jobs.get_mut(name) {
                    j.next_run = *t;
                }
            }
        });
        let sleep = wake
            .and_then(|w| (w - Utc::now()).to_std().ok())
            .unwrap_or_default()
            .min(TICK);
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            changed = plans.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

fn trigger(ctx: &Arc<Ctx>, plan: &Arc<Plan>, job: &JobSpec, at: DateTime<Utc>) {
    if !ctx.state.try_start(&job.name) {
        tracing::warn!(
            job = %job.name,
            scheduled = %at.format("%Y-%m-%dT%H:%M:%SZ"),
            "skipped: the previous run is still going (the schedule is shorter than a run)"
        );
        return;
    }
    let (ctx2, plan, job) = (ctx.clone(), plan.clone(), job.clone());
    ctx.tracker
        .spawn(async move { run_job(ctx2, plan, job, at).await });
}

/// In a fleet, claims the run: `None` when this daemon must not run it
/// (another has it, or the claim failed, which is recorded as a failure).
async fn claim(
    ctx: &Ctx,
    plan: &Plan,
    job: &JobSpec,
    at: DateTime<Utc>,
) -> Option<Option<FleetRun>> {
    let Some(f) = &ctx.fleet else {
        return Some(None);
    };
    let names: Vec<String> = plan.jobs.iter().map(|j| j.name.clone()).collect();
    match fleet::claim(f, &plan.cfg, &names, job, at).await {
        Ok(Some(run)) => Some(Some(run)),
        Ok(None) => {
            ctx.state.ran_elsewhere(&job.name);
            None
        }
        Err(e) => {
            tracing::error!(job = %job.name, error = %e, "job failed");
            ctx.state.finish(&job.name, 0.0, Err(e));
            None
        }
    }
}

async fn run_job(ctx: Arc<Ctx>, plan: Arc<Plan>, job: JobSpec, at: DateTime<Utc>) {
    let permit = tokio::select! {
        p = ctx.slots.clone().acquire_owned() => p,
        _ = ctx.stop.cancelled() => {
            ctx.state.cancel(&job.name);
            return;
        }
    };
    let Ok(_permit) = permit else {
        ctx.state.cancel(&job.name);
        return;
    };
    let Some(fleet_run) = claim(&ctx, &plan, &job, at).await else {
        return;
    };
    let cfg = plan.cfg.clone();
    // Stopped at the end of the grace period, or when a fleet claim may be lost.
    let cancel = ctx.abort.child_token();
    let lost = fleet::stop_on_loss(fleet_run.as_ref(), &cancel);
    // Measured after the slot and the claim: what a user sees as lateness.
    let delay = (Utc::now() - at).num_milliseconds() as f64 / 1000.0;
    ctx.state.started(&job.name, delay);
    tracing::info!(job = %job.name, scheduled = %at.format("%Y-%m-%dT%H:%M:%SZ"), delay_seconds = delay, "job started");
    let t0 = Instant::now();
    let policy = RetryPolicy::from(&cfg.daemon());
    let work = jobs::retry(
        &policy,
        &ctx.stop,
        jobs::JobError::is_transient,
        |attempt, e, delay| {
            ctx.state.with(|s| {
                if let Some(j) = s.jobs.get_mut(&job.name) {
                    j.retries += 1;
                }
            });
            tracing::warn!(
                job = %job.name,
                attempt,
                error = %e,
                "transient failure; retrying in {:.1}s",
                delay.as_secs_f64()
            );
        },
        || jobs::run_once(&cfg, &job, &cancel),
    );
    // Dropping the run is safe: a backup becomes visible only when its
    // manifest, written last, is durable, and the PostgreSQL session that
    // holds pg_backup_start ends with the dropped connection.
    // A verification is not dropped: it sees `abort` itself and stops its
    // scratch server and removes its directory before returning.
    let result = if job.kind == jobs::JobKind::PgVerify {
        Some(work.await)
    } else {
        tokio::select! {
            r = work => Some(r),
            _ = cancel.cancelled() => None,
        }
    };
    // Ends the loss watch.
    cancel.cancel();
    let secs = t0.elapsed().as_secs_f64();
    let outcome = match result {
        Some(Ok(out)) => {
            for (region, why) in &out.degraded {
                tracing::warn!(job = %job.name, region, error = %why, "region missed writes; run `dr repo sync` once it is back");
            }
            tracing::info!(job = %job.name, id = %out.id, bytes = out.bytes, seconds = secs, "job succeeded");
            Ok(out)
        }
        Some(Err(e)) => {
            let e = match lost.is_set() {
                true => format!("stopped: this daemon lost its fleet lease mid-run ({e})"),
                false => e.to_string(),
            };
            tracing::error!(job = %job.name, error = %e, seconds = secs, "job failed");
            Err(e)
        }
        None if lost.is_set() => {
            let e = "stopped: this daemon lost its fleet lease mid-run; nothing of this run is visible in the repository";
            tracing::error!(job = %job.name, seconds = secs, "{e}");
            Err(e.to_string())
        }
        None => {
            tracing::warn!(
                job = %job.name,
                seconds = secs,
                "job aborted: the shutdown grace period is over; nothing of this run is visible in the repository"
            );
            Err("aborted at shutdown".to_string())
        }
    };
    let outcome = outcome.as_ref().map_err(Clone::clone);
    if let Some(f) = fleet_run {
        f.finish(outcome.clone()).await;
    }
    ctx.state.finish(&job.name, secs, outcome);
}
