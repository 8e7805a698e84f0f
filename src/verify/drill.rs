//! `dr drill NAME`: restore every source of a drill at once as of one target
//! into scratch servers or the servers of a staging environment, check them,
//! optionally run a failover playbook, and measure the achieved RTO/RPO
//! against the objectives in the config.
//!
//! The sources are restored concurrently, as they would be in a real
//! recovery, so the drill's RTO is the time until the last of them answers
//! (plus the playbook up to its own RTO point, when one runs).

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::report::{self, CheckResult, SourceReport, secs};
use super::{VerifyError, failed_checks};
use crate::audit::{Audit, AuditLog};
use crate::config::{Config, DrillConfig, EnvConfig, PgTarget, RedisTarget};
use crate::playbook::{FailoverLock, Playbook, RunOptions};
use crate::postgres::restore::Target;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

pub use super::report::{DrillReport, Rtpo};

enum Running {
    Pg(super::pg::PgScratch),
    Redis(super::redis::RedisScratch),
    Rabbitmq(super::scratch::Scratch),
}

impl Running {
    fn scratch(&self) -> &super::scratch::Scratch {
        match self {
            Running::Pg(p) => &p.scratch,
            Running::Redis(r) => &r.scratch,
            Running::Rabbitmq(s) => s,
        }
    }
}

