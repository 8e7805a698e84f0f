//! `dr verify redis --restore`: restore a snapshot into a scratch directory,
//! serve it with a loopback `redis-server`, compare key counts with the
//! manifest, run the user checks, and always clean up.

use std::path::PathBuf;
use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::checks;
use super::report::{CheckResult, SourceReport};
use super::scratch::{Scratch, free_port};
use crate::config::{DEFAULT_SCRATCH_DIR, RedisConfig};
use crate::redis::restore::{self, RestoreOptions};
use crate::repo::Repository;

/// A restored instance still running in its scratch directory.
#[derive(Debug)]
pub struct RedisScratch {
    /// The directory (and the server in it).
    pub scratch: Scratch,
    /// Loopback port of the server.
    pub port: u16,
}

/// Verifies one instance end to end; the scratch server and directory are
/// gone when this returns.
pub async fn verify(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    target: Option<DateTime<Utc>>,
    cancel: &CancellationToken,
) -> SourceReport {
    let t0 = Instant::now();
    let (mut rep, scratch) = restore_and_check(repo, instance, cfg, target, t0, cancel).await;
    if let Some(s) = scratch {
        super::record_cleanup(&mut rep, &s.scratch).await;
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    rep
}

/// Restores and checks, leaving the server running for the caller, who must
/// clean the returned scratch up. `t0` is when the recovery started.
pub async fn restore_and_check(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    cancel: &CancellationToken,
) -> (SourceReport, Option<RedisScratch>) {
    let mut rep = new_report(instance, target, "verification start (latest)");
    let parent = cfg
        .verify
        .scratch_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_DIR));
    let scratch = match Scratch::create(&parent, "redis", cfg.os_user.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("scratch directory", e, 0.0));
            return (rep, None);
        }
    };
    rep.scratch_dir = Some(scratch.root().display().to_string());
    let mut out = RedisScratch { scratch, port: 0 };
    let work = run(repo, instance, cfg, target, t0, &mut out, &mut rep);
    let interrupted = super::interruptible(work, cancel, t0, super::INTERRUPTED).await;
    rep.checks.extend(interrupted);
    (rep, Some(out))
}

/// An empty report whose RPO will be measured from `target`, or for
/// `latest` from now (`latest_basis` says what now is): the age of the
/// newest snapshot is what a disaster at this moment would lose.
pub(super) fn new_report(
    instance: &str,
    target: Option<DateTime<Utc>>,
    latest_basis: &str,
) -> SourceReport {
    SourceReport::of_snapshot("redis", instance, target, latest_basis)
}

async fn run(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    out: &mut RedisScratch,
    rep: &mut SourceReport,
) {
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("scratch directory", e, 0.0));
            return;
        }
    };
    out.port = port;
    rep.port = Some(port);
    let opts = RestoreOptions {
        target,
        dir: out.scratch.root().to_path_buf(),
        start: Some(port),
    };
    let progress = crate::progress::Progress::new();
    let r = match restore::restore(repo, instance, cfg, &opts, progress).await {
        Ok(r) => r,
        Err(e) => {
            rep.checks.push(CheckResult::fail(
                "restore",
                e.to_string(),
                t0.elapsed().as_secs_f64(),
            ));
            return;
        }
    };
    // restore() returns once the server answers with the dataset loaded.
    let url = format!("redis://127.0.0.1:{port}");
    record_restore(rep, &r, t0, &url, cfg).await;
}

/// Fills the report from a restore whose server answers at `url` with the
/// dataset loaded (now: the RTO point), then runs the user checks there.
pub(super) async fn record_restore(
    rep: &mut SourceReport,
    r: &restore::RestoreReport,
    t0: Instant,
    url: &str,
    cfg: &RedisConfig,
) {
    rep.rto_seconds = Some(t0.elapsed().as_secs_f64());
    rep.backup = Some(r.snapshot.clone());
    rep.bytes = r.size;
    rep.restore_seconds = Some(r.restore_seconds);
    rep.recovered_point = Some(r.snapshot_time);
    rep.recovered_basis = "snapshot time (when the server forked for the sync)".into();
    rep.set_rpo();
    rep.checks.push(CheckResult::pass(
        "restore",
        format!(
            "snapshot {} ({} bytes from region {}) written in {:.2}s, loaded in {:.2}s",
            r.snapshot,
            r.size,
            r.region,
            r.restore_seconds,
            r.load_seconds.unwrap_or_default()
        ),
        r.restore_seconds + r.load_seconds.unwrap_or_default(),
    ));
    let why = r.key_check.clone().unwrap_or_default();
    rep.checks.push(if r.keys_match == Some(true) {
        CheckResult::pass("key counts", why, 0.0)
    } else {
        CheckResult::fail(
            "key counts",
            format!("the restored server's keyspace disagrees with the manifest: {why}"),
            0.0,
        )
    });
    for c in &cfg.verify.check {
        rep.checks.push(checks::redis_user_check(url, c).await);
    }
}
