//! What a scratch restore proved: per-check outcomes, the recovered point,
//! RPO and RTO. Reports are stored encrypted in the repository so the history
//! of verified restores survives the host that ran them.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

crate::message_error!(
    /// A report that could not be stored in the repository (the run itself stands).
    ReportStoreError
);

/// The outcome of one check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckResult {
    /// What was checked.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen, or why it failed.
    pub detail: String,
    /// Seconds the check took.
    pub seconds: f64,
}

impl CheckResult {
    /// A passed check.
    pub fn pass(name: impl Into<String>, detail: impl Into<String>, seconds: f64) -> CheckResult {
        CheckResult {
            name: name.into(),
            ok: true,
            detail: detail.into(),
            seconds,
        }
    }

    /// A failed check.
    pub fn fail(name: impl Into<String>, detail: impl Into<String>, seconds: f64) -> CheckResult {
        CheckResult {
            name: name.into(),
            ok: false,
            detail: detail.into(),
            seconds,
        }
    }
}

/// One restored source (a PostgreSQL cluster or a Redis instance).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceReport {
    /// `pg` or `redis`.
    pub kind: String,
    /// Config name of the cluster or instance.
    pub name: String,
    /// The target as asked: `latest` or a time.
    pub target: String,
    /// The time RPO is measured from.
    pub target_time: Option<DateTime<Utc>>,
    /// What `target_time` is, in words (it differs for `latest`).
    pub target_basis: String,
    /// Backup or snapshot restored.
    pub backup: Option<String>,
    /// The point the restored data represents.
    pub recovered_point: Option<DateTime<Utc>>,
    /// How `recovered_point` was found.
    pub recovered_basis: String,
    /// Target minus recovered point.
    pub rpo_seconds: Option<f64>,
    /// Start of the restore to the restored server answering queries.
    pub rto_seconds: Option<f64>,
    /// Seconds spent fetching and writing the data.
    pub restore_seconds: Option<f64>,
    /// Bytes restored.
    pub bytes: u64,
    /// Files restored (PostgreSQL).
    pub files: usize,
    /// The scratch directory used (removed afterwards).
    pub scratch_dir: Option<String>,
    /// Loopback port of the scratch server (the staging server's port).
    pub port: Option<u16>,
    /// The staging server restored into, when not a scratch server; it
    /// stays running with the restored data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
    /// Every check, in the order run.
    pub checks: Vec<CheckResult>,
    /// Total seconds, cleanup included.
    pub seconds: f64,
}

impl SourceReport {
    /// An empty report for `kind`/`name`, filled in as the run goes.
    pub fn new(kind: &str, name: &str, target: &str) -> SourceReport {
        SourceReport {
            kind: kind.into(),
            name: name.into(),
            target: target.into(),
            target_time: None,
            target_basis: String::new(),
            backup: None,
            recovered_point: None,
            recovered_basis: String::new(),
            rpo_seconds: None,
            rto_seconds: None,
            restore_seconds: None,
            bytes: 0,
            files: 0,
            scratch_dir: None,
            port: None,
            staging: None,
            checks: Vec::new(),
            seconds: 0.0,
        }
    }

    /// A report of a snapshot source whose RPO is measured from `target`,
    /// or for `latest` from now (`latest_basis` says what now is): the age
    /// of the newest snapshot is what a disaster at this moment would lose.
    pub fn of_snapshot(
        kind: &str,
        name: &str,
        target: Option<DateTime<Utc>>,
        latest_basis: &str,
    ) -> SourceReport {
        let mut rep = SourceReport::new(
            kind,
            name,
            &target.map_or("latest".into(), |t| t.to_rfc3339()),
        );
        (rep.target_time, rep.target_basis) = match target {
            Some(t) => (Some(t), "requested target time".into()),
            None => (Some(Utc::now()), latest_basis.into()),
        };
        rep
    }

    /// True when every check passed.
    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// Sets the RPO from the target and recovered point, when both are known.
    pub fn set_rpo(&mut self) {
        if let (Some(t), Some(r)) = (self.target_time, self.recovered_point) {
            self.rpo_seconds = Some((t - r).num_milliseconds() as f64 / 1000.0);
        }
    }
}

/// One `dr verify --restore` run over one or more sources.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyRun {
    /// Report id (also its repository object name).
    pub id: String,
    /// When the run started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// Whether every source passed every check.
    pub ok: bool,
    /// Each source restored.
    pub sources: Vec<SourceReport>,
}

impl VerifyRun {
    /// Builds the run report; `ok` follows from the sources.
    pub fn new(id: &BackupId, started: DateTime<Utc>, sources: Vec<SourceReport>) -> VerifyRun {
        VerifyRun {
            id: id.to_string(),
            started,
            finished: Utc::now(),
            ok: !sources.is_empty() && sources.iter().all(SourceReport::ok),
            sources,
        }
    }
}

/// Stores `report` encrypted under `key`. The error is phrased for a warning:
/// the verification outcome stands whether or not its copy was stored.
pub async fn store<T: Serialize>(
    repo: &Repository,
    key: &ObjectKey,
    report: &T,
) -> Result<(), ReportStoreError> {
    let body = serde_json::to_vec(report).map_err(|e| format!("cannot encode the report: {e}"))?;
    repo.put_buffer(key, Bytes::from(body), None)
        .await
        .map(|_| ())
        .map_err(|e| {
            ReportStoreError(format!(
                "the report could not be stored in the repository as {key}: {e}"
            ))
        })
}

/// Seconds as people read them in reports.
pub fn secs(v: Option<f64>) -> String {
    match v {
        Some(s) => format!("{s:.2}s"),
        None => "-".into(),
    }
}

/// A compact UTC time for tables.
pub fn time(t: Option<DateTime<Utc>>) -> String {
    match t {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "-".into(),
    }
}

/// Objectives or achievements: recovery time and recovery point, in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rtpo {
    /// Recovery time.
    pub rto_seconds: Option<f64>,
    /// Recovery point.
    pub rpo_seconds: Option<f64>,
}

/// What a drill did and achieved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrillReport {
    /// Report id (also its repository object name and file names).
    pub id: String,
    /// Drill name.
    pub drill: String,
    /// When it started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// Target as configured (`latest` or a time).
    pub target: String,
    /// Where the sources were restored.
    pub environment: String,
    /// Whether every source, the playbook and every objective passed.
    pub ok: bool,
    /// Declared objectives.
    pub objectives: Rtpo,
    /// Achieved overall: RTO until the last source answered (and the
    /// playbook's RTO point), RPO of the worst source.
    pub achieved: Rtpo,
    /// Each source restored.
    pub sources: Vec<SourceReport>,
    /// The failover playbook's run, when one ran.
    pub playbook: Option<serde_json::Value>,
    /// Drill-level checks: playbook, objectives, report files.
    pub checks: Vec<CheckResult>,
    /// The JSON, Markdown and HTML report files written.
    pub files: Vec<String>,
    /// Things to know that did not fail the drill.
    pub warnings: Vec<String>,
}
