//! `dr verify rabbitmq --restore`: start a private scratch broker, load the
//! snapshot's definitions into it, check that every vhost, user, permission,
//! exchange, queue, binding, policy and parameter the manifest names is
//! there, run the user checks, and always remove the broker and its
//! directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::report::{CheckResult, SourceReport};
use super::scratch::Scratch;
use crate::config::{DEFAULT_SCRATCH_DIR, RabbitCheck, RabbitConfig};
use crate::rabbitmq::api::Api;
use crate::rabbitmq::definitions;
use crate::rabbitmq::restore::{self, RabbitCatalog};
use crate::rabbitmq::server;
use crate::repo::Repository;

/// How long a scratch broker may take to answer.
const START_LIMIT: Duration = Duration::from_secs(120);

/// Verifies one broker's snapshot end to end; the scratch broker and its
/// directory are gone when this returns.
pub async fn verify(
    repo: &Repository,
    name: &str,
    cfg: &RabbitConfig,
    target: Option<DateTime<Utc>>,
    cancel: &CancellationToken,
) -> SourceReport {
    let t0 = Instant::now();
    let (mut rep, scratch) = restore_and_check(repo, name, cfg, target, t0, cancel).await;
    if let Some(s) = scratch {
        super::record_cleanup(&mut rep, &s).await;
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    rep
}

/// Restores and checks, leaving the scratch broker running for the caller,
/// who must clean the returned scratch up. `t0` is when the recovery started.
pub async fn restore_and_check(
    repo: &Repository,
    name: &str,
    cfg: &RabbitConfig,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    cancel: &CancellationToken,
) -> (SourceReport, Option<Scratch>) {
    let mut rep = new_report(name, target, "verification start (latest)");
    let parent = cfg
        .verify
        .scratch_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_DIR));
    let scratch = match Scratch::create(&parent, "rabbitmq", cfg.os_user.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("scratch directory", e, 0.0));
            return (rep, None);
        }
    };
    rep.scratch_dir = Some(scratch.root().display().to_string());
    let work = run(repo, name, cfg, target, t0, &scratch, &mut rep);
    let interrupted = super::interruptible(work, cancel, t0, super::INTERRUPTED).await;
    rep.checks.extend(interrupted);
    (rep, Some(scratch))
}

async fn run(
    repo: &Repository,
    name: &str,
    cfg: &RabbitConfig,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    scratch: &Scratch,
    rep: &mut SourceReport,
) {
    let fail = |rep: &mut SourceReport, check: &str, why: String| {
        rep.checks
            .push(CheckResult::fail(check, why, t0.elapsed().as_secs_f64()));
    };
    let Some(snap) = fetch(repo, name, target, t0, rep).await else {
        return;
    };
    let started = Instant::now();
    let broker = match server::start_scratch(cfg, scratch.root(), START_LIMIT).await {
        Ok(b) => b,
        Err(e) => return fail(rep, "scratch broker", e.to_string()),
    };
    rep.port = broker.url.rsplit(':').next().and_then(|p| p.parse().ok());
    let start_seconds = started.elapsed().as_secs_f64();
    let api = match broker.api(Duration::from_secs(cfg.timeout_seconds.max(30))) {
        Ok(a) => a,
        Err(e) => return fail(rep, "scratch broker", e.to_string()),
    };
    let into = format!("a scratch broker (RabbitMQ started in {start_seconds:.1}s)");
    load_and_check(&api, &snap, &into, cfg, t0, rep).await;
}

/// A snapshot fetched for loading: its manifest, definitions, the region
/// that served them and how long that took.
pub(super) struct Fetched {
    m: crate::rabbitmq::manifest::RabbitManifest,
    defs: Value,
    region: String,
    seconds: f64,
}

/// Picks and fetches the snapshot; a failure is a `restore` check.
pub(super) async fn fetch(
    repo: &Repository,
    name: &str,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    rep: &mut SourceReport,
) -> Option<Fetched> {
    let t = Instant::now();
    let r = async {
        let cat = RabbitCatalog::load(repo, name)
            .await
            .map_err(|e| e.to_string())?;
        let m = cat.pick(target).map_err(|e| e.to_string())?.clone();
        let (region, defs) = restore::fetch(repo, &m).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Fetched {
            m,
            defs,
            region,
            seconds: t.elapsed().as_secs_f64(),
        })
    }
    .await;
    match r {
        Ok(f) => Some(f),
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("restore", e, t0.elapsed().as_secs_f64()));
            None
        }
    }
}

