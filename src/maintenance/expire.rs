//! `dr expire`: builds retention plans from what the repository holds and
//! carries them out in every region, manifests first.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Config;
use crate::repo::layout::{ObjectKey, WalSegmentName};
use crate::repo::retention::{
    Deletion, Item, PgBackup, PgWal, Policy, Snap, SourcePlan, Stored, may_be_running, plan_pg,
    plan_snapshots,
};
use crate::repo::snapshots::{Catalog, SnapshotManifest, list_objects};
use crate::repo::{RepoError, Repository};
use crate::store::{ObjectInfo, Store, StoreError};

/// Plans every configured source; `[retention] orphan_age` tells a running
/// backup's data from an orphan's.
pub async fn plan(
    repo: &Repository,
    cfg: &Config,
    now: DateTime<Utc>,
) -> Result<Vec<SourcePlan>, RepoError> {
    if !repo.codec.can_decrypt() {
        return Err(RepoError::Other(format!(
            "expire needs the private key: a kept block-incremental backup reads blocks stored \
             under older backups' ids, and the WAL the oldest kept backup needs starts at an LSN, \
             both recorded only in encrypted manifests; deleting by name alone could delete data \
             a kept backup still restores from ({}). Run `dr expire` (or the daemon's \
             [retention] schedule) on a host where identity_file is set",
            repo.codec.cannot_decrypt_because()
        )));
    }
    let orphan_age = cfg.orphan_age();
    let mut out = Vec::new();
    for (name, pg) in &cfg.postgres {
        let policy = pg
            .get_ref()
            .retention
            .as_ref()
            .map(|r| Policy {
                keep: r.keep_full,
                keep_within: r.keep_within,
            })
            .unwrap_or_default();
        out.push(plan_pg_cluster(repo, name, &policy, now, orphan_age).await?);
    }
    for (name, r) in &cfg.redis {
        let policy = snapshot_policy(r.get_ref().retention.as_ref());
        out.push(
            plan_snapshot_source::<crate::redis::manifest::RedisManifest>(
                repo, name, &policy, now, orphan_age,
            )
            .await?,
        );
    }
    for (name, r) in &cfg.rabbitmq {
        let policy = snapshot_policy(r.get_ref().retention.as_ref());
        out.push(
            plan_snapshot_source::<crate::rabbitmq::manifest::RabbitManifest>(
                repo, name, &policy, now, orphan_age,
            )
            .await?,
        );
    }
    Ok(out)
}

fn snapshot_policy(r: Option<&crate::config::RedisRetention>) -> Policy {
    r.map(|r| Policy {
        keep: r.keep_snapshots,
        keep_within: r.keep_within,
    })
    .unwrap_or_default()
}

/// Plans one Redis instance or RabbitMQ broker: its snapshots by their
/// manifests, and every data object and running marker by name.
async fn plan_snapshot_source<M: SnapshotManifest>(
    repo: &Repository,
    name: &str,
    policy: &Policy,
    now: DateTime<Utc>,
    orphan_age: std::time::Duration,
) -> Result<SourcePlan, RepoError> {
    let cat = Catalog::<M>::load(repo, name).await?;
    refuse_unreadable(M::PREFIX, name, &cat.unreadable)?;
    let snaps: Vec<Snap> = cat
        .manifest_keys(name)
        .into_iter()
        .map(|(manifest, m)| Snap {
            item: Item {
                id: m.id().to_string(),
                time: m.time(),
            },
            manifest,
        })
        .collect();
    let stored: Vec<Stored> = list_objects::<M>(repo, name)
        .await?
        .iter()
        .filter_map(|o| {
            let (id, kind) = M::stored_part(&o.key.parse::<ObjectKey>().ok()?)?;
            Some(to_stored(o, id.to_string(), kind))
        })
        .collect();
    Ok(plan_snapshots(
        M::PREFIX,
        name,
        &snaps,
        &stored,
        policy,
        now,
        orphan_age,
    ))
}

