//! `dr expire`: builds retention plans from what the repository holds and
//! carries them out in every region, manifests first.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::layout::{ObjectKey, WalSegmentName};
use super::retention::{
    Deletion, Item, PgBackup, PgWal, Policy, RedisSnap, SourcePlan, plan_pg, plan_redis,
};
use super::{RepoError, Repository};
use crate::config::Config;
use crate::store::StoreError;

/// Plans every configured source.
pub async fn plan(
    repo: &Repository,
    cfg: &Config,
    now: DateTime<Utc>,
) -> Result<Vec<SourcePlan>, RepoError> {
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
        out.push(plan_pg_cluster(repo, name, &policy, now).await?);
    }
    for (name, r) in &cfg.redis {
        let policy = r
            .get_ref()
            .retention
            .as_ref()
            .map(|r| Policy {
                keep: r.keep_snapshots,
                keep_within: r.keep_within,
            })
            .unwrap_or_default();
        let cat = crate::redis::restore::RedisCatalog::load(repo, name)
            .await
            .map_err(|e| RepoError::Other(e.to_string()))?;
        refuse_unreadable("redis", name, &cat.unreadable)?;
        let snaps: Vec<RedisSnap> = cat
            .snapshots
            .iter()
            .filter_map(|m| {
                let id = m.id.parse().ok()?;
                let id2 = m.id.parse().ok()?;
                Some(RedisSnap {
                    item: Item {
                        id: m.id.clone(),
                        time: m.time,
                    },
                    manifest: ObjectKey::RedisManifest {
                        instance: name.clone(),
                        snapshot: id,
                    }
                    .to_string(),
                    rdb: ObjectKey::RedisRdb {
                        instance: name.clone(),
                        snapshot: id2,
                    }
                    .to_string(),
                })
            })
            .collect();
        out.push(plan_redis(name, &snaps, &policy, now));
    }
    Ok(out)
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

async fn plan_pg_cluster(
    repo: &Repository,
    cluster: &str,
    policy: &Policy,
    now: DateTime<Utc>,
) -> Result<SourcePlan, RepoError> {
    let cat = crate::postgres::catalog::Catalog::load(repo, cluster)
        .await
        .map_err(|e| RepoError::Other(e.to_string()))?;
    refuse_unreadable("postgres", cluster, &cat.unreadable)?;
    let (_, objects) = repo.regions.list(&format!("pg/{cluster}/")).await?;
    let mut data = Vec::new();
    let mut wal = Vec::new();
    for o in &objects {
        match o.key.parse::<ObjectKey>() {
            Ok(ObjectKey::PgData { .. }) => data.push(o.key.clone()),
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
    Ok(plan_pg(cluster, &backups, &data, &wal, policy, now))
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
