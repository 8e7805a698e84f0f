//! `dr check`: is this host ready? Config, every region, the repository
//! descriptor and the identity here; each PostgreSQL cluster in `postgres.rs`.

mod postgres;
mod redis;

use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use serde::Serialize;

use crate::config::Config;
use crate::keys;
use crate::repo::layout::{BackupId, ObjectKey};
use crate::store::Regions;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but something needs attention.
    Warn,
    /// Broken.
    Fail,
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct CheckItem {
    /// What was checked (e.g. `region local`).
    pub name: String,
    /// Result.
    pub status: Status,
    /// Details or guidance.
    pub detail: String,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    /// Every check, in order.
    pub checks: Vec<CheckItem>,
}

impl CheckReport {
    /// True when nothing failed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn push(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(CheckItem {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }
}

/// Runs every check against a loaded (hence valid) config.
pub async fn run(cfg: &Config) -> CheckReport {
    let mut rep = CheckReport { checks: Vec::new() };
    rep.push(
        "config",
        Status::Ok,
        format!(
            "{} ({} region(s), min_regions = {})",
            cfg.source.display(),
            cfg.region_specs.len(),
            cfg.repository.min_regions.get_ref()
        ),
    );
    identity_check(cfg, &mut rep);
    audit_check(cfg, &mut rep);
    let regions = match Regions::from_config(cfg).await {
        Ok(r) => r,
        Err(e) => {
            rep.push("regions", Status::Fail, e.to_string());
            return rep;
        }
    };
    let info_key = ObjectKey::RepoInfo.to_string();
    let mut healthy = 0;
    let mut repo_ids = Vec::new();
    for r in regions.iter() {
        let (ok, id) = region_checks(cfg, r, &info_key, &mut rep).await;
        healthy += usize::from(ok);
        repo_ids.extend(id);
    }
    repo_ids.dedup();
    if repo_ids.len() > 1 {
        rep.push(
            "repository",
            Status::Fail,
            format!(
                "regions hold different repositories: {}",
                repo_ids.join(", ")
            ),
        );
    }
    let min = regions.min_regions();
    let status = if healthy >= min {
        if healthy < regions.len() {
            Status::Warn
        } else {
            Status::Ok
        }
    } else {
        Status::Fail
    };
    let detail = if status == Status::Warn {
        format!(
            "{healthy} of {} regions healthy (min_regions = {min}): degraded, writes still succeed",
            regions.len()
        )
    } else {
        format!(
            "{healthy} of {} regions healthy (min_regions = {min})",
            regions.len()
        )
    };
    rep.push("write quorum", status, detail);
    for (name, pg) in &cfg.postgres {
        for (check, status, detail) in postgres::checks(name, pg.get_ref()).await {
            rep.push(check, status, detail);
        }
    }
    archive_user_checks(cfg, &regions, &mut rep);
    for (name, rc) in &cfg.redis {
        let (status, detail) = redis::check(rc.get_ref()).await;
        rep.push(format!("redis {name}"), status, detail);
    }
    rep
}

/// Checks one region: reachable and writable (or uninitialized but
/// usable), its Object Lock settings, and its repository descriptor.
/// Returns whether it counts towards the write quorum, and its repository id.
async fn region_checks(
    cfg: &Config,
    r: &crate::store::Region,
    info_key: &str,
    rep: &mut CheckReport,
) -> (bool, Option<String>) {
    let mut healthy = false;
    let name = format!("region {}", r.name);
    let t = Instant::now();
    // Read before writing: a region without a repository is reported,
    // never written to (a check must not create a repository).
    let info = r.store.get_bytes(info_key).await;
    let missing = matches!(&info, Err(e) if e.is_not_found());
    // A locked bucket used without object_lock_days: dr's deletes would
    // only add delete markers (objects hidden, storage kept).
    if let crate::store::Store::S3(s3) = r.store.as_ref()
        && !s3.object_lock_configured()
        && s3.bucket_object_lock().await.unwrap_or(false)
    {
        rep.push(
            format!("object lock in {}", r.name),
            Status::Warn,
            format!(
                "{}: the bucket has Object Lock enabled but the region has no object_lock_days; \
                 dr expire would only hide objects behind delete markers and storage would not be \
                 reclaimed; set object_lock_days and object_lock_mode to match the bucket",
                r.store.describe()
            ),
        );
    }
    match &info {
        Ok(_) => match write_probe(r).await {
            Ok((true, note)) => {
                healthy = true;
                rep.push(
                    &name,
                    Status::Ok,
                    format!(
                        "{}: writable, {} ms round trip{note}",
                        r.store.describe(),
                        t.elapsed().as_millis()
                    ),
                );
            }
            Ok((false, _)) => rep.push(
                &name,
                Status::Fail,
                format!(
                    "{}: read back different bytes than written",
                    r.store.describe()
                ),
            ),
            Err(e) => rep.push(&name, Status::Fail, e.to_string()),
        },
        Err(_) if missing => {
            let (status, detail) = uninitialized_region(r).await;
            if status != Status::Fail {
                healthy = true;
            }
            rep.push(&name, status, detail);
        }
        Err(e) => rep.push(&name, Status::Fail, e.to_string()),
    }
    let id = descriptor_checks(cfg, r, info, missing, rep);
    (healthy, id)
}