/// Runs the drill `name` of `cfg`. `dr_command` is how PostgreSQL runs `dr`
/// for `wal-fetch`. The report is written as JSON and Markdown to the
/// drill's `report_dir`, stored in the repository and audited.
pub async fn run(
    repo: &Repository,
    cfg: &Config,
    name: &str,
    dr_command: &str,
    cancel: &CancellationToken,
) -> Result<DrillReport, VerifyError> {
    let d = cfg.drill(name)?.clone();
    let target = match d.to.as_str() {
        "latest" => None,
        t => Some(
            crate::time::parse_time(t)
                .map_err(|e| VerifyError::Other(format!("[drill.{name}] to: {e}")))?
                .0,
        ),
    };
    let audit = Audit::begin(
        AuditLog::from_config(cfg),
        "drill",
        name,
        serde_json::json!({
            "to": d.to,
            "environment": d.environment,
            "postgres": d.postgres,
            "redis": d.redis,
            "rabbitmq": d.rabbitmq,
        }),
    )?;
    let mut warnings = Vec::new();
    let staging = match d.staging() {
        Some(env) => match prepare_staging(cfg, env, &d).await {
            Ok((e, lock, notes)) => {
                warnings.extend(notes);
                Some((env, e, lock))
            }
            Err(why) => {
                let _ = audit.finish(Some(repo), Err(why.clone())).await;
                return Err(VerifyError::Other(why));
            }
        },
        None => None,
    };
    let staging_env = staging.as_ref().map(|(env, e, _)| (*env, *e));
    let started = Utc::now();
    let id = BackupId::new(started);
    let t0 = Instant::now();
    let pg_runs = d.postgres.iter().map(|n| async move {
        let (_, pg) = cfg.pg(Some(n))?;
        let t = target.map_or(Target::Latest, Target::Time);
        if let Some((env, e)) = staging_env {
            let s = staging_server(&e.postgres, env, "postgres", n)?;
            let rep =
                super::staging::restore_pg(repo, env, n, pg, s, &t, dr_command, t0, cancel).await;
            return Ok((rep, None));
        }
        let (rep, s) = super::pg::restore_and_check(repo, n, pg, &t, dr_command, t0, cancel).await;
        Ok::<_, VerifyError>((rep, s.map(Running::Pg)))
    });
    let redis_runs = d.redis.iter().map(|n| async move {
        let (_, r) = cfg.redis(Some(n))?;
        if let Some((env, e)) = staging_env {
            let s = staging_server(&e.redis, env, "redis", n)?;
            let rep = super::staging::restore_redis(repo, env, n, r, s, target, t0, cancel).await;
            return Ok((rep, None));
        }
        let (rep, s) = super::redis::restore_and_check(repo, n, r, target, t0, cancel).await;
        Ok::<_, VerifyError>((rep, s.map(Running::Redis)))
    });
    let rabbitmq_runs = d.rabbitmq.iter().map(|n| async move {
        let (_, r) = cfg.rabbitmq(Some(n))?;
        if let Some((env, e)) = staging_env {
            let s = staging_server(&e.rabbitmq, env, "rabbitmq", n)?;
            let rep =
                super::rabbitmq_staging::restore(repo, env, n, r, s, target, t0, cancel).await;
            return Ok((rep, None));
        }
        let (rep, s) = super::rabbitmq::restore_and_check(repo, n, r, target, t0, cancel).await;
        Ok::<_, VerifyError>((rep, s.map(Running::Rabbitmq)))
    });
    let (pg_done, redis_done, rabbitmq_done) = futures::future::join3(
        futures::future::join_all(pg_runs),
        futures::future::join_all(redis_runs),
        futures::future::join_all(rabbitmq_runs),
    )
    .await;
    let mut sources = Vec::new();
    let mut running = Vec::new();
    let mut first_err = None;
    for r in pg_done.into_iter().chain(redis_done).chain(rabbitmq_done) {
        match r {
            Ok((rep, s)) => {
                sources.push(rep);
                running.push(s);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    let mut checks = Vec::new();
    let mut playbook = None;
    let mut playbook_rto_point = None;
    let all_up = sources.iter().all(SourceReport::ok) && first_err.is_none();
    if let Some(pb) = &d.playbook {
        let (check, point, notes, value) =
            playbook_step(cfg, &d, name, pb, &running, all_up, t0, cancel).await;
        checks.push(check);
        playbook_rto_point = point;
        warnings.extend(notes);
        playbook = value;
    }
    // Staging servers stay up on the restored data; the lock is released.
    drop(staging);
    // Clean up every scratch server, whatever happened above.
    let cleanups = futures::future::join_all(
        running
            .iter()
            .zip(sources.iter_mut())
            .filter_map(|(s, rep)| s.as_ref().map(|s| (s, rep)))
            .map(|(s, rep)| super::record_cleanup(rep, s.scratch())),
    );
    cleanups.await;
    if let Some(e) = first_err {
        let _ = audit.finish(Some(repo), Err(e.to_string())).await;
        return Err(e);
    }
    let achieved = achieved(&sources, playbook_rto_point);
    let objectives = Rtpo {
        rto_seconds: d.rto_seconds,
        rpo_seconds: d.rpo_seconds,
    };
    checks.extend(objective_checks(&objectives, &achieved));
    let rep = DrillReport {
        id: id.to_string(),
        drill: name.to_string(),
        started,
        finished: Utc::now(),
        target: d.to.clone(),
        environment: d.environment.clone(),
        ok: false,
        objectives,
        achieved,
        sources,
        playbook,
        checks,
        files: Vec::new(),
        warnings,
    };
    Ok(conclude(repo, &d, rep, audit, id).await)
}

/// Decides the verdict, writes the report files, stores the report in the
/// repository and closes the audit record.
async fn conclude(
    repo: &Repository,
    d: &DrillConfig,
    mut rep: DrillReport,
    mut audit: Audit,
    id: BackupId,
) -> DrillReport {
    rep.ok = rep.sources.iter().all(SourceReport::ok) && rep.checks.iter().all(|c| c.ok);
    match write_files(d, &rep) {
        Ok(files) => rep.files = files,
        Err(e) => {
            rep.checks.push(CheckResult::fail("report files", e, 0.0));
            rep.ok = false;
        }
    }
    if let Err(e) = report::store(repo, &ObjectKey::DrillReport { id }, &rep).await {
        rep.warnings.push(e.into());
    }
    let details = serde_json::to_value(&rep).unwrap_or_default();
    audit.set_details(details.clone());
    let result = if rep.ok {
        Ok(details)
    } else {
        Err(drill_failures(&rep))
    };
    let (_, w) = audit.finish(Some(repo), result).await;
    rep.warnings.extend(w);
    rep
}

/// Runs the drill's playbook once every source is up: the check line, the
/// RTO point it reached (seconds into the drill), its warnings and report.
#[allow(clippy::too_many_arguments)]
async fn playbook_step(
    cfg: &Config,
    d: &DrillConfig,
    name: &str,
    pb: &str,
    running: &[Option<Running>],
    all_up: bool,
    t0: Instant,
    cancel: &CancellationToken,
) -> (
    CheckResult,
    Option<f64>,
    Vec<String>,
    Option<serde_json::Value>,
) {
    if !all_up || cancel.is_cancelled() {
        let why = "not run: not every source was restored and checked";
        return (
            CheckResult::fail("playbook", why, 0.0),
            None,
            Vec::new(),
            None,
        );
    }
    let at = t0.elapsed().as_secs_f64();
    let run = tokio::select! {
        r = run_playbook(cfg, d, name, pb, running) => Some(r),
        () = cancel.cancelled() => None,
    };
    let r = match run {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            return (
                CheckResult::fail("playbook", e, 0.0),
                None,
                Vec::new(),
                None,
            );
        }
        None => {
            let check = CheckResult::fail("playbook", "interrupted by a signal", 0.0);
            return (check, None, Vec::new(), None);
        }
    };
    let point = at + r.rto_seconds.unwrap_or(r.total_seconds);
    let check = if r.ok() {
        CheckResult::pass(
            "playbook",
            format!(
                "{} on {}: done in {:.2}s (RTO point {:.2}s into the drill)",
                r.playbook, r.env, r.total_seconds, point
            ),
            r.total_seconds,
        )
    } else {
        CheckResult::fail(
            "playbook",
            format!(
                "{} on {} failed: {}",
                r.playbook,
                r.env,
                r.error.clone().unwrap_or_default()
            ),
            r.total_seconds,
        )
    };
    (
        check,
        Some(point),
        r.warnings.clone(),
        serde_json::to_value(&r).ok(),
    )
}

/// The drill's RTO (the slowest source, or the playbook's RTO point if
/// later) and RPO (the largest of the sources'), when every source has one.
fn achieved(sources: &[SourceReport], playbook_rto_point: Option<f64>) -> Rtpo {
    let restored = sources.iter().all(|s| s.rto_seconds.is_some());
    Rtpo {
        rto_seconds: restored.then(|| {
            sources
                .iter()
                .filter_map(|s| s.rto_seconds)
                .fold(0.0, f64::max)
                .max(playbook_rto_point.unwrap_or(0.0))
        }),
        rpo_seconds: sources.iter().all(|s| s.rpo_seconds.is_some()).then(|| {
            sources
                .iter()
                .filter_map(|s| s.rpo_seconds)
                .fold(0.0, f64::max)
        }),
    }
}

/// One check per configured objective: met, missed, or not measured.
fn objective_checks(objectives: &Rtpo, achieved: &Rtpo) -> Vec<CheckResult> {
    let mut checks = Vec::new();
    for (what, goal, got) in [
        (
            "RTO objective",
            objectives.rto_seconds,
            achieved.rto_seconds,
        ),
        (
            "RPO objective",
            objectives.rpo_seconds,
            achieved.rpo_seconds,
        ),
    ] {
        let Some(goal) = goal else { continue };
        checks.push(match got {
            Some(v) if v <= goal => {
                CheckResult::pass(what, format!("achieved {v:.2}s ≤ objective {goal}s"), 0.0)
            }
            Some(v) => CheckResult::fail(
                what,
                format!("achieved {v:.2}s exceeds the objective of {goal}s"),
                0.0,
            ),
            None => CheckResult::fail(
                what,
                format!("not measured (a source did not recover); objective {goal}s"),
                0.0,
            ),
        });
    }
    checks
}

/// Checks a staging environment before the drill touches it and takes its
/// drill lock, so two drills never overwrite the same servers at once.
async fn prepare_staging<'a>(
    cfg: &'a Config,
    env: &str,
    d: &DrillConfig,
) -> Result<(&'a EnvConfig, FailoverLock, Vec<String>), String> {
    let e = cfg.environment(env).map_err(|e| e.to_string())?;
    let lock = FailoverLock::acquire(&e.state_dir(), &format!("{env}-drill"))
        .map_err(|e| e.to_string())?;
    let notes = super::staging::preflight(cfg, env, d)
        .await
        .map_err(|why| {
            format!(
                "refusing to drill into environment {env}, nothing was touched: {}",
                why
            )
        })?;
    Ok((e, lock, notes))
}

fn staging_server<'a, T>(
    servers: &'a BTreeMap<String, toml::Spanned<T>>,
    env: &str,
    kind: &str,
    name: &str,
) -> Result<&'a T, VerifyError> {
    servers
        .get(name)
        .map(|s| s.get_ref())
        .ok_or_else(|| VerifyError::Other(format!("no [env.{env}.{kind}.{name}] to restore into")))
}