/// Loads a fetched snapshot into the broker at `api` (shovel and federation
/// URIs pointed at nothing), reads it back, and checks the manifest's items
/// and the user checks; `into` says which broker, for the report.
pub(super) async fn load_and_check(
    api: &Api,
    snap: &Fetched,
    into: &str,
    cfg: &RabbitConfig,
    t0: Instant,
    rep: &mut SourceReport,
) {
    let m = &snap.m;
    let fail = |rep: &mut SourceReport, why: String| {
        rep.checks.push(CheckResult::fail(
            "restore",
            why,
            t0.elapsed().as_secs_f64(),
        ));
    };
    let loaded = Instant::now();
    if let Err(e) = api.load_definitions(&server::neutralised(&snap.defs)).await {
        return fail(rep, format!("{into} refused the definitions: {e}"));
    }
    let live = match api.definitions().await {
        Ok(d) => definitions::scope(&d, m.vhosts.as_deref()),
        Err(e) => return fail(rep, e.to_string()),
    };
    rep.rto_seconds = Some(t0.elapsed().as_secs_f64());
    rep.backup = Some(m.id.clone());
    rep.bytes = m.definitions.plain_size;
    rep.restore_seconds = Some(snap.seconds + loaded.elapsed().as_secs_f64());
    rep.recovered_point = Some(m.time);
    rep.recovered_basis = "snapshot time (when the export was requested)".into();
    rep.set_rpo();
    rep.checks.push(CheckResult::pass(
        "restore",
        format!(
            "snapshot {} ({} bytes from region {}) loaded into {into}",
            m.id, m.definitions.plain_size, snap.region
        ),
        t0.elapsed().as_secs_f64(),
    ));
    rep.checks.push(manifest_items(&m.items, &live));
    for c in &cfg.verify.check {
        rep.checks.push(user_check(api, c).await);
    }
}

/// A report for `name` whose RPO is measured from `target` (or, for
/// latest, from now: `basis` says what now is).
pub(super) fn new_report(name: &str, target: Option<DateTime<Utc>>, basis: &str) -> SourceReport {
    SourceReport::of_snapshot("rabbitmq", name, target, basis)
}

/// Every item the manifest names is on the broker.
fn manifest_items(
    items: &std::collections::BTreeMap<String, Vec<String>>,
    live: &Value,
) -> CheckResult {
    let t = Instant::now();
    let index = definitions::index(live);
    let mut missing = Vec::new();
    let mut total = 0;
    for (kind, names) in items {
        let have = index.get(kind.as_str());
        for n in names {
            total += 1;
            if !have.is_some_and(|h| h.contains_key(n)) {
                missing.push(format!("{} {n}", singular(kind)));
            }
        }
    }
    if missing.is_empty() {
        CheckResult::pass(
            "definitions",
            format!("all {total} items of the manifest are on the restored broker"),
            t.elapsed().as_secs_f64(),
        )
    } else {
        CheckResult::fail(
            "definitions",
            format!(
                "{} of {total} items of the manifest are missing on the restored broker: {}",
                missing.len(),
                missing.join(", ")
            ),
            t.elapsed().as_secs_f64(),
        )
    }
}

fn singular(kind: &str) -> &str {
    match kind {
        "users" => "user",
        "vhosts" => "vhost",
        "permissions" => "permission",
        "topic_permissions" => "topic permission",
        "parameters" => "parameter",
        "global_parameters" => "global parameter",
        "policies" => "policy",
        "queues" => "queue",
        "exchanges" => "exchange",
        "bindings" => "binding",
        other => other,
    }
}

/// A `[[rabbitmq.<n>.verify.check]]` on the restored broker.
pub async fn user_check(api: &Api, c: &RabbitCheck) -> CheckResult {
    let t = Instant::now();
    let segments: Vec<&str> = match c.kind.as_str() {
        "vhost" => vec!["vhosts", &c.item],
        "user" => vec!["users", &c.item],
        "exchange" => vec!["exchanges", &c.vhost, &c.item],
        "queue" => vec!["queues", &c.vhost, &c.item],
        "policy" => vec!["policies", &c.vhost, &c.item],
        other => {
            return CheckResult::fail(&c.name, format!("unknown kind {other:?}"), 0.0);
        }
    };
    let what = match c.kind.as_str() {
        "vhost" | "user" => format!("{} {:?}", c.kind, c.item),
        _ => format!("{} {:?} in vhost {:?}", c.kind, c.item, c.vhost),
    };
    let found = match api.get(&segments).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return CheckResult::fail(
                &c.name,
                format!("{what} does not exist"),
                t.elapsed().as_secs_f64(),
            );
        }
        Err(e) => return CheckResult::fail(&c.name, e.to_string(), t.elapsed().as_secs_f64()),
    };
    let mut wrong = Vec::new();
    for (k, want) in &c.arguments {
        let want = toml_to_json(want);
        let got = found.get("arguments").and_then(|a| a.get(k));
        if got != Some(&want) {
            wrong.push(format!(
                "argument {k} is {} (expected {want})",
                got.map_or("absent".into(), |g| g.to_string())
            ));
        }
    }
    if wrong.is_empty() {
        let args = if c.arguments.is_empty() {
            String::new()
        } else {
            format!(" with {} argument(s) as expected", c.arguments.len())
        };
        CheckResult::pass(
            &c.name,
            format!("{what} exists{args}"),
            t.elapsed().as_secs_f64(),
        )
    } else {
        CheckResult::fail(
            &c.name,
            format!("{what}: {}", wrong.join("; ")),
            t.elapsed().as_secs_f64(),
        )
    }
}

fn toml_to_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}
