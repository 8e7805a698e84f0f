//! Verification by restoring: checksums prove bytes, only a restore that
//! starts and answers queries proves a backup.
//!
//! [`pg`] and [`redis`] restore one source into a [`scratch`] directory,
//! start an isolated server on it and run the [`checks`]; [`run`] does that
//! for several sources, writes the audit records and stores the
//! [`report`] in the repository; [`drill`] restores several sources at once
//! against recovery objectives, into scratch servers or into the servers of
//! a [`staging`] environment. Scratch servers and directories are removed
//! on success, on failure and on cancellation (Ctrl-C / SIGTERM); staging
//! servers stay running on the restored data.

pub mod checks;
pub mod drill;
pub mod html;
pub mod pg;
pub mod rabbitmq;
pub mod rabbitmq_staging;
pub mod redis;
pub mod report;
pub mod scratch;
pub mod staging;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::audit::{Audit, AuditError, AuditLog};
use crate::config::Config;
use crate::postgres::restore::Target;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

pub use report::{CheckResult, SourceReport, VerifyRun};

/// Errors that stop a verification before it acts. Failed checks are not
/// errors: they are outcomes in the report.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The config names something that does not exist.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The audit log could not be written, so nothing was run.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// Anything else, phrased for the user.
    #[error("{0}")]
    Other(String),
}

/// One thing to verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A `[postgres.<name>]` cluster.
    Pg(String),
    /// A `[redis.<name>]` instance.
    Redis(String),
    /// A `[rabbitmq.<name>]` broker.
    Rabbitmq(String),
}

/// Appends the cleanup outcome to a report as a check: a scratch copy left
/// behind is a failure even when everything else passed.
pub(crate) async fn record_cleanup(rep: &mut SourceReport, s: &scratch::Scratch) {
    let t = std::time::Instant::now();
    rep.checks.push(match s.cleanup().await {
        Ok(note) => CheckResult::pass("cleanup", note, t.elapsed().as_secs_f64()),
        Err(e) => CheckResult::fail("cleanup", e, t.elapsed().as_secs_f64()),
    });
}

/// What an `interrupted` check of a scratch restore says.
pub(crate) const INTERRUPTED: &str = "stopped by a signal before the checks finished";

/// Runs `work` unless a signal (`cancel`) comes first; then returns the
/// `interrupted` check to report, saying `why` at `t0`'s elapsed time.
pub(crate) async fn interruptible(
    work: impl std::future::Future<Output = ()>,
    cancel: &CancellationToken,
    t0: std::time::Instant,
    why: &str,
) -> Option<CheckResult> {
    tokio::select! {
        () = work => None,
        () = cancel.cancelled() => Some(CheckResult::fail(
            "interrupted",
            why,
            t0.elapsed().as_secs_f64(),
        )),
    }
}

/// Restores and checks each source in turn (`target` `None` = latest), with
/// an audit record per source, and stores the run's report in the
/// repository. `dr_command` is how PostgreSQL runs `dr` for `wal-fetch`
/// (`/path/to/dr --config /path/to/dr.toml`). Returns the report and
/// warnings (e.g. the report could not be stored).
pub async fn run(
    repo: &Repository,
    cfg: &Config,
    sources: &[Source],
    target: Option<DateTime<Utc>>,
    dr_command: &str,
    cancel: &CancellationToken,
) -> Result<(VerifyRun, Vec<String>), VerifyError> {
    let started = Utc::now();
    let id = BackupId::new(started);
    let mut reports = Vec::new();
    let mut warnings = Vec::new();
    for s in sources {
        if cancel.is_cancelled() {
            break;
        }
        let (action, name) = match s {
            Source::Pg(n) => ("verify.pg", n),
            Source::Redis(n) => ("verify.redis", n),
            Source::Rabbitmq(n) => ("verify.rabbitmq", n),
        };
        let mut audit = Audit::begin(
            AuditLog::from_config(cfg),
            action,
            name,
            serde_json::json!({
                "to": target.map_or("latest".into(), |t| t.to_rfc3339()),
                "report": id.to_string(),
            }),
        )?;
        let rep = match s {
            Source::Pg(n) => {
                let (_, pg) = cfg.pg(Some(n))?;
                let t = target.map_or(Target::Latest, Target::Time);
                pg::verify(repo, n, pg, &t, dr_command, cancel).await
            }
            Source::Redis(n) => {
                let (_, r) = cfg.redis(Some(n))?;
                redis::verify(repo, n, r, target, cancel).await
            }
            Source::Rabbitmq(n) => {
                let (_, r) = cfg.rabbitmq(Some(n))?;
                rabbitmq::verify(repo, n, r, target, cancel).await
            }
        };
        let details = serde_json::to_value(&rep).unwrap_or_default();
        audit.set_details(details.clone());
        let result = if rep.ok() {
            Ok(details)
        } else {
            Err(failed_checks(&rep))
        };
        let (_, w) = audit.finish(Some(repo), result).await;
        warnings.extend(w);
        reports.push(rep);
    }
    let run = VerifyRun::new(&id, started, reports);
    if let Err(e) = report::store(repo, &ObjectKey::VerifyReport { id }, &run).await {
        tracing::warn!("{e}");
        warnings.push(e);
    }
    Ok((run, warnings))
}

/// The failed checks of a report in one line, for audit records.
pub fn failed_checks(rep: &SourceReport) -> String {
    let failed: Vec<String> = rep
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if failed.is_empty() {
        "no check ran".into()
    } else {
        failed.join("; ")
    }
}