/// What `dr drill NAME --dry-run` found: the plan, or why it would be refused.
#[derive(Debug, Clone, Serialize)]
pub struct DrillPlan {
    /// Drill name.
    pub drill: String,
    /// Where the sources would be restored.
    pub environment: String,
    /// Whether the drill would run (every safety check passed).
    pub ok: bool,
    /// What would be done, server by server.
    pub steps: Vec<String>,
    /// Why the drill would be refused.
    pub refused: Vec<String>,
    /// Things to know, e.g. a production server that did not answer.
    pub notes: Vec<String>,
}

/// Runs the safety checks of drill `name` and says what it would do,
/// touching nothing; audited as `drill.dry-run`.
pub async fn dry_run(cfg: &Config, name: &str) -> Result<DrillPlan, VerifyError> {
    let d = cfg.drill(name)?.clone();
    let audit = Audit::begin(
        AuditLog::from_config(cfg),
        "drill.dry-run",
        name,
        serde_json::json!({ "to": d.to, "environment": d.environment }),
    )?;
    let mut plan = DrillPlan {
        drill: name.to_string(),
        environment: d.environment.clone(),
        ok: true,
        steps: Vec::new(),
        refused: Vec::new(),
        notes: Vec::new(),
    };
    match d.staging() {
        Some(env) => {
            plan.steps = super::staging::plan(cfg, env, &d);
            match super::staging::preflight(cfg, env, &d).await {
                Ok(notes) => plan.notes = notes,
                Err(why) => {
                    plan.ok = false;
                    plan.refused = why.0;
                }
            }
        }
        None => {
            plan.steps.extend(
                d.postgres
                    .iter()
                    .map(|n| {
                        format!(
                            "[postgres.{n}]: restore as of {} into a scratch server, check, remove",
                            d.to
                        )
                    })
                    .chain(d.redis.iter().map(|n| {
                        format!(
                            "[redis.{n}]: restore as of {} into a scratch server, check, remove",
                            d.to
                        )
                    }))
                    .chain(d.rabbitmq.iter().map(|n| {
                        format!(
                            "[rabbitmq.{n}]: load the definitions as of {} into a scratch broker, check, remove",
                            d.to
                        )
                    })),
            );
            // A plan that cannot restore anything does not pass.
            match covered(cfg, &d).await {
                Ok(notes) => plan.notes.extend(notes),
                Err(why) => {
                    plan.ok = false;
                    plan.refused = why;
                }
            }
        }
    }
    if let Some(pb) = &d.playbook {
        plan.steps.push(format!(
            "then playbook {pb} on {}",
            d.env
                .as_deref()
                .or(d.staging())
                .unwrap_or("the restored servers")
        ));
    }
    let details = serde_json::to_value(&plan).unwrap_or_default();
    let result = if plan.ok {
        Ok(details)
    } else {
        Err(plan.refused.join("; "))
    };
    let _ = audit.finish(None, result).await;
    Ok(plan)
}