/// Checks a region's `dr-repo.json`: a supported format, the configured
/// recipients. Returns the repository id it names.
fn descriptor_checks(
    cfg: &Config,
    r: &crate::store::Region,
    info: Result<bytes::Bytes, crate::store::StoreError>,
    missing: bool,
    rep: &mut CheckReport,
) -> Option<String> {
    let mut repo_id = None;
    match info {
        Ok(b) => match serde_json::from_slice::<crate::repo::RepoInfo>(&b) {
            Ok(info) if info.version == crate::repo::FORMAT_VERSION => {
                repo_id = Some(info.id.clone());
                rep.push(
                    format!("repository in {}", r.name),
                    Status::Ok,
                    format!(
                        "id {}, created {}",
                        info.id,
                        info.created.format("%Y-%m-%d %H:%M:%SZ")
                    ),
                );
                let fps: Vec<String> = cfg
                    .repository
                    .recipients
                    .get_ref()
                    .iter()
                    .map(|x| keys::fingerprint(x))
                    .collect();
                if !fps.iter().all(|f| info.recipient_fingerprints.contains(f)) {
                    rep.push(
                        format!("recipients in {}", r.name),
                        Status::Warn,
                        "the configured recipients differ from those at `dr repo init`; older backups need the old identities",
                    );
                }
            }
            Ok(info) => rep.push(
                format!("repository in {}", r.name),
                Status::Fail,
                format!(
                    "format version {} is not supported by this dr (reads {})",
                    info.version,
                    crate::repo::FORMAT_VERSION
                ),
            ),
            Err(e) => rep.push(
                format!("repository in {}", r.name),
                Status::Fail,
                format!("dr-repo.json is not a dr descriptor: {e}"),
            ),
        },
        Err(_) if missing => rep.push(
            format!("repository in {}", r.name),
            Status::Warn,
            "not initialized; run `dr repo init`",
        ),
        Err(e) => rep.push(
            format!("repository in {}", r.name),
            Status::Fail,
            e.to_string(),
        ),
    }
    repo_id
}

/// Writes, reads back and deletes a probe object in a region that holds a
/// repository. Returns whether the bytes came back equal, and a note.
async fn write_probe(r: &crate::store::Region) -> Result<(bool, String), crate::store::StoreError> {
    let probe = ObjectKey::Selftest {
        id: BackupId::new(Utc::now()),
    }
    .to_string();
    let payload = Bytes::from(format!("dr check probe {}", Utc::now().to_rfc3339()));
    let mut note = String::new();
    if let crate::store::Store::S3(s3) = r.store.as_ref() {
        s3.check_object_lock().await?;
    }
    r.store.put_bytes(&probe, payload.clone()).await?;
    let back = r.store.get_bytes(&probe).await?;
    match r.store.delete(&probe).await {
        Err(crate::store::StoreError::Locked { until, .. }) => {
            note = format!("; Object Lock on, probe kept until {until}");
        }
        other => other?,
    }
    Ok((back == payload, note))
}

