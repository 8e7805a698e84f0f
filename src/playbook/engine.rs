//! Running a playbook: pre gates, action, post gates per step, with retries,
//! `on_failure` handling (abort, rollback in reverse, continue) and the
//! failover RTO. Progress goes to an [`Observer`]; the outcome is a
//! [`RunReport`] whatever happened, because a half-done failover must be
//! reported as precisely as a finished one.

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Targets;
use super::actions::{self, ActionContext};
use super::gates::{self, GateResult};
use super::model::{Action, Check, OnFailure, Playbook, Step};

/// How to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Evaluate pre gates once and report the plan; change nothing.
    pub dry_run: bool,
}

/// Which gates of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GatePhase {
    /// Before the action.
    Pre,
    /// After the action.
    Post,
}

/// Progress, as it happens.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step begins (index from 0).
    StepStarted {
        /// Position.
        index: usize,
        /// Number of steps.
        total: usize,
        /// The step.
        step: &'a Step,
    },
    /// A gate finished.
    Gate {
        /// Pre or post.
        phase: GatePhase,
        /// Its result.
        result: &'a GateResult,
    },
    /// An action begins (attempt from 1).
    ActionStarted {
        /// The action.
        action: &'a Action,
        /// Attempt number.
        attempt: u32,
    },
    /// An action finished.
    ActionFinished {
        /// Its result.
        result: &'a ActionResult,
    },
    /// A step finished.
    StepFinished {
        /// Its report.
        report: &'a StepReport,
    },
    /// Rollback begins, over this many steps.
    RollbackStarted {
        /// Steps to undo.
        steps: usize,
    },
    /// One rollback action finished.
    RollbackAction {
        /// Its result.
        result: &'a RollbackReport,
    },
}

/// Receives progress events (the CLI prints them).
pub trait Observer: Sync {
    /// Called for each event, in order.
    fn event(&self, event: &Event<'_>);
}

/// An observer that discards events.
#[derive(Debug, Default)]
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: &Event<'_>) {}
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step passed (or failed with `on_failure = "continue"`).
    Ok,
    /// A step failed and the run stopped there.
    Aborted,
    /// A step failed and the completed steps were rolled back.
    RolledBack,
    /// Dry run: every pre gate passes now.
    Ready,
    /// Dry run: some pre gate fails now.
    NotReady,
}

/// State of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached (or a dry run).
    NotRun,
    /// Gates and action passed.
    Ok,
    /// Failed; the run went on (`on_failure = "continue"`).
    FailedContinued,
    /// Failed and stopped the run.
    Failed,
}

/// The result of one action.
#[derive(Debug, Clone, Serialize)]
pub struct ActionResult {
    /// The action as written.
    pub action: String,
    /// True on success.
    pub ok: bool,
    /// What it did, or why it failed.
    pub detail: String,
    /// Duration.
    pub seconds: f64,
}

/// One action + post-gates attempt.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// The action's result.
    pub action: ActionResult,
    /// Post gates evaluated after it (none when the action failed).
    pub post: Vec<GateResult>,
}

/// What happened in one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Step name.
    pub name: String,
    /// Line in the playbook.
    pub line: usize,
    /// Outcome.
    pub status: StepStatus,
    /// The action as written, if any.
    pub action: Option<String>,
    /// Pre gates as written.
    pub pre_gates: Vec<String>,
    /// Post gates as written.
    pub post_gates: Vec<String>,
    /// Rollback actions as written.
    pub rollback_actions: Vec<String>,
    /// What a failure does.
    pub on_failure: OnFailure,
    /// Pre-gate results.
    pub pre: Vec<GateResult>,
    /// Action attempts.
    pub attempts: Vec<Attempt>,
    /// Seconds from the start of the run to the start of the step.
    pub started_at_seconds: f64,
    /// Duration of the step.
    pub seconds: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// One rollback action run.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// The step it undoes.
    pub step: String,
    /// Its result.
    pub result: ActionResult,
}

/// The full account of a run: what the audit log records and `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Playbook name.
    pub playbook: String,
    /// Environment.
    pub env: String,
    /// Dry run?
    pub dry_run: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Start time.
    pub started: DateTime<Utc>,
    /// Duration of the whole run.
    pub total_seconds: f64,
    /// Start to new primary accepting writes.
    pub rto_seconds: Option<f64>,
    /// What the RTO was measured to.
    pub rto_basis: Option<String>,
    /// Every step, run or not.
    pub steps: Vec<StepReport>,
    /// Rollback actions run.
    pub rollback: Vec<RollbackReport>,
    /// The audit record id.
    pub audit_id: Option<String>,
    /// Things to know that did not fail the run.
    pub warnings: Vec<String>,
}