/// Whether the repository holds what a scratch drill restores: a backup
/// and WAL reaching the target for each cluster, a snapshot for each Redis
/// instance. Notes what would be restored, or every reason it could not.
async fn covered(cfg: &Config, d: &DrillConfig) -> Result<Vec<String>, Vec<String>> {
    let target = match d.to.as_str() {
        "latest" => None,
        t => Some(
            crate::time::parse_time(t)
                .map_err(|e| vec![format!("to = {t:?}: {e}")])?
                .0,
        ),
    };
    let repo = Repository::open(cfg)
        .await
        .map_err(|e| vec![format!("the repository cannot be opened: {e}")])?;
    let (mut notes, mut refused) = (Vec::new(), Vec::new());
    for n in &d.postgres {
        match crate::postgres::catalog::Catalog::load(&repo, n).await {
            Ok(cat) => match cat.plan(target, false, Default::default()) {
                Ok(p) => notes.push(format!(
                    "[postgres.{n}]: backup {} on timeline {}",
                    p.backup.id, p.timeline
                )),
                Err(e) => refused.push(format!("[postgres.{n}]: {e}")),
            },
            Err(e) => refused.push(format!("[postgres.{n}]: {e}")),
        }
    }
    for n in &d.redis {
        match crate::redis::restore::RedisCatalog::load(&repo, n).await {
            Ok(cat) => match cat.pick(target) {
                Ok(m) => notes.push(format!("[redis.{n}]: snapshot {}", m.id)),
                Err(e) => refused.push(format!("[redis.{n}]: {e}")),
            },
            Err(e) => refused.push(format!("[redis.{n}]: {e}")),
        }
    }
    for n in &d.rabbitmq {
        match crate::rabbitmq::restore::RabbitCatalog::load(&repo, n).await {
            Ok(cat) => match cat.pick(target) {
                Ok(m) => notes.push(format!("[rabbitmq.{n}]: snapshot {}", m.id)),
                Err(e) => refused.push(format!("[rabbitmq.{n}]: {e}")),
            },
            Err(e) => refused.push(format!("[rabbitmq.{n}]: {e}")),
        }
    }
    if refused.is_empty() {
        Ok(notes)
    } else {
        Err(refused)
    }
}