/// An unreadable manifest could reference anything: expiring around it could
/// delete data a backup still needs.
fn refuse_unreadable(kind: &str, name: &str, bad: &[(String, String)]) -> Result<(), RepoError> {
    if bad.is_empty() {
        return Ok(());
    }
    Err(RepoError::Other(format!(
        "{kind} {name}: {} manifest(s) cannot be read ({}); nothing is expired until they are \
         (check the identity, or repair with `dr repo sync`)",
        bad.len(),
        bad.iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

fn to_stored(o: &ObjectInfo, id: String, kind: &'static str) -> Stored {
    Stored {
        key: o.key.clone(),
        id,
        kind,
        modified: o.modified,
    }
}

async fn plan_pg_cluster(
    repo: &Repository,
    cluster: &str,
    policy: &Policy,
    now: DateTime<Utc>,
    orphan_age: std::time::Duration,
) -> Result<SourcePlan, RepoError> {
    let cat = crate::postgres::catalog::Catalog::load_backups(repo, cluster)
        .await
        .map_err(|e| RepoError::Other(e.to_string()))?;
    refuse_unreadable("postgres", cluster, &cat.unreadable)?;
    let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
    let mut data = Vec::new();
    let mut wal = Vec::new();
    let mut summaries = Vec::new();
    let mut prefix_summaries = Vec::new();
    for o in &objects {
        match o.key.parse::<ObjectKey>() {
            Ok(ObjectKey::PgData { backup, .. }) => {
                data.push(to_stored(o, backup.to_string(), "data"))
            }
            Ok(ObjectKey::PgStarted { backup, .. }) => {
                data.push(to_stored(o, backup.to_string(), "marker"))
            }
            Ok(ObjectKey::PgSummary { summary, .. }) => {
                summaries.push((summary.backup.to_string(), o.key.clone()))
            }
            Ok(ObjectKey::WalPrefixSummary {
                system_id,
                timeline,
                summary,
                ..
            }) => prefix_summaries.push(((system_id, timeline.0, summary.log), o.key.clone())),
            Ok(ObjectKey::Wal {
                system_id, segment, ..
            }) => wal.push(PgWal {
                key: o.key.clone(),
                system_id,
                pos: (segment.log, segment.seg),
            }),
            _ => {}
        }
    }
    let mut backups = Vec::new();
    for m in &cat.backups {
        let (Some(id), Ok(start)) = (m.backup_id(), m.start_segment.parse::<WalSegmentName>())
        else {
            return Err(RepoError::Other(format!(
                "postgres {cluster}: backup {} has an unparsable id or start segment; not expiring",
                m.id
            )));
        };
        let reads = m
            .objects
            .iter()
            .filter_map(|d| {
                Some(
                    ObjectKey::PgData {
                        cluster: cluster.to_string(),
                        system_id: m.system_id,
                        backup: m.owner(&d.backup)?,
                        n: d.n,
                    }
                    .to_string(),
                )
            })
            .collect();
        backups.push(PgBackup {
            item: Item {
                id: m.id.clone(),
                time: m.stop_time,
            },
            manifest: ObjectKey::PgManifest {
                cluster: cluster.to_string(),
                system_id: m.system_id,
                backup: id,
            }
            .to_string(),
            system_id: m.system_id,
            start_pos: (start.log, start.seg),
            reads,
        });
    }
    let mut plan = plan_pg(cluster, &backups, &data, &wal, policy, now, orphan_age);
    // A backup's summary goes before its manifest: a summary vouches for a
    // manifest, so it must never outlive it by design (a stale one left by
    // a failed delete only costs the planner a manifest read).
    let expiring: Vec<String> = plan
        .deletions
        .iter()
        .filter(|d| d.kind == "manifest")
        .filter_map(|d| match d.key.parse::<ObjectKey>() {
            Ok(ObjectKey::PgManifest { backup, .. }) => Some(backup.to_string()),
            _ => None,
        })
        .collect();
    let mut first: Vec<Deletion> = summaries
        .into_iter()
        .filter(|(id, _)| expiring.contains(id))
        .map(|(id, key)| Deletion {
            key,
            // Part of the manifest's record: deleted with the manifests.
            kind: "manifest".into(),
            why: format!("backup {id} expires (its summary, before its manifest)"),
            orphan: false,
        })
        .collect();
    // A prefix summary says every segment of its prefix exists: it goes
    // before any of them does, with the manifests, so it never outlives one.
    let thinned: std::collections::BTreeSet<(u64, u32, u32)> = plan
        .deletions
        .iter()
        .filter_map(|d| match d.key.parse::<ObjectKey>() {
            Ok(ObjectKey::Wal {
                system_id, segment, ..
            }) => Some((system_id, segment.timeline.0, segment.log)),
            _ => None,
        })
        .collect();
    first.extend(
        prefix_summaries
            .into_iter()
            .filter(|(at, _)| thinned.contains(at))
            .map(|((_, tli, log), key)| Deletion {
                key,
                kind: "manifest".into(),
                why: format!(
                    "WAL prefix {log:08X} of timeline {tli} loses segments (its summary, first)"
                ),
                orphan: false,
            }),
    );
    plan.deletions.splice(0..0, first);
    Ok(plan)
}

/// What happened to one source.
#[derive(Debug, Clone, Serialize)]
pub struct Executed {
    /// The plan carried out.
    pub plan: SourcePlan,
    /// Keys deleted from every region.
    pub deleted: Vec<String>,
    /// Keys kept because S3 Object Lock retention has not expired, with the
    /// region's message.
    pub locked: Vec<(String, String)>,
    /// Keys whose deletion failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Deletions not attempted because a manifest stayed (its backup is
    /// still visible, so its data must stay too).
    pub skipped: usize,
}

/// Deletes what `plan` says in every region: all manifests first; only if
/// every manifest is gone everywhere, the data and WAL.
pub async fn execute(repo: &Repository, plan: SourcePlan) -> Executed {
    let mut ex = Executed {
        plan: plan.clone(),
        deleted: Vec::new(),
        locked: Vec::new(),
        failed: Vec::new(),
        skipped: 0,
    };
    let (manifests, rest): (Vec<&Deletion>, Vec<&Deletion>) =
        plan.deletions.iter().partition(|d| d.kind == "manifest");
    // Summaries vouch for manifests and segments: while one stays, what it
    // names stays too.
    let (summaries, manifests): (Vec<&Deletion>, Vec<&Deletion>) =
        manifests.into_iter().partition(|d| {
            matches!(
                d.key.parse::<ObjectKey>(),
                Ok(ObjectKey::PgSummary { .. } | ObjectKey::WalPrefixSummary { .. })
            )
        });
    for d in summaries {
        delete_everywhere(repo, &d.key, &mut ex).await;
    }
    if !ex.locked.is_empty() || !ex.failed.is_empty() {
        ex.skipped = manifests.len() + rest.len();
        return ex;
    }
    for d in manifests {
        delete_everywhere(repo, &d.key, &mut ex).await;
    }
    if !ex.locked.is_empty() || !ex.failed.is_empty() {
        ex.skipped = rest.len();
        return ex;
    }
    for d in rest {
        delete_everywhere(repo, &d.key, &mut ex).await;
    }
    ex
}

async fn delete_everywhere(repo: &Repository, key: &str, ex: &mut Executed) {
    let mut ok = true;
    for r in repo.regions.iter() {
        match r.store.delete(key).await {
            Ok(()) => {}
            Err(e @ StoreError::Locked { .. }) => {
                ok = false;
                ex.locked
                    .push((key.to_string(), format!("[{}] {e}", r.name)));
            }
            Err(e) => {
                ok = false;
                ex.failed
                    .push((key.to_string(), format!("[{}] {e}", r.name)));
            }
        }
    }
    if ok {
        ex.deleted.push(key.to_string());
    }
}

/// A temp file a killed writer left under an fs region's `.tmp/`.
#[derive(Debug, Clone, Serialize)]
pub struct TempFile {
    /// Region name.
    pub region: String,
    /// File name under `.tmp/`.
    pub name: String,
    /// Last write.
    pub modified: DateTime<Utc>,
}

/// Temp files of every fs region not written for `orphan_age`: a put removes
/// its own temp file, so these belong to writers that were killed. (S3 puts
/// leave nothing under their key; an interrupted multipart upload is the
/// bucket's lifecycle rule's to abort.)
pub async fn stale_temp_files(
    repo: &Repository,
    now: DateTime<Utc>,
    orphan_age: std::time::Duration,
) -> Result<Vec<TempFile>, RepoError> {
    let mut out = Vec::new();
    for r in repo.regions.iter() {
        let Store::Fs(fs) = r.store.as_ref() else {
            continue;
        };
        for (name, modified) in fs.temp_files().await? {
            if let Some(modified) = modified
                && !may_be_running(Some(modified), now, orphan_age)
            {
                out.push(TempFile {
                    region: r.name.clone(),
                    name,
                    modified,
                });
            }
        }
    }
    Ok(out)
}

/// Removes `files`; returns those removed and those that failed, with why.
pub async fn remove_temp_files(
    repo: &Repository,
    files: Vec<TempFile>,
) -> (Vec<TempFile>, Vec<(TempFile, String)>) {
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for f in files {
        let res = match repo.regions.get_region(&f.region).map(|r| r.store.as_ref()) {
            Some(Store::Fs(fs)) => fs.remove_temp(&f.name).await.map_err(|e| e.to_string()),
            _ => Err(format!("region {} is not an fs region", f.region)),
        };
        match res {
            Ok(()) => removed.push(f),
            Err(e) => failed.push((f, e)),
        }
    }
    (removed, failed)
}

/// What an audited `expire` run did.
#[derive(Debug, Serialize)]
pub struct ExpireRun {
    /// Per source: its plan and what was deleted, kept or failed.
    pub expire: Vec<Executed>,
    /// Temp files of killed writers removed.
    pub temp_removed: Vec<TempFile>,
    /// Temp files that could not be removed, with why.
    pub temp_failed: Vec<(TempFile, String)>,
    /// The audit record's id.
    pub audit_id: String,
}

impl ExpireRun {
    /// Every planned deletion and temp file removal succeeded (objects kept
    /// by Object Lock are not failures).
    pub fn ok(&self) -> bool {
        self.expire.iter().all(|r| r.failed.is_empty()) && self.temp_failed.is_empty()
    }

    /// Objects deleted, temp files included.
    pub fn deleted(&self) -> usize {
        self.expire.iter().map(|r| r.deleted.len()).sum::<usize>() + self.temp_removed.len()
    }

    /// The audit record's details: per source, counts and expired ids.
    fn details(&self, by: &str) -> serde_json::Value {
        let sources: Vec<_> = self
            .expire
            .iter()
            .map(|r| {
                serde_json::json!({
                    "source": format!("{}.{}", r.plan.kind, r.plan.name),
                    "deleted": r.deleted.len(), "locked": r.locked.len(),
                    "failed": r.failed.len(), "skipped": r.skipped,
                    "orphans_deleted": r.orphans_deleted(), "running": r.plan.running,
                    "expired": r.plan.decisions.iter().filter(|d| !d.keep).map(|d| &d.id).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "by": by, "sources": sources, "temp_files_removed": self.temp_removed.len(),
            "temp_files_failed": self.temp_failed.len(),
        })
    }
}

impl Executed {
    /// Objects of backups that never wrote a manifest actually deleted.
    pub fn orphans_deleted(&self) -> usize {
        self.plan
            .deletions
            .iter()
            .filter(|d| d.orphan && self.deleted.contains(&d.key))
            .count()
    }
}

/// Why an `expire` run did not run or could not plan.
#[derive(Debug, thiserror::Error)]
pub enum ExpireError {
    /// No audit record could be started, or the repository not opened.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Planning failed (nothing was deleted).
    #[error(transparent)]
    Plan(#[from] RepoError),
}

/// `dr expire` as the CLI and the daemon run it: audited (`by` says who
/// asked), every source planned, every plan carried out, stale temp files
/// removed. Returns the opened repository with the result.
pub async fn run(
    cfg: &Config,
    now: DateTime<Utc>,
    by: &str,
) -> Result<(Repository, ExpireRun), ExpireError> {
    let (audit, repo) = crate::audit::Audit::begin_open(
        cfg,
        "expire",
        "repository",
        serde_json::json!({ "by": by }),
    )
    .await?;
    let planned = match plan(&repo, cfg, now).await {
        Ok(p) => stale_temp_files(&repo, now, cfg.orphan_age())
            .await
            .map(|t| (p, t)),
        Err(e) => Err(e),
    };
    let (plans, temp) = match planned {
        Ok(p) => p,
        Err(e) => {
            audit.finish(Some(&repo), Err(e.to_string())).await;
            return Err(e.into());
        }
    };
    let mut expire = Vec::new();
    for p in plans {
        expire.push(execute(&repo, p).await);
    }
    let (temp_removed, temp_failed) = remove_temp_files(&repo, temp).await;
    let run = ExpireRun {
        expire,
        temp_removed,
        temp_failed,
        audit_id: audit.id(),
    };
    let details = run.details(by);
    let result = if run.ok() {
        Ok(details)
    } else {
        Err(format!("some deletions failed: {details}"))
    };
    let (_, warnings) = audit.finish(Some(&repo), result).await;
    for w in warnings {
        tracing::warn!("{w}");
    }
    Ok((repo, run))
}
