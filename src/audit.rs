//! Append-only audit log: who did what, when, with which arguments, and how it
//! ended. One JSON object per line in a local file, and each finished record
//! also as an encrypted object in the repository so the history survives the
//! host.
//!
//! An operation that must be audited (restore, failover, drill, expire) opens
//! its record *before* acting: if the local log cannot be written, the
//! operation is refused rather than run unaudited.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::repo::Repository;
use crate::repo::layout::{BackupId, ObjectKey};

crate::message_error!(
    /// An audit log that cannot be read back; names the file or the line.
    AuditReadError
);

/// Audit log errors.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The local log could not be appended to.
    #[error(
        "cannot write the audit log {path}: {cause}; the operation was not run. \
         Fix the permissions or set `[audit] path` in the config"
    )]
    Write {
        /// Log file.
        path: PathBuf,
        /// Cause (in the message; not a separate source, so it is said once).
        cause: std::io::Error,
    },
    /// The repository of an audited operation could not be opened (the
    /// failure is in the record).
    #[error(transparent)]
    Repository(#[from] crate::repo::RepoError),
}

/// Who ran the operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Actor {
    /// Login name: `SUDO_USER` when run through sudo, else the passwd name of
    /// the effective uid, else `USER`/`LOGNAME`, else `uid N`.
    pub user: String,
    /// Effective uid.
    pub uid: u32,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
}

impl Actor {
    /// The current process's actor.
    pub fn current() -> Actor {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let uid = crate::os::current_uid().unwrap_or(u32::MAX);
        // USER survives `runuser`/`su` without a login shell, so the passwd
        // name of the effective uid comes first; sudo names the person.
        let user = env("SUDO_USER")
            .or_else(|| crate::os::passwd_entry(uid).map(|(name, _)| name))
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .unwrap_or_else(|| format!("uid {uid}"));
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Actor {
            user,
            uid,
            host,
            pid: std::process::id(),
        }
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Record id (time-sortable; also the repository object name).
    pub id: String,
    /// `started` or `finished`.
    pub phase: String,
    /// When this line was written.
    pub time: DateTime<Utc>,
    /// When the operation started.
    pub started: DateTime<Utc>,
    /// What ran, e.g. `restore.pg`, `restore.redis`, `failover`.
    pub action: String,
    /// What it acted on, e.g. the cluster or environment name.
    pub target: String,
    /// Who ran it.
    pub actor: Actor,
    /// Command line.
    pub args: Vec<String>,
    /// `running`, `ok` or `failed`.
    pub outcome: String,
    /// Failure cause, when failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall time in seconds (finished records).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Operation-specific details (restored backup, steps and gates, …).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

/// The local append-only log.
#[derive(Debug, Clone)]
pub struct AuditLog {
    path: PathBuf,
}

impl AuditLog {
    /// The log configured in `[audit]`.
    pub fn from_config(cfg: &Config) -> AuditLog {
        AuditLog::at(cfg.audit.resolved_path())
    }

    /// A log at `path`.
    pub fn at(path: PathBuf) -> AuditLog {
        AuditLog { path }
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a single write (O_APPEND keeps concurrent writers'
    /// lines whole) and fsyncs it.
    pub fn append(&self, rec: &AuditRecord) -> Result<(), AuditError> {
        let err = |cause| AuditError::Write {
            path: self.path.clone(),
            cause,
        };
        let mut line = serde_json::to_vec(rec).map_err(|e| err(std::io::Error::other(e)))?;
        line.push(b'\n');
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::os::create_private_dir_all(dir).map_err(err)?;
        }
        let mut f = crate::os::private_file()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(err)?;
        f.write_all(&line).map_err(err)?;
        f.sync_data().map_err(err)
    }

    /// Reads every record (for reports and tests). Unparseable lines are
    /// returned as errors naming the line.
    pub fn read_all(&self) -> Result<Vec<AuditRecord>, AuditReadError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| AuditReadError(format!("{}:{}: {e}", self.path.display(), i + 1)))
            })
            .collect()
    }
}