fn drill_failures(rep: &DrillReport) -> String {
    let mut out: Vec<String> = rep
        .sources
        .iter()
        .filter(|s| !s.ok())
        .map(|s| format!("{} {}: {}", s.kind, s.name, failed_checks(s)))
        .collect();
    out.extend(
        rep.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail)),
    );
    out.join("; ")
}

/// Runs the drill's playbook: on the configured environment, or on the
/// restored scratch servers, named after their sources.
async fn run_playbook(
    cfg: &Config,
    d: &DrillConfig,
    name: &str,
    pb: &str,
    running: &[Option<Running>],
) -> Result<crate::playbook::RunReport, String> {
    let path = crate::playbook::resolve_path(pb, &cfg.source).map_err(|e| e.to_string())?;
    let playbook = Playbook::load(&path).map_err(|e| e.to_string())?;
    let mut cfg = cfg.clone();
    let env = match (&d.env, d.staging()) {
        (Some(e), _) => e.clone(),
        (None, Some(staging)) => staging.to_string(),
        (None, None) => {
            let env = format!("drill-{name}");
            cfg.env.insert(
                env.clone(),
                toml::Spanned::new(0..0, scratch_env(&cfg, d, running)),
            );
            env
        }
    };
    crate::playbook::failover(
        &cfg,
        &playbook,
        &env,
        RunOptions { dry_run: false },
        &crate::playbook::engine::Silent,
    )
    .await
    .map_err(|e| e.to_string())
}

/// An environment whose servers are the drill's scratch servers.
fn scratch_env(cfg: &Config, d: &DrillConfig, running: &[Option<Running>]) -> EnvConfig {
    let mut postgres = BTreeMap::new();
    let mut redis = BTreeMap::new();
    let names = d.postgres.iter().chain(d.redis.iter());
    for (n, r) in names.zip(running) {
        match r {
            Some(Running::Pg(p)) => {
                let t = PgTarget {
                    conninfo: format!(
                        "host={} port={} user={} dbname=postgres sslmode=disable",
                        p.at.host, p.at.port, p.at.user
                    ),
                    replication_conninfo: None,
                    data_dir: Some(p.data.clone()),
                    bin_dir: cfg
                        .pg(Some(n))
                        .map(|c| c.1.bin_dir.clone())
                        .unwrap_or_default(),
                    os_user: cfg
                        .pg(Some(n))
                        .map(|c| c.1.os_user.clone())
                        .unwrap_or_default(),
                };
                postgres.insert(n.clone(), toml::Spanned::new(0..0, t));
            }
            Some(Running::Redis(r)) => {
                let t = RedisTarget::at_url(format!("redis://127.0.0.1:{}", r.port));
                redis.insert(n.clone(), toml::Spanned::new(0..0, t));
            }
            // Scratch brokers have a password of their own that no
            // playbook is given: they are not part of the playbook's env.
            Some(Running::Rabbitmq(_)) | None => {}
        }
    }
    EnvConfig {
        state_dir: Some(d.report_dir.clone()),
        allow_overwrite: false,
        postgres,
        redis,
        rabbitmq: BTreeMap::new(),
    }
}