impl RunReport {
    /// True when the run did what it should (all gates pass, for a dry run).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// The plan of `pb`: every step as written, nothing evaluated yet.
pub fn plan(pb: &Playbook) -> Vec<StepReport> {
    pb.steps.iter().map(planned).collect()
}

fn planned(step: &Step) -> StepReport {
    let descr = |g: &super::model::Gate| {
        if g.negate {
            format!("not {}", g.check.describe())
        } else {
            g.check.describe()
        }
    };
    StepReport {
        name: step.name.clone(),
        line: step.line,
        status: StepStatus::NotRun,
        action: step.action.as_ref().map(Action::describe),
        pre_gates: step.pre.iter().map(descr).collect(),
        post_gates: step.post.iter().map(descr).collect(),
        rollback_actions: step.rollback.iter().map(Action::describe).collect(),
        on_failure: step.on_failure,
        pre: Vec::new(),
        attempts: Vec::new(),
        started_at_seconds: 0.0,
        seconds: 0.0,
        error: None,
    }
}

/// Runs (or, with `dry_run`, plans) `pb` against `targets`.
pub async fn run(
    pb: &Playbook,
    targets: &Targets,
    opts: RunOptions,
    obs: &dyn Observer,
) -> RunReport {
    let t0 = Instant::now();
    let mut report = RunReport {
        playbook: pb.name.clone(),
        env: targets.env().to_string(),
        dry_run: opts.dry_run,
        outcome: Outcome::Ok,
        error: None,
        started: Utc::now(),
        total_seconds: 0.0,
        rto_seconds: None,
        rto_basis: None,
        steps: plan(pb),
        rollback: Vec::new(),
        audit_id: None,
        warnings: Vec::new(),
    };
    if opts.dry_run {
        dry_run(pb, targets, obs, &mut report).await;
    } else {
        let mut runner = Runner {
            pb,
            targets,
            obs,
            t0,
            promoted: None,
            rto: None,
        };
        runner.run(&mut report).await;
    }
    report.total_seconds = t0.elapsed().as_secs_f64();
    report
}

async fn dry_run(pb: &Playbook, targets: &Targets, obs: &dyn Observer, report: &mut RunReport) {
    let mut failing = Vec::new();
    for (i, step) in pb.steps.iter().enumerate() {
        obs.event(&Event::StepStarted {
            index: i,
            total: pb.steps.len(),
            step,
        });
        for g in &step.pre {
            let r = gates::evaluate_once(g, targets).await;
            obs.event(&Event::Gate {
                phase: GatePhase::Pre,
                result: &r,
            });
            if !r.ok {
                failing.push(format!("step {:?}: {}: {}", step.name, r.gate, r.observed));
            }
            report.steps[i].pre.push(r);
        }
    }
    if failing.is_empty() {
        report.outcome = Outcome::Ready;
    } else {
        report.outcome = Outcome::NotReady;
        report.error = Some(format!(
            "{} pre gate(s) fail now: {}",
            failing.len(),
            failing.join("; ")
        ));
    }
}

struct Runner<'a> {
    pb: &'a Playbook,
    targets: &'a Targets,
    obs: &'a dyn Observer,
    t0: Instant,
    /// Step whose action promoted a new primary, and when that step ended.
    promoted: Option<(usize, Option<f64>)>,
    /// Seconds to the first successful write gate after the promotion.
    rto: Option<(f64, String)>,
}