/// An operation in progress. Create it with [`Audit::begin`] before acting and
/// end it with [`Audit::finish`].
#[derive(Debug)]
pub struct Audit {
    log: AuditLog,
    id: BackupId,
    record: AuditRecord,
    clock: Instant,
}

impl Audit {
    /// Writes the `started` record. An error means the operation must not run.
    pub fn begin(
        log: AuditLog,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> Result<Audit, AuditError> {
        let now = Utc::now();
        let id = BackupId::new(now);
        let record = AuditRecord {
            id: id.to_string(),
            phase: "started".into(),
            time: now,
            started: now,
            action: action.into(),
            target: target.into(),
            actor: Actor::current(),
            args: std::env::args().collect(),
            outcome: "running".into(),
            error: None,
            duration_seconds: None,
            details,
        };
        log.append(&record)?;
        Ok(Audit {
            log,
            id,
            record,
            clock: Instant::now(),
        })
    }

    /// Writes the `started` record, then opens the repository the operation
    /// works on; a failure to open it is recorded as the outcome.
    pub async fn begin_open(
        cfg: &Config,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> Result<(Audit, Repository), AuditError> {
        let audit = Audit::begin(AuditLog::from_config(cfg), action, target, details)?;
        match Repository::open(cfg).await {
            Ok(r) => Ok((audit, r)),
            Err(e) => {
                audit.finish(None, Err(e.to_string())).await;
                Err(e.into())
            }
        }
    }

    /// The record id.
    pub fn id(&self) -> String {
        self.id.to_string()
    }

    /// Replaces the details the `finished` record will carry, so a failed
    /// operation can still record what it did before failing.
    pub fn set_details(&mut self, details: serde_json::Value) {
        self.record.details = details;
    }

    /// Writes the `finished` record locally and, when `repo` is given, stores
    /// it in the repository. Returns the record. A failure to store the copy
    /// in the repository is returned as a warning string: the local line is
    /// already durable and the operation's outcome must not be masked by it.
    pub async fn finish(
        mut self,
        repo: Option<&Repository>,
        result: Result<serde_json::Value, String>,
    ) -> (AuditRecord, Vec<String>) {
        let mut warnings = Vec::new();
        self.record.phase = "finished".into();
        self.record.time = Utc::now();
        self.record.duration_seconds = Some(self.clock.elapsed().as_secs_f64());
        match result {
            Ok(details) => {
                self.record.outcome = "ok".into();
                if !details.is_null() {
                    self.record.details = details;
                }
            }
            Err(e) => {
                self.record.outcome = "failed".into();
                self.record.error = Some(e);
            }
        }
        if let Err(e) = self.log.append(&self.record) {
            warnings.push(e.to_string());
        }
        if let Some(repo) = repo {
            let key = ObjectKey::Audit {
                id: self.id.clone(),
            };
            match serde_json::to_vec(&self.record) {
                Ok(body) => {
                    if let Err(e) = repo.put_buffer(&key, Bytes::from(body), None).await {
                        warnings.push(format!(
                            "audit record {} is in {} but could not be stored in the repository: {e}",
                            self.record.id,
                            self.log.path.display()
                        ));
                    }
                }
                Err(e) => warnings.push(format!("cannot encode audit record: {e}")),
            }
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        (self.record, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn begin_and_finish_append_two_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = AuditLog::at(dir.path().join("sub/audit.jsonl"));
        let a = Audit::begin(log.clone(), "restore.pg", "main", serde_json::Value::Null)
            .expect("begin");
        let (rec, warnings) = a.finish(None, Err("boom".into())).await;
        assert!(warnings.is_empty());
        assert_eq!(rec.outcome, "failed");
        let all = log.read_all().expect("read");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].phase, "started");
        assert_eq!(all[1].error.as_deref(), Some("boom"));
        assert_eq!(all[0].id, all[1].id);
    }

    #[test]
    fn unwritable_log_refuses() {
        let log = AuditLog::at(PathBuf::from("/proc/dr-audit-test/audit.jsonl"));
        let err =
            Audit::begin(log, "failover", "prod", serde_json::Value::Null).expect_err("must fail");
        assert!(err.to_string().contains("[audit] path"), "{err}");
    }
}