fn write_files(d: &DrillConfig, rep: &DrillReport) -> Result<Vec<String>, String> {
    let dir = &d.report_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let base = dir.join(format!("{}-{}", rep.drill, rep.id));
    let json = base.with_extension("json");
    let md = base.with_extension("md");
    let body = serde_json::to_vec_pretty(rep).map_err(|e| e.to_string())?;
    std::fs::write(&json, body).map_err(|e| format!("{}: {e}", json.display()))?;
    std::fs::write(&md, markdown(rep)).map_err(|e| format!("{}: {e}", md.display()))?;
    let html = base.with_extension("html");
    std::fs::write(&html, super::html::drill(rep))
        .map_err(|e| format!("{}: {e}", html.display()))?;
    Ok(vec![
        json.display().to_string(),
        md.display().to_string(),
        html.display().to_string(),
    ])
}

/// The report as Markdown, for people and tickets.
pub fn markdown(rep: &DrillReport) -> String {
    let mut s = format!(
        "# Drill `{}` — {}\n\n- id: `{}`\n- started: {}\n- target: `{}`\n- environment: {}\n\n",
        rep.drill,
        if rep.ok { "PASSED" } else { "FAILED" },
        rep.id,
        report::time(Some(rep.started)),
        rep.target,
        rep.environment
    );
    s.push_str("| | RTO | RPO |\n|---|---|---|\n");
    s.push_str(&format!(
        "| objective | {} | {} |\n| achieved | {} | {} |\n",
        rep.objectives
            .rto_seconds
            .map_or("-".into(), |v| format!("{v}s")),
        rep.objectives
            .rpo_seconds
            .map_or("-".into(), |v| format!("{v}s")),
        secs(rep.achieved.rto_seconds),
        secs(rep.achieved.rpo_seconds)
    ));
    for src in &rep.sources {
        s.push_str(&format!(
            "| {} `{}` | {} | {} |\n",
            src.kind,
            src.name,
            secs(src.rto_seconds),
            secs(src.rpo_seconds)
        ));
    }
    s.push('\n');
    for src in &rep.sources {
        s.push_str(&format!(
            "## {} `{}` — {}\n\n",
            src.kind,
            src.name,
            if src.ok() { "ok" } else { "FAILED" },
        ));
        if let Some(server) = &src.staging {
            s.push_str(&format!("restored into {server} (left running)\n\n"));
        }
        s.push_str(&format!(
            "backup `{}`, recovered point {} ({}), target {} ({})\n\n| check | result | detail |\n|---|---|---|\n",
            src.backup.as_deref().unwrap_or("-"),
            report::time(src.recovered_point),
            src.recovered_basis,
            report::time(src.target_time),
            src.target_basis
        ));
        for c in &src.checks {
            s.push_str(&check_row(c));
        }
        s.push('\n');
    }
    if !rep.checks.is_empty() {
        s.push_str("## Drill checks\n\n| check | result | detail |\n|---|---|---|\n");
        for c in &rep.checks {
            s.push_str(&check_row(c));
        }
        s.push('\n');
    }
    s
}

fn check_row(c: &CheckResult) -> String {
    format!(
        "| {} | {} | {} |\n",
        c.name,
        if c.ok { "ok" } else { "**FAIL**" },
        c.detail.replace('|', "\\|").replace('\n', " ")
    )
}