/// A region that answered "no dr-repo.json": reachable, left untouched.
/// For a directory, says whether `dr repo init` run as this user could
/// create the repository there.
async fn uninitialized_region(r: &crate::store::Region) -> (Status, String) {
    let what = r.store.describe();
    match r.store.as_ref() {
        crate::store::Store::Fs(fs) => {
            let uid = crate::os::current_uid().unwrap_or(u32::MAX);
            let (dir, ok) = crate::os::writable_by(fs.root(), uid);
            if ok {
                (
                    Status::Ok,
                    format!(
                        "{what}: no repository yet (nothing written); `dr repo init` can create it"
                    ),
                )
            } else {
                (
                    Status::Fail,
                    format!(
                        "{what}: this user cannot create it ({} is not writable); create it \
                         and give it to the user that archives, e.g. \
                         `install -d -o postgres -g postgres -m 0750 {}`",
                        dir.display(),
                        fs.root().display()
                    ),
                )
            }
        }
        crate::store::Store::S3(s3) => match s3.check_object_lock().await {
            Ok(()) => (
                Status::Ok,
                format!("{what}: reachable, no repository yet (nothing written)"),
            ),
            Err(e) => (Status::Fail, e.to_string()),
        },
        _ => (
            Status::Ok,
            format!("{what}: reachable, no repository yet (nothing written)"),
        ),
    }
}

/// `archive_command` runs `dr wal-push` as the owner of the data directory:
/// a directory region it cannot write fails every archived segment, which
/// a check run as root would not notice.
fn archive_user_checks(cfg: &Config, regions: &Regions, rep: &mut CheckReport) {
    use std::os::unix::fs::MetadataExt;
    for (name, pg) in &cfg.postgres {
        let pg = pg.get_ref();
        if pg.mode != crate::config::BackupMode::Local || pg.wal != crate::config::WalMode::Archive
        {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&pg.data_dir) else {
            continue; // the cluster check already says why
        };
        let uid = meta.uid();
        let user = crate::os::passwd_entry(uid).map_or(format!("uid {uid}"), |(n, _)| n);
        for r in regions.iter() {
            let crate::store::Store::Fs(fs) = r.store.as_ref() else {
                continue;
            };
            let (dir, ok) = crate::os::writable_by(fs.root(), uid);
            let check = format!("archiving {name} to {}", r.name);
            if ok {
                rep.push(
                    check,
                    Status::Ok,
                    format!(
                        "{} is writable by {user}, who runs archive_command",
                        dir.display()
                    ),
                );
            } else {
                rep.push(
                    check,
                    Status::Fail,
                    format!(
                        "{} is not writable by {user}, who runs archive_command (owner of {}): \
                         every wal-push would fail; run `chown -R {user}: {}`",
                        dir.display(),
                        pg.data_dir.display(),
                        fs.root().display()
                    ),
                );
            }
        }
    }
}

/// Restores, failovers and expiry refuse to run unaudited: find out now,
/// not in an emergency.
fn audit_check(cfg: &Config, rep: &mut CheckReport) {
    // Judged without creating it: a check changes nothing.
    let path = cfg.audit.resolved_path();
    if crate::os::can_append(&path) {
        rep.push("audit log", Status::Ok, path.display().to_string());
    } else {
        rep.push(
            "audit log",
            Status::Fail,
            format!(
                "{} cannot be written by this user; restores and failovers would be \
                 refused. Make it writable, or set [audit] path",
                path.display()
            ),
        );
    }
}

fn identity_check(cfg: &Config, rep: &mut CheckReport) {
    let Some(path) = cfg.identity_file() else {
        rep.push(
            "identity",
            Status::Ok,
            "none configured (backup-only host: encrypts to public keys only)",
        );
        return;
    };
    if !path.exists() {
        rep.push(
            "identity",
            Status::Warn,
            format!(
                "{} does not exist; restores and verification need it",
                path.display()
            ),
        );
        return;
    }
    match keys::load_identities(path) {
        Ok(ids) => {
            let rcpts = cfg.repository.recipients.get_ref();
            let matching = ids
                .iter()
                .filter(|i| rcpts.contains(&i.to_public().to_string()))
                .count();
            if matching == 0 {
                rep.push(
                    "identity",
                    Status::Fail,
                    format!("{}: none of its {} key(s) matches a configured recipient, so it cannot decrypt new backups", path.display(), ids.len()),
                );
            } else {
                rep.push(
                    "identity",
                    Status::Ok,
                    format!(
                        "{}: {matching} key(s) match configured recipients",
                        path.display()
                    ),
                );
            }
        }
        Err(e) => rep.push("identity", Status::Fail, e.to_string()),
    }
}