impl Runner<'_> {
    async fn run(&mut self, report: &mut RunReport) {
        // Steps whose action ran (successfully or not), in order.
        let mut acted: Vec<usize> = Vec::new();
        for (i, step) in self.pb.steps.iter().enumerate() {
            self.obs.event(&Event::StepStarted {
                index: i,
                total: self.pb.steps.len(),
                step,
            });
            let start = self.t0.elapsed().as_secs_f64();
            let sr = &mut report.steps[i];
            sr.started_at_seconds = start;
            let (result, ran) = self.step(i, step, sr).await;
            if ran {
                acted.push(i);
            }
            let end = self.t0.elapsed().as_secs_f64();
            sr.seconds = end - start;
            if let Some((p, at @ None)) = &mut self.promoted
                && *p == i
            {
                *at = Some(end);
            }
            let err = match result {
                Ok(()) => {
                    sr.status = StepStatus::Ok;
                    self.obs.event(&Event::StepFinished { report: sr });
                    continue;
                }
                Err(e) => e,
            };
            sr.error = Some(err.clone());
            if step.on_failure == OnFailure::Continue {
                sr.status = StepStatus::FailedContinued;
                self.obs.event(&Event::StepFinished { report: sr });
                report.warnings.push(format!(
                    "step {:?} failed and was skipped (on_failure = \"continue\"): {err}",
                    step.name
                ));
                continue;
            }
            sr.status = StepStatus::Failed;
            self.obs.event(&Event::StepFinished { report: sr });
            let changed = if acted.is_empty() {
                "; no action had run, nothing was changed"
            } else {
                ""
            };
            if step.on_failure == OnFailure::Rollback {
                let failed = self.rollback(&acted, report).await;
                report.outcome = Outcome::RolledBack;
                report.error = Some(format!(
                    "step {:?} failed: {err}; rolled back {} step(s){}{changed}",
                    step.name,
                    acted.len(),
                    if failed > 0 {
                        format!(", but {failed} rollback action(s) FAILED (see the report)")
                    } else {
                        String::new()
                    }
                ));
            } else {
                report.outcome = Outcome::Aborted;
                report.error = Some(format!(
                    "step {:?} failed: {err}; aborted{changed}",
                    step.name
                ));
            }
            break;
        }
        if let Some((s, at)) = self.rto.take() {
            report.rto_seconds = Some(s);
            report.rto_basis = Some(at);
        } else if let Some((p, Some(end))) = self.promoted {
            report.rto_seconds = Some(end);
            report.rto_basis = Some(format!(
                "end of step {:?} (no pg.writable post gate after the promotion)",
                self.pb.steps[p].name
            ));
        }
    }

    /// Runs one step; returns its result and whether its action ran.
    async fn step(
        &mut self,
        index: usize,
        step: &Step,
        sr: &mut StepReport,
    ) -> (Result<(), String>, bool) {
        for g in &step.pre {
            let r = gates::evaluate(g, self.targets).await;
            self.obs.event(&Event::Gate {
                phase: GatePhase::Pre,
                result: &r,
            });
            let failed = (!r.ok).then(|| format!("pre gate {} failed: {}", r.gate, r.observed));
            sr.pre.push(r);
            if let Some(e) = failed {
                return (Err(e), false);
            }
        }
        let Some(action) = &step.action else {
            return (Ok(()), false);
        };
        let ctx = ActionContext {
            playbook: self.pb.name.clone(),
            step: step.name.clone(),
        };
        let mut last_err = String::new();
        for attempt in 1..=step.retries + 1 {
            if attempt > 1 {
                tokio::time::sleep(step.retry_delay).await;
            }
            self.obs.event(&Event::ActionStarted { action, attempt });
            let start = Instant::now();
            let r = actions::run(action, self.targets, &ctx).await;
            let result = ActionResult {
                action: action.describe(),
                ok: r.is_ok(),
                detail: r.unwrap_or_else(String::from),
                seconds: start.elapsed().as_secs_f64(),
            };
            self.obs.event(&Event::ActionFinished { result: &result });
            let ok = result.ok;
            if !ok {
                last_err = format!("action {} failed: {}", result.action, result.detail);
            }
            sr.attempts.push(Attempt {
                action: result,
                post: Vec::new(),
            });
            if !ok {
                continue;
            }
            if action.is_promotion() && self.promoted.is_none() {
                self.promoted = Some((index, None));
            }
            match self.post_gates(step, sr).await {
                Ok(()) => return (Ok(()), true),
                Err(e) => last_err = e,
            }
        }
        let tries = if step.retries > 0 {
            format!(" (after {} attempts)", step.retries + 1)
        } else {
            String::new()
        };
        (Err(format!("{last_err}{tries}")), true)
    }

    async fn post_gates(&mut self, step: &Step, sr: &mut StepReport) -> Result<(), String> {
        for g in &step.post {
            let r = gates::evaluate(g, self.targets).await;
            self.obs.event(&Event::Gate {
                phase: GatePhase::Post,
                result: &r,
            });
            let ok = r.ok;
            let err = format!("post gate {} failed: {}", r.gate, r.observed);
            if ok
                && self.rto.is_none()
                && self.promoted.is_some()
                && !g.negate
                && matches!(g.check, Check::PgWritable { .. })
            {
                self.rto = Some((
                    self.t0.elapsed().as_secs_f64(),
                    format!("first successful {} after the promotion", r.gate),
                ));
            }
            if let Some(last) = sr.attempts.last_mut() {
                last.post.push(r);
            }
            if !ok {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Runs the rollback actions of `acted` steps, newest step first (each
    /// step's own list in the order written). Returns how many failed; a
    /// failed rollback action does not stop the others.
    async fn rollback(&self, acted: &[usize], report: &mut RunReport) -> usize {
        self.obs
            .event(&Event::RollbackStarted { steps: acted.len() });
        let mut failed = 0;
        for &i in acted.iter().rev() {
            let step = &self.pb.steps[i];
            let ctx = ActionContext {
                playbook: self.pb.name.clone(),
                step: step.name.clone(),
            };
            for action in &step.rollback {
                let start = Instant::now();
                let r = actions::run(action, self.targets, &ctx).await;
                if r.is_err() {
                    failed += 1;
                }
                let rr = RollbackReport {
                    step: step.name.clone(),
                    result: ActionResult {
                        action: action.describe(),
                        ok: r.is_ok(),
                        detail: r.unwrap_or_else(String::from),
                        seconds: start.elapsed().as_secs_f64(),
                    },
                };
                self.obs.event(&Event::RollbackAction { result: &rr });
                report.rollback.push(rr);
            }
        }
        failed
    }
}
